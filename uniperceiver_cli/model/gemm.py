"""CPU float32 matrix products on the faster of two GEMM libraries: oneDNN or torch's BLAS.

PyTorch's x86 wheels run a float32 `torch.mm` on the CPU through MKL. On CPUs that MKL does not
tune for, it can pick a narrower code path than the CPU has: on the AMD EPYC (AVX-512) of our
build machines MKL runs at the AVX2 peak, ~103 GFLOPS on one core, while oneDNN's JIT kernels,
which the same wheel ships (`torch.ops.mkldnn._linear_pointwise`, exact float32), reach ~248
GFLOPS on the same product (`benchmarks/cpu_gemm.py`). `mm` sends 2-D float32 CPU products to
oneDNN when the backend says so and to `torch.mm` otherwise.

Backends (`runtime.cpu_gemm` in a recipe, `GemmBackend`):

* `torch`: always `torch.mm` (torch's own choice, what earlier versions did).
* `onednn`: oneDNN for float32 CPU products of layers wide enough to gain
  (`ONEDNN_MIN_WEIGHT`).
* `auto` (default): `onednn` when a one-off timing on this machine finds it at least
  `AUTO_MIN_SPEEDUP` times faster than `torch.mm` and equal to it within float32 rounding, else
  `torch`. The probe runs once per process and thread count (~20 ms).

Both give float32 results within float32 rounding of each other (not bit-identical: the
summation order differs). Other dtypes and devices always use `torch.mm` (bfloat16 and float16
already run on oneDNN on CPU).
"""

from __future__ import annotations

import functools
import statistics
import time
from typing import Literal

import torch
from torch.autograd.function import once_differentiable

__all__ = [
    "AUTO_MIN_SPEEDUP",
    "GEMM_BACKENDS",
    "ONEDNN_MIN_WEIGHT",
    "ONEDNN_ROW_MULTIPLE",
    "GemmBackend",
    "GemmLinear",
    "layer_backend",
    "linear",
    "mm",
    "onednn_available",
    "resolve_backend",
    "set_cpu_gemm",
    "uses_onednn",
]

GemmBackend = Literal["auto", "onednn", "torch"]

#: The accepted backend names.
GEMM_BACKENDS: tuple[str, ...] = ("auto", "onednn", "torch")

#: `auto` picks oneDNN only when the probe measures at least this speed-up.
AUTO_MIN_SPEEDUP = 1.25

#: Layers whose weight has fewer elements (Dout x Din) stay on `torch.mm`: oneDNN builds a
#: kernel for every new product shape (~0.1 ms and fresh memory), which small layers do not repay.
ONEDNN_MIN_WEIGHT = 1 << 16

#: Expert blocks on oneDNN are zero-padded to a multiple of this many rows, so that routed row
#: counts, which change every step, map onto a few shapes whose kernels are built once.
ONEDNN_ROW_MULTIPLE = 16


