"""What a training run returns and raises: `TrainResult`, the `TrainingError` family, `user_errors`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uniperceiver_cli.data.errors import DataError
from uniperceiver_cli.engine.checkpoint import TrainingCheckpointError
from uniperceiver_cli.engine.data import TaskDataError
from uniperceiver_cli.engine.freeze import ParamRow


class TrainingError(RuntimeError):
    """The run started but cannot continue (exit code 1)."""


class RunFolderInUseError(TrainingError):
    """`resume=False` was asked for a run folder that already holds checkpoints (exit code 2, nothing written)."""


class TrainingDivergedError(TrainingError):
    """Too many consecutive steps had a non-finite loss or gradient."""


class TrainingInterrupted(Exception):  # noqa: N818 - a requested stop, not an error
    """SIGINT stopped the run after saving a checkpoint (exit code 130).

    Attributes:
        result: what the run had reached.
    """

    def __init__(self, result: TrainResult) -> None:
        super().__init__(f"interrupted at step {result.step}; checkpoint {result.checkpoint}")
        self.result = result


@dataclass
class TrainResult:
    """What a training run produced.

    Attributes:
        run_dir: the run folder.
        command: `pretrain`, `finetune` or `prompt_tune`.
        step: optimizer steps completed.
        max_steps: steps the recipe asked for.
        checkpoint: the last checkpoint folder written.
        resumed_from: the checkpoint the run resumed from, if any.
        metrics: final validation metrics (`val/<task>/<metric>`).
        losses: mean training loss per task over the last `log_every` steps of each task.
        seconds: wall time of the loop.
        trainable_parameters: scalars trained.
        total_parameters: scalars in the model (and heads).
        parameter_table: prompt tuning: trainable vs frozen per module.
        interrupted: stopped by SIGINT.
        rank: the process that produced this result (only rank 0 renders it).
    """

    run_dir: Path
    command: str
    step: int
    max_steps: int
    checkpoint: Path | None
    resumed_from: Path | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    losses: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    trainable_parameters: int = 0
    total_parameters: int = 0
    parameter_table: list[ParamRow] | None = None
    interrupted: bool = False
    rank: int = 0

    def to_json(self) -> dict[str, Any]:
        """JSON-ready summary."""
        out = dataclasses.asdict(self)
        out["run_dir"] = str(self.run_dir)
        out["checkpoint"] = str(self.checkpoint) if self.checkpoint else None
        out["resumed_from"] = str(self.resumed_from) if self.resumed_from else None
        return out


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors a run reports as a clean message (exit 1) instead of a traceback."""
    from uniperceiver_cli.engine.build import InitCheckpointError
    from uniperceiver_cli.engine.expert_parallel import ExpertParallelSetupError
    from uniperceiver_cli.engine.freeze import PromptDeltaError
    from uniperceiver_cli.engine.runtime import RuntimeSetupError
    from uniperceiver_cli.model.checkpoint import CheckpointError

    return (
        TrainingError,
        TrainingCheckpointError,
        DataError,
        TaskDataError,
        InitCheckpointError,
        PromptDeltaError,
        RuntimeSetupError,
        CheckpointError,
        ExpertParallelSetupError,
    )
