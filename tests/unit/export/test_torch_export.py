"""`export --format torch-export`: traced entry points reload and match eager at two batch sizes and lengths."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from uniperceiver_cli.data.tokenizer import EOT_ID
from uniperceiver_cli.export.bundle import MANIFEST_FILE, check_manifest
from uniperceiver_cli.export.entry import ENTRY_TASKS, build_entry_points, example_inputs
from uniperceiver_cli.export.errors import ExportInputError, VerificationError
from uniperceiver_cli.export.torch_export import export_torch, load_programs
from uniperceiver_cli.export.verify import (
    FEATURE_TOL,
    CaseResult,
    VerifyReport,
    max_abs_diff,
    tolerance,
)
from uniperceiver_cli.model.uniperceiver import UniPerceiver


def test_moe_export_reloads_and_matches(moe_model: UniPerceiver, tmp_path: Path) -> None:
    entry = build_entry_points(moe_model)
    assert sorted(entry.modules) == ["image_encoder", "similarity", "text_encoder", "video_encoder"]
    assert entry.fold is not None and entry.fold.routed_linears == 4
    folder, report, _ = export_torch(entry, tmp_path / "tx")
    assert report.ok
    for name in entry.modules:
        assert report.max_diff(name) <= FEATURE_TOL
    text_cases = {(c.batch, c.length) for c in report.cases if c.entry == "text_encoder"}
    assert {b for b, _ in text_cases} == {1, 3} and {n for _, n in text_cases} == {4, 11}
    frames = {c.frames for c in report.cases if c.entry == "video_encoder"}
    assert frames == {1, 3}
    assert check_manifest(folder) == []
    written = json.loads((folder / MANIFEST_FILE).read_text())
    assert written["kind"] == "torch-export" and written["verification"]["ok"]
    assert written["fold"]["routing_keys"] == [[1, 0, 0, 1, 1, 0, 0, 0], [1, 0, 0, 1, 0, 1, 1, 0]]
    # an independent reload, at a size never used before, against the routed (unfolded) model
    programs = load_programs(folder)
    ids = torch.randint(0, 49_000, (5, 13))
    ids[:, -1] = EOT_ID
    padding = torch.zeros(5, 13, dtype=torch.bool)
    with torch.no_grad():
        expected = moe_model.target_features(ids, padding, kind="captions").features
        got = programs["text_encoder"](ids, padding)
    assert max_abs_diff(got, torch.nn.functional.normalize(expected, dim=-1)) <= FEATURE_TOL


def test_dense_export_for_classification(dense_model: UniPerceiver, tmp_path: Path) -> None:
    entry = build_entry_points(dense_model, "video_classification")
    assert entry.fold is None
    _, report, manifest = export_torch(entry, tmp_path / "tx", cases=((2, 3, 2), (4, 6, 4)))
    assert report.ok and manifest["task"] == "video_classification"
    assert manifest["temperature"] == pytest.approx(1 / 0.07, rel=1e-5)


def test_entry_points_refuse_tasks_they_do_not_serve(moe_model: UniPerceiver) -> None:
    assert "image_caption" not in ENTRY_TASKS
    with pytest.raises(ExportInputError, match="caption decoding and MLM are not exported"):
        build_entry_points(moe_model, "image_caption")
    with pytest.raises(ExportInputError, match="unknown task 'nope'"):
        build_entry_points(moe_model, "nope")


def test_verify_helpers(moe_model: UniPerceiver) -> None:
    with pytest.raises(VerificationError, match="shapes differ"):
        max_abs_diff(np.zeros((2, 3)), torch.zeros(3, 2))
    assert max_abs_diff(np.ones(3), torch.zeros(3)) == 1.0
    entry = build_entry_points(moe_model)
    # similarity logits: 1e-5 on the cosine scale
    assert tolerance(entry.modules["similarity"]) == pytest.approx(FEATURE_TOL / 0.07, rel=1e-5)
    assert tolerance(entry.modules["image_encoder"]) == FEATURE_TOL
    report = VerifyReport([CaseResult("image_encoder", 1, 4, 1, 2e-5, FEATURE_TOL)])
    assert not report.ok
    with pytest.raises(VerificationError, match="image_encoder B=1"):
        report.raise_if_failed("test")
    a = example_inputs(entry.model, "text_encoder", batch=3, length=6)
    b = example_inputs(entry.model, "text_encoder", batch=3, length=6)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))  # deterministic
    assert bool(a[1][0, -1]) and not bool(a[1][1:].any())  # one padded row
