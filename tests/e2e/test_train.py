"""`uniperceiver pretrain / finetune / prompt-tune` end to end on the toy world with the tiny preset.

Each run is a handful of steps of a 2-layer model; the subprocess tests (kill -9, SIGINT) start a fresh Python
and are marked `slow` except the SIGINT one.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from typer.testing import CliRunner

from uniperceiver_cli.cli.app import app
from uniperceiver_cli.cli.exit_codes import ExitCode

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.e2e


def tiny_recipe(path: Path, *, command: str = "pretrain", **sections: Any) -> Path:
    """Write a small recipe (4 toy tasks, tiny MoE model, 6 steps) with `sections` merged in."""
    recipe: dict[str, Any] = {
        "command": command,
        "run": {"name": "t", "seed": 3},
        "model": {"preset": "tiny", "moe": {"num_experts": 4, "top_k": 2, "layers": "every_other"}},
        "tasks": [
            {
                "name": "cls",
                "type": "image_classification",
                "batch_size": 8,
                "data": {"format": "toy", "num_samples": 32},
                "eval_data": {"format": "toy", "split": "val", "num_samples": 16},
            },
            {
                "name": "ret",
                "type": "image_retrieval",
                "batch_size": 8,
                "max_text_len": 12,
                "data": {"format": "toy", "num_samples": 32},
                "eval_data": {"format": "toy", "split": "val", "num_samples": 16},
            },
            {
                "name": "cap",
                "type": "image_caption",
                "batch_size": 4,
                "max_text_len": 12,
                "vocab_negatives": 32,
                "data": {"format": "toy", "num_samples": 32},
            },
            {
                "name": "mlm",
                "type": "mlm",
                "batch_size": 8,
                "max_text_len": 16,
                "vocab_negatives": 32,
                "data": {"format": "toy", "num_samples": 32},
            },
        ],
        "optim": {"lr": 1.0e-3},
        "schedule": {
            "max_steps": 6,
            "warmup_steps": 2,
            "log_every": 2,
            "checkpoint_every": 3,
            "keep_last": 2,
        },
        "runtime": {"device": "cpu", "threads": 1, "deterministic": True},
        "evaluation": {"batch_size": 16},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_cli(*args: str) -> Any:
    result = CliRunner().invoke(app, list(args))
    return result


def read_weights(step_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(step_dir / "model.safetensors"))


def latest(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "LATEST").read_text().strip()


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:5]}"


def test_pretrain_writes_checkpoints_metrics_and_json(tmp_path: Path) -> None:
    recipe = tiny_recipe(tmp_path / "r.yaml")
    run = tmp_path / "run"
    result = run_cli("pretrain", str(recipe), "-o", str(run), "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["ok"] is True and payload["step"] == 6
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in steps if "event" not in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    assert all({"lr", "grad_norm", "loss", "task", "tokens_per_s"} <= r.keys() for r in train_rows)
    assert any(k.startswith("moe/layers.0.") for k in train_rows[-1])
    # keep_last 2: checkpoints 3 and 6 remain; LATEST names the last one; the run folder loads.
    names = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert names == ["step-000003", "step-000006"]
    assert latest(run).name == "step-000006"
    state = json.loads((latest(run) / "trainer.json").read_text())
    assert state["step"] == 6 and set(state["streams"]) == {"cls", "ret", "cap", "mlm"}
    assert (run / "recipe.resolved.yaml").is_file() and (run / "env.json").is_file()
    assert json.loads((run / "env.json").read_text())["cpu_gemm"] in ("onednn", "torch")
    assert any(k.startswith(("val/", "cls/")) for k in payload["metrics"])


def _crash_after(step_to_die: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the run die right after writing the checkpoint of `step_to_die` (like a kill -9 there)."""
    import uniperceiver_cli.engine.train_state as train_module

    real = train_module.save_checkpoint

    class Killed(BaseException):
        pass

    def saving(run_dir: Path, payload: Any, *args: Any, **kwargs: Any) -> Path:
        out = real(run_dir, payload, *args, **kwargs)
        if payload is not None and payload.state.step == step_to_die:
            raise Killed
        return out

    monkeypatch.setattr(train_module, "save_checkpoint", saving)


