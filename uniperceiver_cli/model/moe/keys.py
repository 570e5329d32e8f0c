"""State-dict key mapping between the reference MoE linears and ours (SPEC §8.4).

Reference: `<P>.gate.{tag_transform.0,tag_transform.1,wg}.*` and
`<P>.experts.deepspeed_experts.<e>.{weight,bias}` per expert. Ours: the same gate names and one
stacked `<P>.experts.weight` (E, out, in) / `<P>.experts.bias` (E, out). Gates of reference linears
that only reuse a decision (`self_attn.dense`, `linear2`) are dead (SPEC §2.6) and are dropped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

_EXPERT_KEY = re.compile(
    r"^(?P<prefix>.*)experts\.deepspeed_experts\.(?P<e>\d+)\.(?P<kind>weight|bias)$"
)


class MoEKeyError(KeyError):
    """Reference expert keys are incomplete."""


def stack_reference_experts(
    state: Mapping[str, torch.Tensor], prefix: str, num_experts: int
) -> dict[str, torch.Tensor]:
    """Stack the per-expert reference tensors of one linear.

    Args:
        state: reference state dict (or a part of it).
        prefix: the linear's key prefix including the trailing dot, e.g.
            `fused_encoder.layers.0.linear1.`.
        num_experts: E.

    Returns:
        `{prefix + "experts.weight": (E, out, in), prefix + "experts.bias": (E, out)}` (bias only
        when present).

    Raises:
        MoEKeyError: when an expert's weight is missing.
    """
    out: dict[str, torch.Tensor] = {}
    for kind in ("weight", "bias"):
        keys = [f"{prefix}experts.deepspeed_experts.{e}.{kind}" for e in range(num_experts)]
        present = [k in state for k in keys]
        if not any(present) and kind == "bias":
            continue
        if not all(present):
            missing = [k for k, p in zip(keys, present, strict=True) if not p]
            raise MoEKeyError(f"missing reference expert tensors: {missing}")
        out[f"{prefix}experts.{kind}"] = torch.stack([state[k] for k in keys])
    return out


def convert_reference_linear(
    state: Mapping[str, torch.Tensor], prefix: str, num_experts: int, keep_gate: bool
) -> dict[str, torch.Tensor]:
    """Convert one reference MoE linear to our keys (same prefix).

    Args:
        state: reference state dict.
        prefix: the linear's key prefix with trailing dot.
        num_experts: E.
        keep_gate: copy `gate.*` (False for linears that reuse a decision).

    Returns:
        Our tensors for this linear.
    """
    out = stack_reference_experts(state, prefix, num_experts)
    if keep_gate:
        for key, value in state.items():
            if key.startswith(prefix + "gate."):
                out[key] = value
    return out


def is_reference_expert_key(key: str) -> bool:
    """Whether `key` is a per-expert reference tensor."""
    return _EXPERT_KEY.match(key) is not None
