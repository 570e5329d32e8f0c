"""build_routed_linears: placement, shared gates, parameter names and config errors."""

from __future__ import annotations

import pytest
import torch
from moe_helpers import tiny_config

from uniperceiver_cli.model.config import ModelConfig
from uniperceiver_cli.model.moe import (
    MoEConfigError,
    SegmentRoutedLinear,
    TokenRoutedLinear,
    build_routed_linears,
    total_aux_loss,
)
from uniperceiver_cli.model.routing import RoutingContext, input_segments


def test_only_moe_layers_get_routed_linears() -> None:
    config = tiny_config(routing="attribute")
    assert build_routed_linears(config, 1) == {}
    assert build_routed_linears(ModelConfig(hidden_size=16, num_heads=2), 0) == {}
    modules = build_routed_linears(config, 0)
    assert set(modules) == {"qkv", "attn_out", "ffn_in", "ffn_out"}
    shapes = {k: tuple(m.experts.weight.shape) for k, m in modules.items()}  # type: ignore[union-attr]
    assert shapes == {
        "qkv": (4, 48, 16),
        "attn_out": (4, 16, 16),
        "ffn_in": (4, 24, 16),
        "ffn_out": (4, 16, 24),
    }


def test_pairs_share_one_gate_and_register_it_once() -> None:
    modules = build_routed_linears(tiny_config(routing="attribute"), 0)
    qkv, attn_out = modules["qkv"], modules["attn_out"]
    assert isinstance(qkv, SegmentRoutedLinear) and isinstance(attn_out, SegmentRoutedLinear)
    assert attn_out.leader is qkv and attn_out.router is qkv.gate
    container = torch.nn.ModuleDict(modules)
    keys = set(container.state_dict())
    assert "qkv.gate.wg.weight" in keys and "ffn_in.gate.tag_transform.0.weight" in keys
    assert not any(k.startswith(("attn_out.gate", "ffn_out.gate")) for k in keys)
    # gates are counted once among the parameters
    ids = [id(p) for p in container.parameters()]
    assert len(ids) == len(set(ids))


def test_a_lone_member_of_a_pair_owns_its_gate() -> None:
    modules = build_routed_linears(
        tiny_config(routing="token", sublayers=("attn_out", "ffn_in")), 0
    )
    assert set(modules) == {"attn_out", "ffn_in"}
    for module in modules.values():
        assert isinstance(module, TokenRoutedLinear) and module.gate is not None


def test_encoder_style_call_collects_aux() -> None:
    modules = build_routed_linears(tiny_config(routing="token"), 0)
    routing = RoutingContext("t", input_segments("image_classification", visual_len=5))
    x = torch.randn(2, 6, 16)
    auxes = []
    for name, width in (("qkv", 16), ("attn_out", 16), ("ffn_in", 16), ("ffn_out", 24)):
        _, aux = modules[name](torch.randn(2, 6, width) if name != "qkv" else x, routing)
        auxes.append(aux)
    assert [a is None for a in auxes] == [False, True, False, True]
    total = total_aux_loss(auxes)
    assert total is not None and total.ndim == 0
    first = auxes[0]
    assert first is not None and first.name == "layers.0.qkv"
    assert set(first.metrics()) >= {"moe/layers.0.qkv/entropy", "moe/layers.0.qkv/tokens/3"}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"layers": (5,)}, "outside 0..1"),
        ({"routing": "attribute", "expert_parallel_size": 2}, "needs token or context routing"),
        ({"routing": "token", "expert_parallel_size": 3}, "must divide"),
        ({"routing": "token", "capacity_factor": 0.0}, "capacity factors must be > 0"),
        ({"routing": "task"}, "task_names"),
        (
            {"routing": "attribute", "expert_ffn": True},
            "expert_ffn \\(true\\) needs routing token or context",
        ),
        ({"routing": "token", "expert_ffn": True, "sublayers": ("ffn_in",)}, "missing"),
    ],
)
def test_config_errors_are_explicit(fields: dict[str, object], message: str) -> None:
    layers = fields.pop("layers", (0,))
    config = tiny_config(**fields)
    config = ModelConfig(
        hidden_size=16,
        num_heads=2,
        ffn_size=24,
        num_layers=2,
        moe=type(config.moe)(**{**config.moe.__dict__, "layers": layers}),  # type: ignore[union-attr]
    )
    with pytest.raises((MoEConfigError, ValueError), match=message):
        build_routed_linears(config, layers[0])  # type: ignore[index]
