"""Segment-constant routing: weight merge, shared decisions, eval cache, fold and fold_report."""

from __future__ import annotations

import pytest
import torch
from moe_helpers import tiny_config
from torch import nn

from uniperceiver_cli.model.config import ModelConfig, MoEConfig
from uniperceiver_cli.model.moe import (
    FoldError,
    SegmentRoutedLinear,
    build_routed_linears,
    fold,
    fold_report,
)
from uniperceiver_cli.model.moe.keys import convert_reference_linear
from uniperceiver_cli.model.moe.reference import reference_segment_mixture
from uniperceiver_cli.model.routing import RoutingContext, input_segments, target_segments

CAPTION = RoutingContext("caption", input_segments("image_caption", visual_len=4, text_len=3))
SEGMENT_ROUTINGS = ("attribute", "modality", "task")


def _layer(routing: str, **fields: object) -> dict[str, nn.Module]:
    config = tiny_config(routing=routing, task_names=("caption", "mlm"), **fields)
    return build_routed_linears(config, 0)


def _decisions(aux_segments: tuple) -> list[tuple[list[int], list[float]]]:  # type: ignore[type-arg]
    return [(s.expert_ids.tolist(), s.weights.tolist()) for s in aux_segments]


@pytest.mark.parametrize("routing", SEGMENT_ROUTINGS)
@pytest.mark.parametrize("top_k", [1, 2])
def test_weight_merge_equals_explicit_mixture(routing: str, top_k: int) -> None:
    layer = _layer(routing, top_k=top_k, noise="vmoe")
    qkv, attn_out = layer["qkv"], layer["attn_out"]
    assert isinstance(qkv, SegmentRoutedLinear) and isinstance(attn_out, SegmentRoutedLinear)
    x = torch.randn(3, 8, 16)
    y, aux = qkv(x, CAPTION)  # training mode, noisy decisions
    assert aux is not None
    bounds = CAPTION.boundaries()
    expected = reference_segment_mixture(
        x, bounds, _decisions(aux.segments), qkv.experts.weight.detach(), qkv.experts.bias.detach()
    )
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    # the follower reuses exactly the leader's (noisy) decisions of this call
    h = torch.randn(3, 8, 16)
    y2, aux2 = attn_out(h, CAPTION)
    assert aux2 is None
    expected2 = reference_segment_mixture(
        h,
        bounds,
        _decisions(aux.segments),
        attn_out.experts.weight.detach(),
        attn_out.experts.bias.detach(),
    )
    torch.testing.assert_close(y2, expected2, atol=1e-5, rtol=1e-5)


def test_gradients_reach_gate_and_selected_experts_only() -> None:
    layer = _layer("attribute", top_k=2, noise="none")
    qkv, attn_out = layer["qkv"], layer["attn_out"]
    x = torch.randn(2, 8, 16)
    y, aux = qkv(x, CAPTION)
    y2, _ = attn_out(y[..., :16], CAPTION)
    (y.square().sum() + y2.square().sum()).backward()
    assert aux is not None
    gate = qkv.gate
    assert gate is not None and gate.wg.weight.grad is not None
    assert gate.wg.weight.grad.abs().sum() > 0
    used = {int(e) for s in aux.segments for e in s.expert_ids}
    grad = qkv.experts.weight.grad
    assert grad is not None
    for e in range(4):
        assert (grad[e].abs().sum() > 0) == (e in used)
    assert not any("gate" in k for k in attn_out.state_dict())