def test_resume_is_bitwise_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from uniperceiver_cli.engine.train import train
    from uniperceiver_cli.recipe.load import load_recipe

    recipe = tiny_recipe(
        tmp_path / "r.yaml", schedule={"max_steps": 8, "checkpoint_every": 4, "keep_last": 3}
    )
    straight = tmp_path / "straight"
    assert run_cli("pretrain", str(recipe), "-o", str(straight)).exit_code == 0

    broken = tmp_path / "broken"
    _crash_after(4, monkeypatch)
    with pytest.raises(BaseException) as died:
        train(load_recipe(recipe), output_dir=broken)
    monkeypatch.undo()
    assert type(died.value).__name__ == "Killed"
    assert latest(broken).name == "step-000004"
    # A checkpoint write that was killed half-way leaves only a temporary folder: it must be ignored.
    partial = broken / "checkpoints" / ".step-000008.tmp-999-1"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\x00" * 10)
    result = run_cli("pretrain", str(recipe), "-o", str(broken), "--resume", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["resumed_from"].endswith("step-000004")
    assert not partial.exists()
    assert_same_tensors(read_weights(latest(straight)), read_weights(latest(broken)))
    a = torch.load(latest(straight) / "optim.pt", weights_only=True)["optimizer"]["state"]
    b = torch.load(latest(broken) / "optim.pt", weights_only=True)["optimizer"]["state"]
    assert a.keys() == b.keys()
    for k in a:
        for name, value in a[k].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b[k][name])), (k, name)
    rows = [
        json.loads(x)
        for x in (broken / "metrics.jsonl").read_text().splitlines()
        if "event" not in x
    ]
    assert [r["step"] for r in rows] == list(range(1, 9))


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(REPO)
    return env


@pytest.mark.slow
def test_kill_minus_9_then_resume_matches_straight_run(tmp_path: Path) -> None:
    recipe = tiny_recipe(
        tmp_path / "r.yaml",
        schedule={"max_steps": 40, "checkpoint_every": 5, "keep_last": 2, "log_every": 5},
    )
    straight = tmp_path / "straight"
    assert run_cli("pretrain", str(recipe), "-o", str(straight)).exit_code == 0
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "uniperceiver_cli", "pretrain", str(recipe), "-o", str(killed)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (killed / "checkpoints" / "LATEST").is_file():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / "checkpoints" / "LATEST").is_file()
    result = run_cli("pretrain", str(recipe), "-o", str(killed), "--json")
    assert result.exit_code == 0, result.output
    assert_same_tensors(read_weights(latest(straight)), read_weights(latest(killed)))


