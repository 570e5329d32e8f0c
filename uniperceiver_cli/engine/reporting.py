"""Training output on rank 0: a Rich progress bar in a terminal, plain log lines otherwise, `metrics.jsonl`
per step (the source of truth for curves), and TensorBoard event files when `tensorboard` is installed.

Non-zero ranks get a `Reporter` that does nothing, so the loop never branches on the rank to log.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


class MetricSink(Protocol):
    """Something that records one metrics record per step."""

    def write(self, record: Mapping[str, Any]) -> None:
        """Record one step."""
        ...

    def close(self) -> None:
        """Flush and release."""
        ...


class JsonlSink:
    """Append one JSON object per line to `<run>/metrics.jsonl`.

    On resume, records of steps after the resumed step (written by the interrupted run after its last
    checkpoint) are dropped first, so the file describes exactly the steps of the final parameters.

    Args:
        path: the file.
        resume_step: the step training resumes from (None = start a fresh file).
    """

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            path.write_text("", encoding="utf-8")
        elif path.is_file():
            kept = []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    if int(json.loads(line).get("step", 0)) <= resume_step:
                        kept.append(line)
                except (ValueError, AttributeError):
                    continue
            path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
        self._fh = path.open("a", encoding="utf-8")

    def write(self, record: Mapping[str, Any]) -> None:
        """Append one record (non-finite floats become null)."""
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()
        }
        self._fh.write(json.dumps(clean, sort_keys=False) + "\n")
        self._fh.flush()

    def close(self) -> None:
        """Close the file."""
        self._fh.close()


class TensorBoardSink:
    """Scalars to TensorBoard event files under `<run>/tensorboard` (only with the extra installed)."""

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, record: Mapping[str, Any]) -> None:
        """Write every numeric field as a scalar at `record['step']`."""
        step = int(record.get("step", 0))
        for k, v in record.items():
            if k != "step" and isinstance(v, int | float) and math.isfinite(float(v)):
                self._writer.add_scalar(k, float(v), step)

    def close(self) -> None:
        """Flush and close."""
        self._writer.close()


def tensorboard_available() -> bool:
    """True when the `tensorboard` package is importable."""
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def interactive() -> bool:
    """Progress bars only in a terminal and outside CI."""
    return sys.stderr.isatty() and not os.environ.get("CI")


class Reporter:
    """Rank-0 progress, log lines and metric sinks.

    Args:
        run_dir: the run folder.
        max_steps: total steps (ETA).
        log_every: steps between plain log lines.
        start_step: first step of this process (resume).
        enabled: False on non-zero ranks.
        resume_step: keep metrics up to this step (resume), else start fresh.
        progress: show a Rich progress bar (default: in a terminal).
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        max_steps: int,
        log_every: int,
        start_step: int = 0,
        enabled: bool = True,
        resume_step: int | None = None,
        progress: bool | None = None,
    ) -> None:
        self.enabled = enabled
        self.max_steps = max_steps
        self.log_every = log_every
        self.start_step = start_step
        self.sinks: list[MetricSink] = []
        self._t0 = time.perf_counter()
        self._last_t = self._t0
        self._window: dict[str, list[float]] = {}
        self._progress: Any = None
        self._task_id: Any = None
        if not enabled:
            return
        self.sinks.append(JsonlSink(run_dir / METRICS_FILE, resume_step))
        if tensorboard_available():
            try:
                self.sinks.append(TensorBoardSink(run_dir / "tensorboard"))
            except ImportError as e:
                logger.debug("TensorBoard sink unavailable: %s", e)
        if interactive() if progress is None else progress:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            from uniperceiver_cli.cli.render import stderr_console

            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=stderr_console(),
                transient=False,
            )
            self._progress.start()
            self._task_id = self._progress.add_task(
                "train", total=max_steps, completed=start_step, info=""
            )

    def step(self, record: Mapping[str, Any]) -> None:
        """Record one optimizer step (`step`, `task`, `loss`, `lr`, `grad_norm`, `tokens_per_s`, ...)."""
        if not self.enabled:
            return
        for sink in self.sinks:
            sink.write(record)
        task = str(record.get("task", ""))
        loss = record.get(f"loss/{task}", record.get("loss"))
        if isinstance(loss, float) and math.isfinite(loss):
            self._window.setdefault(task, []).append(loss)
        step = int(record["step"])
        if self._progress is not None:
            info = (
                f"step {step} · {task} · loss {record.get('loss', float('nan')):.4f} · "
                f"lr {record.get('lr', 0.0):.2e} · {record.get('tokens_per_s', 0.0):,.0f} tok/s"
            )
            self._progress.update(self._task_id, completed=step, info=info)
        if step % self.log_every == 0 or step == self.max_steps:
            now = time.perf_counter()
            done = step - self.start_step
            eta = (now - self._t0) / max(1, done) * (self.max_steps - step)
            means = " ".join(f"{t}={sum(v) / len(v):.4f}" for t, v in sorted(self._window.items()))
            message = "step %d/%d  lr %.2e  grad %.3f  %s  %.0f tok/s  eta %.0fs"
            args = (
                step,
                self.max_steps,
                float(record.get("lr", 0.0)),
                float(record.get("grad_norm", float("nan"))),
                means,
                float(record.get("tokens_per_s", 0.0)),
                eta,
            )
            if self._progress is not None:
                self._progress.console.log(message % args)
            else:
                logger.info(message, *args)
            self._window.clear()
            self._last_t = now

    def event(self, record: Mapping[str, Any]) -> None:
        """Record a non-step event (evaluation results) in the sinks and the log."""
        if not self.enabled:
            return
        for sink in self.sinks:
            sink.write(record)
        shown = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
        )
        logger.info("%s", shown)

    def close(self) -> None:
        """Stop the progress bar and close the sinks."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        for sink in self.sinks:
            sink.close()
        self.sinks = []
