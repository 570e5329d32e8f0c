"""`export --format bundle`: layout, manifest hashes, atomic replace rules, bitwise round trip via `load`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import uniperceiver_cli
from uniperceiver_cli.export.bundle import (
    MANIFEST_FILE,
    RECIPE_FILE,
    check_manifest,
    find_recipe,
    sha256_file,
    write_bundle,
)
from uniperceiver_cli.export.errors import ExportInputError
from uniperceiver_cli.export.run import export_checkpoint
from uniperceiver_cli.model.checkpoint import save_pretrained
from uniperceiver_cli.model.uniperceiver import UniPerceiver


def _same_state(a: UniPerceiver, b: UniPerceiver) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def test_bundle_round_trip_is_bitwise(moe_model: UniPerceiver, tmp_path: Path) -> None:
    result = write_bundle(moe_model, tmp_path / "bundle", source="test")
    folder = result.path
    names = set(result.manifest["files"])
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer/bpe_simple_vocab_16e6.txt.gz",
        "tokenizer/LICENSE-CLIP-BPE.txt",
        "tokenizer/tokenizer.json",
    } == names
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    assert manifest["format_version"] == 1 and manifest["kind"] == "bundle"
    assert manifest["versions"]["torch"] == torch.__version__.split("+")[0]
    assert manifest["versions"]["uniperceiver_cli"] == uniperceiver_cli.__version__
    for rel, meta in manifest["files"].items():
        assert meta["sha256"] == sha256_file(folder / rel)
    assert check_manifest(folder) == []
    loaded = uniperceiver_cli.load(folder)
    assert loaded.config == moe_model.config
    _same_state(moe_model, loaded)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(moe_model.encode_images(x), loaded.encode_images(x))
    assert not list(tmp_path.glob(".bundle.tmp-*"))  # the temporary folder was renamed


def test_manifest_detects_tampering(dense_model: UniPerceiver, tmp_path: Path) -> None:
    folder = write_bundle(dense_model, tmp_path / "b").path
    (folder / "tokenizer" / "tokenizer.json").write_text("{}")
    (folder / "extra.txt").write_text("x")
    problems = check_manifest(folder)
    assert "tokenizer/tokenizer.json: sha256 differs from the manifest" in problems
    assert "extra.txt: not in the manifest" in problems


def test_out_folder_rules(dense_model: UniPerceiver, tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ExportInputError, match="not an export of uniperceiver-cli"):
        write_bundle(dense_model, foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    first = write_bundle(dense_model, tmp_path / "b").path
    (first / "stale.txt").write_text("old")
    second = write_bundle(dense_model, tmp_path / "b").path  # our own export is replaced
    assert second == first and not (second / "stale.txt").exists()


def test_export_of_a_run_folder_carries_the_recipe(
    dense_model: UniPerceiver, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    save_pretrained(dense_model, run / "checkpoints" / "step-000002")
    (run / "checkpoints" / "LATEST").write_text("step-000002\n")
    (run / RECIPE_FILE).write_text("command: pretrain\n")
    assert find_recipe(run / "checkpoints" / "step-000002") == run / RECIPE_FILE
    result = export_checkpoint(run, tmp_path / "out", "bundle")
    assert RECIPE_FILE in result["files"]
    assert (tmp_path / "out" / RECIPE_FILE).read_text() == "command: pretrain\n"
    _same_state(dense_model, uniperceiver_cli.load(tmp_path / "out"))


def test_bundle_refuses_fold_for(dense_model: UniPerceiver, tmp_path: Path) -> None:
    folder = save_pretrained(dense_model, tmp_path / "ck")
    with pytest.raises(ExportInputError, match="--fold-for applies to"):
        export_checkpoint(folder, tmp_path / "out", "bundle", fold_for="image_retrieval")
    with pytest.raises(ExportInputError, match="--format 'tflite'"):
        export_checkpoint(folder, tmp_path / "out", "tflite")
