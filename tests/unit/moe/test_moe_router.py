"""Routers: the official attribute gate table, noise policies, top-k weights, task/modality keys."""

from __future__ import annotations

import math

import pytest
import torch
from moe_helpers import official_moe_dir, tiny_config
from safetensors.torch import load_file

from uniperceiver_cli.model.moe import UnseenTaskError, build_routed_linears
from uniperceiver_cli.model.moe.dispatch import select_top_k
from uniperceiver_cli.model.moe.keys import convert_reference_linear
from uniperceiver_cli.model.moe.router import (
    AttributeRouter,
    ContextRouter,
    ModalityRouter,
    RoutingError,
    TaskRouter,
    TokenRouter,
)
from uniperceiver_cli.model.routing import RoutingContext, Segment, input_segments

GATE_MODULES = ("self_attn.qkv_proj", "self_attn.dense", "linear1", "linear2")


def _official() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    path = official_moe_dir()
    state = torch.load(path / "checkpoint_torch.pth", weights_only=True)["model"]
    outputs = load_file(str(path / "outputs.safetensors"))
    return state, outputs


@pytest.mark.parity
@pytest.mark.parametrize("index", range(4))
def test_attribute_router_reproduces_official_gate_table(index: int) -> None:
    state, outputs = _official()
    prefix = f"fused_encoder.layers.0.{GATE_MODULES[index]}.gate."
    router = AttributeRouter(8, 64, 4, "vmoe", 1.0)
    gate_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    router.load_state_dict(gate_state, strict=True)
    router.eval()
    rows = outputs["moe.attribute_rows"]
    keys = [tuple(int(v) for v in row.tolist()) for row in rows]
    gate_out = router(keys)
    torch.testing.assert_close(
        gate_out.logits, outputs["moe.gate_logits"][index], atol=1e-5, rtol=0
    )
    top = select_top_k(gate_out.noisy_logits, 2)
    assert torch.equal(top.expert_ids, outputs["moe.gate_top2_ids"][index])
    torch.testing.assert_close(
        top.weights, outputs["moe.gate_top2_weights"][index], atol=1e-6, rtol=0
    )


@pytest.mark.parity
def test_routed_linears_loaded_from_reference_keys_use_live_gates() -> None:
    state, outputs = _official()
    config = tiny_config(hidden=64, ffn=256, routing="attribute", num_experts=4, top_k=2)
    modules = build_routed_linears(config, 0)
    ours = {
        "qkv": "self_attn.qkv_proj",
        "attn_out": "self_attn.dense",
        "ffn_in": "linear1",
        "ffn_out": "linear2",
    }
    for name, ref in ours.items():
        prefix = f"fused_encoder.layers.0.{ref}."
        converted = convert_reference_linear(state, prefix, 4, keep_gate=name in ("qkv", "ffn_in"))
        local = {k[len(prefix) :]: v for k, v in converted.items()}
        modules[name].load_state_dict(local, strict=True)
        modules[name].eval()
    rows = outputs["moe.attribute_rows"]
    ids = outputs["moe.gate_top2_ids"]
    weights = outputs["moe.gate_top2_weights"]
    for r, row in enumerate(rows):
        key = tuple(int(v) for v in row.tolist())
        routing = RoutingContext("t", (Segment(3, "text", key),))
        x = torch.randn(2, 3, 64)
        with torch.no_grad():
            _, aux_qkv = modules["qkv"](x, routing)
            _, aux_ffn = modules["ffn_in"](x, routing)
        assert aux_qkv is not None and aux_ffn is not None
        # qkv_proj is gate module 0, linear1 is gate module 2; the followers' gates are dead
        assert aux_qkv.segments[0].expert_ids.tolist() == ids[0, r].tolist()
        assert aux_ffn.segments[0].expert_ids.tolist() == ids[2, r].tolist()
        torch.testing.assert_close(aux_qkv.segments[0].weights, weights[0, r], atol=1e-6, rtol=0)
        torch.testing.assert_close(aux_ffn.segments[0].weights, weights[2, r], atol=1e-6, rtol=0)


def test_vmoe_noise_is_seeded_per_call_and_absent_in_eval() -> None:
    router = TokenRouter(8, 4, "vmoe", 2.0)
    x = torch.randn(5, 8)
    router.generator = torch.Generator().manual_seed(7)
    out = router(x)
    expected_noise = torch.randn(5, 4, generator=torch.Generator().manual_seed(7)) * (2.0 / 4)
    torch.testing.assert_close(out.noisy_logits - out.logits, expected_noise)
    router.eval()
    first, second = router(x), router(x)
    assert torch.equal(first.noisy_logits, first.logits)
    assert torch.equal(first.logits, second.logits)
    torch.testing.assert_close(first.logits, out.logits)


def test_jitter_scales_the_gate_input_in_training_only() -> None:
    router = TokenRouter(8, 4, "jitter", 0.4)
    x = torch.randn(6, 8)
    router.generator = torch.Generator().manual_seed(3)
    out = router(x)
    u = torch.rand(6, 8, generator=torch.Generator().manual_seed(3))
    factor = 1 + (2 * u - 1) * 0.1
    torch.testing.assert_close(out.noisy_logits, (x * factor) @ router.wg.weight.T)
    router.eval()
    assert torch.equal(router(x).noisy_logits, router(x).logits)


