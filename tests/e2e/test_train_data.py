"""Training through the data engine's real readers: files written by `uniperceiver data toy` (image_folder,
coco_captions, text_corpus) with exact resume, broken images skipped and counted (or stopping the run past
`max_bad_fraction`), and VQA on the toy world."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from typer.testing import CliRunner

from uniperceiver_cli.cli.app import app
from uniperceiver_cli.cli.exit_codes import ExitCode

pytestmark = pytest.mark.e2e


def run_cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def latest(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "LATEST").read_text().strip()


def read_weights(step_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(step_dir / "model.safetensors"))


def rows(run: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def toy_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The toy world on disk, written by the CLI (80 images, 10 videos)."""
    out = tmp_path_factory.mktemp("toy") / "world"
    result = run_cli("data", "toy", "--out", str(out), "--num-images", "80", "--num-videos", "10")
    assert result.exit_code == 0, result.output
    return out


def write_recipe(path: Path, recipe: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def files_recipe(path: Path, world: Path, *, max_steps: int = 6) -> Path:
    """Classification, retrieval, caption and MLM on the written files; relative paths under data_root."""
    coco_train = {
        "format": "coco_captions",
        "annotation_file": "captions/captions_train.json",
        "images_dir": "images",
    }
    return write_recipe(
        path,
        {
            "command": "pretrain",
            "run": {"name": "files", "seed": 4, "data_root": str(world)},
            "model": {"preset": "tiny", "moe": {"num_experts": 2, "top_k": 1}},
            "tasks": [
                {
                    "name": "cls",
                    "type": "image_classification",
                    "batch_size": 8,
                    "data": {"format": "image_folder", "root": "images"},
                    "eval_data": {"format": "image_folder", "root": "images", "split": "val"},
                },
                {
                    "name": "ret",
                    "type": "image_retrieval",
                    "batch_size": 8,
                    "max_text_len": 16,
                    "data": coco_train,
                },
                {
                    "name": "cap",
                    "type": "image_caption",
                    "batch_size": 4,
                    "max_text_len": 16,
                    "vocab_negatives": 32,
                    "data": coco_train,
                },
                {
                    "name": "mlm",
                    "type": "mlm",
                    "batch_size": 4,
                    "max_text_len": 24,
                    "vocab_negatives": 32,
                    "data": {
                        "format": "text_corpus",
                        "file": "text/corpus_train.txt",
                        "min_words": 16,
                    },
                },
            ],
            "schedule": {
                "max_steps": max_steps,
                "warmup_steps": 2,
                "log_every": 3,
                "checkpoint_every": 3,
                "keep_last": 3,
            },
            "runtime": {"device": "cpu", "threads": 1, "deterministic": True},
            "evaluation": {"batch_size": 16},
        },
    )


def test_training_on_toy_files_through_real_formats_resumes_exactly(
    tmp_path: Path, toy_files: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from uniperceiver_cli.engine.train import train
    from uniperceiver_cli.recipe.load import load_recipe

    recipe = files_recipe(tmp_path / "r.yaml", toy_files)
    straight = tmp_path / "straight"
    result = run_cli("pretrain", str(recipe), "-o", str(straight), "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["step"] == 6
    assert set(payload["losses"]) == {"cls", "ret", "cap", "mlm"}  # every task was sampled
    assert "cls/acc1" in payload["metrics"] or "val/cls/acc1" in payload["metrics"]

    # Die right after the step-3 checkpoint, then resume: the same parameters as the straight run.
    import uniperceiver_cli.engine.train_state as train_module

    real = train_module.save_checkpoint

    class Killed(BaseException):
        pass

    def saving(run_dir: Path, payload: Any, *args: Any, **kwargs: Any) -> Path:
        out = real(run_dir, payload, *args, **kwargs)
        if payload is not None and payload.state.step == 3:
            raise Killed
        return out

    monkeypatch.setattr(train_module, "save_checkpoint", saving)
    broken = tmp_path / "broken"
    with pytest.raises(BaseException) as died:
        train(load_recipe(recipe), output_dir=broken)
    assert type(died.value).__name__ == "Killed"
    monkeypatch.undo()
    result = run_cli("pretrain", str(recipe), "-o", str(broken), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["resumed_from"].endswith("step-000003")
    a, b = read_weights(latest(straight)), read_weights(latest(broken))
    assert a.keys() == b.keys()
    assert not [k for k in a if not torch.equal(a[k], b[k])]
    state = json.loads((latest(broken) / "trainer.json").read_text())
    assert sum(s["position"] for s in state["streams"].values()) > 0


def bad_image_recipe(path: Path, root: Path, max_bad_fraction: float) -> Path:
    return write_recipe(
        path,
        {
            "command": "pretrain",
            "run": {"name": "bad", "seed": 1},
            "model": {"preset": "tiny"},
            "tasks": [
                {
                    "name": "cls",
                    "type": "image_classification",
                    "batch_size": 8,
                    "data": {
                        "format": "image_folder",
                        "root": str(root),
                        "on_error": "skip",
                        "max_bad_fraction": max_bad_fraction,
                    },
                }
            ],
            # 12 steps x 8 samples = 96 draws over 64 images: every image is read at least once.
            "schedule": {
                "max_steps": 12,
                "warmup_steps": 0,
                "log_every": 4,
                "checkpoint_every": 100,
            },
            "runtime": {"device": "cpu", "threads": 1},
        },
    )


@pytest.fixture()
def corrupt_folder(tmp_path: Path, toy_files: Path) -> tuple[Path, str]:
    """A copy of the toy train images (64) with one PNG overwritten by garbage."""
    import shutil

    root = tmp_path / "images"
    shutil.copytree(toy_files / "images" / "train", root / "train")
    victim = sorted((root / "train").rglob("*.png"))[5]
    victim.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    return root, victim.name


def test_broken_image_is_skipped_counted_and_summarised(
    tmp_path: Path, corrupt_folder: tuple[Path, str], caplog: pytest.LogCaptureFixture
) -> None:
    from uniperceiver_cli.engine.train import train
    from uniperceiver_cli.recipe.load import load_recipe

    root, victim = corrupt_folder
    recipe = bad_image_recipe(tmp_path / "r.yaml", root, 0.05)
    run = tmp_path / "run"
    with caplog.at_level("WARNING"):
        result = train(load_recipe(recipe), output_dir=run)
    assert result.step == 12
    assert any(victim in r.getMessage() and "skip" in r.getMessage() for r in caplog.records)
    assert any(
        "bad-data summary" in r.getMessage() and victim in r.getMessage() for r in caplog.records
    )
    records = rows(run)
    summary = [r for r in records if r.get("event") == "bad_data"]
    assert len(summary) == 1
    assert summary[0]["bad_data/cls/distinct_bad"] == 1
    assert summary[0]["bad_data/cls/skip_events"] >= 1
    assert summary[0]["bad_data/cls/served"] == 12 * 8
    assert [Path(f).name for f in summary[0]["bad_data/cls/files"]] == [victim]
    steps = [r for r in records if "event" not in r]
    assert steps[-1]["bad_data/cls"] == 1


def test_too_much_broken_data_stops_the_run_with_exit_1(
    tmp_path: Path, corrupt_folder: tuple[Path, str]
) -> None:
    root, victim = corrupt_folder
    recipe = bad_image_recipe(tmp_path / "r.yaml", root, 0.0)
    run = tmp_path / "run"
    result = run_cli("pretrain", str(recipe), "-o", str(run), "--json")
    assert result.exit_code == ExitCode.FAILURE, result.output
    payload = json.loads(result.stdout)
    assert payload["error"] == "DataError"
    assert victim in payload["message"] and "max_bad_fraction" in payload["message"]
    summary = [r for r in rows(run) if r.get("event") == "bad_data"]
    assert summary and [Path(f).name for f in summary[0]["bad_data/cls/files"]] == [victim]


def test_vqa_trains_on_the_toy_world(tmp_path: Path) -> None:
    recipe = write_recipe(
        tmp_path / "vqa.yaml",
        {
            "command": "pretrain",
            "run": {"name": "vqa", "seed": 2},
            "model": {"preset": "tiny", "layer_scale_init": 0.1},
            "tasks": [
                {
                    "name": "vqa",
                    "type": "vqa",
                    "batch_size": 16,
                    "label_smoothing": 0.0,
                    "data": {"format": "toy", "num_samples": 256},
                }
            ],
            "optim": {"lr": 2.0e-3},
            "schedule": {
                "max_steps": 30,
                "warmup_steps": 3,
                "log_every": 10,
                "checkpoint_every": 100,
            },
            "runtime": {"device": "cpu", "threads": 1, "deterministic": True},
        },
    )
    run = tmp_path / "run"
    result = run_cli("pretrain", str(recipe), "-o", str(run), "--json")
    assert result.exit_code == 0, result.output
    steps = [r for r in rows(run) if "event" not in r]
    assert len(steps) == 30
    ce = [r["ce/vqa"] for r in steps]
    assert all(math.isfinite(v) for v in ce)
    assert all(0.0 <= r["acc/vqa"] <= 1.0 for r in steps)
    # Cross-entropy over the answer set: starts near log(#answers) and drops as the model learns.
    from uniperceiver_cli.data.toy import ToyWorld

    num_answers = len(ToyWorld(0).vqa_answers)
    assert ce[0] == pytest.approx(math.log(num_answers), rel=0.25)
    assert sum(ce[-10:]) / 10 < 0.85 * sum(ce[:10]) / 10


def test_bad_data_counts_continue_across_a_resume(
    tmp_path: Path, corrupt_folder: tuple[Path, str]
) -> None:
    """6 steps, stop, resume to 12: the final bad-data summary equals the straight 12-step run's."""
    root, victim = corrupt_folder
    recipe = bad_image_recipe(tmp_path / "r.yaml", root, 0.05)
    straight = tmp_path / "straight"
    assert run_cli("pretrain", str(recipe), "-o", str(straight)).exit_code == 0
    resumed = tmp_path / "resumed"
    first = run_cli(
        "pretrain",
        str(recipe),
        "-o",
        str(resumed),
        "--set",
        "schedule.max_steps=6",
        "--set",
        "schedule.checkpoint_every=6",
    )
    assert first.exit_code == 0, first.output
    state = json.loads((latest(resumed) / "trainer.json").read_text())
    assert state["bad_data"]["cls"]["served"] == 6 * 8
    second = run_cli("pretrain", str(recipe), "-o", str(resumed))
    assert second.exit_code == 0, second.output

    def summary(run: Path) -> dict[str, Any]:
        return [r for r in rows(run) if r.get("event") == "bad_data"][-1]

    a, b = summary(straight), summary(resumed)
    assert b["bad_data/cls/served"] == a["bad_data/cls/served"] == 12 * 8
    assert b["bad_data/cls/skip_events"] == a["bad_data/cls/skip_events"] >= 1
    assert b["bad_data/cls/distinct_bad"] == a["bad_data/cls/distinct_bad"] == 1
    assert [Path(f).name for f in b["bad_data/cls/files"]] == [victim]
