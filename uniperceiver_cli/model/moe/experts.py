"""Batched expert weights of a routed linear and the two ways to apply them.

`ExpertWeights` stores E linear experts as one (E, out, in) weight and an (E, out) bias.
`merge_experts` forms Σ g_k W_{i_k} for segment-constant routing (SPEC §2.5). For token/context
routing, `grouped_linear` applies each expert to its contiguous block of expert-sorted rows (a
per-expert matmul loop with a hand-written backward, or `torch._grouped_mm`), and
`dispatch_linear` fuses gather, experts, combine weights and scatter-add into one autograd node
(the default path of `TokenRoutedLinear`). No routing decisions here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.autograd.function import once_differentiable


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


class _GroupedLinear(torch.autograd.Function):
    """Per-block linear with hand-written backward (no per-expert `weight[e]` autograd nodes).

    Autograd through `weight[e]` would give every expert a full-size zero gradient of the whole
    (E, Dout, Din) tensor and add them up; here each expert's gradient is written once, in place,
    and the forward writes every block straight into one preallocated output (no `cat`).
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        counts: tuple[int, ...],
        experts: tuple[int, ...],
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.blocks = (counts, experts)  # type: ignore[attr-defined]
        ctx.has_bias = bias is not None  # type: ignore[attr-defined]
        out = x.new_empty((x.shape[0], weight.shape[1]))
        with torch.autocast(device_type=x.device.type, enabled=False):
            start = 0
            for n, e in zip(counts, experts, strict=True):
                if n:
                    rows = slice(start, start + n)
                    if bias is None:
                        torch.mm(x[rows], weight[e].t(), out=out[rows])
                    else:
                        torch.addmm(bias[e], x[rows], weight[e].t(), out=out[rows])
                start += n
        return out

    @staticmethod
    @once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, None, None]:
        x, weight = ctx.saved_tensors  # type: ignore[attr-defined]
        counts, experts = ctx.blocks  # type: ignore[attr-defined]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]  # type: ignore[attr-defined]
        need_b = need_b and ctx.has_bias  # type: ignore[attr-defined]
        grad_out = grad_out.contiguous()
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = torch.empty_like(weight) if need_w else None
        grad_b = grad_out.new_zeros((weight.shape[0], weight.shape[1])) if need_b else None
        written: set[int] = set()
        with torch.autocast(device_type=x.device.type, enabled=False):
            start = 0
            for n, e in zip(counts, experts, strict=True):
                if not n:
                    continue
                rows = slice(start, start + n)
                start += n
                g = grad_out[rows]
                if grad_x is not None:
                    torch.mm(g, weight[e], out=grad_x[rows])
                if grad_w is not None:
                    if e in written:
                        grad_w[e].addmm_(g.t(), x[rows])
                    else:
                        torch.mm(g.t(), x[rows], out=grad_w[e])
                if grad_b is not None:
                    grad_b[e] += g.sum(dim=0)
                written.add(e)
            if grad_x is not None and start < x.shape[0]:
                grad_x[start:].zero_()
            if grad_w is not None:
                for e in range(weight.shape[0]):
                    if e not in written:
                        grad_w[e].zero_()
        return grad_x, grad_w, grad_b, None, None


def grouped_linear(
    x_sorted: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    counts: Sequence[int],
    use_grouped_mm: bool = False,
    block_experts: Sequence[int] | None = None,
) -> torch.Tensor:
    """Apply expert e to its block of rows: rows are contiguous per block, blocks in order.

    Under autocast the operands are cast to the autocast dtype first (as `F.linear` would be).

    Args:
        x_sorted: (M, Din) rows, block-major.
        weight: (E, Dout, Din) weights of the experts the blocks refer to.
        bias: (E, Dout) biases or None.
        counts: row count of every block (sum M); without `block_experts`, one block per expert
            in expert order (E counts).
        use_grouped_mm: use `torch._grouped_mm` when the operands allow it (one block per
            expert only).
        block_experts: expert index of every block, when blocks are not simply 0..E-1 (an
            expert may own several blocks, e.g. one per source rank under expert parallelism).

    Returns:
        (M, Dout) outputs in the same row order.
    """
    num = weight.shape[0]
    experts = tuple(range(num)) if block_experts is None else tuple(int(e) for e in block_experts)
    assert len(counts) == len(experts), f"expected {len(experts)} counts, got {len(counts)}"
    device_type = x_sorted.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x_sorted, weight = x_sorted.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    fused = use_grouped_mm and block_experts is None and x_sorted.shape[0] > 0
    if fused and grouped_mm_supported(x_sorted, weight):
        offsets = torch.tensor(counts, device=x_sorted.device).cumsum(0).to(torch.int32)
        out: torch.Tensor = torch._grouped_mm(x_sorted, weight.transpose(1, 2), offs=offsets)
        if bias is not None:
            rows_expert = torch.repeat_interleave(
                torch.arange(num, device=x_sorted.device),
                torch.tensor(counts, device=x_sorted.device),
            )
            out = out + bias.index_select(0, rows_expert)
        return out
    applied: torch.Tensor = _GroupedLinear.apply(  # type: ignore[no-untyped-call]
        x_sorted, weight, bias, tuple(int(c) for c in counts), experts
    )
    return applied


