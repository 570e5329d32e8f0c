"""Token and context dispatch against the loop oracle: capacity, dropping, BPR, eval invariance."""

from __future__ import annotations

import math

import pytest
import torch
from moe_helpers import tiny_config
from torch.utils._python_dispatch import TorchDispatchMode

from uniperceiver_cli.model.moe import SharedDecisionError, TokenRoutedLinear, build_routed_linears
from uniperceiver_cli.model.moe.dispatch import (
    expert_capacity,
    plan_dispatch,
    select_top_k,
)
from uniperceiver_cli.model.moe.experts import grouped_linear, grouped_mm_supported
from uniperceiver_cli.model.moe.fused_dispatch import LOW_PRECISION_ROW_MULTIPLE, dispatch_linear
from uniperceiver_cli.model.moe.reference import (
    reference_apply_experts,
    reference_token_moe,
    reference_token_route,
)
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
    """Eval: same experts and outputs for every batch split, bitwise equal across runs.

    Expert ids are compared exactly. Outputs and combine weights are compared to float32
    rounding: BLAS picks its kernel by the number of rows, so, as for a dense `nn.Linear`, a row's
    last bits can depend on how many rows share the matmul.
    """
    lead, _ = _layer(routing, noise="vmoe", noise_std=8.0, capacity_factor=0.5)
    lead.eval()
    x = torch.randn(12, L, 16)
    with torch.no_grad():
        full, _ = lead(x, ROUTING)
        assert lead._memo is not None
        full_plan = lead._memo.plan
        again, _ = lead(x, ROUTING)
        outs: list[torch.Tensor] = []
        ids: list[torch.Tensor] = []
        weights: list[torch.Tensor] = []
        for size in (1, 2, 3, 5, 1):
            start = sum(o.shape[0] for o in outs)
            y, _ = lead(x[start : start + size], ROUTING)
            assert lead._memo is not None
            outs.append(y)
            ids.append(lead._memo.plan.expert_ids)
            weights.append(lead._memo.plan.weights)
    assert sum(o.shape[0] for o in outs) == 12
    assert torch.equal(full, again)
    assert torch.equal(torch.cat(ids), full_plan.expert_ids)
    assert bool(full_plan.kept.all()), "eval is dropless"
    torch.testing.assert_close(torch.cat(weights), full_plan.weights, atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.cat(outs), full, atol=1e-6, rtol=1e-6)


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


def _oracle_chain(
    lead: TokenRoutedLinear,
    x: torch.Tensor,
    wg: torch.Tensor,
    noise: torch.Tensor | None,
    capacity: int | None,
    experts: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, list[list[bool]]]:
    """Loop oracle of `follow(gelu(lead(x)))` from the gate weight `wg` and the experts'
    (lead weight, lead bias, follower weight, follower bias)."""
    units = x if lead.context else x.reshape(-1, 1, x.shape[-1])
    gate_in = units.mean(dim=1)  # context: mean over the sample; token: the token itself
    logits = gate_in @ wg.T
    if noise is not None:
        logits = logits + noise
    moe = lead.moe
    ids, weights, kept = reference_token_route(logits, moe.top_k, capacity, moe.batch_prioritized)
    h = reference_apply_experts(units, ids, weights, kept, experts[0], experts[1])
    h = torch.nn.functional.gelu(h)
    out = reference_apply_experts(h, ids, weights, kept, experts[2], experts[3])
    return out.reshape(B, L, -1), kept


