"""Top-k accuracy, multi-view averaging, GLUE metrics and VQA soft accuracy against hand values."""

from __future__ import annotations

import math

import pytest
import torch

from uniperceiver_cli.metrics.classification import multiview_probabilities, topk_accuracy
from uniperceiver_cli.metrics.glue import accuracy, binary_f1, glue_metrics, matthews_corr
from uniperceiver_cli.metrics.vqa import vqa_soft_accuracy


def test_topk_accuracy() -> None:
    logits = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    labels = torch.tensor([2, 0, 0, 1])
    out = topk_accuracy(logits, labels, ks=(1, 2, 3))
    assert out == {"top1": 25.0, "top2": 75.0, "top3": 100.0}
    with pytest.raises(ValueError, match="exceeds"):
        topk_accuracy(logits, labels, ks=(5,))


def test_multiview_softmax_then_mean() -> None:
    views = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])  # 1 video, 2 views, 2 classes
    p1 = torch.tensor([math.exp(2), 1.0]) / (math.exp(2) + 1)
    p2 = torch.tensor([1.0, math.e]) / (1 + math.e)
    assert torch.allclose(multiview_probabilities(views)[0], (p1 + p2) / 2)
    # Averaging logits first would pick class 0 with a different margin; probabilities sum to 1.
    assert multiview_probabilities(views).sum().item() == pytest.approx(1.0)


def test_glue_hand_values() -> None:
    pred = [1, 1, 0, 0, 1, 0]
    gold = [1, 0, 0, 1, 1, 0]
    # tp=2 tn=2 fp=1 fn=1
    assert accuracy(pred, gold) == pytest.approx(400 / 6)
    assert binary_f1(pred, gold) == pytest.approx(100 * 4 / 6)
    assert matthews_corr(pred, gold) == pytest.approx(100 * (4 - 1) / 9)
    assert matthews_corr([1, 1], [0, 1]) == 0.0  # constant prediction: undefined -> 0
    out = glue_metrics("CoLA", pred, gold)
    assert set(out) == {"accuracy", "matthews_corr"}
    assert set(glue_metrics("mrpc", pred, gold)) == {"accuracy", "f1"}
    with pytest.raises(ValueError, match="unknown GLUE task"):
        glue_metrics("stsb2", pred, gold)


def test_vqa_soft_accuracy() -> None:
    targets = [{"yes": 1.0, "no": 0.3}, {"2": 0.6}, {"red": 1.0}]
    assert vqa_soft_accuracy(["no", "2", "blue"], targets) == pytest.approx(100 * 0.9 / 3)
