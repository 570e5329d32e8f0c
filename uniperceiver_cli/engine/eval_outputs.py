"""Evaluation results and outputs: `TaskResult`, `EvalResult`, `--fail-under` thresholds, metrics.json and predictions."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from uniperceiver_cli.engine.eval_tasks import CAPTION_TYPES, EvalError


@dataclass
class TaskResult:
    """What evaluating one task produced.

    Attributes:
        name: task name.
        type: task type.
        metrics: metric name -> value (fractions).
        num_items: images, videos or sentences evaluated.
        num_texts: captions ranked (retrieval) or references (captioning), else None.
        seconds: wall time.
        protocol: protocol fields that applied.
        implementation: which code computed the metrics, with versions.
        split: data split.
        data_format: data format.
        predictions: captions in COCO result format, classification/cloze top predictions, or None.
        ranks: retrieval top-k rows and ranks of the positives, or None.
    """

    name: str
    type: str
    metrics: dict[str, float]
    num_items: int
    num_texts: int | None = None
    seconds: float = 0.0
    protocol: dict[str, Any] = field(default_factory=dict)
    implementation: dict[str, Any] = field(default_factory=dict)
    split: str = ""
    data_format: str = ""
    predictions: list[dict[str, Any]] | None = None
    ranks: dict[str, Any] | None = None

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary without the predictions."""
        return {
            "type": self.type,
            "split": self.split,
            "data_format": self.data_format,
            "num_items": self.num_items,
            "num_texts": self.num_texts,
            "seconds": round(self.seconds, 3),
            "protocol": self.protocol,
            "implementation": self.implementation,
        }


class EvalResult(dict[str, float]):
    """Flat metrics `{"<task>/<metric>": value}`, plus per-task results and run metadata.

    It is a plain `dict` of floats so that callers that only want numbers (the training loop) can log it.

    Attributes:
        tasks: task name -> `TaskResult`, in evaluation order.
        metadata: checkpoint, device, precision, versions, vocabulary cache use.
    """

    def __init__(self, tasks: Mapping[str, TaskResult], metadata: Mapping[str, Any]) -> None:
        """Flatten the task metrics."""
        super().__init__(
            {f"{name}/{k}": float(v) for name, res in tasks.items() for k, v in res.metrics.items()}
        )
        self.tasks: dict[str, TaskResult] = dict(tasks)
        self.metadata: dict[str, Any] = dict(metadata)

    def nested(self) -> dict[str, dict[str, float]]:
        """Metrics by task: `{task: {metric: value}}`."""
        return {name: dict(res.metrics) for name, res in self.tasks.items()}

    def to_json(self) -> dict[str, Any]:
        """The content of `metrics.json`."""
        return {
            "format_version": 1,
            **self.metadata,
            "metrics": self.nested(),
            "tasks": {name: res.summary() for name, res in self.tasks.items()},
        }


# ---------------------------------------------------------------------------------------------- thresholds


@dataclass(frozen=True)
class FailUnder:
    """One `--fail-under METRIC=VALUE` threshold.

    Attributes:
        metric: `metric` (every task that reports it) or `task/metric`.
        value: the minimum accepted value (same scale as the reported metric).
    """

    metric: str
    value: float


def parse_fail_under(items: Sequence[str]) -> list[FailUnder]:
    """Parse `METRIC=VALUE` strings.

    Raises:
        EvalError: a malformed item, naming it and the expected form.
    """
    out: list[FailUnder] = []
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not sep or not name or math.isnan(number):
            raise EvalError(
                f"--fail-under {item!r}: expected METRIC=VALUE with a number, e.g. r1_i2t=0.5 "
                "or toy_retrieve/r1_i2t=0.5"
            )
        out.append(FailUnder(name, number))
    return out


def _threshold_targets(threshold: FailUnder, available: Mapping[str, Sequence[str]]) -> list[str]:
    """Flat names `task/metric` a threshold applies to, given each task's metric names."""
    task, sep, metric = threshold.metric.rpartition("/")
    if sep:
        if task in available and metric in available[task]:
            return [threshold.metric]
        return []
    return [
        f"{t}/{threshold.metric}" for t, names in available.items() if threshold.metric in names
    ]


def check_fail_under(
    thresholds: Sequence[FailUnder], available: Mapping[str, Sequence[str]]
) -> None:
    """Check that every threshold names a metric some task reports (before or after a run).

    Args:
        thresholds: parsed thresholds.
        available: task name -> metric names it reports (or can report).

    Raises:
        EvalError: for an unknown metric, listing the known names.
    """
    for th in thresholds:
        if not _threshold_targets(th, available):
            known = sorted({m for names in available.values() for m in names})
            tasks = ", ".join(available)
            raise EvalError(
                f"--fail-under {th.metric}: no evaluated task reports this metric; known metrics: "
                f"{', '.join(known)} (prefix with a task name to pick one task: {tasks})"
            )


def failed_thresholds(result: EvalResult, thresholds: Sequence[FailUnder]) -> list[dict[str, Any]]:
    """Thresholds that the result falls short of, as `{metric, value, threshold}` records.

    Raises:
        EvalError: a threshold names a metric the result does not have.
    """
    available = {name: list(res.metrics) for name, res in result.tasks.items()}
    check_fail_under(thresholds, available)
    failures: list[dict[str, Any]] = []
    for th in thresholds:
        for flat in _threshold_targets(th, available):
            if result[flat] < th.value:
                failures.append({"metric": flat, "value": result[flat], "threshold": th.value})
    return failures


# ---------------------------------------------------------------------------------------------- outputs


def _write_json(path: Path, payload: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


def write_outputs(result: EvalResult, output_dir: str | Path) -> list[Path]:
    """Write `metrics.json` and the predictions of every task.

    Files: `metrics.json`; `<task>.captions.json` (COCO result format `[{image_id, caption}]`);
    `<task>.ranks.json` (retrieval: top-10 rows both ways and the rank of the best positive);
    `<task>.predictions.json` (classification top-5 / cloze predictions).

    Returns:
        The files written.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "metrics.json"]
    _write_json(written[0], result.to_json())
    for name, res in result.tasks.items():
        if res.type in CAPTION_TYPES and res.predictions is not None:
            path = out / f"{name}.captions.json"
            _write_json(path, res.predictions)
            written.append(path)
        elif res.ranks is not None:
            path = out / f"{name}.ranks.json"
            _write_json(path, res.ranks)
            written.append(path)
        elif res.predictions is not None:
            path = out / f"{name}.predictions.json"
            _write_json(path, res.predictions)
            written.append(path)
    return written


def task_result_dict(res: TaskResult) -> dict[str, Any]:
    """A `TaskResult` as plain data (with predictions), for tests and tools."""
    return asdict(res)