class _DispatchLinear(torch.autograd.Function):
    """Gather, grouped linear, row scaling and scatter-add in one node (see `dispatch_linear`).

    Expert by expert, forward gathers the block's input rows, runs one matmul, scales the rows
    in place and adds them to their output rows; only block-sized temporaries exist and only the
    ungathered input is kept for backward. Backward regathers per block and keeps every scaling
    on the input side (width Din): with g the block's output gradient and s its row weights,
    dx = s * (g W) scattered back, dW = gᵀ (s * x), db = gᵀ s and ds = rowdot(g W, x) + g · b.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        row_weights: torch.Tensor,
        src: torch.Tensor,
        dest: torch.Tensor,
        num_out: int,
        counts: tuple[int, ...],
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight, bias, row_weights, src, dest)  # type: ignore[arg-type]
        ctx.counts = counts  # type: ignore[attr-defined]
        scale = row_weights.to(x.dtype).unsqueeze(1)
        y = x.new_zeros((num_out, weight.shape[1]))
        with torch.autocast(device_type=x.device.type, enabled=False):
            start = 0
            for e, n in enumerate(counts):
                if not n:
                    continue
                rows = slice(start, start + n)
                start += n
                xb = x.index_select(0, src[rows])
                if bias is None:
                    out = torch.mm(xb, weight[e].t())
                else:
                    out = torch.addmm(bias[e], xb, weight[e].t())
                out.mul_(scale[rows])
                y.index_add_(0, dest[rows], out)
        return y

    @staticmethod
    @once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_y: torch.Tensor
    ) -> tuple[
        torch.Tensor | None,
        torch.Tensor | None,
        torch.Tensor | None,
        torch.Tensor | None,
        None,
        None,
        None,
        None,
    ]:
        x, weight, bias, row_weights, src, dest = ctx.saved_tensors  # type: ignore[attr-defined]
        counts = ctx.counts  # type: ignore[attr-defined]
        need_x, need_w, need_b, need_s = ctx.needs_input_grad[:4]  # type: ignore[attr-defined]
        need_b = need_b and bias is not None
        scale = row_weights.to(x.dtype)
        grad_y = grad_y.to(x.dtype)
        grad_x = torch.zeros_like(x) if need_x else None
        grad_w = torch.empty_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b else None
        grad_s = torch.empty_like(scale) if need_s else None
        with torch.autocast(device_type=x.device.type, enabled=False):
            start = 0
            for e, n in enumerate(counts):
                if not n:
                    if grad_w is not None:
                        grad_w[e].zero_()
                    continue
                rows = slice(start, start + n)
                start += n
                g = grad_y.index_select(0, dest[rows])  # (n, Dout)
                xb = x.index_select(0, src[rows])  # (n, Din)
                sb = scale[rows].unsqueeze(1)
                if grad_w is not None:
                    # scale the narrower operand: dW = (s * g)ᵀ x = gᵀ (s * x)
                    if g.shape[1] <= xb.shape[1]:
                        torch.mm((g * sb).t(), xb, out=grad_w[e])
                    else:
                        torch.mm(g.t(), xb * sb, out=grad_w[e])
                if grad_b is not None:
                    # (1, n) @ (n, Dout): a matmul, faster than mv for bfloat16 on CPU
                    torch.mm(scale[rows].unsqueeze(0), g, out=grad_b[e].unsqueeze(0))
                if grad_x is None and grad_s is None:
                    continue
                gx = g @ weight[e]  # (n, Din), before the row scaling
                if grad_s is not None:
                    # row dots as a batched (1, Din) @ (Din, 1) product: no (n, Din) temporary
                    ds = torch.bmm(gx.unsqueeze(1), xb.unsqueeze(2)).view(n)
                    if bias is not None:
                        ds += torch.mm(g, bias[e].unsqueeze(1)).squeeze(1)
                    grad_s[rows] = ds
                if grad_x is not None:
                    grad_x.index_add_(0, src[rows], gx.mul_(sb))
        if grad_s is not None:
            grad_s = grad_s.to(row_weights.dtype)
        return grad_x, grad_w, grad_b, grad_s, None, None, None, None


def dispatch_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    counts: Sequence[int],
    src: torch.Tensor,
    row_weights: torch.Tensor,
    dest: torch.Tensor,
    num_out: int,
) -> torch.Tensor:
    """y[dest[r]] += row_weights[r] * (x[src[r]] W_e^T + b_e) for rows r grouped by expert e.

    The token-dispatch fast path: gather, `grouped_linear` and the weighted combine in one
    autograd node, expert by expert, so the (M, Din) gathered input and the (M, Dout) expert
    outputs are never materialised or stored (M = routed rows). Deterministic on CPU
    (sequential index_add).

    Args:
        x: (R_in, Din) input rows (tokens).
        weight: (E, Dout, Din) expert weights.
        bias: (E, Dout) expert biases or None.
        counts: E row counts, rows expert-major (sum M).
        src: (M,) int64 input row of every routed row.
        row_weights: (M,) combine weight of every routed row (gradient flows into it).
        dest: (M,) int64 output row of every routed row.
        num_out: R_out, rows of the output.

    Returns:
        (R_out, Dout); rows no routed row points to are zero. Under autocast the operands are
        cast to the autocast dtype first.
    """
    assert len(counts) == weight.shape[0], f"expected {weight.shape[0]} counts, got {len(counts)}"
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    combined: torch.Tensor = _DispatchLinear.apply(  # type: ignore[no-untyped-call]
        x,
        weight,
        bias,
        row_weights,
        src,
        dest,
        num_out,
        tuple(int(c) for c in counts),
    )
    return combined
