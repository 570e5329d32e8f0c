"""`export --format onnx`: onnxruntime reproduces the eager entry points (needs the `onnx` extra)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from uniperceiver_cli.export.bundle import MANIFEST_FILE
from uniperceiver_cli.export.entry import build_entry_points
from uniperceiver_cli.export.verify import FEATURE_TOL
from uniperceiver_cli.model.uniperceiver import UniPerceiver

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

from uniperceiver_cli.export.onnx import export_onnx, load_sessions


def test_onnx_text_and_image_encoders(moe_model: UniPerceiver, tmp_path: Path) -> None:
    entry = build_entry_points(moe_model)
    folder, report, _ = export_onnx(
        entry, tmp_path / "onnx", names=["image_encoder", "text_encoder"]
    )
    assert report.ok
    assert report.max_diff("text_encoder") <= FEATURE_TOL
    assert report.max_diff("image_encoder") <= FEATURE_TOL
    sessions = load_sessions(folder)
    inputs = {i.name: i.shape for i in sessions["text_encoder"].get_inputs()}
    assert inputs == {"ids": ["batch", "length"], "padding": ["batch", "length"]}
    assert sessions["image_encoder"].get_inputs()[0].shape == ["batch", 3, 32, 32]
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    assert sorted(manifest["entry_points"]) == ["image_encoder", "text_encoder"]
    assert "onnxruntime" in manifest["versions"]


@pytest.mark.slow
def test_onnx_all_entry_points(moe_model: UniPerceiver, tmp_path: Path) -> None:
    entry = build_entry_points(moe_model, "image_classification")
    _, report, manifest = export_onnx(entry, tmp_path / "onnx")
    assert report.ok and len({c.entry for c in report.cases}) == 4
    assert manifest["task"] == "image_classification"
