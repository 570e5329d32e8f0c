"""Batch-invariant eval: a sample's routed-linear output is bitwise the same in any batch.

Also the pieces that make it so (`chunked_linear`) and the padded-block option of
`dispatch_linear` used by the low-precision training path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import pytest
import torch
from moe_helpers import tiny_config
from torch import nn

from uniperceiver_cli.model import gemm
from uniperceiver_cli.model.moe import SegmentRoutedLinear, TokenRoutedLinear, build_routed_linears
from uniperceiver_cli.model.moe.experts import INVARIANT_CHUNK, chunked_linear
from uniperceiver_cli.model.moe.fused_dispatch import dispatch_linear
from uniperceiver_cli.model.routing import RoutingContext, input_segments

D, FFN, L = 64, 96, 8
SEGMENTS = input_segments("image_caption", visual_len=4, text_len=3)
# batch compositions: sample indices into a pool of 9; sizes 1, 2, 3, 6 and 9 in other orders
COMPOSITIONS = ([4], [2, 7], [8, 0, 3], [6, 5, 4, 3, 2, 1], [8, 7, 6, 5, 4, 3, 2, 1, 0])


@contextlib.contextmanager
def _precision(dtype: str) -> Iterator[None]:
    if dtype == "bf16":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield
    else:
        yield


def _pair(routing: str, **fields: object) -> tuple[nn.Module, nn.Module]:
    config = tiny_config(hidden=D, ffn=FFN, routing=routing, task_names=("caption",), **fields)
    modules = build_routed_linears(config, 0)
    lead, follow = modules["ffn_in"], modules["ffn_out"]
    lead.eval()
    follow.eval()
    return lead, follow


def _ffn(
    lead: nn.Module,
    follow: nn.Module,
    pool: torch.Tensor,
    padding: torch.Tensor | None,
    index: Sequence[int],
    dtype: str,
) -> torch.Tensor:
    """ffn_out(GELU(ffn_in(x))) of the pool samples `index`, in eval without gradients."""
    rows = torch.tensor(index)
    mask = None if padding is None else padding[rows]
    routing = RoutingContext("caption", SEGMENTS, mask)
    with torch.no_grad(), _precision(dtype):
        h, _ = lead(pool[rows], routing)
        y, _ = follow(nn.functional.gelu(h), routing)
    assert isinstance(y, torch.Tensor)
    return y


def _assert_batch_invariant(
    lead: nn.Module, follow: nn.Module, padding: torch.Tensor | None, dtype: str
) -> torch.Tensor:
    pool = torch.randn(9, L, D)
    full = _ffn(lead, follow, pool, padding, range(9), dtype)
    for index in COMPOSITIONS:
        out = _ffn(lead, follow, pool, padding, index, dtype)
        for row, sample in enumerate(index):
            assert torch.equal(out[row], full[sample]), f"sample {sample} in batch {index}"
    again = _ffn(lead, follow, pool, padding, range(9), dtype)
    assert torch.equal(again, full), "two runs of the same batch differ"
    return full


@pytest.mark.parametrize("routing", ["token", "context"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_token_and_context_eval_is_bitwise_batch_invariant(
    routing: str, dtype: str, top_k: int
) -> None:
    lead, follow = _pair(routing, top_k=top_k)
    padding = torch.zeros(9, L, dtype=torch.bool)
    padding[2, 5:] = True
    padding[7, 3:] = True
    full = _assert_batch_invariant(lead, follow, padding, dtype)
    if routing == "token":
        assert torch.equal(full[2, 5:], torch.zeros_like(full[2, 5:]))


@pytest.mark.parametrize("routing", ["token", "context"])
def test_invariant_mode_matches_the_plain_path(routing: str) -> None:
    lead, follow = _pair(routing)
    assert isinstance(lead, TokenRoutedLinear) and isinstance(follow, TokenRoutedLinear)
    pool = torch.randn(5, L, D)
    chunked = _ffn(lead, follow, pool, None, range(5), "fp32")
    lead.invariant_chunk = follow.invariant_chunk = None
    plain = _ffn(lead, follow, pool, None, range(5), "fp32")
    torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=1e-5)


def test_unfused_setting_does_not_leave_the_invariant_mode() -> None:
    lead, follow = _pair("token")
    assert isinstance(lead, TokenRoutedLinear) and isinstance(follow, TokenRoutedLinear)
    for module in (lead, follow):
        module.fused_dispatch = False
        module.use_grouped_mm = True
    _assert_batch_invariant(lead, follow, None, "fp32")


@pytest.mark.parametrize("routing", ["attribute", "modality", "task"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_segment_eval_is_bitwise_batch_invariant(routing: str, dtype: str) -> None:
    lead, follow = _pair(routing)
    assert isinstance(lead, SegmentRoutedLinear) and isinstance(follow, SegmentRoutedLinear)
    assert lead.invariant_chunk is None and follow.invariant_chunk is None  # opt-in here
    lead.invariant_chunk = follow.invariant_chunk = INVARIANT_CHUNK
    _assert_batch_invariant(lead, follow, None, dtype)
    # decisions cached key by key do not depend on which keys missed the cache together
    lead.clear_cache()
    follow.clear_cache()
    _assert_batch_invariant(lead, follow, None, dtype)


@pytest.mark.skipif(not gemm.onednn_available(), reason="no oneDNN in this torch")
@pytest.mark.parametrize("routing", ["token", "context", "attribute"])
def test_eval_is_bitwise_batch_invariant_on_onednn(
    routing: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The invariant mode keeps its promise when float32 products run on oneDNN."""
    monkeypatch.setattr(gemm, "ONEDNN_MIN_WEIGHT", 0)  # the tiny layers qualify too
    calls: list[int] = []
    real = gemm._onednn_linear

    def record(
        x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        calls.append(x.shape[0])
        return real(x, weight, bias)

    monkeypatch.setattr(gemm, "_onednn_linear", record)
    lead, follow = _pair(routing)
    lead.invariant_chunk = follow.invariant_chunk = INVARIANT_CHUNK  # opt-in for attribute
    lead.cpu_gemm = follow.cpu_gemm = "onednn"
    _assert_batch_invariant(lead, follow, None, "fp32")
    assert calls and set(calls) == {INVARIANT_CHUNK}, "every product is one full chunk on oneDNN"


def test_mode_is_only_on_in_eval_without_grad() -> None:
    lead, _ = _pair("token")
    assert isinstance(lead, TokenRoutedLinear)
    assert lead.row_chunk() is None  # eval with grad enabled
    with torch.no_grad():
        assert lead.row_chunk() == INVARIANT_CHUNK
        lead.train()
        assert lead.row_chunk() is None
        lead.eval()
        lead.invariant_chunk = None
        assert lead.row_chunk() is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("din", "dout"), [(64, 96), (96, 64), (64, 4)])
