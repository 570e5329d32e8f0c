"""The CPU float32 GEMM choice (`model.gemm`): oneDNN products equal torch's, fall back where
they must, and the expert paths on oneDNN give the torch path's outputs and gradients."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from uniperceiver_cli.model import gemm
from uniperceiver_cli.model.moe.experts import grouped_linear
from uniperceiver_cli.model.moe.fused_dispatch import dispatch_linear

needs_onednn = pytest.mark.skipif(not gemm.onednn_available(), reason="no oneDNN in this torch")


@pytest.fixture
def onednn_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, int, int]]]:
    """Record (M, K, N) of every product that reaches oneDNN."""
    calls: list[tuple[int, int, int]] = []
    gemm.resolve_backend("auto")  # the one-off probe runs before recording starts
    real = gemm._onednn_linear

    def record(
        x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        calls.append((x.shape[0], x.shape[1], weight.shape[0]))
        return real(x, weight, bias)

    monkeypatch.setattr(gemm, "_onednn_linear", record)
    yield calls


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.detach().abs().max()))


@needs_onednn
def test_onednn_mm_and_addmm_equal_torch(onednn_calls: list[tuple[int, int, int]]) -> None:
    """Products on oneDNN equal torch.mm / torch.addmm (with a bias), for transposed views and
    into slices."""
    a, w = torch.randn(37, 64), torch.randn(48, 64)
    bias = torch.randn(48)
    _close(gemm.mm(a, w.t(), backend="onednn"), torch.mm(a, w.t()))
    b = torch.randn(37, 20)
    _close(gemm.mm(a.t(), b, backend="onednn"), torch.mm(a.t(), b))
    buffer = torch.zeros(50, 48)
    gemm.mm(a, w.t(), bias=bias, out=buffer[5:42], backend="onednn")
    _close(buffer[5:42], torch.addmm(bias, a, w.t()))
    assert buffer[:5].abs().sum() == 0 and buffer[42:].abs().sum() == 0
    assert len(onednn_calls) == 3


def test_mm_stays_on_torch_where_it_must(onednn_calls: list[tuple[int, int, int]]) -> None:
    """bfloat16, tensors that need autograd, empty products and backend `torch` use torch.mm."""
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    gemm.mm(a.bfloat16(), b.bfloat16(), backend="onednn")
    gemm.mm(a.requires_grad_(), b, backend="onednn")
    gemm.mm(torch.randn(0, 16), b, backend="onednn")
    gemm.mm(a.detach(), b, backend="torch")
    assert onednn_calls == []
    assert gemm.mm(a, b, backend="onednn").requires_grad  # torch.mm kept the graph


def test_resolve_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """Names are checked; `torch` is always torch; without oneDNN everything resolves to torch."""
    with pytest.raises(ValueError, match="cpu_gemm must be one of auto, onednn, torch"):
        gemm.resolve_backend("fast")  # type: ignore[arg-type]
    assert gemm.resolve_backend("torch") == "torch"
    assert gemm.resolve_backend("auto") == gemm.resolve_backend("auto")  # probed once
    monkeypatch.setattr(gemm, "onednn_available", lambda: False)
    gemm._onednn_wins.cache_clear()
    try:
        assert gemm.resolve_backend("onednn") == "torch"
        assert gemm.resolve_backend("auto") == "torch"
    finally:
        gemm._onednn_wins.cache_clear()


@needs_onednn
def test_layer_backend_keeps_small_and_low_precision_layers_on_torch() -> None:
    big, small = torch.empty(256, 256), torch.empty(4, 64, 128)
    assert gemm.layer_backend("onednn", big, torch.float32) == "onednn"
    assert gemm.layer_backend("onednn", small, torch.float32) == "torch"  # 64 x 128 < 2^16
    assert gemm.layer_backend("onednn", big, torch.bfloat16) == "torch"
    assert gemm.layer_backend("torch", big, torch.float32) == "torch"


@needs_onednn
def test_linear_equals_f_linear_with_gradients(onednn_calls: list[tuple[int, int, int]]) -> None:
    """`gemm.linear` on oneDNN: forward and all three gradients equal F.linear's."""
    x = torch.randn(2, 5, 256, requires_grad=True)
    w = torch.randn(320, 256, requires_grad=True)
    b = torch.randn(320, requires_grad=True)
    y = gemm.linear(x, w, b, "onednn")
    (y.square().sum()).backward()  # type: ignore[no-untyped-call]
    grads = [t.grad for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    ref = F.linear(x, w, b)
    ref.square().sum().backward()  # type: ignore[no-untyped-call]
    _close(y, ref)
    for got, want in zip(grads, (x.grad, w.grad, b.grad), strict=True):
        assert got is not None and want is not None
        _close(got, want)
    assert len(onednn_calls) == 3  # forward, dx, dW
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gemm.linear(x, w, b, "onednn").dtype == torch.bfloat16  # autocast: F.linear


def _routed_inputs(din: int, dout: int) -> tuple[list[torch.Tensor], list[int], torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    counts = [37, 0, 21, 50]
    m = sum(counts)
    x = torch.randn(40, din, generator=gen)
    weight = torch.randn(4, dout, din, generator=gen) / din**0.5
    bias = torch.randn(4, dout, generator=gen)
    row_weights = torch.rand(m, generator=gen)
    src = torch.randint(0, 40, (m,), generator=gen)
    return [x, weight, bias, row_weights], counts, src


@needs_onednn
@pytest.mark.parametrize(("din", "dout"), [(256, 384), (384, 256)])
def test_dispatch_linear_on_onednn_equals_torch_backend(
    din: int, dout: int, onednn_calls: list[tuple[int, int, int]]
) -> None:
    """The fused node on oneDNN (blocks padded to 16 rows) gives the torch backend's outputs and
    the gradients of x, weights, biases and combine weights, with both wide and narrow outputs."""
    tensors, counts, src = _routed_inputs(din, dout)
    dest = src.flip(0)
    results = {}
    for backend in ("torch", "onednn"):
        leaves = [t.clone().requires_grad_() for t in tensors]
        x, weight, bias, row_weights = leaves
        y = dispatch_linear(x, weight, bias, counts, src, row_weights, dest, 40, cpu_gemm=backend)
        y.square().sum().backward()  # type: ignore[no-untyped-call]
        results[backend] = [y.detach(), *(t.grad for t in leaves)]
    for got, want in zip(results["onednn"], results["torch"], strict=True):
        assert got is not None and want is not None
        _close(got, want)
    assert len(onednn_calls) == 3 * 3  # forward, dx, dW of the three non-empty experts
    rows = {m for m, k, n in onednn_calls if (k, n) in ((din, dout), (dout, din))}
    assert rows and all(m % gemm.ONEDNN_ROW_MULTIPLE == 0 for m in rows), onednn_calls


@needs_onednn
def test_grouped_linear_on_onednn_equals_torch_backend(
    onednn_calls: list[tuple[int, int, int]],
) -> None:
    """The unfused / expert-parallel path on oneDNN gives the torch backend's results."""
    tensors, counts, _ = _routed_inputs(256, 256)
    rows = torch.randn(sum(counts), 256)
    results = {}
    for backend in ("torch", "onednn"):
        x = rows.clone().requires_grad_()
        weight, bias = (t.clone().requires_grad_() for t in tensors[1:3])
        y = grouped_linear(x, weight, bias, counts, cpu_gemm=backend)
        y.square().sum().backward()  # type: ignore[no-untyped-call]
        results[backend] = [y.detach(), x.grad, weight.grad, bias.grad]
    for got, want in zip(results["onednn"], results["torch"], strict=True):
        assert got is not None and want is not None
        _close(got, want)
    assert onednn_calls  # the products did reach oneDNN


@pytest.mark.parametrize("routing", ["token", "attribute"])
def test_set_cpu_gemm_sets_every_linear_that_has_one(routing: str) -> None:
    from moe_helpers import tiny_config

    from uniperceiver_cli.model.moe import build_routed_linears

    modules = torch.nn.ModuleDict(build_routed_linears(tiny_config(routing=routing), 0))
    modules["dense"] = gemm.GemmLinear(8, 8)
    routed = [m for m in modules.modules() if hasattr(m, "cpu_gemm")]
    assert len(routed) == len(modules) and all(m.cpu_gemm == "auto" for m in routed)
    assert gemm.set_cpu_gemm(modules, "torch") == len(routed)
    assert all(m.cpu_gemm == "torch" for m in routed)
    with pytest.raises(ValueError, match="cpu_gemm"):
        gemm.set_cpu_gemm(modules, "blas")  # type: ignore[arg-type]


@needs_onednn
def test_gemm_linear_is_an_nn_linear_on_onednn(onednn_calls: list[tuple[int, int, int]]) -> None:
    """Same state-dict keys and values as nn.Linear; float32 CPU products reach oneDNN."""
    plain = torch.nn.Linear(256, 256)
    ours = gemm.GemmLinear(256, 256)
    assert set(ours.state_dict()) == set(plain.state_dict())
    ours.load_state_dict(plain.state_dict())
    x = torch.randn(3, 7, 256)
    _close(ours(x), plain(x))
    assert onednn_calls == [(21, 256, 256)]
    ours.cpu_gemm = "torch"
    ours(x)
    assert len(onednn_calls) == 1


class _Subclass(torch.Tensor):
    """A tensor subclass, as FSDP2's DTensor or a fake tensor would be."""


@needs_onednn
def test_linear_records_a_plain_linear_when_exported_or_given_subclasses(
    onednn_calls: list[tuple[int, int, int]],
) -> None:
    layer = gemm.GemmLinear(256, 256)
    x = torch.randn(4, 256)
    exported = torch.export.export(layer, (x,))
    assert "aten.linear" in str(exported.graph)
    assert onednn_calls == []
    _close(exported.module()(x), layer(x))
    calls = len(onednn_calls)  # the eager call above
    gemm.linear(x.as_subclass(_Subclass), layer.weight, layer.bias, "onednn")
    assert len(onednn_calls) == calls


@needs_onednn
def test_model_runs_its_dense_linears_on_onednn(onednn_calls: list[tuple[int, int, int]]) -> None:
    """A model wide enough for oneDNN sends its encoder linears there; features equal the torch
    backend's within float32 rounding."""
    from uniperceiver_cli.model.build import build_model
    from uniperceiver_cli.model.presets import get_preset

    config = dataclasses.replace(get_preset("tiny", image_size=32), hidden_size=256, ffn_size=512)
    torch.manual_seed(0)
    model = build_model(config).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        auto = model(task_type="image_classification", visual=images).features
        assert onednn_calls, "no product reached oneDNN"
        assert gemm.set_cpu_gemm(model, "torch") >= 4 * config.num_layers
        blas = model(task_type="image_classification", visual=images).features
    _close(auto, blas)
