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


def reference_token_moe(
    x_units: torch.Tensor,
    logits: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    top_k: int,
    capacity: int | None,
    batch_prioritized: bool,
) -> tuple[torch.Tensor, list[list[bool]]]:
    """Token dispatch with capacity, by loops.

    First choices of all units are placed before any second choice; within a choice rank units go
    in index order, or by descending top-1 probability with batch-prioritised routing. An expert
    accepts an assignment while it holds fewer than `capacity`.

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
    num_units = x_units.shape[0]
    num_experts = weight.shape[0]
    rows = logits.tolist()
    choices = [reference_top_k(row, top_k) for row in rows]
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
    out = torch.zeros(num_units, x_units.shape[1], weight.shape[1], dtype=x_units.dtype)
    for u in range(num_units):
        ids, weights, _ = choices[u]
        for k in range(top_k):
            if not kept[u][k]:
                continue
            e = ids[k]
            expert_out = x_units[u] @ weight[e].T
            if bias is not None:
                expert_out = expert_out + bias[e]
            out[u] += weights[k] * expert_out
    return out, kept


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
