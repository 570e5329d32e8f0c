"""VQA soft accuracy: the mean over questions of the target score of the predicted answer (SPEC §7).

Target scores are the ViLBERT-style soft labels already stored with each question (e.g.
min(#annotators/3, 1) or the 10-choose-9 average); an answer missing from the targets scores 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["vqa_soft_accuracy"]


def vqa_soft_accuracy(
    predictions: Sequence[str | int], targets: Sequence[Mapping[str | int, float]]
) -> float:
    """Mean target score (percent) of the predicted answers.

    Args:
        predictions: one predicted answer (string or answer-vocabulary id) per question.
        targets: per question, answer -> soft score in [0, 1].

    Returns:
        100 × mean score.
    """
    if len(predictions) != len(targets):
        raise ValueError(
            f"predictions and targets differ in length ({len(predictions)} vs {len(targets)})"
        )
    if not predictions:
        raise ValueError("no questions: predictions is empty")
    return (
        100.0
        * sum(t.get(p, 0.0) for p, t in zip(predictions, targets, strict=True))
        / len(predictions)
    )
