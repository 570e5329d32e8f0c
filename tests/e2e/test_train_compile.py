"""`runtime.compile` (dense blocks compiled, MoE blocks eager) and TensorBoard event files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from uniperceiver_cli.cli.app import app

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "recipes" / "pretrain" / "quickstart.yaml"
SHORT = [
    "--set",
    "schedule.max_steps=6",
    "--set",
    "schedule.warmup_steps=1",
    "--set",
    "schedule.eval_every=null",
    "--set",
    "schedule.checkpoint_every=null",
    "--set",
    "schedule.log_every=1",
]


@pytest.mark.slow
@pytest.mark.parametrize("moe", [True, False], ids=["moe", "dense"])
def test_compiled_training_runs_and_logs(tmp_path: Path, moe: bool) -> None:
    extra = [] if moe else ["--set", "model.moe=null"]
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "pretrain",
            str(QUICKSTART),
            *SHORT,
            *extra,
            "--set",
            "runtime.compile=true",
            "-o",
            str(out),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in lines if "loss" in json.dumps(row) and row.get("step")]
    assert steps, lines[:3]
    pytest.importorskip("tensorboard")
    assert list((out / "tensorboard").glob("events.out.tfevents.*")), (
        "no TensorBoard event file written"
    )
