"""GLUE dev metrics: accuracy, F1 of the positive class and Matthews correlation (SPEC §7, §9.3).

Pure Python over label sequences; percentages (×100) as the paper's tables report them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["accuracy", "binary_f1", "glue_metrics", "matthews_corr"]


def _check(predictions: Sequence[int], labels: Sequence[int]) -> None:
    if len(predictions) != len(labels):
        raise ValueError(
            f"predictions and labels differ in length ({len(predictions)} vs {len(labels)})"
        )
    if not labels:
        raise ValueError("no samples: labels is empty")


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Percentage of predictions equal to their label."""
    _check(predictions, labels)
    return 100.0 * sum(p == y for p, y in zip(predictions, labels, strict=True)) / len(labels)


def binary_f1(predictions: Sequence[int], labels: Sequence[int], positive: int = 1) -> float:
    """F1 (percent) of the positive class; 0 when there is no true positive."""
    _check(predictions, labels)
    tp = sum(p == positive and y == positive for p, y in zip(predictions, labels, strict=True))
    fp = sum(p == positive and y != positive for p, y in zip(predictions, labels, strict=True))
    fn = sum(p != positive and y == positive for p, y in zip(predictions, labels, strict=True))
    if tp == 0:
        return 0.0
    return 100.0 * 2 * tp / (2 * tp + fp + fn)


def matthews_corr(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Matthews correlation (percent) for binary labels {0, 1}; 0 when undefined (a constant row)."""
    _check(predictions, labels)
    tp = sum(p == 1 and y == 1 for p, y in zip(predictions, labels, strict=True))
    tn = sum(p == 0 and y == 0 for p, y in zip(predictions, labels, strict=True))
    fp = sum(p == 1 and y == 0 for p, y in zip(predictions, labels, strict=True))
    fn = sum(p == 0 and y == 1 for p, y in zip(predictions, labels, strict=True))
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    if denominator == 0:
        return 0.0
    return 100.0 * (tp * tn - fp * fn) / denominator


def glue_metrics(task: str, predictions: Sequence[int], labels: Sequence[int]) -> dict[str, float]:
    """The metrics the reference reports per GLUE task (SPEC §7).

    Args:
        task: cola, mrpc, qqp, qnli, rte, sst2 or mnli (case-insensitive; "sst-2" accepted).
        predictions: predicted label ids.
        labels: gold label ids.

    Returns:
        ``accuracy`` always, plus ``matthews_corr`` for CoLA and ``f1`` for MRPC/QQP.
    """
    name = task.lower().replace("-", "")
    known = {"cola", "mrpc", "qqp", "qnli", "rte", "sst2", "mnli"}
    if name not in known:
        raise ValueError(f"unknown GLUE task {task!r}; expected one of {sorted(known)}")
    out = {"accuracy": accuracy(predictions, labels)}
    if name == "cola":
        out["matthews_corr"] = matthews_corr(predictions, labels)
    if name in {"mrpc", "qqp"}:
        out["f1"] = binary_f1(predictions, labels)
    return out
