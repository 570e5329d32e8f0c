"""Slow, obviously-correct loop implementations of routed linears, used as test oracles.

Everything is a Python loop over units, choices and experts; nothing is vectorised or cached.
Not for training or inference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def reference_top_k(logits: Sequence[float], k: int) -> tuple[list[int], list[float], float]:
    """Top-k of one unit from plain floats.

    Args:
        logits: E logits of one unit.
        k: K.

    Returns:
        Expert ids (best first), combine weights (renormalised for K >= 2, p_{i1} for K = 1) and
        the top-1 probability.
    """
    top = max(logits)
    exps = [math.exp(v - top) for v in logits]
    total = sum(exps)
    probs = [v / total for v in exps]
    ids = sorted(range(len(logits)), key=lambda e: -logits[e])[:k]
    chosen = [probs[e] for e in ids]
    if k == 1:
        weights = chosen
    else:
        norm = max(sum(chosen), torch.finfo(torch.float32).eps)
        weights = [p / norm for p in chosen]
    return ids, weights, probs[ids[0]]


def reference_token_route(
    logits: torch.Tensor, top_k: int, capacity: int | None, batch_prioritized: bool
) -> tuple[list[list[int]], list[list[torch.Tensor]], list[list[bool]]]:
    """Top-k choices, differentiable combine weights and capacity decisions, by loops.

    First choices of all units are placed before any second choice; within a choice rank units go
    in index order, or by descending top-1 probability with batch-prioritised routing. An expert
    accepts an assignment while it holds fewer than `capacity`.

    Args:
        logits: (U, E) (noisy) gate logits; the combine weights keep their graph.
        top_k: K.
        capacity: C, or None for no limit.
        batch_prioritized: sort units by their top-1 probability.

    Returns:
        Expert ids [u][k], combine weights [u][k] (0-dim tensors: p_{i_k} renormalised over the
        K choices for K >= 2, p_{i_1} for K = 1) and kept flags [u][k].
    """
    num_units, num_experts = logits.shape
    choices = [reference_top_k(row, top_k) for row in logits.tolist()]
    order = list(range(num_units))
    if batch_prioritized:
        order = sorted(order, key=lambda u: -choices[u][2])
    fill = [0] * num_experts
    kept = [[False] * top_k for _ in range(num_units)]
    for k in range(top_k):
        for u in order:
            e = choices[u][0][k]
            if capacity is None or fill[e] < capacity:
                fill[e] += 1
                kept[u][k] = True
    ids = [choice[0] for choice in choices]
    weights: list[list[torch.Tensor]] = []
    eps = torch.finfo(torch.float32).eps
    for u in range(num_units):
        probs = torch.softmax(logits[u].float(), dim=0)
        chosen = [probs[e] for e in ids[u]]
        if top_k == 1:
            weights.append(chosen)
        else:
            norm = torch.clamp(sum(chosen[1:], chosen[0]), min=eps)
            weights.append([p / norm for p in chosen])
    return ids, weights, kept


def reference_apply_experts(
    x_units: torch.Tensor,
    ids: Sequence[Sequence[int]],
    weights: Sequence[Sequence[torch.Tensor | float]],
    kept: Sequence[Sequence[bool]],
    weight: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """y_u = Σ over kept k of g_{u,k} E_{i_{u,k}}(x_u), one unit and one choice at a time.

    Args:
        x_units: (U, T, Din) inputs (T tokens share each unit's decision).
        ids: expert ids [u][k].
        weights: combine weights [u][k].
        kept: kept flags [u][k].
        weight: (E, Dout, Din) expert weights.
        bias: (E, Dout) expert biases or None.

    Returns:
        (U, T, Dout) outputs, differentiable in every tensor argument.
    """
    rows = []
    for u in range(x_units.shape[0]):
        row = x_units.new_zeros((x_units.shape[1], weight.shape[1]))
        for k, e in enumerate(ids[u]):
            if not kept[u][k]:
                continue
            expert_out = x_units[u] @ weight[e].T
            if bias is not None:
                expert_out = expert_out + bias[e]
            row = row + weights[u][k] * expert_out
        rows.append(row)
    return torch.stack(rows)


def reference_token_moe(
    x_units: torch.Tensor,
    logits: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    top_k: int,
    capacity: int | None,
    batch_prioritized: bool,
) -> tuple[torch.Tensor, list[list[bool]]]:
    """Token dispatch with capacity, by loops (`reference_token_route` + `reference_apply_experts`).

    Differentiable in `x_units`, `logits` (through the combine weights), `weight` and `bias`.

    Args:
        x_units: (U, T, Din) inputs (T tokens share each unit's decision).
        logits: (U, E) (noisy) gate logits.
        weight: (E, Dout, Din) expert weights.
        bias: (E, Dout) expert biases or None.
        top_k: K.
        capacity: C, or None for no limit.
        batch_prioritized: sort units by their top-1 probability.

    Returns:
        (U, T, Dout) outputs and the kept flags [u][k].
    """
    ids, weights, kept = reference_token_route(logits, top_k, capacity, batch_prioritized)
    return reference_apply_experts(x_units, ids, weights, kept, weight, bias), kept


def reference_segment_mixture(
    x: torch.Tensor,
    bounds: Sequence[tuple[int, int]],
    decisions: Sequence[tuple[Sequence[int], Sequence[float]]],
    weight: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """The explicit mixture Σ_k g_k E_{i_k}(x) per segment (no weight merging).

    Args:
        x: (B, L, Din) inputs.
        bounds: [start, end) of each segment.
        decisions: (expert ids, weights) of each segment.
        weight: (E, Dout, Din) expert weights.
        bias: (E, Dout) expert biases or None.

    Returns:
        (B, L, Dout) outputs.
    """
    out = torch.zeros(*x.shape[:-1], weight.shape[1], dtype=x.dtype)
    for (start, end), (ids, gates) in zip(bounds, decisions, strict=True):
        for e, g in zip(ids, gates, strict=True):
            expert_out = x[:, start:end] @ weight[e].T
            if bias is not None:
                expert_out = expert_out + bias[e]
            out[:, start:end] += g * expert_out
    return out
