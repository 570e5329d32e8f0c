"""Whole-FFN experts: y = Σ_k s_k (W2_e GELU(W1_e x + b1_e) + b2_e), mixed once per token.

The opt-in `moe.expert_ffn` mode of token and context routing (GShard, V-MoE and DeepSpeed's
`MoE` layer work this way). The default mode mixes after each routed linear (SPEC §2.5-§2.6:
`ffn_in`'s experts are mixed before the GELU, then `ffn_out` re-dispatches the mixed F-wide rows);
here `ffn_in` and `ffn_out` of one expert form one FFN, so every F-wide intermediate stays in its
expert's block and only D-wide rows are gathered and combined.

`expert_ffn` is one autograd node (`_ExpertFFN`) built from the pieces of `fused_dispatch`: the
expert-major padded `_Layout`, per-expert products on the layer's GEMM library and one weighted
`embedding_bag` for the combine.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from uniperceiver_cli.model.gemm import GemmBackend, layer_backend, mm
from uniperceiver_cli.model.moe.fused_dispatch import (
    _block_matmul,
    _combine,
    _gather_padded,
    _Layout,
    _mm_into,
    _output_buffer,
    _weight_grad_onednn,
    _weighted_combine,
    expert_row_multiple,
)

__all__ = ["expert_ffn"]


def _block_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    chunk: int | None,
    gemm: GemmBackend,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x Wᵀ + b as one product or in products of exactly `chunk` rows (x has a multiple),
    into `out` when given."""
    if chunk is None:
        return mm(x, weight.t(), bias=bias, out=out, backend=gemm)
    if out is None:
        out = x.new_empty((x.shape[0], weight.shape[0]))
    wt = weight.t()
    for start in range(0, x.shape[0], chunk):
        rows = slice(start, start + chunk)
        mm(x[rows], wt, bias=bias, out=out[rows], backend=gemm)
    return out


