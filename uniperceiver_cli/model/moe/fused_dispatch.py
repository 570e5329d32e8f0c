"""Fused token dispatch: gather, per-expert matmuls, biases, combine weights and the per-token sum.

`dispatch_linear` is the default path of `TokenRoutedLinear`: one autograd node
(`_DispatchLinear`) that works expert by expert on an expert-major, padded buffer (`_Layout`)
and combines with one weighted `embedding_bag`, so the (M, Din) gathered inputs and the
(M, Dout) expert outputs are never materialised together. See `experts.py` for the expert
weights themselves and the unfused `grouped_linear`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from uniperceiver_cli.model.gemm import ONEDNN_ROW_MULTIPLE, GemmBackend, layer_backend, mm

__all__ = ["LOW_PRECISION_ROW_MULTIPLE", "dispatch_linear", "expert_row_multiple"]


@dataclass(frozen=True)
class _Layout:
    """Where routed rows sit in a padded, expert-major buffer and how they combine.

    Block e occupies buffer rows [starts[e], starts[e] + padded[e]); its first counts[e] rows are
    routed rows, the rest padding. Row `total` of a buffer is kept at zero (slots of an output
    row with fewer than K contributions point to it) and rows total + 1 + e may hold expert e's
    bias.

    Attributes:
        counts: routed rows per block.
        starts: first buffer row of every block.
        padded: buffer rows of every block (a multiple of the row multiple).
        total: M', padded rows of all blocks (the index of the zero row).
        positions: (M,) int64 buffer row of every routed row.
        experts: (M,) int64 expert of every routed row.
    """

    counts: tuple[int, ...]
    starts: tuple[int, ...]
    padded: tuple[int, ...]
    total: int
    positions: torch.Tensor
    experts: torch.Tensor

    @staticmethod
    def build(counts: Sequence[int], multiple: int, device: torch.device) -> _Layout:
        """Pad every block to a multiple of `multiple` rows (blocks of 0 rows stay empty)."""
        starts: list[int] = []
        padded: list[int] = []
        pieces: list[torch.Tensor] = []
        total = 0
        for n in counts:
            starts.append(total)
            size = n + (-n) % multiple
            padded.append(size)
            pieces.append(torch.arange(total, total + n, device=device))
            total += size
        positions = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
        experts = torch.repeat_interleave(
            torch.arange(len(counts), device=device), torch.tensor(counts, device=device)
        )
        return _Layout(tuple(counts), tuple(starts), tuple(padded), total, positions, experts)

    @property
    def offsets(self) -> torch.Tensor:
        """(E,) int64 first routed row of every block (bag offsets of `embedding_bag`)."""
        counts = torch.tensor(self.counts, device=self.positions.device)
        return torch.cumsum(counts, 0) - counts

    def slots(
        self, keys: torch.Tensor, num_rows: int, with_bias: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Buffer rows that add up into each of `num_rows` target rows.

        Args:
            keys: (M,) int64 target row (dest or src) of every routed row.
            num_rows: R, rows of the target.
            with_bias: also add, per routed row, its expert's bias row (total + 1 + e).

        Returns:
            (R, K) int64 buffer rows, or (R, 2K) with the bias rows after the K data rows (the
            zero row where a target row has fewer than K contributions; within a target row in
            routed-row order, i.e. by expert), and the (M,) int64 flat slot index r * K + k of
            every routed row.
        """
        m = keys.shape[0]
        per_row = torch.bincount(keys, minlength=num_rows)
        k = max(int(per_row.max()) if m else 0, 1)
        order = torch.argsort(keys, stable=True)
        sorted_keys = keys.index_select(0, order)
        first = torch.cumsum(per_row, 0) - per_row
        rank = torch.arange(m, device=keys.device) - first.index_select(0, sorted_keys)
        flat = torch.empty_like(order)
        flat[order] = sorted_keys * k + rank
        table = torch.full((num_rows * k,), self.total, dtype=torch.long, device=keys.device)
        table[flat] = self.positions
        table = table.view(num_rows, k)
        if with_bias:
            rows = torch.full((num_rows * k,), self.total, dtype=torch.long, device=keys.device)
            rows[flat] = self.experts + (self.total + 1)
            table = torch.cat([table, rows.view(num_rows, k)], dim=1)
        return table, flat