@functools.cache
def onednn_available() -> bool:
    """Whether this torch build has the oneDNN float32 linear (`mkldnn::_linear_pointwise`).

    Cached: it is asked before every product on the oneDNN path.
    """
    available = bool(torch.backends.mkldnn.is_available())  # type: ignore[no-untyped-call]
    return available and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x weightᵀ (+ bias) on oneDNN: x (M, K), weight (N, K) (any strides), bias (N,)."""
    out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return out


@functools.cache
def _onednn_wins(threads: int) -> bool:
    """One-off timing of a 256x512 @ 512x1024 float32 product: oneDNN against `torch.mm`.

    Cached per thread count (the hardware does not change within a process).
    """
    del threads  # the cache key: the timing below runs under the current setting
    if not onednn_available():
        return False
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(256, 512, generator=gen)
    b = torch.randn(512, 1024, generator=gen)
    with torch.no_grad():
        try:
            ours = _onednn_linear(a, b.t())
        except (RuntimeError, TypeError):  # a private op: another torch may have changed it
            return False
        ref = torch.mm(a, b)
        if not torch.allclose(ours, ref, rtol=1e-4, atol=1e-3):
            return False
        times: dict[str, list[float]] = {"onednn": [], "torch": []}
        bt = b.t()
        for _ in range(7):
            start = time.perf_counter()
            _onednn_linear(a, bt)
            middle = time.perf_counter()
            torch.mm(a, b)
            times["onednn"].append(middle - start)
            times["torch"].append(time.perf_counter() - middle)
    onednn, blas = (statistics.median(times[k][2:]) for k in ("onednn", "torch"))
    return onednn * AUTO_MIN_SPEEDUP <= blas


def resolve_backend(backend: GemmBackend) -> Literal["onednn", "torch"]:
    """The backend float32 CPU products will use: `auto` resolved by the probe.

    Raises:
        ValueError: for a name outside `GEMM_BACKENDS`.
    """
    if backend not in GEMM_BACKENDS:
        raise ValueError(f"cpu_gemm must be one of {', '.join(GEMM_BACKENDS)}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "onednn":
        return "onednn" if onednn_available() else "torch"
    return "onednn" if _onednn_wins(torch.get_num_threads()) else "torch"


def layer_backend(
    backend: GemmBackend, weight: torch.Tensor, dtype: torch.dtype
) -> Literal["onednn", "torch"]:
    """The concrete backend of one linear layer's products (forward and backward alike).

    Args:
        backend: the requested backend.
        weight: the layer's (Dout, Din) weight or (E, Dout, Din) expert weights.
        dtype: the compute dtype of its products.

    Returns:
        `onednn` for a float32 CPU layer of at least `ONEDNN_MIN_WEIGHT` weights per output
        matrix when `backend` resolves to oneDNN, else `torch`.
    """
    if backend == "torch" or weight.device.type != "cpu" or dtype != torch.float32:
        return "torch"
    if weight.shape[-1] * weight.shape[-2] < ONEDNN_MIN_WEIGHT:
        return "torch"
    return resolve_backend(backend)


def uses_onednn(a: torch.Tensor, b: torch.Tensor, backend: GemmBackend) -> bool:
    """Whether `mm(a, b, backend=backend)` runs on oneDNN.

    Args:
        a: (M, K).
        b: (K, N).
        backend: the requested backend (`auto` resolved by `resolve_backend`).
    """
    if backend == "torch" or a.device.type != "cpu" or b.device.type != "cpu":
        return False
    if a.dtype != torch.float32 or b.dtype != torch.float32 or a.dim() != 2 or b.dim() != 2:
        return False
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return False  # the oneDNN op has no autograd formula
    if min(a.shape[0], a.shape[1], b.shape[1]) == 0:
        return False
    return resolve_backend(backend) == "onednn"


def mm(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    backend: GemmBackend = "torch",
) -> torch.Tensor:
    """a @ b (+ bias over every row) like `torch.mm` / `torch.addmm`, on oneDNN when
    `uses_onednn` says so (no autograd there).

    Args:
        a: (M, K).
        b: (K, N).
        bias: optional (N,).
        out: optional (M, N) destination (any dtype `copy_` accepts on the oneDNN path).
        backend: `torch`, `onednn` or `auto`.

    Returns:
        (M, N), `out` when given.
    """
    plain_bias = bias is None or (bias.dtype == torch.float32 and bias.dim() == 1)
    if not (plain_bias and uses_onednn(a, b, backend)):
        if bias is None:
            return torch.mm(a, b) if out is None else torch.mm(a, b, out=out)
        return torch.addmm(bias, a, b) if out is None else torch.addmm(bias, a, b, out=out)
    product = _onednn_linear(a, b.t(), None if bias is None else bias.contiguous())
    return product if out is None else out.copy_(product)


class _Linear(torch.autograd.Function):
    """x Wᵀ + b with every product (forward and both gradients) through `mm`."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        backend: GemmBackend,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.backend = backend  # type: ignore[attr-defined]
        ctx.has_bias = bias is not None  # type: ignore[attr-defined]
        return mm(x, weight.t(), bias=bias, backend=backend)

    @staticmethod
    @once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, None]:
        x, weight = ctx.saved_tensors  # type: ignore[attr-defined]
        backend: GemmBackend = ctx.backend  # type: ignore[attr-defined]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]  # type: ignore[attr-defined]
        grad = grad.contiguous()
        grad_x = mm(grad, weight, backend=backend) if need_x else None
        grad_w = mm(grad.t(), x, backend=backend) if need_w else None
        has_bias: bool = ctx.has_bias  # type: ignore[attr-defined]
        grad_b = grad.sum(0) if need_b and has_bias else None
        return grad_x, grad_w, grad_b, None


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    backend: GemmBackend = "auto",
) -> torch.Tensor:
    """Differentiable `F.linear` whose float32 CPU products go through `mm`.

    Falls back to `F.linear` under autocast, while tracing, compiling or exporting (the graph
    then records a plain linear), and for inputs that are not plain float32 CPU tensors (tensor
    subclasses such as FSDP2's DTensor included), so it can stand in for `F.linear` anywhere.

    Args:
        x: (..., Din).
        weight: (Dout, Din).
        bias: (Dout,) or None.
        backend: `torch`, `onednn` or `auto`.

    Returns:
        (..., Dout).
    """
    plain = (
        backend != "torch"
        and _plain_tensor(x)
        and _plain_tensor(weight)
        and (bias is None or _plain_tensor(bias))
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and (bias is None or bias.dtype == torch.float32)
        and not torch.is_autocast_enabled("cpu")
        and not _tracing()
    )
    if not plain or layer_backend(backend, weight, x.dtype) == "torch":
        return torch.nn.functional.linear(x, weight, bias)
    flat = x.reshape(-1, x.shape[-1])
    out: torch.Tensor = _Linear.apply(flat, weight, bias, "onednn")  # type: ignore[no-untyped-call]
    return out.view(*x.shape[:-1], weight.shape[0])


