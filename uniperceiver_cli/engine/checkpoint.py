"""Training checkpoints: atomic step folders, keep-last-N, the LATEST pointer, and exact resume.

Layout of `<run>/checkpoints/step-000500/`:

* `model.safetensors` + `config.json` (the `model/checkpoint.py` folder format, so `uniperceiver_cli.load`
  reads a run folder); prompt-tuning runs write `prompt_delta.safetensors` + `prompt_delta.json` instead
  (only the tuned tensors plus a reference to the base checkpoint, see `engine/freeze.py`);
* `heads.safetensors`: prompt-tuning linear heads, when any;
* `optim.pt` (optimizer and gradient-scaler state), `trainer.json` (step, sampler and stream positions,
  counters), `rng-rank<r>.pt` (every rank's RNG states), `recipe.resolved.yaml`.

A checkpoint is written under a temporary name and renamed into place, then `LATEST` (a text file naming the
folder) is replaced atomically, so a crash or `kill -9` at any moment leaves the previous checkpoint intact.
Every `torch.load` is `weights_only=True`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from uniperceiver_cli.engine.runtime import Runtime
from uniperceiver_cli.model.checkpoint import (
    CONFIG_FILE,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    config_to_dict,
)
from uniperceiver_cli.model.config import ModelConfig

logger = logging.getLogger(__name__)

TRAINER_FILE = "trainer.json"
OPTIM_FILE = "optim.pt"
HEADS_FILE = "heads.safetensors"
RECIPE_FILE = "recipe.resolved.yaml"
LATEST_FILE = "LATEST"
TRAINER_FORMAT = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")


class TrainingCheckpointError(Exception):
    """A training checkpoint is missing, incomplete or does not fit this run."""


@dataclass
class TrainingState:
    """Everything besides tensors that a resume needs.

    Attributes:
        step: optimizer steps taken.
        sampler: `TaskSampler.state_dict()`.
        streams: per task, the batch stream state (`seed`, `position`).
        bad_steps: consecutive non-finite steps at save time.
        world_size: processes of the run that wrote it.
        extra: free-form metadata (run name, command, best metrics).
        bad_data: per task, the bad-data monitor state summed over ranks
            (`BadDataMonitor.state_dict`), so counts and limits continue across a resume.
    """

    step: int
    sampler: dict[str, Any]
    streams: dict[str, dict[str, int]]
    bad_steps: int = 0
    world_size: int = 1
    extra: dict[str, Any] | None = None
    bad_data: dict[str, dict[str, Any]] | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict with the format version."""
        return {
            "format_version": TRAINER_FORMAT,
            "step": self.step,
            "sampler": self.sampler,
            "streams": self.streams,
            "bad_steps": self.bad_steps,
            "world_size": self.world_size,
            "extra": self.extra or {},
            "bad_data": self.bad_data or {},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str) -> TrainingState:
        """Parse `to_json` output.

        Raises:
            TrainingCheckpointError: on a wrong version or missing keys.
        """
        if data.get("format_version") != TRAINER_FORMAT:
            raise TrainingCheckpointError(
                f"{where}: trainer format {data.get('format_version')!r} is not {TRAINER_FORMAT}; "
                "resume with the uniperceiver-cli version that wrote it"
            )
        try:
            return cls(
                step=int(data["step"]),
                sampler=dict(data["sampler"]),
                streams={k: dict(v) for k, v in data["streams"].items()},
                bad_steps=int(data.get("bad_steps", 0)),
                world_size=int(data.get("world_size", 1)),
                extra=dict(data.get("extra") or {}),
                bad_data={k: dict(v) for k, v in (data.get("bad_data") or {}).items()},
            )
        except (KeyError, TypeError, ValueError) as e:
            raise TrainingCheckpointError(f"{where}: incomplete trainer state ({e})") from e


def step_dir_name(step: int) -> str:
    """`step-000500`."""
    return f"step-{step:06d}"


def checkpoints_dir(run_dir: Path) -> Path:
    """`<run>/checkpoints`."""
    return run_dir / "checkpoints"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete step folders (with a trainer state), oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found: list[tuple[int, Path]] = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir() and (child / TRAINER_FILE).is_file():
            found.append((int(m.group(1)), child))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The folder `LATEST` names, else the newest complete step folder, else None."""
    root = checkpoints_dir(run_dir)
    pointer = root / LATEST_FILE
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8").strip()
        target = root / name
        if name and (target / TRAINER_FILE).is_file():
            return target
        logger.warning(
            "%s names %r, which is incomplete; using the newest complete checkpoint", pointer, name
        )
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def save_tensors(tensors: Mapping[str, Tensor], path: Path) -> None:
    """Write tensors (contiguous, CPU) as safetensors."""
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path))


def load_tensors(path: Path) -> dict[str, Tensor]:
    """Read a safetensors file to CPU.

    Raises:
        TrainingCheckpointError: when the file is missing or unreadable.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise TrainingCheckpointError(
            f"{path}: cannot read the tensors ({e}); the file may be truncated"
        ) from e


@dataclass
class CheckpointPayload:
    """What one checkpoint holds (rank 0's copy of the sharded/replicated state).

    Attributes:
        model_state: full model state dict (empty for prompt-tuning runs, which write `delta`).
        model_config: the model's configuration.
        optimizer_state: optimizer state dict (plus `scaler` when fp16).
        state: the trainer state.
        recipe_text: the resolved recipe YAML.
        heads_state: prompt-tuning head tensors.
        delta: prompt-tuning delta `(tensors, metadata)` instead of the full weights.
    """

    model_state: Mapping[str, Tensor]
    model_config: ModelConfig
    optimizer_state: dict[str, Any]
    state: TrainingState
    recipe_text: str
    heads_state: Mapping[str, Tensor] | None = None
    delta: tuple[Mapping[str, Tensor], dict[str, Any]] | None = None


