"""`eval`, `zero-shot` (presets, recipes, ad-hoc files) and `score captions` end to end through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from uniperceiver_cli.cli.app import app
from uniperceiver_cli.cli.exit_codes import ExitCode

REPO = Path(__file__).resolve().parents[2]
TINY_EVAL = REPO / "recipes" / "eval" / "tiny_toy.yaml"
TINY_ZERO_SHOT = REPO / "recipes" / "zero_shot" / "tiny_toy_video.yaml"
COCO_EVAL = REPO / "recipes" / "eval" / "coco_retrieval.yaml"
#: Shrink the shipped toy recipes to a few samples so each run takes seconds.
SHRINK = ["--set", "tasks.2.data.num_samples=6", "--set", "evaluation.max_len=4"]

pytestmark = pytest.mark.e2e


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> CliRunner:
    monkeypatch.setenv("UNIPERCEIVER_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return CliRunner()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from uniperceiver_cli.model.build import build_model
    from uniperceiver_cli.model.checkpoint import save_pretrained
    from uniperceiver_cli.model.presets import get_preset

    torch.manual_seed(0)
    model = build_model(get_preset("tiny", num_heads=2))
    with torch.no_grad():
        for layer in model.encoder.blocks():
            layer.gamma_1.fill_(0.5)
            layer.gamma_2.fill_(0.5)
    return save_pretrained(model.eval(), tmp_path_factory.mktemp("ckpt") / "tiny")


def test_eval_task_json_fail_under_exits_1(
    runner: CliRunner, checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = ["eval", "--task", "toy-retrieval", "--checkpoint", str(checkpoint), "--json"]
    result = runner.invoke(app, [*args, "--fail-under", "r1_i2t=0.99", "-o", str(out)])
    assert result.exit_code == ExitCode.FAILURE, result.output
    payload = json.loads(result.stdout)
    assert payload["ok"] is False
    assert [f["metric"] for f in payload["fail_under"]] == ["toy_retrieve/r1_i2t"]
    r1 = payload["metrics"]["toy_retrieve"]["r1_i2t"]
    assert payload["fail_under"][0]["value"] == r1 < 0.99
    assert payload["checkpoint"]["sha256"] and payload["preset"] == "toy-retrieval"
    assert (out / "metrics.json").is_file() and (out / "toy_retrieve.ranks.json").is_file()
    assert json.loads((out / "metrics.json").read_text())["metrics"] == payload["metrics"]
    # the same run with a threshold it meets exits 0; the default output folder is runs/eval-<name>
    result = runner.invoke(app, [*args, "--fail-under", f"toy_retrieve/r1_i2t={r1}"])
    assert result.exit_code == ExitCode.OK, result.output
    assert json.loads(result.stdout)["metrics"]["toy_retrieve"]["r1_i2t"] == r1
    assert (tmp_path / "runs" / "eval-toy-retrieval" / "metrics.json").is_file()


def test_eval_bad_thresholds_exit_2(runner: CliRunner, checkpoint: Path) -> None:
    base = ["eval", "--task", "toy-retrieval", "--checkpoint", str(checkpoint)]
    result = runner.invoke(app, [*base, "--fail-under", "bleu4=0.1"])
    assert result.exit_code == ExitCode.USAGE
    assert "no evaluated task reports this metric" in result.output
    result = runner.invoke(app, [*base, "--fail-under", "r1_i2t"])
    assert result.exit_code == ExitCode.USAGE
    assert "METRIC=VALUE" in result.output
    # with --task, the one positional argument is the checkpoint
    positional = ["eval", "--task", "toy-retrieval", str(checkpoint), "--fail-under", "bad"]
    result = runner.invoke(app, positional)
    assert result.exit_code == ExitCode.USAGE
    assert "METRIC=VALUE" in result.output


def test_eval_missing_data_and_checkpoint_exit_2(
    runner: CliRunner, checkpoint: Path, tmp_path: Path
) -> None:
    result = runner.invoke(
        app,
        ["eval", "--task", "coco-retrieval", "--checkpoint", str(checkpoint), "--data-root",
         str(tmp_path), "--json"],
    )  # fmt: skip
    assert result.exit_code == ExitCode.USAGE
    payload = json.loads(result.stdout)
    assert str(tmp_path / "mscoco" / "captions_test5k.json") in payload["error"]
    assert "expected layout" in payload["error"]
    # a recipe whose data is missing: the reader names the file, the CLI adds the format's layout
    result = runner.invoke(
        app, ["eval", str(COCO_EVAL), str(checkpoint), "--data-root", str(tmp_path), "--json"]
    )
    assert result.exit_code == ExitCode.USAGE, result.output
    error = json.loads(result.stdout)["error"]
    assert "captions_test5k.json" in error and "coco_captions:" in error
    result = runner.invoke(app, ["eval", "--task", "toy-retrieval", "--checkpoint", "nope"])
    assert result.exit_code == ExitCode.USAGE
    assert "no such file or folder" in result.output
    result = runner.invoke(app, ["eval", "--task", "toy-retreival", "--checkpoint", "x"])
    assert result.exit_code == ExitCode.USAGE
    assert "unknown evaluation preset" in result.output


def test_eval_recipe_with_checkpoint(runner: CliRunner, checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "recipe_out"
    result = runner.invoke(
        app, ["eval", str(TINY_EVAL), str(checkpoint), *SHRINK, "--json", "-o", str(out)]
    )
    assert result.exit_code == ExitCode.OK, result.output
    payload = json.loads(result.stdout)
    assert list(payload["metrics"]) == ["toy_cls", "toy_retrieve", "toy_caption"]
    assert set(payload["metrics"]["toy_cls"]) == {"acc1", "acc5"}
    assert payload["tasks"]["toy_caption"]["num_items"] == 6
    assert payload["tasks"]["toy_caption"]["protocol"]["max_len"] == 4
    captions = json.loads((out / "toy_caption.captions.json").read_text())
    assert len(captions) == 6 and {"image_id", "caption"} <= set(captions[0])
    assert "toy_caption" in result.output  # the Rich table went to stderr


def test_eval_released_reference_checkpoint(
    runner: CliRunner, official_tiny: Path, tmp_path: Path
) -> None:
    dense = official_tiny / "dense" / "checkpoint_torch.pth"
    result = runner.invoke(app, ["eval", str(TINY_EVAL), str(dense), *SHRINK, "--json"])
    assert result.exit_code == ExitCode.OK, result.output
    payload = json.loads(result.stdout)
    assert payload["checkpoint"]["path"] == str(dense)
    assert payload["model"]["hidden_size"] == 64
    assert 0.0 <= payload["metrics"]["toy_retrieve"]["r10_t2i"] <= 1.0


def test_zero_shot_preset_and_recipe(runner: CliRunner, checkpoint: Path) -> None:
    result = runner.invoke(
        app,
        ["zero-shot", "--task", "toy-video-retrieval", "--checkpoint", str(checkpoint), "--json"],
    )
    assert result.exit_code == ExitCode.OK, result.output
    payload = json.loads(result.stdout)
    assert payload["command"] == "zero_shot"
    assert payload["tasks"]["toy_video_retrieve"]["type"] == "video_retrieval"
    assert payload["tasks"]["toy_video_retrieve"]["num_items"] == 64
    shrink = ["--set", "tasks.1.data.num_samples=4", "--set", "evaluation.max_len=3"]
    result = runner.invoke(
        app,
        ["zero-shot", "--recipe", str(TINY_ZERO_SHOT), "--checkpoint", str(checkpoint), *shrink,
         "--json"],
    )  # fmt: skip
    assert result.exit_code == ExitCode.OK, result.output
    payload = json.loads(result.stdout)
    assert list(payload["metrics"]) == ["toy_video_retrieve", "toy_video_caption"]
    assert payload["tasks"]["toy_video_caption"]["protocol"]["length_penalty"] == 2.0
    result = runner.invoke(app, ["zero-shot", "--task", "toy-video-retrieval"])
    assert result.exit_code == ExitCode.USAGE
    assert "--checkpoint" in result.output


def test_score_captions_after_eval(runner: CliRunner, checkpoint: Path, tmp_path: Path) -> None:
    results = tmp_path / "res.json"
    results.write_text(json.dumps([{"image_id": 1, "caption": "a red circle on the left"}]))
    annotations = tmp_path / "ann.json"
    annotations.write_text(
        json.dumps(
            {
                "images": [{"id": 1}],
                "annotations": [
                    {"image_id": 1, "caption": "a red circle on the left"},
                    {"image_id": 1, "caption": "there is a red circle"},
                ],
            }
        )
    )
    result = runner.invoke(app, ["score", "captions", str(results), str(annotations), "--json"])
    assert result.exit_code == ExitCode.OK, result.output
    payload = json.loads(result.stdout)
    assert payload["BLEU-1"] == pytest.approx(1.0)
    assert payload["num_images"] == 1
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    result = runner.invoke(app, ["score", "captions", str(bad), str(annotations)])
    assert result.exit_code == ExitCode.USAGE
    assert "not valid JSON" in result.output


def test_adhoc_commands_json_lines(runner: CliRunner, checkpoint: Path, tmp_path: Path) -> None:
    from torchvision.io import write_png

    from uniperceiver_cli.data.toy import ToyWorld

    world = ToyWorld(0, image_size=32)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        write_png(world.image(i, "val")[0], str(folder / f"{i}.png"))
    files = [str(folder / "0.png"), str(folder / "1.png")]
    ck = ["--checkpoint", str(checkpoint)]
    result = runner.invoke(
        app, ["zero-shot", "classify", *files, "--labels", "circle,square", *ck, "--json"]
    )
    assert result.exit_code == ExitCode.OK, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["file"] for r in lines] == files and all(
        r["label"] in ("circle", "square") for r in lines
    )
    result = runner.invoke(app, ["zero-shot", "caption", files[0], *ck, "--max-len", "3", "--json"])
    assert result.exit_code == ExitCode.OK, result.output
    assert json.loads(result.stdout)["file"] == files[0]
    queries = tmp_path / "q.txt"
    queries.write_text("a circle\na square\n")
    result = runner.invoke(
        app, ["zero-shot", "retrieve", "--images", str(folder), "--texts", str(queries), *ck,
              "--top-k", "1", "--json"],
    )  # fmt: skip
    assert result.exit_code == ExitCode.OK, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["query"] for r in rows] == ["a circle", "a square"]
    assert all(len(r["results"]) == 1 for r in rows)
    result = runner.invoke(app, ["zero-shot", "classify", str(queries), "--labels", "a", *ck])
    assert result.exit_code == ExitCode.USAGE
    assert "not an image or video" in result.output
    result = runner.invoke(app, ["zero-shot", "classify", files[0], "--labels", "a", *ck])
    assert result.exit_code == ExitCode.OK
    assert "zero-shot classification" in result.stdout
