"""`uniperceiver score captions`: COCO result file + COCO caption annotations -> caption metrics.

Reads the two JSON files, validates every record (errors name the file and the record), keeps the
first caption when an image id appears twice in the results (as the reference evaluator drops padding
duplicates) and scores with `compute_caption_metrics`. Torch-free.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from uniperceiver_cli.metrics.caption import Backend, CaptionMetricsError, compute_caption_metrics

__all__ = ["MetricsInputError", "score_captions"]

logger = logging.getLogger(__name__)


class MetricsInputError(Exception):
    """A results or annotations file is missing, not JSON, or has a malformed record."""


def _load_json(path: Path, what: str) -> Any:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise MetricsInputError(f"{path}: cannot read the {what} file ({exc.strerror})") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise MetricsInputError(
            f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
            f"expected the {what} in JSON"
        ) from exc


def _image_id(value: Any, path: Path, where: str) -> int | str:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise MetricsInputError(
            f"{path}: {where}: 'image_id' must be an integer or string, got {value!r}"
        )
    return value


def _check_caption_record(record: Any, path: Path, where: str, missing_hint: str = "") -> None:
    """Check that a record is an object with the keys 'image_id' and 'caption' (not their values).

    Args:
        record: the parsed JSON value.
        path: the file it came from (for messages).
        where: its position, e.g. `record 3` or `annotations[3]`.
        missing_hint: appended to the message when a key is missing.

    Raises:
        MetricsInputError: naming the file, the position and the problem.
    """
    if not isinstance(record, dict):
        raise MetricsInputError(f"{path}: {where}: expected an object, found {record!r:.60}")
    for key in ("image_id", "caption"):
        if key not in record:
            raise MetricsInputError(f"{path}: {where}: missing '{key}'{missing_hint}")


def _read_results(path: Path) -> dict[int | str, str]:
    data = _load_json(path, "results")
    if not isinstance(data, list):
        raise MetricsInputError(
            f"{path}: expected a COCO result list [{{'image_id': ..., 'caption': ...}}, ...], "
            f"found a JSON {type(data).__name__}"
        )
    predictions: dict[int | str, str] = {}
    duplicates = 0
    for index, record in enumerate(data):
        where = f"record {index}"
        _check_caption_record(record, path, where, " (each result needs 'image_id' and 'caption')")
        image_id = _image_id(record["image_id"], path, where)
        if not isinstance(record["caption"], str):
            raise MetricsInputError(
                f"{path}: {where}: 'caption' must be a string, got {record['caption']!r:.60}"
            )
        if image_id in predictions:
            duplicates += 1
            continue
        predictions[image_id] = record["caption"]
    if duplicates:
        logger.warning(
            "%s: %d duplicate image id(s) in the results; kept the first caption of each",
            path,
            duplicates,
        )
    if not predictions:
        raise MetricsInputError(f"{path}: the results list is empty; nothing to score")
    return predictions


def _read_annotations(path: Path) -> dict[int | str, list[str]]:
    data = _load_json(path, "annotations")
    if not isinstance(data, dict) or "annotations" not in data:
        raise MetricsInputError(
            f"{path}: expected a COCO caption file (an object with 'images' and 'annotations')"
        )
    references: dict[int | str, list[str]] = {}
    images = data.get("images", [])
    if not isinstance(images, list):
        raise MetricsInputError(f"{path}: 'images' must be a list")
    for index, image in enumerate(images):
        if not isinstance(image, dict) or "id" not in image:
            raise MetricsInputError(f"{path}: images[{index}]: missing 'id'")
        references.setdefault(_image_id(image["id"], path, f"images[{index}]"), [])
    annotations = data["annotations"]
    if not isinstance(annotations, list):
        raise MetricsInputError(f"{path}: 'annotations' must be a list")
    for index, ann in enumerate(annotations):
        where = f"annotations[{index}]"
        _check_caption_record(ann, path, where)
        if not isinstance(ann["caption"], str):
            raise MetricsInputError(f"{path}: {where}: 'caption' must be a string")
        references.setdefault(_image_id(ann["image_id"], path, where), []).append(ann["caption"])
    return references


def score_captions(
    results_json: Path, annotations_json: Path, backend: Backend = "builtin"
) -> dict[str, Any]:
    """Score a COCO-format caption result file against COCO-format references.

    Args:
        results_json: list of ``{"image_id", "caption"}`` records.
        annotations_json: COCO captions file with ``images`` and ``annotations``.
        backend: "builtin" (no Java) or "coco" (pycocoevalcap).

    Returns:
        ``{"BLEU-1": ..., ..., "CIDEr": ..., "num_images": ..., "implementation": ..., "versions": ...}``.

    Raises:
        MetricsInputError: unreadable/malformed files, or result image ids missing from the
            annotations (or with no reference caption).
    """
    predictions = _read_results(Path(results_json))
    references = _read_annotations(Path(annotations_json))
    for index, image_id in enumerate(predictions):
        refs = references.get(image_id)
        if refs is None:
            raise MetricsInputError(
                f"{results_json}: result for image_id {image_id!r} (unique result {index}) is not in "
                f"{annotations_json}; score against the annotation file of the same split"
            )
        if not refs:
            raise MetricsInputError(
                f"{annotations_json}: image_id {image_id!r} has no reference caption"
            )
    try:
        scores = compute_caption_metrics(predictions, references, backend=backend)
    except CaptionMetricsError as exc:
        raise MetricsInputError(str(exc)) from exc
    return scores.as_dict()