def _output_buffer(
    x: torch.Tensor,
    layout: _Layout,
    dest: torch.Tensor,
    num_out: int,
    bias: torch.Tensor | None,
    width: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The expert-major output buffer of a fused node and the slots that combine it.

    Args:
        x: any tensor of the compute dtype and device.
        layout: the blocks.
        dest: (M,) int64 output row of every routed row.
        num_out: R, output rows.
        bias: (E, W) biases, stored as rows `total + 1 + e`, or None.
        width: W.

    Returns:
        The (M' + 1 [+ E], W) buffer (row M' zero, bias rows filled, block rows for the caller
        to write), the (R, K) or (R, 2K) slots and the (M,) flat slot index (`_Layout.slots`).
    """
    out_slots, out_flat = layout.slots(dest, num_out, with_bias=bias is not None)
    extra = 1 + (bias.shape[0] if bias is not None else 0)
    buffer = x.new_empty((layout.total + extra, width))
    buffer[layout.total].zero_()
    if bias is not None:
        buffer[layout.total + 1 :] = bias
    return buffer, out_slots, out_flat


def _weighted_combine(
    buffer: torch.Tensor,
    out_slots: torch.Tensor,
    out_flat: torch.Tensor,
    row_weights: torch.Tensor,
    with_bias: bool,
) -> torch.Tensor:
    """Σ over each output row's slots of weight x buffer row, biases weighted like their rows.

    Args:
        buffer: from `_output_buffer`, block rows written.
        out_slots: (R, K), or (R, 2K) with bias slots.
        out_flat: (M,) flat slot index of every routed row.
        row_weights: (M,) combine weights in the buffer's dtype.
        with_bias: `out_slots` has the K bias slots.

    Returns:
        (R, W).
    """
    scale = row_weights.new_zeros(out_slots.shape)
    k = scale.shape[1] // (2 if with_bias else 1)
    scale.view(-1)[_widen(out_flat, k, scale.shape[1])] = row_weights
    if with_bias:
        scale[:, k:] = scale[:, :k]
    return _combine(buffer, out_slots, scale)


def _combine(
    buffer: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor | None
) -> torch.Tensor:
    """out[r] = Σ_k weights[r, k] * buffer[slots[r, k]], summed in slot order.

    One fused gather-and-sum (`embedding_bag`: no (R, K, W) temporary, 3x faster on CPU than
    K gathers and multiply-adds; it accumulates low-precision rows in float32).

    Args:
        buffer: (M' + 1 [+ E], W) rows; row M' is zero.
        slots: (R, K) int64 buffer rows.
        weights: (R, K) weights in buffer's dtype, or None for a plain sum.

    Returns:
        (R, W).
    """
    return F.embedding_bag(slots, buffer, mode="sum", per_sample_weights=weights)


class _DispatchLinear(torch.autograd.Function):
    """Gather, grouped linear and weighted combine in one node (see `dispatch_linear`).

    Forward gathers each expert's rows (zero-padded to the row multiple), writes its bias-free
    matmul into one expert-major buffer that also holds the experts' biases, and combines the
    buffer into the output rows with one fused gather-and-sum (`embedding_bag`): each output row
    reads its K rows and K biases, weighted (no scatter-add, no separate scaling pass, no bias
    broadcast into every matmul output). Weights stay in their own dtype: each expert's weight
    is cast to the compute dtype right before its matmul (cache hot, the cast reused by
    backward) and its gradient cast back right after, so no stacked low-precision copy of all
    experts is made in either direction.

    Backward regathers each block's output gradient g and keeps every row scaling, and the row
    dots of the combine-weight gradient, on the narrower side: with s the block's row weights
    and o = x Wᵀ its bias-free outputs, dW = (s g)ᵀ x = gᵀ (s x), dx = Σ s (g W) over the rows
    read from x, ds = g · o + g · b = (g W) · x + g · b; db = Σ s g is one weighted
    `embedding_bag` over all blocks. When
    Dout <= Din the bias-free outputs and the gathered inputs are kept from forward; otherwise
    only the ungathered input is kept.
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
        row_chunk: int | None,
        row_multiple: int,
        gemm: GemmBackend,
    ) -> torch.Tensor:
        dtype = x.dtype
        _, dout, din = weight.shape
        narrow_out = dout <= din
        layout = _Layout.build(counts, row_chunk or row_multiple, x.device)
        buffer, out_slots, out_flat = _output_buffer(x, layout, dest, num_out, bias, dout)
        # Dout <= Din: backward needs the gathered inputs (for dW) but never x itself
        need_w = bool(ctx.needs_input_grad[1])  # type: ignore[attr-defined]
        inputs = x.new_empty((layout.total, din)) if narrow_out and need_w else None
        cast: list[torch.Tensor | None] = []
        with torch.autocast(device_type=x.device.type, enabled=False):
            first = 0
            for e, n in enumerate(counts):
                if not n:
                    cast.append(None)
                    continue
                w = weight[e].to(dtype)
                cast.append(w)
                start, size = layout.starts[e], layout.padded[e]
                block = None if inputs is None else inputs[start : start + size]
                xb = _gather_padded(x, src[first : first + n], size, block)
                _block_matmul(xb, w, buffer[start : start + size], row_chunk, gemm)
                first += n
            y = _weighted_combine(
                buffer, out_slots, out_flat, row_weights.to(dtype), bias is not None
            )
        keep_outputs = bool(ctx.needs_input_grad[3]) and narrow_out  # type: ignore[attr-defined]
        saved = (
            inputs if narrow_out else x,
            weight,
            bias,
            row_weights,
            src,
            dest,
            buffer if keep_outputs else None,
        )
        ctx.save_for_backward(*saved)  # type: ignore[arg-type]
        ctx.layout = layout  # type: ignore[attr-defined]
        ctx.num_in = x.shape[0]  # type: ignore[attr-defined]
        ctx.dtype = dtype  # type: ignore[attr-defined]
        ctx.gemm = gemm  # type: ignore[attr-defined]
        # casts of the experts' weights, reused by backward (None: no cast happened)
        ctx.cast = tuple(cast) if weight.dtype != dtype else None  # type: ignore[attr-defined]
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
        None,
        None,
        None,
    ]:
        # rows_in: x (Dout > Din) or the gathered, padded inputs (Dout <= Din, when dW is needed)
        rows_in, weight, bias, row_weights, src, dest, outputs = ctx.saved_tensors  # type: ignore[attr-defined]
        layout: _Layout = ctx.layout  # type: ignore[attr-defined]
        num_in: int = ctx.num_in  # type: ignore[attr-defined]
        cast = ctx.cast  # type: ignore[attr-defined]
        gemm: GemmBackend = ctx.gemm  # type: ignore[attr-defined]
        need_x, need_w, need_b, need_s = ctx.needs_input_grad[:4]  # type: ignore[attr-defined]
        need_b = need_b and bias is not None
        dtype: torch.dtype = ctx.dtype  # type: ignore[attr-defined]
        scale = row_weights.to(dtype)
        grad_y = grad_y.to(dtype).contiguous()
        narrow_out = weight.shape[1] <= weight.shape[2]
        din = weight.shape[2]
        grad_w = torch.empty_like(weight) if need_w else None
        grad_s = grad_y.new_empty(scale.shape) if need_s else None
        # Dout > Din on oneDNN: the bias gradient comes out of the weight-gradient product
        grad_b_rows = None
        if need_b and need_w and not narrow_out and gemm == "onednn":
            grad_b_rows = grad_y.new_zeros((weight.shape[0], weight.shape[1]))
        # input-gradient rows, expert-major and padded like the forward buffer
        grads_in = grad_y.new_empty((layout.total + 1, din)) if need_x else None
        if grads_in is not None:
            grads_in[layout.total].zero_()
        with torch.autocast(device_type=grad_y.device.type, enabled=False):
            first = 0
            for e, n in enumerate(layout.counts):
                if not n:
                    if grad_w is not None:
                        grad_w[e].zero_()
                    continue
                rows = slice(first, first + n)
                first += n
                start, size = layout.starts[e], layout.padded[e]
                w = weight[e] if cast is None else cast[e]
                g = _gather_padded(grad_y, dest[rows], size)  # (n', Dout), zero tail
                s_col = scale[rows].unsqueeze(1)  # (n, 1)
                gx_out = None if grads_in is None else grads_in[start : start + size]
                if grad_s is not None and bias is not None:
                    # g · b_e: (n', Dout) @ (Dout, 1), cheaper than one (R, Dout) @ (Dout, E); on
                    # the padded block, since for bfloat16 oneDNN builds and caches a kernel per
                    # row count (a new one every step for the unpadded n: time and memory)
                    b_col = bias[e].to(dtype).unsqueeze(1)
                    grad_s[rows] = torch.mm(g, b_col)[:n].squeeze(1)
                elif grad_s is not None:
                    grad_s[rows] = 0
                if narrow_out:
                    # Dout <= Din: ds from the kept outputs, then scale g in place (width Dout)
                    if grad_s is not None:
                        grad_s[rows] += torch.linalg.vecdot(g[:n], outputs[start : start + n])
                    g[:n].mul_(s_col)
                    if grad_w is not None:
                        _mm_into(grad_w[e], g.t(), rows_in[start : start + size], gemm)
                    if gx_out is not None:
                        mm(g, w, out=gx_out, backend=gemm)
                    continue
                # Dout > Din: scale the input rows (width Din); dx is scaled when combined
                xb = _gather_padded(rows_in, src[rows], size) if need_w or need_s else None
                if gx_out is not None or grad_s is not None:
                    gx = mm(g, w, out=gx_out, backend=gemm)
                    if grad_s is not None:
                        assert xb is not None
                        grad_s[rows] += torch.linalg.vecdot(gx[:n], xb[:n])
                if grad_w is not None and gemm == "onednn":
                    assert xb is not None
                    _weight_grad_onednn(g, xb, scale[rows], grad_w[e], grad_b_rows, e)
                elif grad_w is not None:
                    assert xb is not None
                    xb[:n].mul_(s_col)
                    _mm_into(grad_w[e], g.t(), xb, gemm)
            grad_b = None
            if grad_b_rows is not None and bias is not None:
                grad_b = grad_b_rows.to(bias.dtype)
            elif bias is not None and need_b:
                # db_e = Σ_r s_r g_r over expert e's rows: one weighted bag per expert
                sums = F.embedding_bag(
                    dest, grad_y, layout.offsets, mode="sum", per_sample_weights=scale
                )
                grad_b = sums.to(bias.dtype)
            grad_x = None
            if grads_in is not None:
                in_slots, in_flat = layout.slots(src, num_in, with_bias=False)
                weights = None
                if not narrow_out:
                    weights = scale.new_zeros(in_slots.shape)
                    weights.view(-1)[in_flat] = scale
                grad_x = _combine(grads_in, in_slots, weights)
        if grad_s is not None:
            grad_s = grad_s.to(row_weights.dtype)
        return grad_x, grad_w, grad_b, grad_s, None, None, None, None, None, None, None


