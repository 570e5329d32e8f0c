"""Batched expert weights of a routed linear and the ways to apply them.

`ExpertWeights` stores E linear experts as one (E, out, in) weight and an (E, out) bias.
`merge_experts` forms Σ g_k W_{i_k} for segment-constant routing (SPEC §2.5). For token/context
routing, `grouped_linear` applies each expert to its contiguous block of expert-sorted rows (a
per-expert matmul loop with a hand-written backward, or `torch._grouped_mm`; the default path of
`TokenRoutedLinear` is `fused_dispatch.dispatch_linear`). `chunked_linear` is the batch-invariant
linear of the eval mode (fixed-size row chunks). No routing decisions here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from uniperceiver_cli.model.gemm import GemmBackend, layer_backend, mm
from uniperceiver_cli.model.moe.fused_dispatch import expert_row_multiple


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
        gemm: GemmBackend,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.blocks = (counts, experts)  # type: ignore[attr-defined]
        ctx.gemm = gemm  # type: ignore[attr-defined]
        ctx.has_bias = bias is not None  # type: ignore[attr-defined]
        out = x.new_empty((x.shape[0], weight.shape[1]))
        multiple = expert_row_multiple(x, gemm)
        with torch.autocast(device_type=x.device.type, enabled=False):
            start = 0
            for n, e in zip(counts, experts, strict=True):
                for rows in _row_pieces(start, n, multiple):
                    b = None if bias is None else bias[e]
                    mm(x[rows], weight[e].t(), bias=b, out=out[rows], backend=gemm)
                start += n
        return out

    @staticmethod
    @once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, None, None, None]:
        x, weight = ctx.saved_tensors  # type: ignore[attr-defined]
        counts, experts = ctx.blocks  # type: ignore[attr-defined]
        gemm: GemmBackend = ctx.gemm  # type: ignore[attr-defined]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]  # type: ignore[attr-defined]
        need_b = need_b and ctx.has_bias  # type: ignore[attr-defined]
        grad_out = grad_out.contiguous()
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = torch.empty_like(weight) if need_w else None
        grad_b = grad_out.new_zeros((weight.shape[0], weight.shape[1])) if need_b else None
        written: set[int] = set()
        multiple = expert_row_multiple(x, gemm)
        with torch.autocast(device_type=x.device.type, enabled=False):
            start = 0
            for n, e in zip(counts, experts, strict=True):
                for rows in _row_pieces(start, n, multiple):
                    g = grad_out[rows]
                    if grad_x is not None:
                        mm(g, weight[e], out=grad_x[rows], backend=gemm)
                    if grad_w is not None:
                        if e in written:
                            grad_w[e] += mm(g.t(), x[rows], backend=gemm)
                        else:
                            mm(g.t(), x[rows], out=grad_w[e], backend=gemm)
                    if grad_b is not None:
                        grad_b[e] += g.sum(dim=0)
                    written.add(e)
                start += n
            if grad_x is not None and start < x.shape[0]:
                grad_x[start:].zero_()
            if grad_w is not None:
                for e in range(weight.shape[0]):
                    if e not in written:
                        grad_w[e].zero_()
        return grad_x, grad_w, grad_b, None, None, None


def _row_pieces(start: int, n: int, multiple: int) -> list[slice]:
    """Rows [start, start + n) as a block of a multiple of `multiple` rows and a shorter tail.

    For bfloat16 on CPU oneDNN builds (and caches) a kernel per matmul shape; a routed row
    count changes every step, but split like this the shapes repeat (multiples of the row
    multiple, tails below it), so kernels are built once rather than every step.
    """
    main = n - n % multiple
    pieces = [slice(start, start + main)] if main else []
    if main < n:
        pieces.append(slice(start + main, start + n))
    return pieces


def grouped_linear(
    x_sorted: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    counts: Sequence[int],
    use_grouped_mm: bool = False,
    block_experts: Sequence[int] | None = None,
    cpu_gemm: GemmBackend = "auto",
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
        cpu_gemm: GEMM library of float32 CPU matmuls (`gemm.mm`: `auto`, `onednn`, `torch`).

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
        x_sorted,
        weight,
        bias,
        tuple(int(c) for c in counts),
        experts,
        layer_backend(cpu_gemm, weight, x_sorted.dtype),
    )
    return applied


#: Rows per matmul of the batch-invariant eval path (`chunked_linear`).
INVARIANT_CHUNK = 128

#: Byte alignment of fresh CPU tensors; BLAS may round differently for other alignments.
_ALIGNMENT = 64


def chunked_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    chunk: int = INVARIANT_CHUNK,
    cpu_gemm: GemmBackend = "torch",
) -> torch.Tensor:
    """x Wᵀ + b computed in fixed-size row chunks: each row's result ignores the other rows.

    BLAS picks its kernel (and so its rounding) by the number of rows, and for narrow outputs
    by the operands' memory alignment, so a row's `F.linear` output changes in the last bits
    with the batch around it. Here the rows are zero-padded to a multiple of `chunk` (in a fresh,
    64-byte aligned buffer when needed) and every matmul has exactly `chunk` rows, so a row
    gives the same bits in any batch, at any position, in any call (same weights, dtype,
    device and thread count). On oneDNN (`cpu_gemm`, float32 CPU layers wide enough) the same
    holds: each chunk is one product of exactly `chunk` rows, copied into place.

    Args:
        x: (R, Din) rows.
        weight: (Dout, Din).
        bias: (Dout,) or None.
        chunk: rows per matmul (C).
        cpu_gemm: GEMM library of float32 CPU products (`gemm.mm`: `auto`, `onednn`, `torch`).

    Returns:
        (R, Dout) in x's dtype.
    """
    rows, din = x.shape
    size = rows + (-rows) % chunk
    if size != rows or not x.is_contiguous() or x.data_ptr() % _ALIGNMENT:
        padded = x.new_empty((size, din))
        padded[:rows] = x
        padded[rows:].zero_()
        x = padded
    out = x.new_empty((size, weight.shape[0]))
    wt = weight.t()
    gemm = layer_backend(cpu_gemm, weight, x.dtype)
    for start in range(0, size, chunk):
        block = slice(start, start + chunk)
        mm(x[block], wt, bias=bias, out=out[block], backend=gemm)
    return out[:rows]
