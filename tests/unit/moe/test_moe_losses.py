"""Auxiliary losses and statistics against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from uniperceiver_cli.model.moe import total_aux_loss
from uniperceiver_cli.model.moe.dispatch import expert_capacity
from uniperceiver_cli.model.moe.losses import (
    balance_loss,
    gate_entropy,
    importance_loss,
    router_z_loss,
)


def test_balance_loss_hand_value() -> None:
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6], [0.9, 0.1]])
    top1 = torch.tensor([0, 1, 0])
    # f = (2/3, 1/3), P = (2/3, 1/3): E * sum f P = 2 * (4/9 + 1/9) = 10/9
    assert float(balance_loss(probs, top1)) == pytest.approx(10 / 9)
    uniform = torch.full((4, 4), 0.25)
    assert float(balance_loss(uniform, torch.tensor([0, 1, 2, 3]))) == pytest.approx(1.0)


def test_balance_loss_gradient_flows_through_probabilities() -> None:
    logits = torch.zeros(2, 2, requires_grad=True)
    probs = torch.softmax(logits, -1)
    balance_loss(probs, torch.tensor([0, 0])).backward()
    assert logits.grad is not None
    # loss = 2 * mean_u p0 (f = (1, 0)); d/dl_u0 = 2 * 1/2 * p0 (1 - p0) = 0.25: descent lowers
    # the overloaded expert's logits
    torch.testing.assert_close(logits.grad, torch.tensor([[0.25, -0.25], [0.25, -0.25]]))


def test_router_z_loss_hand_value() -> None:
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    expected = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    assert float(router_z_loss(logits)) == pytest.approx(expected)


def test_importance_loss_hand_value() -> None:
    probs = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.0, 0.5], [1.0, 0.0, 0.0]])
    # importance = (2, 0.5, 0.5): mean 1, population std sqrt(((1)^2 + 0.25 + 0.25) / 3)
    expected = (1.0 + 0.25 + 0.25) / 3
    assert float(importance_loss(probs)) == pytest.approx(expected)
    assert float(importance_loss(torch.full((5, 4), 0.25))) == pytest.approx(0.0, abs=1e-12)


def test_gate_entropy_hand_values() -> None:
    assert float(gate_entropy(torch.full((3, 8), 1 / 8))) == pytest.approx(math.log(8))
    assert float(gate_entropy(torch.tensor([[1.0, 0.0]]))) == pytest.approx(0.0)


def test_capacity_formula() -> None:
    assert expert_capacity(4096, 8, 2, 1.0) == 1024
    assert expert_capacity(10, 4, 2, 1.25) == math.ceil(1.25 * 10 * 2 / 4)
    assert expert_capacity(10, 4, 2, None) is None


def test_total_aux_loss_skips_none() -> None:
    assert total_aux_loss([None, None]) is None