def _weight_grad_onednn(
    g: torch.Tensor,
    xb: torch.Tensor,
    s: torch.Tensor | None,
    grad_w: torch.Tensor,
    grad_b: torch.Tensor | None,
    expert: int,
    n: int | None = None,
) -> None:
    """dW = gᵀ (s x) and db = gᵀ s of one block with one oneDNN product (Dout > Din).

    oneDNN wants its input contiguous, so rather than letting it transpose the wide g (n', Dout)
    the product runs on [(s x)ᵀ; sᵀ] (Din + 1, n'), which is narrow and carries the bias
    gradient as one extra row: [(s x)ᵀ; sᵀ] g = [dWᵀ; dbᵀ].

    Args:
        g: (n', Dout) output-gradient rows (zero padding rows).
        xb: (n', Din) input rows (zero padding rows).
        s: (n,) combine weights of the block's routed rows, or None for weights of 1.
        grad_w: (Dout, Din) destination of dW.
        grad_b: (E, Dout) bias gradients (row `expert` is written) or None.
        expert: the block's expert.
        n: the block's routed rows when `s` is None.
    """
    n = s.shape[0] if s is not None else n
    assert n is not None, "give the row count when s is None"
    size, din = xb.shape
    rows = din + (1 if grad_b is not None else 0)
    if s is None:
        # the padding rows of xb are zero: one blocked transpose of the whole block
        aug = xb.new_empty((rows, size))
        aug[:din] = xb.t()
        if grad_b is not None:
            aug[din, :n] = 1
            aug[din, n:] = 0
    else:
        aug = xb.new_zeros((rows, size))
        torch.mul(xb[:n].t(), s, out=aug[:din, :n])
        if grad_b is not None:
            aug[din, :n] = s
    product = mm(aug, g, backend="onednn")  # (rows, Dout)
    grad_w.copy_(product[:din].t())
    if grad_b is not None:
        grad_b[expert] = product[din]


