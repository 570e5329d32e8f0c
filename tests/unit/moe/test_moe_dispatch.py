"""Token and context dispatch against the loop oracle: capacity, dropping, BPR, eval invariance."""

from __future__ import annotations

import pytest
import torch
from moe_helpers import tiny_config

from uniperceiver_cli.model.moe import SharedDecisionError, TokenRoutedLinear, build_routed_linears
from uniperceiver_cli.model.moe.dispatch import (
    expert_capacity,
    plan_dispatch,
    select_top_k,
)
from uniperceiver_cli.model.moe.experts import grouped_linear, grouped_mm_supported
from uniperceiver_cli.model.moe.reference import reference_token_moe
from uniperceiver_cli.model.routing import RoutingContext, input_segments

B, L = 3, 8
ROUTING = RoutingContext("caption", input_segments("image_caption", visual_len=4, text_len=3))


def _layer(routing: str, **fields: object) -> tuple[TokenRoutedLinear, TokenRoutedLinear]:
    modules = build_routed_linears(tiny_config(routing=routing, **fields), 0)
    lead, follow = modules["ffn_in"], modules["ffn_out"]
    assert isinstance(lead, TokenRoutedLinear) and isinstance(follow, TokenRoutedLinear)
    return lead, follow


def _oracle(
    module: TokenRoutedLinear, x: torch.Tensor, logits: torch.Tensor, capacity: int | None
) -> tuple[torch.Tensor, list[list[bool]]]:
    units = x if module.context else x.reshape(-1, 1, x.shape[-1])
    out, kept = reference_token_moe(
        units,
        logits,
        module.experts.weight.detach(),
        module.experts.bias.detach(),
        module.moe.top_k,
        capacity,
        module.moe.batch_prioritized,
    )
    return out.reshape(B, L, -1), kept


@pytest.mark.parametrize("routing", ["token", "context"])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("bpr", [True, False])
@pytest.mark.parametrize("factor", [None, 0.5])
def test_dispatch_equals_reference_loop(
    routing: str, top_k: int, bpr: bool, factor: float | None
) -> None:
    lead, follow = _layer(
        routing,
        top_k=top_k,
        batch_prioritized=bpr,
        noise="none",
        capacity_factor=factor or 1.0,
        eval_capacity_factor=factor,
    )
    lead.eval()
    follow.eval()
    x = torch.randn(B, L, 16)
    with torch.no_grad():
        y, aux = lead(x, ROUTING)
        gate = lead.gate
        assert gate is not None
        logits = gate(x).logits if lead.context else gate(x.reshape(-1, 16)).logits
    units = logits.shape[0]
    capacity = expert_capacity(units, 4, top_k, factor)
    expected, kept = _oracle(lead, x, logits, capacity)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    dropped = sum(not k for row in kept for k in row)
    assert aux is not None
    assert float(aux.dropped_fraction) == pytest.approx(dropped / (units * top_k))
    if factor is not None:
        assert dropped > 0, "capacity factor 0.5 must drop assignments"
        assert lead._memo is not None
        assert lead._memo.plan.kept.tolist() == kept
    # the follower reuses the leader's routing, drops included
    h = torch.randn(B, L, 24)
    with torch.no_grad():
        y2, aux2 = follow(h, ROUTING)
    assert aux2 is None
    units_h = h if lead.context else h.reshape(-1, 1, 24)
    ref2 = torch.zeros(units, units_h.shape[1], 16)
    ids = lead._memo.plan.expert_ids if lead._memo is not None else None
    assert ids is not None
    weights = lead._memo.plan.weights  # type: ignore[union-attr]
    w, b = follow.experts.weight.detach(), follow.experts.bias.detach()
    for u in range(units):
        for k in range(top_k):
            if kept[u][k]:
                ref2[u] += weights[u, k] * (units_h[u] @ w[ids[u, k]].T + b[ids[u, k]])
    torch.testing.assert_close(y2, ref2.reshape(B, L, 16), atol=1e-5, rtol=1e-5)


def test_training_dispatch_with_vmoe_noise_matches_oracle() -> None:
    lead, _ = _layer("token", noise="vmoe", noise_std=4.0, capacity_factor=0.75)
    gate = lead.gate
    assert gate is not None
    gate.generator = torch.Generator().manual_seed(11)
    x = torch.randn(B, L, 16)
    y, _ = lead(x, ROUTING)
    flat = x.reshape(-1, 16)
    noise = torch.randn(B * L, 4, generator=torch.Generator().manual_seed(11)) * (4.0 / 4)
    logits = flat @ gate.wg.weight.detach().T + noise
    capacity = expert_capacity(B * L, 4, 2, 0.75)
    expected, kept = _oracle(lead, x, logits, capacity)
    assert any(not k for row in kept for k in row)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_batch_prioritised_routing_keeps_the_most_confident_tokens() -> None:
    # 4 units all choosing expert 0 first; capacity 2 keeps the 2 with highest top-1 prob
    logits = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.5, 0.0], [2.0, 0.0]])
    top = select_top_k(logits, 1)
    plan = plan_dispatch(top, 2, capacity=2, batch_prioritized=True)
    assert plan.kept[:, 0].tolist() == [False, True, False, True]
    plain = plan_dispatch(top, 2, capacity=2, batch_prioritized=False)
    assert plain.kept[:, 0].tolist() == [True, True, False, False]
    assert plan.counts.tolist() == [2, 0]


