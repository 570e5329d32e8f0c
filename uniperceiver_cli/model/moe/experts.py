"""Batched expert weights of a routed linear and the two ways to apply them.

`ExpertWeights` stores E linear experts as one (E, out, in) weight and an (E, out) bias.
`merge_experts` forms Σ g_k W_{i_k} for segment-constant routing (SPEC §2.5); `grouped_linear`
applies each expert to its contiguous block of expert-sorted rows (token/context routing), with a
per-expert matmul loop or `torch._grouped_mm`. No routing decisions here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def xavier_bound(out_features: int, in_features: int, fused_qkv: bool = False) -> float:
    """Xavier-uniform bound of the reference MAE init (SPEC §1.12).

    Args:
        out_features: rows of the weight.
        in_features: columns of the weight.
        fused_qkv: use fan (out / 3 + in), as the reference does for fused qkv weights.

    Returns:
        The bound a of U(-a, a).
    """
    fan_out = out_features // 3 if fused_qkv else out_features
    return math.sqrt(6.0 / (fan_out + in_features))


class ExpertWeights(nn.Module):
    """E linear experts as stacked tensors.

    With expert parallelism a rank holds `num_local` consecutive experts starting at global index
    `first_expert`; otherwise it holds all of them.

    Args:
        num_experts: E.
        in_features: Din.
        out_features: Dout.
        bias: whether experts have biases.
        fused_qkv: initialise with the reference's fused-qkv Xavier fan.

    Attributes:
        weight: (E_local, Dout, Din).
        bias: (E_local, Dout) or None.
    """

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        out_features: int,
        bias: bool = True,
        fused_qkv: bool = False,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.in_features = in_features
        self.out_features = out_features
        self.fused_qkv = fused_qkv
        self.first_expert = 0
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))
        self.bias: nn.Parameter | None = (
            nn.Parameter(torch.empty(num_experts, out_features)) if bias else None
        )
        self.reset_parameters()

    @property
    def num_local(self) -> int:
        """Experts held by this module (E_local)."""
        return int(self.weight.shape[0])

    def reset_parameters(self) -> None:
        """Xavier-uniform per expert, zero biases (the reference MAE init)."""
        bound = xavier_bound(self.out_features, self.in_features, self.fused_qkv)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def shard(self, first_expert: int, num_local: int) -> None:
        """Keep only experts [first_expert, first_expert + num_local) (expert parallelism).

        Args:
            first_expert: global index of the first kept expert.
            num_local: number of kept experts.
        """
        end = first_expert + num_local
        if not 0 <= first_expert < end <= self.num_local:
            raise ValueError(
                f"cannot keep experts [{first_expert}, {end}) of {self.num_local} held experts"
            )
        self.weight = nn.Parameter(self.weight.detach()[first_expert:end].clone())
        if self.bias is not None:
            self.bias = nn.Parameter(self.bias.detach()[first_expert:end].clone())
        self.first_expert += first_expert

    def extra_repr(self) -> str:
        """Shape summary."""
        return (
            f"experts={self.num_local}/{self.num_experts}, in={self.in_features}, "
            f"out={self.out_features}, bias={self.bias is not None}"
        )


def merge_experts(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    expert_ids: torch.Tensor,
    gates: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Merge experts into one linear: W = Σ g_k W_{i_k}, b = Σ g_k b_{i_k} (SPEC §2.5).

    Args:
        weight: (E, Dout, Din) expert weights.
        bias: (E, Dout) expert biases or None.
        expert_ids: (K,) int64 selected experts.
        gates: (K,) combine weights.

    Returns:
        (Dout, Din) weight and (Dout,) bias (or None), in the parameters' dtype (autocast off).
    """
    # merge in the parameters' dtype: cached merges must not depend on the ambient autocast
    with torch.autocast(device_type=weight.device.type, enabled=False):
        g = gates.to(weight.dtype)
        merged_w = torch.einsum("k,koi->oi", g, weight.index_select(0, expert_ids))
        merged_b = None if bias is None else g @ bias.index_select(0, expert_ids)
    return merged_w, merged_b


def grouped_mm_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` accepts these operands.

    With torch 2.11 on CPU it runs float32 and bfloat16 (forward and backward) when both widths
    are multiples of 16 bytes and the dtypes match; there it measured about 10% slower than the
    per-expert matmul loop, so the loop is the default.

    Args:
        x: (M, Din) rows.
        weight: (E, Dout, Din) weights.

    Returns:
        True when the grouped kernel can be used.
    """
    if not hasattr(torch, "_grouped_mm") or x.dtype != weight.dtype:
        return False
    item = x.element_size()
    return (weight.shape[-1] * item) % 16 == 0 and (weight.shape[-2] * item) % 16 == 0


def grouped_linear(
    x_sorted: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    counts: Sequence[int],
    use_grouped_mm: bool = False,
) -> torch.Tensor:
    """Apply expert e to its block of rows: rows are contiguous per expert, in expert order.

    Args:
        x_sorted: (M, Din) rows, expert-major.
        weight: (E, Dout, Din) weights of the experts the counts refer to.
        bias: (E, Dout) biases or None.
        counts: E row counts (sum M).
        use_grouped_mm: use `torch._grouped_mm` when the operands allow it.

    Returns:
        (M, Dout) outputs in the same row order.
    """
    num = weight.shape[0]
    assert len(counts) == num, f"expected {num} counts, got {len(counts)}"
    if x_sorted.shape[0] == 0:
        return x_sorted.new_zeros((0, weight.shape[1]))
    if use_grouped_mm and grouped_mm_supported(x_sorted, weight):
        offsets = torch.tensor(counts, device=x_sorted.device).cumsum(0).to(torch.int32)
        out: torch.Tensor = torch._grouped_mm(x_sorted, weight.transpose(1, 2), offs=offsets)
        if bias is not None:
            rows_expert = torch.repeat_interleave(
                torch.arange(num, device=x_sorted.device),
                torch.tensor(counts, device=x_sorted.device),
            )
            out = out + bias.index_select(0, rows_expert)
        return out
    blocks = torch.split(x_sorted, list(counts))
    outs = [
        F.linear(block, weight[e], None if bias is None else bias[e])
        for e, block in enumerate(blocks)
        if counts[e] > 0
    ]
    return torch.cat(outs, dim=0)