def save_checkpoint(
    run_dir: Path,
    payload: CheckpointPayload | None,
    rng_state: dict[str, Any],
    runtime: Runtime,
    *,
    keep_last: int,
) -> Path:
    """Write one checkpoint atomically (every rank calls this; only rank 0 passes `payload`).

    Args:
        run_dir: the run folder.
        payload: rank 0's tensors and state (None on other ranks).
        rng_state: this rank's RNG states.
        runtime: the run's runtime.
        keep_last: complete checkpoints to keep.

    Returns:
        The final step folder.
    """
    from uniperceiver_cli.engine.runtime import broadcast_object

    root = checkpoints_dir(run_dir)
    tmp_name: str | None = None
    step = -1
    if runtime.is_main:
        assert payload is not None
        step = payload.state.step
        root.mkdir(parents=True, exist_ok=True)
        for leftover in root.glob(".step-*.tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        tmp_name = f".{step_dir_name(step)}.tmp-{os.getpid()}-{int(time.time() * 1000)}"
        (root / tmp_name).mkdir()
    tmp_name, step = broadcast_object((tmp_name, step), runtime)
    tmp = root / str(tmp_name)
    torch.save(rng_state, tmp / f"rng-rank{runtime.rank}.pt")
    runtime.barrier()
    final = root / step_dir_name(step)
    if runtime.is_main:
        assert payload is not None
        if payload.delta is not None:
            from uniperceiver_cli.engine.freeze import DELTA_FILE, DELTA_META

            tensors, meta = payload.delta
            save_tensors(tensors, tmp / DELTA_FILE)
            (tmp / DELTA_META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        else:
            save_tensors(payload.model_state, tmp / WEIGHTS_FILE)
        meta_cfg = {
            "format_version": FORMAT_VERSION,
            "model_config": config_to_dict(payload.model_config),
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(meta_cfg, indent=2) + "\n", encoding="utf-8")
        if payload.heads_state:
            save_tensors(payload.heads_state, tmp / HEADS_FILE)
        torch.save(payload.optimizer_state, tmp / OPTIM_FILE)
        (tmp / RECIPE_FILE).write_text(payload.recipe_text, encoding="utf-8")
        # The trainer state is written last: its presence marks the folder as complete.
        (tmp / TRAINER_FILE).write_text(
            json.dumps(payload.state.to_json(), indent=2) + "\n", encoding="utf-8"
        )
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_text_atomic(root / LATEST_FILE, final.name + "\n")
        _prune(run_dir, keep_last, keep=final)
        logger.info("saved checkpoint %s", final)
    runtime.barrier()
    return final


def _prune(run_dir: Path, keep_last: int, *, keep: Path) -> None:
    done = complete_checkpoints(run_dir)
    for old in done[: max(0, len(done) - keep_last)]:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)


@dataclass
class LoadedCheckpoint:
    """A training checkpoint read back for resume.

    Attributes:
        path: the step folder.
        model_state: full weights (None for prompt-tuning deltas).
        delta: prompt-tuning delta tensors (None for full checkpoints).
        heads_state: prompt-tuning head tensors (None when absent).
        optimizer_state: optimizer (and scaler) state.
        state: the trainer state.
        rng_state: this rank's RNG states, or None when that rank's file is absent.
    """

    path: Path
    model_state: dict[str, Tensor] | None
    delta: dict[str, Tensor] | None
    heads_state: dict[str, Tensor] | None
    optimizer_state: dict[str, Any]
    state: TrainingState
    rng_state: dict[str, Any] | None


def load_checkpoint(path: Path, rank: int = 0) -> LoadedCheckpoint:
    """Read a step folder for resume.

    Raises:
        TrainingCheckpointError: on missing or unreadable parts.
    """
    from uniperceiver_cli.engine.freeze import DELTA_FILE

    trainer = path / TRAINER_FILE
    if not trainer.is_file():
        raise TrainingCheckpointError(f"{path}: no {TRAINER_FILE}; the checkpoint is incomplete")
    state = TrainingState.from_json(json.loads(trainer.read_text(encoding="utf-8")), str(trainer))
    model_state = load_tensors(path / WEIGHTS_FILE) if (path / WEIGHTS_FILE).is_file() else None
    delta = load_tensors(path / DELTA_FILE) if (path / DELTA_FILE).is_file() else None
    if model_state is None and delta is None:
        raise TrainingCheckpointError(
            f"{path}: neither {WEIGHTS_FILE} nor {DELTA_FILE}; incomplete checkpoint"
        )
    heads = load_tensors(path / HEADS_FILE) if (path / HEADS_FILE).is_file() else None
    try:
        optim = torch.load(path / OPTIM_FILE, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as e:
        raise TrainingCheckpointError(
            f"{path / OPTIM_FILE}: cannot read the optimizer state ({e})"
        ) from e
    rng_path = path / f"rng-rank{rank}.pt"
    rng = (
        torch.load(rng_path, map_location="cpu", weights_only=True) if rng_path.is_file() else None
    )
    return LoadedCheckpoint(
        path=path,
        model_state=model_state,
        delta=delta,
        heads_state=heads,
        optimizer_state=optim,
        state=state,
        rng_state=rng,
    )


def read_model_config(path: Path) -> ModelConfig:
    """The `ModelConfig` stored in a step folder (or any `save_pretrained` folder)."""
    from uniperceiver_cli.model.checkpoint import read_config

    return read_config(path)
