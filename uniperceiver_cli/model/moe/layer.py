"""Routed linears: the MoE replacements of an encoder block's four linears, and their factory.

* `SegmentRoutedLinear` (`segment_linear.py`; modality, task, attribute routing): one decision per
  segment, experts merged into one weight per decision (SPEC §2.5), cached per key in eval.
* `TokenRoutedLinear` (`token_linear.py`; token, context routing): top-k, capacity,
  batch-prioritised routing and the fused per-expert matmul; bitwise batch-invariant in eval.
* Their shared base and the shared-decision rule (`routed.py`).

This module validates the MoE part of a `ModelConfig` and builds the routed linears of a layer
(`build_routed_linears`). Both kinds are called as `y, aux = module(x, routing)`. Shared decisions
(SPEC §2.6): the second linear of a pair (`attn_out` after `qkv`, `ffn_out` after `ffn_in`) holds
no gate; it keeps an unregistered reference to its leader and reuses the decision of the leader's
latest call, so it must be called after the leader within the same block call. Followers return
`aux=None`.
"""

from __future__ import annotations

from torch import nn

from uniperceiver_cli.model.config import ModelConfig, expert_ffn_problems
from uniperceiver_cli.model.moe.routed import SHARED_PAIRS, SharedDecisionError
from uniperceiver_cli.model.moe.router import (
    AttributeRouter,
    ContextRouter,
    ModalityRouter,
    SegmentRouter,
    TaskRouter,
    TokenRouter,
)
from uniperceiver_cli.model.moe.segment_linear import SegmentDecision, SegmentRoutedLinear
from uniperceiver_cli.model.moe.token_linear import TokenRoute, TokenRoutedLinear

__all__ = [
    "SHARED_PAIRS",
    "MoEConfigError",
    "RoutedLinear",
    "SegmentDecision",
    "SegmentRoutedLinear",
    "SharedDecisionError",
    "TokenRoute",
    "TokenRoutedLinear",
    "build_routed_linears",
    "build_router",
    "sublayer_shapes",
    "validate_moe_config",
]


class MoEConfigError(ValueError):
    """The MoE part of a ModelConfig cannot be built."""


RoutedLinear = SegmentRoutedLinear | TokenRoutedLinear


def validate_moe_config(config: ModelConfig) -> None:
    """Check the MoE settings a build relies on.

    Args:
        config: model configuration.

    Raises:
        MoEConfigError: naming the field, the value found and what to change.
    """
    moe = config.moe
    if moe is None:
        return
    if moe.routing not in ("token", "context", "modality", "task", "attribute"):
        raise MoEConfigError(f"moe.routing {moe.routing!r} is not a known strategy")
    if not 1 <= moe.top_k <= moe.num_experts:
        raise MoEConfigError(f"moe.top_k ({moe.top_k}) must be in 1..{moe.num_experts}")
    bad_layers = [i for i in moe.layers if not 0 <= i < config.num_layers]
    if bad_layers:
        raise MoEConfigError(
            f"moe.layers {bad_layers} are outside 0..{config.num_layers - 1} (num_layers)"
        )
    bad_sub = [s for s in moe.sublayers if s not in ("qkv", "attn_out", "ffn_in", "ffn_out")]
    if bad_sub:
        raise MoEConfigError(f"unknown moe.sublayers {bad_sub}; use qkv/attn_out/ffn_in/ffn_out")
    if moe.expert_parallel_size < 1 or moe.num_experts % moe.expert_parallel_size:
        raise MoEConfigError(
            f"moe.expert_parallel_size ({moe.expert_parallel_size}) must divide "
            f"moe.num_experts ({moe.num_experts})"
        )
    if moe.expert_parallel_size > 1 and moe.routing not in ("token", "context"):
        raise MoEConfigError(
            f"moe.expert_parallel_size={moe.expert_parallel_size} needs token or context routing "
            f"(got {moe.routing!r}); segment routing merges weights and keeps all experts local"
        )
    if moe.expert_ffn:
        problems = expert_ffn_problems(moe.routing, moe.sublayers)
        if problems:
            raise MoEConfigError("; ".join(f"moe.{p}" for p in problems))
    if moe.capacity_factor <= 0 or (
        moe.eval_capacity_factor is not None and moe.eval_capacity_factor <= 0
    ):
        raise MoEConfigError(
            f"capacity factors must be > 0, got capacity_factor={moe.capacity_factor}, "
            f"eval_capacity_factor={moe.eval_capacity_factor}"
        )


