"""Expert parallelism for token/context routing over a torch.distributed process group.

Each of the P ranks of an expert-parallel group keeps E / P consecutive experts of every
token-routed linear (`shard_experts`). Routers stay replicated, so every rank routes its own tokens
with global expert ids; rows sorted by expert are then already grouped by owning rank. The exchange
sends per-expert counts first, then the rows, with `all_to_all_single` and uneven splits (the
differentiable variant from `torch.distributed.nn.functional`, so gradients flow back), runs the
local experts and sends the results back the same way. Works on gloo (CPU) and NCCL.
"""

from __future__ import annotations

import logging
from typing import cast

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from torch import nn

from uniperceiver_cli.model.gemm import GemmBackend
from uniperceiver_cli.model.moe.experts import ExpertWeights, grouped_linear
from uniperceiver_cli.model.moe.layer import TokenRoutedLinear

logger = logging.getLogger(__name__)


class ExpertParallelError(RuntimeError):
    """Experts cannot be sharded over the given group."""


def shard_experts(model: nn.Module, group: dist.ProcessGroup | None = None) -> int:
    """Keep only this rank's share of the experts of every token/context-routed linear.

    Call it on every rank of the group after building (and loading) the full model; rank r of a
    group of size P keeps experts [r E / P, (r + 1) E / P). Checkpoints of a sharded model hold
    only the local experts.

    Args:
        model: a module tree containing `TokenRoutedLinear`s.
        group: the expert-parallel process group (None = the default group).

    Returns:
        The number of linears sharded.

    Raises:
        ExpertParallelError: when E is not divisible by the group size or a linear is already
            sharded.
    """
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    sharded = 0
    for name, module in model.named_modules():
        if not isinstance(module, TokenRoutedLinear):
            continue
        experts = module.experts
        if experts.num_local != experts.num_experts:
            raise ExpertParallelError(f"{name} is already sharded ({experts.extra_repr()})")
        if experts.num_experts % world:
            raise ExpertParallelError(
                f"{name}: {experts.num_experts} experts cannot be split over {world} ranks; "
                "choose an expert_parallel_size that divides num_experts"
            )
        per_rank = experts.num_experts // world
        experts.shard(rank * per_rank, per_rank)
        module.expert_group = group if group is not None else dist.group.WORLD
        sharded += 1
    logger.debug("sharded %d routed linears over %d ranks", sharded, world)
    return sharded


def expert_parallel_linear(
    rows: torch.Tensor,
    counts: torch.Tensor,
    experts: ExpertWeights,
    group: dist.ProcessGroup,
    cpu_gemm: GemmBackend = "auto",
) -> torch.Tensor:
    """Apply globally indexed experts to expert-sorted rows, exchanging rows between ranks.

    Args:
        rows: (M, Din) this rank's rows, sorted by global expert id.
        counts: (E,) int64 rows per global expert (sum M).
        experts: this rank's shard of the experts.
        group: the expert-parallel group.
        cpu_gemm: GEMM library of float32 CPU matmuls (`gemm.mm`).

    Returns:
        (M, Dout) outputs in the order of `rows`.
    """
    return _expert_parallel(rows, counts, (experts,), group, cpu_gemm)


def expert_parallel_ffn(
    rows: torch.Tensor,
    counts: torch.Tensor,
    first: ExpertWeights,
    second: ExpertWeights,
    group: dist.ProcessGroup,
    cpu_gemm: GemmBackend = "auto",
) -> torch.Tensor:
    """`expert_parallel_linear` for whole-FFN experts (`moe.expert_ffn`): W2 GELU(W1 x + b1) + b2.

    Args:
        rows: (M, D) this rank's rows, sorted by global expert id.
        counts: (E,) int64 rows per global expert (sum M).
        first: this rank's shard of the first-layer experts (D -> F).
        second: the same shard of the second-layer experts (F -> D).
        group: the expert-parallel group.
        cpu_gemm: GEMM library of float32 CPU matmuls (`gemm.mm`).

    Returns:
        (M, D) expert outputs (second-layer bias included, not yet weighted) in the order of `rows`.
    """
    return _expert_parallel(rows, counts, (first, second), group, cpu_gemm)


def _expert_parallel(
    rows: torch.Tensor,
    counts: torch.Tensor,
    layers: tuple[ExpertWeights, ...],
    group: dist.ProcessGroup,
    cpu_gemm: GemmBackend,
) -> torch.Tensor:
    """Send rows to the ranks owning their experts, apply `layers` (GELU between), send back."""
    world = dist.get_world_size(group)
    local = layers[0].num_local
    assert counts.numel() == world * local, (
        f"expected {world * local} expert counts, got {counts.numel()}"
    )
    send_counts = counts.to(torch.long)
    recv_counts = torch.empty_like(send_counts)
    # counts first: recv_counts[src * local + j] = rows rank src sends to local expert j
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    send_splits = send_counts.view(world, local).sum(1).tolist()
    recv_splits = recv_counts.view(world, local).sum(1).tolist()
    received = rows.new_empty((sum(recv_splits), rows.shape[-1]))
    received = _exchange(received, rows.contiguous(), recv_splits, send_splits, group)
    # received rows: source-major, then local expert
    block_counts = recv_counts.tolist()
    block_experts = [index % local for index in range(len(block_counts))]
    processed = received
    for i, experts in enumerate(layers):
        if i:
            processed = F.gelu(processed)
        processed = grouped_linear(
            processed,
            experts.weight,
            experts.bias,
            block_counts,
            block_experts=block_experts,
            cpu_gemm=cpu_gemm,
        )
    returned = processed.new_empty((rows.shape[0], layers[-1].out_features))
    return _exchange(returned, processed, send_splits, recv_splits, group)


def _exchange(
    output: torch.Tensor,
    tensor: torch.Tensor,
    output_splits: list[int],
    input_splits: list[int],
    group: dist.ProcessGroup,
) -> torch.Tensor:
    """Differentiable all_to_all_single with uneven splits (gradients take the reverse route)."""
    out = dist_nn.all_to_all_single(  # type: ignore[no-untyped-call]
        output, tensor, output_splits, input_splits, group
    )
    return cast(torch.Tensor, out)
