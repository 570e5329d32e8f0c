"""The `uniperceiver` app through Typer's CliRunner: commands, exit codes, streams, JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from uniperceiver_cli.cli.app import app
from uniperceiver_cli.cli.exit_codes import ExitCode

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "recipes" / "pretrain" / "tiny_toy.yaml"
COMMANDS = [
    "pretrain",
    "finetune",
    "prompt-tune",
    "eval",
    "zero-shot",
    "export",
    "convert",
    "score",
    "data",
    "validate",
    "recipes",
]


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_help_lists_every_command(runner: CliRunner) -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help(runner: CliRunner, command: str) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_version(runner: CliRunner) -> None:
    from uniperceiver_cli import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.stdout


def test_validate_ok_and_json(runner: CliRunner) -> None:
    result = runner.invoke(app, ["validate", str(TINY), "--json"])
    assert result.exit_code == 0
    payload = json.loads(result.stdout)
    assert payload["ok"] is True
    assert payload["files"][0]["command"] == "pretrain"


def test_validate_bad_recipe_table_exit_2_no_traceback(runner: CliRunner, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        TINY.read_text()
        .replace("  seed: 0", "  sead: 0")
        .replace("batch_size: 32", "batch_size: 0", 1)
    )
    result = runner.invoke(app, ["validate", str(bad), str(TINY)])
    assert result.exit_code == ExitCode.USAGE
    assert "Traceback" not in result.output
    assert "run.sead" in result.output
    assert "did you mean 'seed'" in result.output
    assert "tasks[0].batch_size" in result.output
    assert "1 of 2 recipes valid" in result.output


def test_validate_json_reports_issues(runner: CliRunner, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.read_text().replace("  seed: 0", "  sead: 0"))
    result = runner.invoke(app, ["validate", str(bad), "--json"])
    assert result.exit_code == ExitCode.USAGE
    payload = json.loads(result.stdout)
    issue = payload["files"][0]["issues"][0]
    assert issue["field"] == "run.sead"
    assert issue["line"] == 6


@pytest.mark.parametrize("command", ["pretrain", "finetune", "prompt-tune"])
def test_training_commands_reject_bad_recipe(
    runner: CliRunner, tmp_path: Path, command: str
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: {name: x}\nschedule: {max_steps: 0}\ntasks: []\n")
    result = runner.invoke(app, [command, str(bad)])
    assert result.exit_code == ExitCode.USAGE
    assert "schedule.max_steps" in result.output


def test_training_command_json_reports_recipe_issues_on_stdout(runner: CliRunner) -> None:
    """With --json a bad recipe value still exits 2, and stdout carries the problems as JSON."""
    result = runner.invoke(app, ["pretrain", str(TINY), "--json", "--set", "runtime.cpu_gemm=fast"])
    assert result.exit_code == ExitCode.USAGE
    payload = json.loads(result.stdout)
    assert payload["ok"] is False and payload["exit_code"] == ExitCode.USAGE
    (issue,) = payload["issues"]
    assert (
        issue["field"] == "runtime.cpu_gemm" and "'auto', 'onednn' or 'torch'" in issue["message"]
    )
    assert issue["source"] == "--set runtime.cpu_gemm=fast"


def test_recipe_for_another_command(runner: CliRunner) -> None:
    result = runner.invoke(app, ["finetune", str(TINY)])
    assert result.exit_code == ExitCode.USAGE
    assert "uniperceiver pretrain" in result.output


def test_dry_run_prints_resolved_recipe(runner: CliRunner) -> None:
    result = runner.invoke(
        app, ["pretrain", str(TINY), "--dry-run", "--set", "schedule.max_steps=70"]
    )
    assert result.exit_code == 0, result.output
    assert "max_steps: 70" in result.stdout
    assert "capacity_factor" not in result.stdout  # dense recipe: no moe section filled in


def test_not_available_commands_exit_3(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import uniperceiver_cli.cli.export_commands as export_commands
    import uniperceiver_cli.cli.train_commands as train_commands

    monkeypatch.setattr(train_commands, "engine_available", lambda module: False)
    monkeypatch.setattr(export_commands, "engine_available", lambda module: False)
    result = runner.invoke(app, ["pretrain", str(TINY), "--json"])
    assert result.exit_code == ExitCode.NOT_AVAILABLE
    payload = json.loads(result.stdout)
    assert payload["status"] == "not_available"
    assert "not available yet" in result.output
    result = runner.invoke(app, ["export", str(TINY), "--out", str(tmp_path / "bundle")])
    assert result.exit_code == ExitCode.NOT_AVAILABLE


def test_eval_needs_recipe_or_task(runner: CliRunner) -> None:
    result = runner.invoke(app, ["eval"])
    assert result.exit_code == ExitCode.USAGE
    assert "RECIPE or --task" in result.output


def test_export_unknown_format_and_missing_path(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["export", str(tmp_path), "--out", str(tmp_path / "o"), "--format", "tflite"]
    )
    assert result.exit_code == ExitCode.USAGE
    assert "tflite" in result.output
    result = runner.invoke(app, ["export", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert result.exit_code == ExitCode.USAGE
    assert "does not exist" in result.output


def test_unknown_option_is_usage_error(runner: CliRunner) -> None:
    result = runner.invoke(app, ["pretrain", str(TINY), "--no-such-flag"])
    assert result.exit_code == ExitCode.USAGE


def test_recipes_list_show_cp(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["recipes", "list", "--json"])
    assert result.exit_code == 0
    rows = json.loads(result.stdout)
    names = {row["recipe"] for row in rows}
    assert "pretrain/tiny_toy.yaml" in names
    assert all(row["command"] != "?" for row in rows)
    result = runner.invoke(app, ["recipes", "show", "pretrain/tiny_toy", "--resolved"])
    assert result.exit_code == 0
    assert "label_smoothing: 0.1" in result.stdout
    result = runner.invoke(app, ["recipes", "cp", "pretrain/tiny_toy", str(tmp_path)])
    assert result.exit_code == 0
    assert (tmp_path / "tiny_toy.yaml").read_text() == TINY.read_text()
    result = runner.invoke(app, ["recipes", "cp", "pretrain/tiny_toy", str(tmp_path)])
    assert result.exit_code == ExitCode.USAGE
    result = runner.invoke(app, ["recipes", "show", "no_such_recipe"])
    assert result.exit_code == ExitCode.USAGE


def test_data_toy_writes_real_formats(runner: CliRunner, tmp_path: Path) -> None:
    from uniperceiver_cli.data.build import build_dataset
    from uniperceiver_cli.data.options import options_for

    out = tmp_path / "toy"
    result = runner.invoke(
        app,
        ["data", "toy", "--out", str(out), "--num-images", "20", "--num-videos", "10", "--json"],
    )
    assert result.exit_code == 0, result.output
    paths = json.loads(result.stdout)["paths"]
    assert not list(tmp_path.glob(".toy.tmp-*"))
    options = options_for(
        {
            "format": "coco_captions",
            "split": "train",
            "annotation_file": paths["captions_train"],
            "images_dir": paths["images"],
        }
    )
    dataset = build_dataset(options, task_type="image_retrieval", image_size=32)
    assert len(dataset) > 0
    again = runner.invoke(app, ["data", "toy", "--out", str(out)])
    assert again.exit_code == ExitCode.USAGE