def build_router(
    config: ModelConfig, in_features: int
) -> TokenRouter | ContextRouter | SegmentRouter:
    """Build the gate of one gate-owning routed linear.

    Args:
        config: model configuration with `moe` set.
        in_features: input width of the linear (gate input of token/context routers).

    Returns:
        The router for `config.moe.routing`.
    """
    moe = config.moe
    assert moe is not None
    e, noise, std = moe.num_experts, moe.noise, moe.noise_std
    if moe.routing == "token":
        return TokenRouter(in_features, e, noise, std)
    if moe.routing == "context":
        return ContextRouter(in_features, e, noise, std)
    if moe.routing == "modality":
        return ModalityRouter(config.hidden_size, e, noise, std)
    if moe.routing == "task":
        return TaskRouter(
            config.hidden_size, e, noise, std, moe.task_names, moe.unseen_task, moe.fallback_task
        )
    return AttributeRouter(moe.attribute_length, config.hidden_size, e, noise, std, config.ln_eps)


def sublayer_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of the four block linears."""
    d, f = config.hidden_size, config.ffn_size
    return {"qkv": (d, 3 * d), "attn_out": (d, d), "ffn_in": (d, f), "ffn_out": (f, d)}


def _make_linear(
    config: ModelConfig,
    name: str,
    layer_index: int,
    leader: SegmentRoutedLinear | TokenRoutedLinear | None,
) -> SegmentRoutedLinear | TokenRoutedLinear:
    """One routed linear: a gate owner when `leader` is None, else a follower of `leader`."""
    moe = config.moe
    assert moe is not None
    fan_in, fan_out = sublayer_shapes(config)[name]
    fused = name == "qkv"
    if moe.routing in ("modality", "task", "attribute"):
        if leader is None:
            router = build_router(config, fan_in)
            assert isinstance(router, SegmentRouter)
            return SegmentRoutedLinear(
                fan_in,
                fan_out,
                moe,
                router=router,
                layer_index=layer_index,
                sublayer=name,
                fused_qkv=fused,
            )
        assert isinstance(leader, SegmentRoutedLinear)
        return SegmentRoutedLinear(
            fan_in,
            fan_out,
            moe,
            router=None,
            leader=leader,
            layer_index=layer_index,
            sublayer=name,
            fused_qkv=fused,
        )
    if leader is None:
        token_router = build_router(config, fan_in)
        assert isinstance(token_router, TokenRouter | ContextRouter)
        return TokenRoutedLinear(
            fan_in,
            fan_out,
            moe,
            router=token_router,
            layer_index=layer_index,
            sublayer=name,
            fused_qkv=fused,
        )
    assert isinstance(leader, TokenRoutedLinear)
    return TokenRoutedLinear(
        fan_in,
        fan_out,
        moe,
        router=None,
        leader=leader,
        layer_index=layer_index,
        sublayer=name,
        fused_qkv=fused,
    )


def build_routed_linears(config: ModelConfig, layer_index: int) -> dict[str, nn.Module]:
    """Routed replacements for the linears of one encoder block.

    Args:
        config: model configuration.
        layer_index: 0-based encoder layer.

    Returns:
        Sublayer name -> routed module for the sublayers of `config.moe.sublayers` when
        `layer_index` is in `config.moe.layers`, else an empty dict. In a pair whose both members
        are routed, the second one reuses the first one's decision and owns no gate.

    Raises:
        MoEConfigError: when the MoE settings cannot be built.
    """
    moe = config.moe
    if moe is None or layer_index not in moe.layers:
        return {}
    validate_moe_config(config)
    out: dict[str, nn.Module] = {}
    for pair in SHARED_PAIRS:
        leader: SegmentRoutedLinear | TokenRoutedLinear | None = None
        for name in pair:
            if name not in moe.sublayers:
                continue
            module = _make_linear(config, name, layer_index, leader)
            leader = leader or module
            out[name] = module
    return out