def test_chunked_linear_row_ignores_batch_position_and_alignment(
    dtype: torch.dtype, din: int, dout: int
) -> None:
    weight = torch.randn(dout, din, dtype=dtype)
    bias = torch.randn(dout, dtype=dtype)
    probe = torch.randn(din, dtype=dtype)
    filler = torch.randn(300, din, dtype=dtype)
    reference = chunked_linear(probe.unsqueeze(0), weight, bias, 32)[0]
    torch.testing.assert_close(
        reference, nn.functional.linear(probe, weight, bias), atol=1e-2, rtol=1e-2
    )
    for rows, position in ((1, 0), (2, 1), (3, 0), (33, 32), (65, 7), (300, 299)):
        batch = filler[:rows].clone()
        batch[position] = probe
        assert torch.equal(chunked_linear(batch, weight, bias, 32)[position], reference)
    # a view starting 1 element into its storage (not 64-byte aligned) gives the same bits
    storage = torch.empty(1 + 5 * din, dtype=dtype)
    view = storage[1:].view(5, din)
    view.copy_(filler[:5])
    view[3] = probe
    assert view.data_ptr() % 64 != 0
    assert torch.equal(chunked_linear(view, weight, bias, 32)[3], reference)


@pytest.mark.skipif(not gemm.onednn_available(), reason="no oneDNN in this torch")
def test_chunked_linear_on_onednn_ignores_batch_position_and_alignment() -> None:
    din, dout = 256, 384  # wide enough for oneDNN (gemm.ONEDNN_MIN_WEIGHT)
    weight, bias = torch.randn(dout, din), torch.randn(dout)
    probe = torch.randn(din)
    filler = torch.randn(300, din)
    reference = chunked_linear(probe.unsqueeze(0), weight, bias, 32, "onednn")[0]
    torch.testing.assert_close(
        reference, nn.functional.linear(probe, weight, bias), atol=1e-4, rtol=1e-4
    )
    for rows, position in ((1, 0), (2, 1), (33, 32), (65, 7), (300, 299)):
        batch = filler[:rows].clone()
        batch[position] = probe
        assert torch.equal(chunked_linear(batch, weight, bias, 32, "onednn")[position], reference)
    storage = torch.empty(1 + 5 * din)
    view = storage[1:].view(5, din)
    view.copy_(filler[:5])
    view[3] = probe
    assert torch.equal(chunked_linear(view, weight, bias, 32, "onednn")[3], reference)


def _dispatch_case(din: int, dout: int, bias: bool) -> tuple[torch.Tensor, ...]:
    x = torch.randn(10, din, requires_grad=True)
    weight = torch.randn(4, dout, din, requires_grad=True)
    b = torch.randn(4, dout, requires_grad=True) if bias else None
    row_weights = torch.rand(9, requires_grad=True)
    return x, weight, b, row_weights  # type: ignore[return-value]


@pytest.mark.parametrize(("din", "dout"), [(16, 8), (8, 16)])
@pytest.mark.parametrize("bias", [True, False])
def test_dispatch_linear_padding_and_chunks_keep_values_and_gradients(
    din: int, dout: int, bias: bool
) -> None:
    counts = [3, 0, 4, 2]
    src = torch.tensor([0, 4, 9, 1, 4, 7, 8, 2, 4])
    dest = torch.tensor([1, 0, 5, 2, 3, 5, 0, 4, 6])
    grad = torch.randn(7, dout)
    results = []
    for multiple, chunk in ((1, None), (8, None), (None, 4)):
        torch.manual_seed(1)
        x, weight, b, row_weights = _dispatch_case(din, dout, bias)
        y = dispatch_linear(
            x, weight, b, counts, src, row_weights, dest, 7, row_chunk=chunk, row_multiple=multiple
        )
        (y * grad).sum().backward()  # type: ignore[no-untyped-call]
        grads = [t.grad for t in (x, weight, b, row_weights) if t is not None]
        results.append((y.detach(), grads))
    for y, grads in results[1:]:
        torch.testing.assert_close(y, results[0][0])
        for ours, theirs in zip(grads, results[0][1], strict=True):
            assert ours is not None and theirs is not None
            torch.testing.assert_close(ours, theirs)
    weight_grad = results[1][1][1]
    assert weight_grad is not None and torch.equal(weight_grad[1], torch.zeros(dout, din))