def _leaves(module: TokenRoutedLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """Detached copies of a linear's expert weight and bias that collect their own gradients."""
    bias = module.experts.bias
    assert bias is not None
    return (
        module.experts.weight.detach().clone().requires_grad_(),
        bias.detach().clone().requires_grad_(),
    )


@pytest.mark.parametrize("routing", ["token", "context"])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("bpr", [True, False])
@pytest.mark.parametrize(
    "mode", ["eval-dropless", "train-no-drops", "train-drops", "train-drops-vmoe"]
)
def test_dispatch_forward_and_gradients_equal_reference_loop(
    routing: str, top_k: int, bpr: bool, mode: str
) -> None:
    """Outputs and the gradients of input, both linears' experts and the router all match."""
    # factor E / K gives C = U: no expert can overflow, yet the capacity code path runs
    factor = {"eval-dropless": 1.0, "train-no-drops": 4 / top_k}.get(mode, 0.5)
    lead, follow = _layer(
        routing,
        top_k=top_k,
        batch_prioritized=bpr,
        noise="vmoe" if mode.endswith("vmoe") else "none",
        noise_std=4.0,
        capacity_factor=factor,
        eval_capacity_factor=None,
    )
    if mode == "eval-dropless":
        lead.eval()
        follow.eval()
    gate = lead.gate
    assert gate is not None
    gate.generator = torch.Generator().manual_seed(7)
    x = torch.randn(B, L, 16, requires_grad=True)
    target = torch.randn(B, L, 16)
    y, aux = lead(x, ROUTING)
    out, _ = follow(torch.nn.functional.gelu(y), ROUTING)
    (out * target).sum().backward()

    # the oracle, built from scratch on copies of every parameter
    x_ref = x.detach().clone().requires_grad_()
    wg = gate.wg.weight.detach().clone().requires_grad_()
    lead_w, lead_b = _leaves(lead)
    follow_w, follow_b = _leaves(follow)
    experts = (lead_w, lead_b, follow_w, follow_b)
    units = B if lead.context else B * L
    noise = None
    if mode.endswith("vmoe"):
        noise = torch.randn(units, 4, generator=torch.Generator().manual_seed(7)) * (4.0 / 4)
    capacity = None if mode == "eval-dropless" else math.ceil(factor * units * top_k / 4)
    out_ref, kept = _oracle_chain(lead, x_ref, wg, noise, capacity, experts)
    (out_ref * target).sum().backward()  # type: ignore[no-untyped-call]

    dropped = sum(not k for row in kept for k in row)
    if mode.startswith("train-drops"):
        assert dropped > 0, "capacity factor 0.5 must drop assignments"
    else:
        assert dropped == 0
    assert aux is not None
    assert float(aux.dropped_fraction) == pytest.approx(dropped / (units * top_k))
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lead.experts.weight.grad, lead_w.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lead.experts.bias.grad, lead_b.grad, atol=1e-5, rtol=1e-5)  # type: ignore[union-attr]
    torch.testing.assert_close(follow.experts.weight.grad, follow_w.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(follow.experts.bias.grad, follow_b.grad, atol=1e-5, rtol=1e-5)  # type: ignore[union-attr]
    assert wg.grad is not None and float(wg.grad.abs().sum()) > 0
    torch.testing.assert_close(gate.wg.weight.grad, wg.grad, atol=1e-5, rtol=1e-5)


def _leaf(*shape: int) -> torch.Tensor:
    return torch.randn(*shape).requires_grad_()


def test_grouped_linear_gradients_match_autograd_with_empty_and_repeated_experts() -> None:
    """The hand-written backward equals autograd through plain per-block linears."""
    x, weight, bias = _leaf(20, 16), _leaf(3, 8, 16), _leaf(3, 8)
    counts, experts = [5, 0, 6, 9], [0, 1, 2, 0]  # expert 1 gets no rows, expert 0 two blocks
    grad = torch.randn(20, 8)
    y = grouped_linear(x, weight, bias, counts, block_experts=experts)
    (y * grad).sum().backward()  # type: ignore[no-untyped-call]
    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, weight, bias))
    blocks = torch.split(x2, counts)
    parts = [blocks[i] @ w2[e].T + b2[e] for i, e in enumerate(experts)]
    expected = torch.cat(parts)
    (expected * grad).sum().backward()  # type: ignore[no-untyped-call]
    torch.testing.assert_close(y, expected)
    for ours, theirs in ((x, x2), (weight, w2), (bias, b2)):
        assert ours.grad is not None and theirs.grad is not None
        torch.testing.assert_close(ours.grad, theirs.grad)
    assert weight.grad is not None and torch.equal(weight.grad[1], torch.zeros(8, 16))


def test_dispatch_linear_matches_gather_linear_scatter_with_gradients() -> None:
    """dispatch_linear = gather rows, per-expert linear, scale, scatter-add; all five grads."""
    x, weight, bias = _leaf(10, 16), _leaf(4, 8, 16), _leaf(4, 8)
    counts = [3, 0, 4, 2]
    src = torch.tensor([0, 4, 9, 1, 4, 7, 8, 2, 4])
    dest = torch.tensor([1, 0, 5, 2, 3, 5, 0, 4, 6])
    row_weights = torch.rand(9).requires_grad_()
    grad = torch.randn(7, 8)
    y = dispatch_linear(x, weight, bias, counts, src, row_weights, dest, 7)
    (y * grad).sum().backward()  # type: ignore[no-untyped-call]
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias, row_weights)]
    x2, w2, b2, s2 = leaves
    experts = torch.repeat_interleave(torch.arange(4), torch.tensor(counts))
    expected = torch.zeros(7, 8)
    for r in range(9):
        e = int(experts[r])
        expected = expected.index_add(
            0, dest[r : r + 1], (s2[r] * (x2[src[r]] @ w2[e].T + b2[e])).unsqueeze(0)
        )
    (expected * grad).sum().backward()  # type: ignore[no-untyped-call]
    torch.testing.assert_close(y, expected)
    for ours, theirs in zip((x, weight, bias, row_weights), leaves, strict=True):
        assert ours.grad is not None and theirs.grad is not None
        torch.testing.assert_close(ours.grad, theirs.grad)
    assert weight.grad is not None
    assert torch.equal(weight.grad[1], torch.zeros(8, 16))