def _plain_tensor(t: torch.Tensor) -> bool:
    """A plain tensor or parameter, not a subclass (DTensor, FakeTensor, functorch wrappers)."""
    return type(t) in (torch.Tensor, torch.nn.Parameter)


def _tracing() -> bool:
    """Whether a tracer, compiler or exporter is recording this call."""
    return bool(
        torch.compiler.is_compiling()
        or torch._C._get_tracing_state() is not None
        or torch.onnx.is_in_onnx_export()
    )


class GemmLinear(torch.nn.Linear):
    """`nn.Linear` whose float32 CPU products go through `linear` (oneDNN or torch's BLAS).

    Same parameters, initialisation and state-dict keys as `nn.Linear`.

    Attributes:
        cpu_gemm: `auto`, `onednn` or `torch` (set from the recipe's `runtime.cpu_gemm`).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self.cpu_gemm: GemmBackend = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., Din) -> (..., Dout)."""
        return linear(x, self.weight, self.bias, self.cpu_gemm)


def set_cpu_gemm(model: torch.nn.Module, backend: GemmBackend) -> int:
    """Set the float32 CPU GEMM library of every linear in `model` that has one (`cpu_gemm`).

    That is every `GemmLinear` and every routed MoE linear.

    Args:
        model: any module.
        backend: `auto`, `onednn` or `torch`.

    Returns:
        How many modules were set.

    Raises:
        ValueError: for an unknown backend name.
    """
    resolve_backend(backend)  # validates the name (and runs the one-off probe for `auto`)
    count = 0
    for module in model.modules():
        if hasattr(module, "cpu_gemm"):
            setattr(module, "cpu_gemm", backend)  # noqa: B010 (any module kind that has one)
            count += 1
    return count