def test_second_choices_come_after_all_first_choices() -> None:
    # unit 0 picks (1, 0); units 1 and 2 pick expert 0 first: with capacity 2 unit 0's second
    # choice of expert 0 is dropped although unit 0 comes first
    logits = torch.tensor([[1.0, 2.0], [2.0, 1.0], [2.0, 1.0]])
    plan = plan_dispatch(select_top_k(logits, 2), 2, capacity=2, batch_prioritized=False)
    assert plan.kept.tolist() == [[True, False], [True, True], [True, False]]


@pytest.mark.parametrize("routing", ["token", "context"])
def test_eval_is_batch_size_invariant_deterministic_and_noise_free(routing: str) -> None:
    lead, _ = _layer(routing, noise="vmoe", noise_std=8.0, capacity_factor=0.5)
    lead.eval()
    x = torch.randn(6, L, 16)
    with torch.no_grad():
        full, _ = lead(x, ROUTING)
        again, _ = lead(x, ROUTING)
        parts = [lead(x[i : i + 2], ROUTING)[0] for i in range(0, 6, 2)]
        single, _ = lead(x[4:5], ROUTING)
    assert torch.equal(full, again)
    torch.testing.assert_close(torch.cat(parts), full, atol=1e-6, rtol=0)
    torch.testing.assert_close(single, full[4:5], atol=1e-6, rtol=0)


def test_padding_is_not_routed_and_does_not_change_other_tokens() -> None:
    lead, follow = _layer("token", noise="none")
    lead.eval()
    follow.eval()
    x = torch.randn(2, L, 16)
    padding = torch.zeros(2, L, dtype=torch.bool)
    padding[0, 5:] = True
    padded = RoutingContext(ROUTING.task, ROUTING.segments, padding)
    with torch.no_grad():
        y_plain, _ = lead(x, ROUTING)
        y, aux = lead(x, padded)
        h, _ = follow(torch.randn(2, L, 24), padded)
        with pytest.raises(SharedDecisionError, match="different padding mask"):
            follow(torch.randn(2, L, 24), ROUTING)
    assert torch.equal(y[0, 5:], torch.zeros(3, 24))
    assert torch.equal(h[0, 5:], torch.zeros(3, 16))
    torch.testing.assert_close(y[~padding], y_plain[~padding], atol=1e-6, rtol=0)
    assert aux is not None
    assert float(aux.tokens_per_expert.sum()) == (2 * L - 3) * 2


def test_context_routing_pools_without_padding() -> None:
    lead, _ = _layer("context", noise="none")
    lead.eval()
    x = torch.randn(2, L, 16)
    padding = torch.zeros(2, L, dtype=torch.bool)
    padding[1, 6:] = True
    changed = x.clone()
    changed[1, 6:] = 100.0
    ctx = RoutingContext(ROUTING.task, ROUTING.segments, padding)
    with torch.no_grad():
        y_a, aux = lead(x, ctx)
        y_b, _ = lead(changed, ctx)
    torch.testing.assert_close(y_a[:, :6], y_b[:, :6])
    assert aux is not None
    # context routing: every real token of a sample goes to its sample's K experts
    assert float(aux.tokens_per_expert.sum()) == (2 * L - 2) * 2
    assert aux.tokens_per_expert_by_segment.shape == (2, 4)


def test_follower_needs_a_matching_leader_call() -> None:
    lead, follow = _layer("token")
    with pytest.raises(SharedDecisionError, match="call the leader first"):
        follow(torch.randn(B, L, 24), ROUTING)
    lead(torch.randn(B, L, 16), ROUTING)
    with pytest.raises(SharedDecisionError, match=r"\(B, L\) = \(3, 8\)"):
        follow(torch.randn(1, L, 24), ROUTING)


def test_aux_losses_and_gradients_in_training() -> None:
    lead, follow = _layer(
        "token",
        noise="none",
        balance_loss_weight=0.5,
        z_loss_weight=0.25,
        importance_loss_weight=0.125,
    )
    x = torch.randn(B, L, 16, requires_grad=True)
    y, aux = lead(x, ROUTING)
    out, _ = follow(torch.nn.functional.gelu(y), ROUTING)
    assert aux is not None
    expected = 0.5 * aux.balance_loss + 0.25 * aux.z_loss + 0.125 * aux.importance_loss
    torch.testing.assert_close(aux.loss, expected)
    (out.square().mean() + aux.loss).backward()
    gate = lead.gate
    assert gate is not None and gate.wg.weight.grad is not None
    assert gate.wg.weight.grad.abs().sum() > 0
    assert follow.experts.weight.grad is not None and x.grad is not None
    assert float(aux.tokens_per_expert.sum()) <= B * L * 2


def test_grouped_mm_path_matches_the_loop() -> None:
    x = torch.randn(20, 16)
    weight = torch.randn(3, 8, 16)
    bias = torch.randn(3, 8)
    counts = [5, 0, 15]
    loop = grouped_linear(x, weight, bias, counts)
    if not grouped_mm_supported(x, weight):
        pytest.skip("torch._grouped_mm is not available for these operands")
    fused = grouped_linear(x, weight, bias, counts, use_grouped_mm=True)
    torch.testing.assert_close(fused, loop, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loop[:5], x[:5] @ weight[0].T + bias[0])