def _widen(flat: torch.Tensor, k: int, width: int) -> torch.Tensor:
    """Flat slot indices r * k + j of an (R, k) table, re-based on an (R, width) table."""
    if k == width:
        return flat
    return torch.div(flat, k, rounding_mode="floor") * width + flat % k


def _block_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    out: torch.Tensor,
    chunk: int | None,
    gemm: GemmBackend = "torch",
) -> None:
    """out = x Wᵀ, as one matmul or in matmuls of exactly `chunk` rows (x has a multiple).

    Per-chunk calls, not one `bmm` with the weight broadcast: for bfloat16 on CPU that `bmm`
    is 2-3x slower, for float32 it is no faster.
    """
    step = x.shape[0] if chunk is None else chunk
    wt = weight.t()
    for start in range(0, x.shape[0], step):
        rows = slice(start, start + step)
        mm(x[rows], wt, out=out[rows], backend=gemm)


def _gather_padded(
    rows: torch.Tensor, index: torch.Tensor, size: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """rows[index] followed by zero rows up to `size` rows: (size, W), into `out` when given."""
    n = index.shape[0]
    if out is None:
        out = rows.new_empty((size, rows.shape[1]))
    # into a preallocated buffer: the allocating index_select is up to 10x slower for bfloat16
    torch.index_select(rows, 0, index, out=out[:n])
    if size > n:
        out[n:].zero_()
    return out


def _mm_into(dest: torch.Tensor, a: torch.Tensor, b: torch.Tensor, gemm: GemmBackend) -> None:
    """dest = a @ b, computed in the operands' dtype and written (cast) into `dest`."""
    if dest.dtype == a.dtype:
        mm(a, b, out=dest, backend=gemm)
    else:
        dest.copy_(mm(a, b, backend=gemm))


def dispatch_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    counts: Sequence[int],
    src: torch.Tensor,
    row_weights: torch.Tensor,
    dest: torch.Tensor,
    num_out: int,
    row_chunk: int | None = None,
    row_multiple: int | None = None,
    cpu_gemm: GemmBackend = "auto",
) -> torch.Tensor:
    """y[dest[r]] += row_weights[r] * (x[src[r]] W_e^T + b_e) for rows r grouped by expert e.

    The token-dispatch fast path: gather, `grouped_linear` and the weighted combine in one
    autograd node, expert by expert, so the (M, Din) gathered input and the (M, Dout) expert
    outputs are never materialised together (M = routed rows; when Dout <= Din and the row
    weights need a gradient, the (M, Dout) outputs are kept for it). Deterministic on CPU
    (sequential index_add: a row's contributions are added in expert order).

    Args:
        x: (R_in, Din) input rows (tokens).
        weight: (E, Dout, Din) expert weights.
        bias: (E, Dout) expert biases or None.
        counts: E row counts, rows expert-major (sum M).
        src: (M,) int64 input row of every routed row.
        row_weights: (M,) combine weight of every routed row (gradient flows into it).
        dest: (M,) int64 output row of every routed row.
        num_out: R_out, rows of the output.
        row_chunk: run every expert's matmul in chunks of this many rows (`chunked_linear`), so
            that each output row is bitwise independent of the other rows (batch-invariant
            eval); None for the plain matmul.
        row_multiple: zero-pad every expert's block to a multiple of this many rows before its
            matmuls (the padding rows are discarded and add nothing to gradients). None picks
            `expert_row_multiple`: where oneDNN runs the matmuls on CPU (bfloat16/float16, and
            float32 when `cpu_gemm` resolves to it) it builds a kernel per new matrix shape
            (~0.1-1.4 ms and fresh pages each time), and routing makes new row counts every step;
            1 elsewhere.
        cpu_gemm: GEMM library of float32 CPU matmuls (`gemm.mm`: `auto`, `onednn`, `torch`).

    Returns:
        (R_out, Dout) in the compute dtype (the autocast dtype under autocast, else x's dtype);
        rows no routed row points to are zero. Weight gradients come back in the weights' dtype.
    """
    assert len(counts) == weight.shape[0], f"expected {weight.shape[0]} counts, got {len(counts)}"
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        x = x.to(torch.get_autocast_dtype(device_type))
    gemm = layer_backend(cpu_gemm, weight, x.dtype)
    combined: torch.Tensor = _DispatchLinear.apply(  # type: ignore[no-untyped-call]
        x,
        weight,
        bias,
        row_weights,
        src,
        dest,
        num_out,
        tuple(int(c) for c in counts),
        row_chunk,
        expert_row_multiple(x, gemm) if row_multiple is None else row_multiple,
        gemm,
    )
    return combined


#: Block row granularity of low-precision CPU matmuls in `dispatch_linear`.
LOW_PRECISION_ROW_MULTIPLE = 64


def expert_row_multiple(x: torch.Tensor, gemm: GemmBackend = "torch") -> int:
    """Row granularity of expert matmuls for x's device and dtype (`dispatch_linear` padding).

    Args:
        x: rows in the compute dtype.
        gemm: the layer's concrete float32 GEMM backend (`gemm.layer_backend`).
    """
    if x.device.type != "cpu":
        return 1
    if x.dtype in (torch.bfloat16, torch.float16):
        return LOW_PRECISION_ROW_MULTIPLE
    if x.dtype == torch.float32 and gemm == "onednn":
        return ONEDNN_ROW_MULTIPLE
    return 1
