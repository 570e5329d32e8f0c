"""`score_captions`: COCO files in, metrics out; malformed inputs give located MetricsInputError."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from uniperceiver_cli.metrics.score import MetricsInputError, score_captions

ANNOTATIONS = {
    "images": [{"id": 1}, {"id": 2}],
    "annotations": [
        {"image_id": 1, "id": 10, "caption": "A dog runs on the grass."},
        {"image_id": 1, "id": 11, "caption": "a dog is running"},
        {"image_id": 2, "id": 12, "caption": "Two cats sleep."},
    ],
}


def _write(tmp_path: Path, name: str, data: object) -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_scores_and_keeps_first_duplicate(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ann = _write(tmp_path, "ann.json", ANNOTATIONS)
    res = _write(
        tmp_path,
        "res.json",
        [
            {"image_id": 1, "caption": "a dog runs on the grass"},
            {"image_id": 2, "caption": "two cats sleep"},
            {"image_id": 2, "caption": "something else entirely"},
        ],
    )
    with caplog.at_level(logging.WARNING):
        out = score_captions(res, ann)
    assert out["num_images"] == 2
    assert out["BLEU-1"] == pytest.approx(1.0, abs=1e-6)
    assert out["implementation"] == "builtin"
    assert "duplicate" in caplog.text


@pytest.mark.parametrize(
    ("results", "message"),
    [
        ("{not json", r"res\.json: not valid JSON \(line 1"),
        ({"image_id": 1}, "expected a COCO result list"),
        ([{"caption": "x"}], r"record 0: missing 'image_id'"),
        ([{"image_id": 1, "caption": "x"}, {"image_id": 1}], r"record 1: missing 'caption'"),
        ([{"image_id": 9, "caption": "x"}], r"image_id 9 .* is not in .*ann\.json"),
        ([{"image_id": 1, "caption": 3}], r"record 0: 'caption' must be a string"),
        ([], "empty"),
    ],
)
def test_malformed_results(tmp_path: Path, results: object, message: str) -> None:
    ann = _write(tmp_path, "ann.json", ANNOTATIONS)
    res = _write(tmp_path, "res.json", results)
    with pytest.raises(MetricsInputError, match=message):
        score_captions(res, ann)


def test_malformed_annotations(tmp_path: Path) -> None:
    res = _write(tmp_path, "res.json", [{"image_id": 1, "caption": "x"}])
    bad = _write(tmp_path, "ann.json", {"annotations": [{"image_id": 1}]})
    with pytest.raises(MetricsInputError, match=r"annotations\[0\]: missing 'caption'"):
        score_captions(res, bad)
    with pytest.raises(MetricsInputError, match="cannot read"):
        score_captions(res, tmp_path / "missing.json")
    no_refs = _write(tmp_path, "ann2.json", {"images": [{"id": 1}], "annotations": []})
    with pytest.raises(MetricsInputError, match="no reference caption"):
        score_captions(res, no_refs)