@pytest.mark.parametrize("routing", ["token", "context"])
@pytest.mark.parametrize("path", ["unfused", "grouped_mm"])
def test_fused_dispatch_equals_the_composed_path(routing: str, path: str) -> None:
    """The fused node and the gather / grouped_linear / combine composition agree (with drops,
    padding), forward and backward; the composition is what expert parallelism runs."""
    padding = torch.zeros(B, L, dtype=torch.bool)
    padding[1, 6:] = True
    ctx = RoutingContext(ROUTING.task, ROUTING.segments, padding)
    results = []
    for fused in (True, False):
        torch.manual_seed(3)
        lead, follow = _layer(routing, noise="none", capacity_factor=0.5)
        for module in (lead, follow):
            module.fused_dispatch = fused
            module.use_grouped_mm = not fused and path == "grouped_mm"
        x = torch.randn(B, L, 16, requires_grad=True)
        y, aux = lead(x, ctx)
        out, _ = follow(torch.nn.functional.gelu(y), ctx)
        assert aux is not None and float(aux.dropped_fraction) > 0
        (out.square().sum() + aux.loss).backward()
        gate = lead.gate
        assert gate is not None
        grads = [x.grad, lead.experts.weight.grad, follow.experts.bias.grad, gate.wg.weight.grad]  # type: ignore[union-attr]
        results.append((out.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        assert a is not None and b is not None
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    if routing == "token":
        assert torch.equal(results[0][0][1, 6:], torch.zeros(2, 16))


def test_bf16_autocast_runs_the_experts_in_bf16() -> None:
    lead, follow = _layer("token", noise="none", capacity_factor=2.0)
    x = torch.randn(B, L, 16, requires_grad=True)
    with torch.no_grad():
        y32, _ = lead(x, ROUTING)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux = lead(x, ROUTING)
        out, _ = follow(torch.nn.functional.gelu(y), ROUTING)
    assert y.dtype == torch.bfloat16 and out.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y32, atol=0.05, rtol=0.05)
    assert aux is not None
    (out.float().sum() + aux.loss).backward()
    assert lead.experts.weight.grad is not None
    assert lead.experts.weight.grad.dtype == torch.float32
    assert float(lead.experts.weight.grad.abs().sum()) > 0


class _RecordBf16Matmuls(TorchDispatchMode):
    """Records the operand shapes of every bfloat16 matmul (mm, addmm, in place or into out)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            a, b = (args[0], args[1]) if func.overloadpacket == torch.ops.aten.mm else args[1:3]
            if a.dtype == torch.bfloat16:
                self.shapes.append((*a.shape, b.shape[1]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("din", "dout"), [(16, 8), (8, 16)])
def test_bf16_matmuls_only_see_padded_row_counts(din: int, dout: int) -> None:
    """Every bfloat16 matmul of the fused node, forward and backward, runs on row counts that are
    multiples of the padding: oneDNN builds and caches a kernel per shape, so a routed count
    that changes every step would cost a new kernel (time) and a cache entry (memory) each step."""
    x, weight, bias = _leaf(10, din), _leaf(4, dout, din), _leaf(4, dout)
    counts = [3, 0, 5, 2]
    src = torch.tensor([0, 4, 9, 1, 4, 7, 8, 2, 4, 3])
    dest = torch.tensor([1, 0, 5, 2, 3, 5, 0, 4, 6, 6])
    row_weights = torch.rand(10).requires_grad_()
    record = _RecordBf16Matmuls()
    with record, torch.autocast("cpu", dtype=torch.bfloat16):
        y = dispatch_linear(x, weight, bias, counts, src, row_weights, dest, 7)
        y.float().square().sum().backward()  # type: ignore[no-untyped-call]
    assert len(record.shapes) >= 3 * 3  # forward, dx and dW of each non-empty expert
    for shape in record.shapes:
        for size in shape:
            assert size in (din, dout, 1) or size % LOW_PRECISION_ROW_MULTIPLE == 0, record.shapes


def test_bf16_grouped_linear_splits_rows_into_repeating_shapes() -> None:
    """The unfused / expert-parallel path splits each block into a multiple of the row multiple
    and a shorter tail, so its bfloat16 matmul shapes repeat across steps; results unchanged."""
    din, dout = 16, 8
    counts = [70, 0, 130, 3]
    x = torch.randn(sum(counts), din, requires_grad=True)
    weight, bias = _leaf(4, dout, din), _leaf(4, dout)
    record = _RecordBf16Matmuls()
    with record, torch.autocast("cpu", dtype=torch.bfloat16):
        y = grouped_linear(x, weight, bias, counts)
        y.float().square().sum().backward()  # type: ignore[no-untyped-call]
    rows = [s for shape in record.shapes for s in shape if s not in (din, dout)]
    assert sorted(set(rows)) == [2, 3, 6, 64, 128]  # 70 = 64 + 6, 130 = 128 + 2, 3
    blocks = torch.split(x.detach().bfloat16(), counts)
    for e, block in enumerate(blocks):
        expected = (
            block.float() @ weight[e].detach().bfloat16().float().T
            + bias[e].detach().bfloat16().float()
        )
        start = sum(counts[:e])
        torch.testing.assert_close(
            y[start : start + counts[e]].float(), expected, atol=0.05, rtol=0.02
        )
