"""`torchrun --nproc-per-node 2` on CPU (gloo): DDP equals one process with the global batch; FSDP2 runs and
resumes. Marked `distributed` (each case starts two Python processes, ~15-30 s)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from typer.testing import CliRunner

from uniperceiver_cli.cli.app import app

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.distributed, pytest.mark.e2e]


def run_cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def latest(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "LATEST").read_text().strip()


def read_weights(step_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(step_dir / "model.safetensors"))


def _recipe(path: Path, batch_size: int, **extra: Any) -> Path:
    recipe: dict[str, Any] = {
        "command": "pretrain",
        "run": {"name": "d", "seed": 5},
        "model": {"preset": "tiny", "layer_scale_init": 0.1},
        # One retrieval task: single-task runs score against every rank's features (gathered with gradients).
        "tasks": [
            {
                "name": "ret",
                "type": "image_retrieval",
                "batch_size": batch_size,
                "max_text_len": 12,
                "data": {"format": "toy", "num_samples": 64},
            }
        ],
        # eps 1 makes Adam's first steps ~linear in the gradient (no sign amplification of rounding noise in
        # near-zero gradients), so the comparison checks the gradients themselves.
        "optim": {"lr": 1.0, "eps": 1.0, "weight_decay": 0.0, "grad_clip": 0.0},
        "schedule": {
            "max_steps": 3,
            "warmup_steps": 0,
            "log_every": 1,
            "checkpoint_every": 1,
            "keep_last": 5,
        },
        "runtime": {"device": "cpu", "threads": 1, "deterministic": True},
    }
    for key, value in extra.items():
        recipe[key] = {**recipe.get(key, {}), **value}
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _torchrun(recipe: Path, out: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    with socket.socket() as sock:  # a free port, so parallel test runs do not collide on 29500
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [
        torchrun,
        "--nproc-per-node",
        "2",
        "--master-port",
        str(port),
        "-m",
        "uniperceiver_cli",
        "pretrain",
        str(recipe),
        "-o",
        str(out),
        *flags,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


def test_ddp_equals_single_process_with_global_batch(tmp_path: Path) -> None:
    single = tmp_path / "single"
    assert (
        run_cli("pretrain", str(_recipe(tmp_path / "one.yaml", 8)), "-o", str(single)).exit_code
        == 0
    )
    ddp = tmp_path / "ddp"
    proc = _torchrun(_recipe(tmp_path / "two.yaml", 4), ddp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = read_weights(latest(single)), read_weights(latest(ddp))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    init = read_weights(latest(single).parent / "step-000001")
    assert not torch.equal(
        a["head.proj.weight"], init["head.proj.weight"]
    )  # training moved the weights
    # Only rank 0 wrote files: one RNG file per rank, one metrics stream.
    assert sorted(p.name for p in latest(ddp).glob("rng-rank*.pt")) == [
        "rng-rank0.pt",
        "rng-rank1.pt",
    ]
    rows = [json.loads(x) for x in (ddp / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "event" not in r] == [1, 2, 3]


def test_fsdp2_runs_and_resumes(tmp_path: Path) -> None:
    recipe = _recipe(
        tmp_path / "fsdp.yaml",
        4,
        runtime={"distributed": "fsdp2"},
        schedule={"max_steps": 2, "checkpoint_every": 1},
    )
    run = tmp_path / "fsdp"
    proc = _torchrun(recipe, run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((latest(run) / "trainer.json").read_text())["step"] == 2
    proc = _torchrun(recipe, run, "--set", "schedule.max_steps=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((latest(run) / "trainer.json").read_text())["step"] == 4
    assert "resuming from" in proc.stderr
    weights = read_weights(latest(run))
    assert weights["embed.word.weight"].shape == (49411, 64)  # full tensors, not shards
