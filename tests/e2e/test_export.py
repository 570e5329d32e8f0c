"""`uniperceiver export` and `uniperceiver convert` end to end through Typer's CliRunner."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import uniperceiver_cli
from uniperceiver_cli.cli.app import app
from uniperceiver_cli.cli.exit_codes import ExitCode

pytestmark = pytest.mark.e2e

DENSE = Path("dense") / "checkpoint_torch.pth"
MOE_TORCH = Path("moe") / "checkpoint_torch.pth"
MOE_DS = Path("moe") / "checkpoint_ds" / "mp_rank_00_model_states.pt"


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.mark.parametrize(("rel", "kind"), [(DENSE, "dense"), (MOE_TORCH, "moe"), (MOE_DS, "moe")])
def test_convert_fixture_checkpoints(
    runner: CliRunner, official_tiny: Path, tmp_path: Path, rel: Path, kind: str
) -> None:
    out = tmp_path / "bundle"
    result = runner.invoke(app, ["convert", str(official_tiny / rel), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["ok"] and payload["out"] == str(out)
    assert payload["report"]["moe"] == (kind == "moe")
    model = uniperceiver_cli.load(out)
    inp = load_file(str(official_tiny / "inputs.safetensors"))
    expected = load_file(str(official_tiny / kind / "outputs.safetensors"))
    with torch.no_grad():
        err = (model.encode_images(inp["images"]) - expected["image.feat_norm"]).abs().max()
    assert err.item() <= 1e-5


def test_convert_prints_the_key_mapping(
    runner: CliRunner, official_tiny: Path, tmp_path: Path
) -> None:
    result = runner.invoke(
        app, ["convert", str(official_tiny / MOE_DS), "--out", str(tmp_path / "b")]
    )
    assert result.exit_code == 0, result.output
    assert "key mapping: 86 tensors" in result.output
    assert "dead gate" in result.output
    assert "encoder.layers.*.qkv.experts.weight[*]" in result.output


def test_convert_trust(runner: CliRunner, official_tiny: Path, tmp_path: Path) -> None:
    blob = torch.load(official_tiny / MOE_DS, map_location="cpu", weights_only=True)
    blob["args"] = argparse.Namespace(local_rank=0)
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save(blob, path)
    refused = runner.invoke(app, ["convert", str(path), "--out", str(tmp_path / "a"), "--json"])
    assert refused.exit_code == ExitCode.USAGE
    assert "--trust" in refused.output and "argparse.Namespace" in refused.output
    assert "Traceback" not in refused.output
    assert json.loads(refused.stdout)["ok"] is False
    trusted = runner.invoke(app, ["convert", str(path), "--out", str(tmp_path / "b"), "--trust"])
    assert trusted.exit_code == 0, trusted.output


def test_export_bundle_and_torch_export(
    runner: CliRunner, official_tiny: Path, tmp_path: Path
) -> None:
    bundle = tmp_path / "bundle"
    result = runner.invoke(
        app, ["export", str(official_tiny / MOE_TORCH), "--out", str(bundle), "--json"]
    )
    assert result.exit_code == 0, result.output
    assert "manifest.json" not in json.loads(result.stdout)["files"]  # manifest lists the others
    assert (bundle / "manifest.json").is_file()
    tx = tmp_path / "tx"
    result = runner.invoke(
        app,
        [
            "export",
            str(bundle),
            "--format",
            "torch-export",
            "--fold-for",
            "image_classification",
            "--out",
            str(tx),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["verification"]["ok"]
    assert max(payload["verification"]["max_abs_diff"].values()) <= 1e-5 * 30  # similarity: x tau
    assert payload["fold"]["tasks"] == ["image_classification"]
    assert sorted(p.name for p in tx.glob("*.pt2")) == [
        "image_encoder.pt2",
        "similarity.pt2",
        "text_encoder.pt2",
        "video_encoder.pt2",
    ]


def test_export_errors_exit_2(runner: CliRunner, official_tiny: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "o")

    def export(checkpoint: Path, *options: str) -> list[str]:
        return ["export", str(checkpoint), "--out", out, *options]

    moe = official_tiny / MOE_TORCH
    cases = {
        "does not exist": export(tmp_path / "missing.pth"),
        "is not one of": export(official_tiny / DENSE, "--format", "tar"),
        "unknown task 'dance'": export(moe, "--format", "torch-export", "--fold-for", "dance"),
        "caption decoding and MLM are not exported": export(
            moe, "--format", "torch-export", "--fold-for", "image_caption"
        ),
        "no row in the reference attribute table": export(
            moe, "--format", "torch-export", "--fold-for", "vqa"
        ),
        "--fold-for applies to": export(moe, "--fold-for", "image_retrieval"),
    }
    truncated = tmp_path / "truncated.pth"
    data = (official_tiny / DENSE).read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    cases["truncated"] = export(truncated)
    cases["truncated, corrupt"] = ["convert", str(truncated), "--out", out]
    foreign = tmp_path / "weights.bin"
    foreign.write_bytes(b"\0" * 10)
    cases["expected a reference checkpoint file"] = export(foreign)
    cases["convert: does not exist"] = ["convert", str(tmp_path / "nope.pt"), "--out", out]
    for expected, argv in cases.items():
        result = runner.invoke(app, [*argv, "--json"])
        assert result.exit_code == ExitCode.USAGE, (expected, result.output)
        assert "Traceback" not in result.output
        # engine errors: an issues table on stderr and, with --json, the message on stdout;
        # argument errors caught before the engine only print the table
        stdout = result.stdout
        payload = json.loads(stdout[stdout.index("{") :]) if "{" in stdout else {}
        message = payload.get("error", " ".join(result.output.split()))
        assert expected.removeprefix("convert: ") in message, (expected, result.output)
    assert not Path(out).exists()


@pytest.mark.slow
def test_export_onnx(runner: CliRunner, official_tiny: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = tmp_path / "onnx"
    result = runner.invoke(
        app,
        ["export", str(official_tiny / MOE_DS), "--format", "onnx", "--out", str(out), "--json"],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["verification"]["ok"]
    assert len(list(out.glob("*.onnx"))) == 4