@pytest.mark.parametrize("routing", SEGMENT_ROUTINGS)
def test_eval_plan_is_cached_and_invalidated(routing: str) -> None:
    layer = _layer(routing)
    module = layer["ffn_in"]
    assert isinstance(module, SegmentRoutedLinear)
    module.eval()
    calls = []
    gate = module.gate
    assert gate is not None
    gate.register_forward_hook(lambda *args: calls.append(1))
    x = torch.randn(2, 8, 16)
    with torch.no_grad():
        first, _ = module(x, CAPTION)
        second, _ = module(x, CAPTION)
    # in eval each distinct key is scored once, alone (batch-invariant decisions), then cached
    keys = len(set(module.routing_keys(CAPTION)))
    assert len(calls) == keys, "the gate must run once per key in eval, not per batch"
    assert torch.equal(first, second)
    torch.testing.assert_close(first, _eval_mixture(module, x), atol=1e-5, rtol=1e-5)
    # an in-place change of the expert weights (an optimiser step, load_state_dict) rebuilds
    before = len(calls)
    with torch.no_grad():
        module.experts.weight.mul_(2.0)
        third, _ = module(x, CAPTION)
    assert len(calls) == before, "an expert-only change keeps the cached decisions"
    torch.testing.assert_close(third, _eval_mixture(module, x), atol=1e-5, rtol=1e-5)
    # loading a new gate changes the decisions and is picked up
    state = {k: torch.randn_like(v) for k, v in module.state_dict().items()}
    module.load_state_dict(state)
    before = len(calls)
    with torch.no_grad():
        fourth, _ = module(x, CAPTION)
    assert len(calls) == before + keys
    torch.testing.assert_close(fourth, _eval_mixture(module, x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(fourth, third)
    module.cache_merged = False
    with torch.no_grad():
        fifth, _ = module(x, CAPTION)
    assert torch.equal(fifth, fourth)
    module.train()
    assert not module._decision_cache and not module._merged_cache


def _eval_mixture(module: SegmentRoutedLinear, x: torch.Tensor) -> torch.Tensor:
    """Explicit mixture with the module's current noise-free decisions."""
    decisions = []
    for key in module.routing_keys(CAPTION):
        d = module.eval_decision(key)
        decisions.append((d.expert_ids.tolist(), d.weights.tolist()))
    weight, bias = module.experts.weight.detach(), module.experts.bias.detach()
    return reference_segment_mixture(x, CAPTION.boundaries(), decisions, weight, bias)


def test_eval_cache_built_under_autocast_serves_fp32_calls() -> None:
    module = _layer("attribute")["ffn_in"]
    module.eval()
    x = torch.randn(2, 8, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low, _ = module(x, CAPTION)
    with torch.no_grad():
        full, _ = module(x, CAPTION)
    assert low.dtype == torch.bfloat16 and full.dtype == torch.float32
    torch.testing.assert_close(full, _eval_mixture(module, x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(low.float(), full, atol=0.1, rtol=0.05)


def test_eval_routing_is_noise_free_and_batch_invariant() -> None:
    module = _layer("attribute", noise="vmoe", noise_std=5.0)["qkv"]
    module.eval()
    x = torch.randn(4, 8, 16)
    with torch.no_grad():
        full, _ = module(x, CAPTION)
        single, _ = module(x[2:3], CAPTION)
    torch.testing.assert_close(full[2:3], single, atol=1e-6, rtol=0)
    module.train()
    with torch.no_grad():
        noisy_a, _ = module(x, CAPTION)
        noisy_b, _ = module(x, CAPTION)
    assert not torch.allclose(noisy_a, noisy_b), "training noise of std 5/4 must change routing"


@pytest.mark.parametrize("name", ["qkv", "attn_out", "ffn_in", "ffn_out"])
def test_fold_equals_routed_module(name: str) -> None:
    layer = _layer("attribute")
    for m in layer.values():
        m.eval()
    module = layer[name]
    assert isinstance(module, SegmentRoutedLinear)
    targets = RoutingContext("caption", target_segments("vocabulary", 5))
    x = torch.randn(3, 5, module.in_features)
    with torch.no_grad():
        routed, _ = module(x, targets)
    dense = fold(module, targets.segments[0].attributes)
    assert isinstance(dense, nn.Linear)
    torch.testing.assert_close(dense(x), routed, atol=1e-6, rtol=1e-6)


def test_fold_modality_and_task_keys() -> None:
    for routing, key, routing_ctx in (
        (
            "modality",
            "image",
            RoutingContext("caption", input_segments("image_classification", visual_len=4)),
        ),
        ("task", "mlm", RoutingContext("mlm", input_segments("mlm", text_len=4))),
    ):
        module = _layer(routing)["ffn_in"]
        module.eval()
        x = torch.randn(2, 5, 16)
        with torch.no_grad():
            routed, _ = module(x, routing_ctx)
        torch.testing.assert_close(fold(module, key)(x), routed, atol=1e-6, rtol=1e-6)
    with pytest.raises(FoldError, match="token- and context-routed"):
        fold(_layer("token")["ffn_in"], "image")
    with pytest.raises(FoldError, match="attribute row"):
        fold(_layer("attribute")["ffn_in"], (1, 0))


def test_fold_report_reproduces_the_released_moe_base_counts() -> None:
    """SPEC §1.2/§2.8: MoE-Base stores 422,668,811 parameters with 4 gates per MoE layer;
    ours has no dead gates (2 per layer, 14,592 parameters each); with 2 merged sets it is
    167,265,803."""
    moe = MoEConfig(routing="attribute", num_experts=8, top_k=2, layers=(0, 2, 4, 6, 8, 10))
    config = ModelConfig(moe=moe)
    with torch.device("meta"):
        model = nn.Module()
        blocks = nn.ModuleList()
        for i in range(12):
            routed = build_routed_linears(config, i)
            block = nn.ModuleDict(
                routed
                or {
                    "qkv": nn.Linear(768, 2304),
                    "attn_out": nn.Linear(768, 768),
                    "ffn_in": nn.Linear(768, 3072),
                    "ffn_out": nn.Linear(3072, 768),
                }
            )
            blocks.append(block)
        model.blocks = blocks
        # embeddings, norms, gammas and head of the base model (124,757,003 - 12 x 7,084,800)
        model.rest = nn.Parameter(torch.empty(124_757_003 - 12 * 7_084_800))
    rows = [(1, 0, 0, 1, 1, 0, 0, 0), (1, 0, 0, 1, 0, 1, 1, 0)]
    report = fold_report(model, rows)
    assert report.params_before == 422_668_811 - 6 * 2 * 14_592
    assert report.params_after == 167_265_803
    assert report.routed_linears == 24
    assert report.merged_sets == 2


def test_reference_expert_keys_stack_in_order() -> None:
    state = {
        f"p.experts.deepspeed_experts.{e}.weight": torch.full((3, 2), float(e)) for e in range(4)
    }
    state.update({f"p.experts.deepspeed_experts.{e}.bias": torch.full((3,), -e) for e in range(4)})
    state["p.gate.wg.weight"] = torch.ones(4, 5)
    out = convert_reference_linear(state, "p.", 4, keep_gate=False)
    assert set(out) == {"p.experts.weight", "p.experts.bias"}
    assert out["p.experts.weight"][:, 0, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert out["p.experts.bias"][:, 0].tolist() == [0, -1, -2, -3]
    assert "p.gate.wg.weight" in convert_reference_linear(state, "p.", 4, keep_gate=True)


@pytest.mark.parametrize("routing", SEGMENT_ROUTINGS)
def test_eval_segment_matmuls_equal_the_mixture(routing: str) -> None:
    """Eval (cached plan, one matmul per run of the 2 segments) equals the explicit mixture,
    with and without autograd."""
    qkv = _layer(routing, top_k=2)["qkv"]
    assert isinstance(qkv, SegmentRoutedLinear)
    qkv.eval()
    x = torch.randn(3, 8, 16)
    with torch.no_grad():
        y, aux = qkv(x, CAPTION)
    with torch.enable_grad():
        y_grad_mode, _ = qkv(x, CAPTION)
    assert aux is not None and qkv.experts.bias is not None
    # task routing has one key for the whole sequence (one matmul); the others two runs
    assert len({s.key for s in aux.segments}) == (1 if routing == "task" else 2)
    expected = reference_segment_mixture(
        x,
        CAPTION.boundaries(),
        _decisions(aux.segments),
        qkv.experts.weight.detach(),
        qkv.experts.bias.detach(),
    )
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, y_grad_mode.detach(), atol=1e-6, rtol=1e-6)
