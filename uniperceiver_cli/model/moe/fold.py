"""Fold segment-routed linears into plain dense linears for a fixed routing key (SPEC §2.8).

With modality, task or attribute routing the decision is a function of the key alone, so in eval a
routed linear equals one `nn.Linear` per key. `fold` builds it; `fold_report` counts the parameters
of a model before and after replacing every routed linear by one merged linear per key a task uses.
Token- and context-routed linears depend on the hidden states and cannot be folded.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable
from dataclasses import dataclass

import torch
from torch import nn

from uniperceiver_cli.model.moe.experts import merge_experts
from uniperceiver_cli.model.moe.layer import SegmentRoutedLinear, TokenRoutedLinear
from uniperceiver_cli.model.moe.router import (
    MODALITIES,
    AttributeRouter,
    ModalityRouter,
    RoutingError,
    TaskRouter,
)


class FoldError(ValueError):
    """A module or key cannot be folded into a dense linear."""


def canonical_key(module: SegmentRoutedLinear, key: Hashable) -> Hashable:
    """The routing key `module` uses for `key` (task fallback applied, rows as int tuples).

    Args:
        module: a segment-routed linear.
        key: attribute row (sequence of 0/1), modality name or task name.

    Returns:
        The key as the router's cache uses it (None = uniform average of experts).

    Raises:
        FoldError: when the key does not fit the router.
    """
    router = module.router
    try:
        if isinstance(router, AttributeRouter):
            if isinstance(key, str) or not isinstance(key, tuple | list):
                raise FoldError(f"attribute routing folds per attribute row, got {key!r}")
            row = tuple(int(v) for v in key)
            if len(row) != router.attribute_length:
                raise FoldError(
                    f"attribute row {row} has {len(row)} entries, expected {router.attribute_length}"
                )
            return row
        if isinstance(router, ModalityRouter):
            if key not in MODALITIES:
                raise FoldError(f"modality routing folds per modality {MODALITIES}, got {key!r}")
            return key
        if isinstance(router, TaskRouter):
            return router.task_key(str(key))
    except RoutingError as err:
        raise FoldError(str(err)) from err
    raise FoldError(f"cannot fold a linear routed by {type(router).__name__}")


def fold(module: nn.Module, routing_key: Hashable) -> nn.Linear:
    """Turn a segment-routed linear into the dense linear it computes for one key (eval, no noise).

    Args:
        module: a `SegmentRoutedLinear` (gate owner or follower).
        routing_key: attribute row, modality or task name.

    Returns:
        An `nn.Linear` with weight Σ g_k W_{i_k} and bias Σ g_k b_{i_k}, on the module's device
        and dtype.

    Raises:
        FoldError: for token/context-routed linears, other modules, or unusable keys.
    """
    if isinstance(module, TokenRoutedLinear):
        raise FoldError(
            "token- and context-routed linears choose experts from the hidden states; only "
            "modality, task and attribute routing can be folded"
        )
    if not isinstance(module, SegmentRoutedLinear):
        raise FoldError(f"expected a SegmentRoutedLinear, got {type(module).__name__}")
    key = canonical_key(module, routing_key)
    decision = module.eval_decision(key)
    experts = module.experts
    with torch.no_grad():
        weight, bias = merge_experts(
            experts.weight, experts.bias, decision.expert_ids, decision.weights
        )
        dense = nn.Linear(
            module.in_features,
            module.out_features,
            bias=bias is not None,
            device=experts.weight.device,
            dtype=experts.weight.dtype,
        )
        dense.weight.copy_(weight)
        if bias is not None:
            dense.bias.copy_(bias)
    return dense


@dataclass(frozen=True)
class FoldReport:
    """Parameter counts of a model before and after folding for a set of routing keys.

    Attributes:
        params_before: all parameters of the model as stored (experts and gates included).
        params_after: parameters of the deployed model: routed linears replaced by one merged
            dense linear per distinct key; gates removed.
        routed_linears: segment-routed linears found.
        merged_sets: distinct keys per linear (after task fallback).
    """

    params_before: int
    params_after: int
    routed_linears: int
    merged_sets: int


def fold_report(model: nn.Module, keys: Collection[Hashable]) -> FoldReport:
    """Count parameters before and after folding every segment-routed linear for `keys`.

    Works on meta-device models (only shapes are read).

    Args:
        model: a model containing `SegmentRoutedLinear`s.
        keys: the routing keys a task uses (e.g. its attribute rows).

    Returns:
        The report.

    Raises:
        FoldError: when the model has token/context-routed linears or a key does not fit.
    """
    before = sum(p.numel() for p in model.parameters())
    removed = 0
    added = 0
    count = 0
    distinct = 0
    for module in model.modules():
        if isinstance(module, TokenRoutedLinear):
            raise FoldError("the model has token/context-routed linears, which cannot be folded")
        if not isinstance(module, SegmentRoutedLinear):
            continue
        count += 1
        removed += sum(p.numel() for p in module.parameters())
        merged = {canonical_key(module, k) for k in keys}
        distinct = max(distinct, len(merged))
        per_set = module.in_features * module.out_features
        if module.experts.bias is not None:
            per_set += module.out_features
        added += len(merged) * per_set
    return FoldReport(before, before - removed + added, count, distinct)
