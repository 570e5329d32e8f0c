"""Top-k selection, capacity, batch-prioritised routing and token grouping (token/context routing).

A *unit* is what one routing decision covers: a token (token routing) or a sample (context
routing). `plan_dispatch` decides which (unit, k) assignments each expert keeps, without a dense
(N, E, C) one-hot tensor: assignments are ordered by priority, stably sorted by expert and cut at
the capacity. `gather_units` / `combine_units` move rows into and out of that expert-sorted order.
Bookkeeping (sort, positions, masks) carries no gradient; combine weights do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TopK:
    """Selected experts and combine weights for U units.

    Attributes:
        expert_ids: (U, K) int64 expert indices, best first.
        weights: (U, K) float32 combine weights g_k: p_{i_k} / max(sum_k p_{i_k}, eps) for
            K >= 2; for K = 1 the Switch weight p_{i_1} (renormalising a single weight would make
            it the constant 1 and cut the router off from the task gradient).
        probs: (U, E) float32 softmax of the (noisy) logits.
    """

    expert_ids: torch.Tensor
    weights: torch.Tensor
    probs: torch.Tensor


def select_top_k(noisy_logits: torch.Tensor, k: int) -> TopK:
    """Pick the top-k experts by (noisy) logits (SPEC §2.4).

    Args:
        noisy_logits: (U, E) logits used for selection.
        k: experts per unit (K).

    Returns:
        The selection; `probs` is softmax(noisy_logits) (the vmoe convention).
    """
    assert noisy_logits.ndim == 2, f"expected (U, E), got {tuple(noisy_logits.shape)}"
    logits = noisy_logits.float()
    probs = torch.softmax(logits, dim=-1)
    ids = torch.topk(logits, k, dim=-1).indices
    top = probs.gather(-1, ids)
    if k == 1:
        weights = top
    else:
        eps = torch.finfo(top.dtype).eps
        weights = top / top.sum(dim=-1, keepdim=True).clamp_min(eps)
    return TopK(ids, weights, probs)


def expert_capacity(
    num_units: int, num_experts: int, top_k: int, factor: float | None
) -> int | None:
    """Capacity per expert, C = ceil(factor * U * K / E); None (dropless) when factor is None.

    Args:
        num_units: units routed together (U).
        num_experts: E.
        top_k: K.
        factor: capacity factor, or None for no capacity.

    Returns:
        C, or None.
    """
    if factor is None:
        return None
    return math.ceil(factor * num_units * top_k / num_experts)


@dataclass(frozen=True)
class DispatchPlan:
    """Which (unit, k) assignments each expert processes, grouped by expert.

    Attributes:
        expert_ids: (U, K) int64 selected experts.
        weights: (U, K) combine weights, zero where the assignment was dropped.
        kept: (U, K) bool, False where capacity dropped the assignment.
        order: (M,) int64 flat assignment indices (u * K + k) of the kept assignments, sorted by
            expert (within an expert, in priority order).
        counts: (E,) int64 kept assignments per expert.
        capacity: C, or None for dropless.
    """

    expert_ids: torch.Tensor
    weights: torch.Tensor
    kept: torch.Tensor
    order: torch.Tensor
    counts: torch.Tensor
    capacity: int | None

    @property
    def num_units(self) -> int:
        """U."""
        return int(self.expert_ids.shape[0])

    @property
    def top_k(self) -> int:
        """K."""
        return int(self.expert_ids.shape[1])

    @property
    def units(self) -> torch.Tensor:
        """(M,) unit index of each kept assignment, in `order`."""
        return torch.div(self.order, self.top_k, rounding_mode="floor")

    def dropped_fraction(self) -> torch.Tensor:
        """Share of (unit, k) assignments dropped by capacity (0-dim float32)."""
        total = max(self.kept.numel(), 1)
        return (self.kept.numel() - self.kept.sum()).float() / total


def plan_dispatch(
    top: TopK,
    num_experts: int,
    capacity: int | None,
    batch_prioritized: bool,
) -> DispatchPlan:
    """Fill expert capacity in priority order.

    Priority: all first choices before any second choice (GShard); within one choice rank, units
    in their natural order, or by descending top-1 probability with batch-prioritised routing
    (V-MoE BPR; ties keep the natural order). An expert keeps its first C assignments.

    Args:
        top: the top-k selection of U units.
        num_experts: E.
        capacity: C, or None to keep everything.
        batch_prioritized: sort units by their top-1 probability before filling capacity.

    Returns:
        The plan.
    """
    ids = top.expert_ids
    num_units, k = ids.shape
    device = ids.device
    with torch.no_grad():
        if batch_prioritized and num_units > 1:
            unit_order = torch.sort(top.probs.max(dim=-1).values, descending=True, stable=True)[1]
        else:
            unit_order = torch.arange(num_units, device=device)
        # (K, U) -> (K*U,): assignment indices u*K + k, first choices first
        ranks = torch.arange(k, device=device).unsqueeze(1)
        prio = (unit_order.unsqueeze(0) * k + ranks).reshape(-1)
        experts = ids.reshape(-1)[prio]
        sorted_experts, perm = torch.sort(experts, stable=True)
        assignments = prio[perm]
        counts_all = torch.bincount(sorted_experts, minlength=num_experts)
        if capacity is None:
            order = assignments
            counts = counts_all
            kept = torch.ones(num_units * k, dtype=torch.bool, device=device)
        else:
            starts = torch.cumsum(counts_all, 0) - counts_all
            position = torch.arange(assignments.numel(), device=device) - starts[sorted_experts]
            keep = position < capacity
            order = assignments[keep]
            counts = counts_all.clamp(max=capacity)
            kept = torch.zeros(num_units * k, dtype=torch.bool, device=device)
            kept[order] = True
        kept = kept.view(num_units, k)
    weights = top.weights * kept.to(top.weights.dtype)
    return DispatchPlan(ids, weights, kept, order, counts, capacity)


def gather_units(x_units: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Copy unit rows into expert-sorted order.

    Args:
        x_units: (U, T, Din) inputs, T tokens per unit (1 for token routing, L for context).
        plan: the dispatch plan.

    Returns:
        (M * T, Din) rows, expert-major.
    """
    rows = x_units.index_select(0, plan.units)  # (M, T, Din)
    return rows.reshape(-1, x_units.shape[-1])


def combine_units(
    out_sorted: torch.Tensor, plan: DispatchPlan, tokens_per_unit: int
) -> torch.Tensor:
    """Weight and sum the expert outputs of each unit (deterministic: no atomics).

    Args:
        out_sorted: (M * T, Dout) expert outputs in `plan.order`.
        plan: the dispatch plan.
        tokens_per_unit: T.

    Returns:
        (U, T, Dout) y_u = sum over kept k of g_k * E_{i_k}(x_u).
    """
    num_units, k = plan.num_units, plan.top_k
    dout = out_sorted.shape[-1]
    per_assignment = out_sorted.reshape(-1, tokens_per_unit, dout)  # (M, T, Dout)
    if plan.order.numel() == num_units * k:
        inverse = torch.empty_like(plan.order)
        inverse[plan.order] = torch.arange(plan.order.numel(), device=plan.order.device)
        slots = per_assignment.index_select(0, inverse)
    else:
        slots = per_assignment.new_zeros((num_units * k, tokens_per_unit, dout))
        slots = slots.index_copy(0, plan.order, per_assignment)
    slots = slots.view(num_units, k, tokens_per_unit, dout)
    weights = plan.weights.to(slots.dtype).view(num_units, k, 1, 1)
    return (slots * weights).sum(dim=1)
