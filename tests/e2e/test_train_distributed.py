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
                "eval_data": {"format": "toy", "split": "val", "num_samples": 12},
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


def _torchrun(
    recipe: Path, out: Path, *flags: str, nproc: int = 2
) -> subprocess.CompletedProcess[str]:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    with socket.socket() as sock:  # a free port, so parallel test runs do not collide on 29500
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [
        torchrun,
        "--nproc-per-node",
        str(nproc),
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
    # Validation ran once (at the end), on rank 0 over the whole split, while rank 1 waited.
    val = [r for r in rows if r.get("event") == "validation"]
    assert len(val) == 1
    counts = [v for k, v in val[0].items() if k.endswith("count")]
    assert not counts or counts == [12.0] * len(counts)
    assert any(k.startswith("ret/") or k.startswith("val/ret/") for k in val[0])


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


def _mlm_recipe(path: Path, batch_size: int) -> Path:
    """One MLM task: ranks see different numbers of masked tokens, so per-rank means would differ."""
    recipe: dict[str, Any] = {
        "command": "pretrain",
        "run": {"name": "m", "seed": 11},
        "model": {"preset": "tiny", "layer_scale_init": 0.1},
        "tasks": [
            {
                "name": "mlm",
                "type": "mlm",
                "batch_size": batch_size,
                "max_text_len": 24,
                "vocab_negatives": 64,
                "data": {"format": "toy", "num_samples": 64},
            }
        ],
        "optim": {"lr": 1.0, "eps": 1.0, "weight_decay": 0.0, "grad_clip": 0.0},
        "schedule": {"max_steps": 2, "warmup_steps": 0, "log_every": 1, "checkpoint_every": 1},
        "runtime": {"device": "cpu", "threads": 1, "deterministic": True},
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_ddp_token_losses_average_over_the_global_batch(tmp_path: Path) -> None:
    single = tmp_path / "single"
    result = run_cli("pretrain", str(_mlm_recipe(tmp_path / "one.yaml", 8)), "-o", str(single))
    assert result.exit_code == 0, result.output
    ddp = tmp_path / "ddp"
    proc = _torchrun(_mlm_recipe(tmp_path / "two.yaml", 4), ddp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = read_weights(latest(single)), read_weights(latest(ddp))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    # The logged MLM loss is the global-batch mean on every rank, the single process's value.
    rows_a = [json.loads(x) for x in (single / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (ddp / "metrics.jsonl").read_text().splitlines()]
    first_a = next(r for r in rows_a if r.get("step") == 1 and "event" not in r)
    first_b = next(r for r in rows_b if r.get("step") == 1 and "event" not in r)
    assert first_b["ce/mlm"] == pytest.approx(first_a["ce/mlm"], rel=1e-5)


def _ep_recipe(path: Path, batch_size: int, **schedule: Any) -> Path:
    """Token-routed MoE with experts split over groups of 2 ranks; no capacity drops, no batch-level aux
    losses (the balance loss is a per-rank statistic), no router noise, so W ranks = 1 process exactly."""
    recipe: dict[str, Any] = {
        "command": "pretrain",
        "run": {"name": "ep", "seed": 7},
        "model": {
            "preset": "tiny",
            "layer_scale_init": 0.1,
            "moe": {
                "routing": "token",
                "num_experts": 4,
                "top_k": 2,
                "layers": "all",
                "noise": "none",
                "capacity_factor": 4.0,
                "balance_loss_weight": 0.0,
                "z_loss_weight": 0.0,
                "expert_parallel_size": 2,
            },
        },
        "tasks": [
            {
                "name": "cls",
                "type": "image_classification",
                "batch_size": batch_size,
                "data": {"format": "toy", "num_samples": 64},
            }
        ],
        "optim": {"lr": 1.0e-2, "eps": 1.0, "weight_decay": 0.0, "grad_clip": 1.0},
        "schedule": {
            "max_steps": 3,
            "warmup_steps": 0,
            "decay": "constant",  # the learning rate does not depend on max_steps (resume check)
            "log_every": 1,
            "checkpoint_every": 1,
            "keep_last": 5,
            **schedule,
        },
        "runtime": {"device": "cpu", "threads": 1, "deterministic": True},
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_expert_parallel_training_checkpoints_full_experts_and_resumes(tmp_path: Path) -> None:
    # One process keeps every expert (expert_parallel_size has nothing to split over): the reference.
    single = tmp_path / "single"
    result = run_cli("pretrain", str(_ep_recipe(tmp_path / "one.yaml", 8)), "-o", str(single))
    assert result.exit_code == 0, result.output
    ep = tmp_path / "ep"
    recipe = _ep_recipe(tmp_path / "two.yaml", 4)
    proc = _torchrun(recipe, ep)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sharded over groups of 2 ranks" in " ".join(proc.stderr.split())  # log lines wrap
    a, b = read_weights(latest(single)), read_weights(latest(ep))
    assert a.keys() == b.keys()
    experts = [k for k in b if k.endswith("experts.weight")]
    assert experts and all(b[k].shape[0] == 4 for k in experts)  # gathered: all 4 experts saved
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    first = read_weights(latest(single).parent / "step-000001")
    assert any(not torch.equal(a[k], first[k]) for k in experts)  # the experts trained
    # Adam moments of the experts are saved whole too.
    moments = torch.load(latest(ep) / "optim.pt", weights_only=True)["optimizer"]["state"]
    assert {tuple(v["exp_avg"].shape)[:1] for v in moments.values() if v["exp_avg"].dim() == 3} == {
        (4,)
    }
    # Resume: 2 steps, then continue to 3 under expert parallelism = the straight 3-step run.
    resumed = tmp_path / "resumed"
    proc = _torchrun(recipe, resumed, "--set", "schedule.max_steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _torchrun(recipe, resumed)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stderr
    c = read_weights(latest(resumed))
    for k in b:
        torch.testing.assert_close(c[k], b[k], rtol=0, atol=0, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.slow
def test_two_expert_parallel_groups_equal_one_process(tmp_path: Path) -> None:
    """4 ranks = 2 expert-parallel groups of 2 (experts replicated across the groups, their gradients
    reduced over the expert data-parallel group) against one process with the global batch."""
    single = tmp_path / "single"
    result = run_cli("pretrain", str(_ep_recipe(tmp_path / "one.yaml", 8)), "-o", str(single))
    assert result.exit_code == 0, result.output
    ep = tmp_path / "ep"
    proc = _torchrun(_ep_recipe(tmp_path / "four.yaml", 2), ep, nproc=4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sharded over groups of 2 ranks" in " ".join(proc.stderr.split())  # log lines wrap
    a, b = read_weights(latest(single)), read_weights(latest(ep))
    assert a.keys() == b.keys()
    experts = [k for k in b if k.endswith("experts.weight")]
    assert experts and all(b[k].shape[0] == 4 for k in experts)
    first = read_weights(latest(single).parent / "step-000001")
    assert any(not torch.equal(a[k], first[k]) for k in experts)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