def test_sigint_saves_and_exits_130(tmp_path: Path) -> None:
    recipe = tiny_recipe(
        tmp_path / "r.yaml", schedule={"max_steps": 400, "checkpoint_every": 1000, "log_every": 50}
    )
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "uniperceiver_cli", "pretrain", str(recipe), "-o", str(run)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (
        metrics.is_file() and metrics.read_text().count("\n") >= 2
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == ExitCode.INTERRUPTED, err.decode()[-2000:]
    step = json.loads((latest(run) / "trainer.json").read_text())["step"]
    assert 2 <= step < 400


def test_nan_losses_stop_the_run_with_exit_1(tmp_path: Path) -> None:
    recipe = tiny_recipe(
        tmp_path / "r.yaml",
        optim={"lr": 1.0e30, "grad_clip": 0.0},
        schedule={"max_steps": 30, "warmup_steps": 0, "max_bad_steps": 2, "checkpoint_every": 100},
    )
    result = run_cli("pretrain", str(recipe), "-o", str(tmp_path / "run"), "--json")
    assert result.exit_code == ExitCode.FAILURE, result.output
    payload = json.loads(result.stdout)
    assert payload["error"] == "TrainingDivergedError"
    assert "2 consecutive steps" in payload["message"]


def test_prompt_tune_changes_only_prompt_parameters(tmp_path: Path) -> None:
    import uniperceiver_cli

    base_run = tmp_path / "base"
    assert (
        run_cli("pretrain", str(tiny_recipe(tmp_path / "p.yaml")), "-o", str(base_run)).exit_code
        == 0
    )
    recipe = tiny_recipe(
        tmp_path / "pt.yaml",
        command="prompt_tune",
        model={"preset": "tiny", "init_from": str(base_run)},
        tasks=[
            {
                "name": "cls",
                "type": "image_classification",
                "batch_size": 8,
                "data": {"format": "toy", "num_samples": 200},
                "eval_data": {"format": "toy", "split": "val", "num_samples": 16},
            }
        ],
        prompt={
            "length": 4,
            "train": ["deep_prompts", "layer_norms", "ln_post", "spe_bias", "linear_head"],
            "data_fraction": 0.1,
        },
        optim={"lr": 1.0e-2, "weight_decay": 0.0},
        schedule={"max_steps": 4, "warmup_steps": 0, "checkpoint_every": 100},
    )
    run = tmp_path / "prompt"
    result = run_cli("prompt-tune", str(recipe), "-o", str(run), "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    table = {r["module"]: r for r in payload["parameter_table"]}
    assert table["model.head"]["trainable"] == 2 * 64  # ln_post only; proj and logit scales frozen
    assert table["heads.cls"]["trainable"] == 64 * 5 + 5 + 1

    base = read_weights(latest(base_run))
    step_dir = latest(run)
    assert not (step_dir / "model.safetensors").exists()
    delta_size = (step_dir / "prompt_delta.safetensors").stat().st_size
    assert delta_size * 50 < (latest(base_run) / "model.safetensors").stat().st_size
    tuned = uniperceiver_cli.load(run)
    state = dict(tuned.state_dict())
    trainable_suffixes = (
        "norm.weight",
        "norm.bias",
        "norm1.weight",
        "norm1.bias",
        "norm2.weight",
        "norm2.bias",
        "ln_post.weight",
        "ln_post.bias",
        ".prompt",
        "spe_bias",
    )
    changed, unchanged_wrongly = [], []
    for key, value in state.items():
        if key in base:
            same = torch.equal(base[key], value)
            intended = key.endswith(trainable_suffixes) and ".gate." not in key
            if intended and not same:
                changed.append(key)
            if not intended and not same:
                unchanged_wrongly.append(key)
        else:
            assert key.endswith((".prompt", "spe_bias")), key
    assert not unchanged_wrongly, f"frozen tensors changed: {unchanged_wrongly[:5]}"
    assert "head.ln_post.weight" in changed and "embed.norm.weight" in changed
    with torch.no_grad():
        feats = tuned.encode_images(torch.zeros(2, 3, 32, 32))
    assert feats.shape == (2, 64)
    # The linear head (zero-initialised) trained and is readable for use with the loaded model.
    from uniperceiver_cli.engine.freeze import load_prompt_heads

    heads = load_prompt_heads(step_dir)
    assert set(heads) == {"cls"}
    head = heads["cls"]
    assert float(head.fc.weight.detach().abs().sum()) > 0  # type: ignore[union-attr, operator]
    logits = head(torch.zeros(2, 5), feats)
    assert logits.shape == (2, 5)
    # load() attaches the heads and `uniperceiver eval` applies the one of the task with the same name.
    assert set(getattr(tuned, "prompt_heads", {})) == {"cls"}
    eval_recipe = tmp_path / "ev.yaml"
    eval_recipe.write_text(
        yaml.safe_dump(
            {
                "command": "eval",
                "run": {"name": "ev"},
                "tasks": [
                    {
                        "name": "cls",
                        "type": "image_classification",
                        "batch_size": 8,
                        "data": {"format": "toy", "split": "val", "num_samples": 16},
                    }
                ],
            }
        )
    )
    result = run_cli("eval", str(eval_recipe), str(run), "-o", str(tmp_path / "ev"), "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["tasks"]["cls"]["protocol"]["prompt_linear_head"] is True


def test_finetune_from_pretrained_run(tmp_path: Path) -> None:
    base_run = tmp_path / "base"
    assert (
        run_cli("pretrain", str(tiny_recipe(tmp_path / "p.yaml")), "-o", str(base_run)).exit_code
        == 0
    )
    recipe = tiny_recipe(
        tmp_path / "ft.yaml",
        command="finetune",
        model={"preset": "tiny", "init_from": str(base_run)},
        tasks=[
            {
                "name": "ret",
                "type": "image_retrieval",
                "batch_size": 8,
                "max_text_len": 12,
                "data": {"format": "toy", "num_samples": 32},
                "eval_data": {"format": "toy", "split": "val", "num_samples": 16},
            }
        ],
        schedule={"max_steps": 3, "warmup_steps": 0, "checkpoint_every": 100},
    )
    result = run_cli("finetune", str(recipe), "-o", str(tmp_path / "ft"), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["step"] == 3


def test_two_stage_resolution_change(tmp_path: Path) -> None:
    import uniperceiver_cli

    stage1 = tmp_path / "s1"
    assert (
        run_cli("pretrain", str(tiny_recipe(tmp_path / "s1.yaml")), "-o", str(stage1)).exit_code
        == 0
    )
    recipe = tiny_recipe(
        tmp_path / "s2.yaml",
        model={
            "preset": "tiny",
            "image_size": 64,
            "init_from": str(stage1),
            "moe": {"num_experts": 4, "top_k": 2, "layers": "every_other"},
        },
        schedule={"max_steps": 2, "warmup_steps": 0, "checkpoint_every": 100},
    )
    stage2 = tmp_path / "s2"
    result = run_cli("pretrain", str(recipe), "-o", str(stage2), "--json")
    assert result.exit_code == 0, result.output
    cfg = json.loads((latest(stage2) / "config.json").read_text())["model_config"]
    s1_cfg = json.loads((latest(stage1) / "config.json").read_text())["model_config"]
    assert cfg["image_size"] == 64
    assert cfg["pos_embed_scale"] == pytest.approx(s1_cfg["pos_embed_scale"] * 2 / 4)
    weights = read_weights(latest(stage2))
    assert weights["embed.spatial"].shape == (16, 64)
    del uniperceiver_cli


@pytest.mark.parametrize(
    "runtime", [{"precision": "bf16", "activation_checkpointing": True}, {"precision": "fp16"}]
)
def test_precisions_accumulation_and_checkpointing_run(
    tmp_path: Path, runtime: dict[str, Any]
) -> None:
    recipe = tiny_recipe(
        tmp_path / "r.yaml",
        runtime={"device": "cpu", "threads": 1, **runtime},
        schedule={
            "max_steps": 2,
            "warmup_steps": 0,
            "grad_accum_steps": 2,
            "checkpoint_every": 100,
        },
    )
    result = run_cli("pretrain", str(recipe), "-o", str(tmp_path / "run"), "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "event" not in r]
    assert len(train_rows) == 2
    # Two micro-batches per step: each record names the task(s) sampled for both.
    assert all(len(r["task"].split(",")) in (1, 2) and r["task"] for r in train_rows)
    assert all(math.isfinite(r["loss"]) for r in train_rows)


def test_no_resume_refuses_to_overwrite_existing_checkpoints(tmp_path: Path) -> None:
    run = tmp_path / "run"
    recipe = str(tiny_recipe(tmp_path / "p.yaml"))
    assert run_cli("pretrain", recipe, "-o", str(run)).exit_code == 0
    step_dir = latest(run)
    before = (step_dir / "model.safetensors").read_bytes()
    result = run_cli("pretrain", recipe, "-o", str(run), "--no-resume", "--json")
    assert result.exit_code == 2, result.output
    assert "already holds checkpoints" in result.output
    assert "Traceback" not in result.output
    assert (step_dir / "model.safetensors").read_bytes() == before