class _ExpertFFN(torch.autograd.Function):
    """Gather, per-expert FFN (linear, GELU, linear) and weighted combine in one node.

    Forward, per expert e with its n routed rows (zero-padded to the row multiple): gather the
    D-wide inputs, h = x W1ᵀ + b1 and a = GELU(h) (n', F) (when a gradient is needed, a goes
    into one expert-major buffer, and h too where the product can be written in place), and the
    bias-free D-wide output o = a W2ᵀ into one expert-major buffer that also holds the b2 rows;
    one weighted `embedding_bag` adds each token's K outputs and biases. h and a are kept for
    backward when a gradient is needed (as autograd would keep them for a dense FFN), and the
    weight gradients are allocated here, at the start of the step.

    Backward, per expert: g = the gathered output gradient, ds = g · (o + b2), then g is scaled
    by s and dW2 = gᵀ a, db2 = Σ g, da = g W2, dh = GELU'(h) da, dW1 = dhᵀ x, db1 = Σ dh and the
    expert's input gradient dh W1, combined into dx with one unweighted `embedding_bag`.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        w1: torch.Tensor,
        b1: torch.Tensor | None,
        w2: torch.Tensor,
        b2: torch.Tensor | None,
        row_weights: torch.Tensor,
        rows: torch.Tensor,
        counts: tuple[int, ...],
        row_chunk: int | None,
        row_multiple: int,
        gemm: GemmBackend,
    ) -> torch.Tensor:
        dtype = x.dtype
        layout = _Layout.build(counts, row_chunk or row_multiple, x.device)
        buffer, out_slots, out_flat = _output_buffer(x, layout, rows, x.shape[0], b2, w2.shape[1])
        keep = any(ctx.needs_input_grad[:6])  # type: ignore[attr-defined]
        # the (E, F, D) and (E, D, F) weight gradients are allocated now, at the start of the
        # step, where the previous step's gradients were just released, not in backward after
        # the kept blocks have split the heap (there they often took fresh pages)
        need_w1, need_w2 = (bool(n) for n in ctx.needs_input_grad[1:4:2])  # type: ignore[attr-defined]
        ctx.grad_w1 = torch.empty_like(w1) if need_w1 else None  # type: ignore[attr-defined]
        ctx.grad_w2 = torch.empty_like(w2) if need_w2 else None  # type: ignore[attr-defined]
        inputs = x.new_empty((layout.total, x.shape[1])) if keep else None
        # what backward needs of every expert, in expert-major buffers rather than 2E separate
        # blocks that fragment the heap: activations GELU(h), and the pre-activations h where
        # the product can be written in place (torch.mm; oneDNN's products are fresh anyway)
        width = w1.shape[1]
        acts = x.new_empty((layout.total, width)) if keep else None
        hs = x.new_empty((layout.total, width)) if keep and gemm != "onednn" else None
        kept: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        cast: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        with torch.autocast(device_type=x.device.type, enabled=False):
            first = 0
            for e, n in enumerate(counts):
                if not n:
                    kept.append(None)
                    cast.append(None)
                    continue
                w1e, w2e = w1[e].to(dtype), w2[e].to(dtype)
                cast.append((w1e, w2e))
                start, size = layout.starts[e], layout.padded[e]
                block = None if inputs is None else inputs[start : start + size]
                xb = _gather_padded(x, rows[first : first + n], size, block)
                first += n
                b1e = None if b1 is None else b1[e].to(dtype)
                block_rows = slice(start, start + size)
                h = _block_linear(
                    xb, w1e, b1e, row_chunk, gemm, None if hs is None else hs[block_rows]
                )
                a = F.gelu(h) if acts is None else torch.ops.aten.gelu.out(h, out=acts[block_rows])
                _block_matmul(a, w2e, buffer[block_rows], row_chunk, gemm)
                kept.append((h, a) if keep else None)
            y = _weighted_combine(
                buffer, out_slots, out_flat, row_weights.to(dtype), b2 is not None
            )
        saved = (inputs, w1, b1, w2, b2, row_weights, rows, buffer if keep else None)
        ctx.save_for_backward(*saved)  # type: ignore[arg-type]
        ctx.layout = layout  # type: ignore[attr-defined]
        ctx.kept = kept  # type: ignore[attr-defined]
        ctx.cast = cast  # type: ignore[attr-defined]
        ctx.dtype = dtype  # type: ignore[attr-defined]
        ctx.gemm = gemm  # type: ignore[attr-defined]
        return y

    @staticmethod
    @once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_y: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        inputs, w1, b1, w2, b2, row_weights, rows, outputs = ctx.saved_tensors  # type: ignore[attr-defined]
        layout: _Layout = ctx.layout  # type: ignore[attr-defined]
        kept = ctx.kept  # type: ignore[attr-defined]
        cast = ctx.cast  # type: ignore[attr-defined]
        dtype: torch.dtype = ctx.dtype  # type: ignore[attr-defined]
        gemm: GemmBackend = ctx.gemm  # type: ignore[attr-defined]
        need_x, need_w1, need_b1, _, need_b2, need_s = ctx.needs_input_grad[:6]  # type: ignore[attr-defined]
        need_b1 = need_b1 and b1 is not None
        need_b2 = need_b2 and b2 is not None
        scale = row_weights.to(dtype)
        grad_y = grad_y.to(dtype).contiguous()
        dim = w1.shape[2]
        grad_w1: torch.Tensor | None = ctx.grad_w1  # type: ignore[attr-defined]
        grad_w2: torch.Tensor | None = ctx.grad_w2  # type: ignore[attr-defined]
        ctx.grad_w1 = ctx.grad_w2 = None  # type: ignore[attr-defined]
        grad_b1 = grad_y.new_zeros((w1.shape[0], w1.shape[1])) if need_b1 else None
        grad_b2 = grad_y.new_zeros((w2.shape[0], w2.shape[1])) if need_b2 else None
        grad_s = grad_y.new_zeros(scale.shape) if need_s else None
        grads_in = grad_y.new_empty((layout.total + 1, dim)) if need_x else None
        if grads_in is not None:
            grads_in[layout.total].zero_()
        work = None
        if gemm != "onednn" and (need_x or need_w1 or need_b1) and layout.counts:
            work = grad_y.new_empty((max(layout.padded), w1.shape[1]))
        with torch.autocast(device_type=grad_y.device.type, enabled=False):
            first = 0
            for e, n in enumerate(layout.counts):
                if not n:
                    for grad in (grad_w1, grad_w2):
                        if grad is not None:
                            grad[e].zero_()
                    continue
                span = slice(first, first + n)
                first += n
                start, size = layout.starts[e], layout.padded[e]
                h, a = kept[e]
                w1e, w2e = cast[e]
                g = _gather_padded(grad_y, rows[span], size)  # (n', D), zero tail
                if grad_s is not None:
                    grad_s[span] = torch.linalg.vecdot(g[:n], outputs[start : start + n])
                    if b2 is not None:
                        grad_s[span] += torch.mm(g, b2[e].to(dtype).unsqueeze(1))[:n].squeeze(1)
                g[:n].mul_(scale[span].unsqueeze(1))
                if grad_b2 is not None:
                    grad_b2[e] = g.sum(0)
                if grad_w2 is not None:
                    _mm_into(grad_w2[e], g.t(), a, gemm)
                if not (need_x or need_w1 or need_b1):
                    continue
                if work is None:  # oneDNN: its product is fresh anyway; GELU' in place
                    da = mm(g, w2e, backend=gemm)
                else:  # torch.mm: into one scratch block reused by every expert
                    da = mm(g, w2e, out=work[:size], backend=gemm)
                dh = torch.ops.aten.gelu_backward.grad_input(da, h, grad_input=da)  # (n', F)
                xb = inputs[start : start + size]
                if grad_w1 is not None and gemm == "onednn":
                    _weight_grad_onednn(dh, xb, None, grad_w1[e], grad_b1, e, n)
                else:
                    if grad_w1 is not None:
                        _mm_into(grad_w1[e], dh.t(), xb, gemm)
                    if grad_b1 is not None:
                        grad_b1[e] = dh.sum(0)
                if grads_in is not None:
                    mm(dh, w1e, out=grads_in[start : start + size], backend=gemm)
            grad_x = None
            if grads_in is not None:
                in_slots, _ = layout.slots(rows, grad_y.shape[0], with_bias=False)
                grad_x = _combine(grads_in, in_slots, None)
        return (
            grad_x,
            grad_w1,
            None if grad_b1 is None or b1 is None else grad_b1.to(b1.dtype),
            grad_w2,
            None if grad_b2 is None or b2 is None else grad_b2.to(b2.dtype),
            None if grad_s is None else grad_s.to(row_weights.dtype),
            None,
            None,
            None,
            None,
            None,
        )


def expert_ffn(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    counts: Sequence[int],
    rows: torch.Tensor,
    row_weights: torch.Tensor,
    row_chunk: int | None = None,
    row_multiple: int | None = None,
    cpu_gemm: GemmBackend = "auto",
) -> torch.Tensor:
    """y[rows[r]] += row_weights[r] * FFN_e(x[rows[r]]) for routed rows r grouped by expert e.

    FFN_e(v) = W2_e GELU(W1_e v + b1_e) + b2_e (exact GELU, as the encoder's FFN).

    Args:
        x: (R, D) token rows.
        w1: (E, F, D) first-layer weights; b1: (E, F) or None.
        w2: (E, D, F) second-layer weights; b2: (E, D) or None.
        counts: E routed row counts, rows expert-major (sum M).
        rows: (M,) int64 token row of every routed row (read and written).
        row_weights: (M,) combine weight of every routed row (gradient flows into it).
        row_chunk: run every product in chunks of exactly this many rows (batch-invariant eval);
            None for plain products.
        row_multiple: zero-pad every expert block to a multiple of this many rows; None picks
            `fused_dispatch.expert_row_multiple`.
        cpu_gemm: GEMM library of float32 CPU products (`gemm.mm`: `auto`, `onednn`, `torch`).

    Returns:
        (R, D) in the compute dtype (the autocast dtype under autocast); rows no routed row
        points to are zero. Weight gradients come back in the weights' dtype.
    """
    assert len(counts) == w1.shape[0] == w2.shape[0], "one count per expert"
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        x = x.to(torch.get_autocast_dtype(device_type))
    gemm = layer_backend(cpu_gemm, w1, x.dtype)
    multiple = expert_row_multiple(x, gemm) if row_multiple is None else row_multiple
    combined: torch.Tensor = _ExpertFFN.apply(  # type: ignore[no-untyped-call]
        x,
        w1,
        b1,
        w2,
        b2,
        row_weights,
        rows,
        tuple(int(c) for c in counts),
        row_chunk,
        multiple,
        gemm,
    )
    return combined