def test_segment_router_draws_one_noise_row_per_key() -> None:
    router = AttributeRouter(8, 16, 4, "vmoe", 1.0)
    router.generator = torch.Generator().manual_seed(1)
    row = (1, 0, 0, 1, 1, 0, 0, 0)
    out = router([row, row])
    noise = out.noisy_logits - out.logits
    assert noise.shape == (2, 4)
    assert not torch.allclose(noise[0], noise[1])


def test_top1_weight_is_the_probability_and_top2_weights_are_renormalised() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 1.0, 0.5]])
    probs = torch.softmax(logits, -1)
    top1 = select_top_k(logits, 1)
    assert top1.expert_ids.tolist() == [[0], [1]]
    torch.testing.assert_close(top1.weights[:, 0], probs.max(-1).values)
    top2 = select_top_k(logits, 2)
    assert top2.expert_ids.tolist() == [[0, 1], [1, 2]]
    expected = torch.tensor(
        [
            [probs[0, 0] / (probs[0, 0] + probs[0, 1]), probs[0, 1] / (probs[0, 0] + probs[0, 1])],
            [probs[1, 1] / (probs[1, 1] + probs[1, 2]), probs[1, 2] / (probs[1, 1] + probs[1, 2])],
        ]
    )
    torch.testing.assert_close(top2.weights, expected)


def test_gate_logits_stay_fp32_under_autocast() -> None:
    router = TokenRouter(8, 4, "none", 1.0)
    x = torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = router(x.bfloat16())
    assert out.logits.dtype == torch.float32
    torch.testing.assert_close(out.logits, x.bfloat16().float() @ router.wg.weight.T)


def test_context_router_pools_only_real_tokens() -> None:
    router = ContextRouter(4, 3, "none", 1.0)
    x = torch.randn(2, 5, 4)
    padding = torch.tensor([[False, False, False, True, True], [False] * 5])
    pooled = ContextRouter.pool(x, padding)
    torch.testing.assert_close(pooled[0], x[0, :3].mean(0))
    torch.testing.assert_close(pooled[1], x[1].mean(0))
    torch.testing.assert_close(router(x, padding).logits, pooled @ router.wg.weight.T)


def test_modality_router_keys_and_unknown_modality() -> None:
    router = ModalityRouter(16, 4, "none", 1.0)
    seg = Segment(3, "video", (0,) * 8)
    assert router.segment_key(seg, "t") == "video"
    logits = router(["image", "video", "text"]).logits
    assert logits.shape == (3, 4)
    assert not torch.allclose(logits[0], logits[1])
    with pytest.raises(RoutingError, match="unknown modality 'audio'"):
        router.segment_key(Segment(3, "audio", (0,) * 8), "t")  # type: ignore[arg-type]


def test_task_router_unseen_task_policies() -> None:
    strict = TaskRouter(16, 4, "none", 1.0, ("caption", "mlm"))
    assert strict.task_key("mlm") == "mlm"
    with pytest.raises(UnseenTaskError, match="'vqa' is not one of the routed tasks"):
        strict.task_key("vqa")
    uniform = TaskRouter(16, 4, "none", 1.0, ("caption",), unseen_task="uniform")
    assert uniform.task_key("vqa") is None
    fallback = TaskRouter(16, 4, "none", 1.0, ("caption", "mlm"), "fallback", "mlm")
    assert fallback.task_key("vqa") == "mlm"
    with pytest.raises(RoutingError, match="fallback_task"):
        TaskRouter(16, 4, "none", 1.0, ("caption",), "fallback", "nope")


def test_task_routing_uniform_and_fallback_outputs() -> None:
    segs = input_segments("image_caption", visual_len=3, text_len=2)
    x = torch.randn(2, 6, 16)
    uniform = build_routed_linears(
        tiny_config(routing="task", task_names=("caption",), unseen_task="uniform"), 0
    )["ffn_in"]
    uniform.eval()
    with torch.no_grad():
        y, aux = uniform(x, RoutingContext("vqa", segs))
    weight = uniform.experts.weight.mean(0)
    bias = uniform.experts.bias.mean(0)
    torch.testing.assert_close(y, x @ weight.T + bias)
    assert aux is not None and aux.segments[0].key is None
    assert math.isclose(float(aux.gate_entropy), math.log(4), rel_tol=1e-6)

    fallback = build_routed_linears(
        tiny_config(
            routing="task",
            task_names=("caption", "mlm"),
            unseen_task="fallback",
            fallback_task="mlm",
        ),
        0,
    )["ffn_in"]
    fallback.eval()
    with torch.no_grad():
        y_unseen, _ = fallback(x, RoutingContext("vqa", segs))
        y_mlm, _ = fallback(x, RoutingContext("mlm", segs))
    assert torch.equal(y_unseen, y_mlm)
