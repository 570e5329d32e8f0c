"""Forward+backward throughput of the dense model (tiny and small presets) against a `torch.mm` baseline.

Run: `python benchmarks/model_forward.py [--threads 2] [--repeats 5]`. Each preset encodes a batch of images
(`[SPE; patches]`), backpropagates `features.sum()`, and reports tokens/s and achieved FLOP/s using PERF.md's
count `L * [B*N*(8 D^2 + 4 D F) + 4 B N^2 D]` (x3 for forward+backward). The baseline is a `torch.mm` of the
FFN-in shape (B*N, D) x (D, F) measured in the same run, so the ratio is robust to machine drift. The step is
also timed with every linear on torch's BLAS (`runtime.cpu_gemm: torch`) against the default (`auto`, oneDNN where
it measures faster, docs/moe.md), interleaved.
Set `GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736` before starting Python for
stable numbers (PERF.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from uniperceiver_cli.model.build import build_model
from uniperceiver_cli.model.gemm import resolve_backend, set_cpu_gemm
from uniperceiver_cli.model.presets import get_preset

#: preset -> (batch, image side) of the benchmark workload.
WORKLOADS: dict[str, tuple[int, int]] = {"tiny": (256, 32), "small": (16, 224)}
#: matmuls per baseline timing.
MM_REPS = 20


def median_seconds(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    """Median wall time of `fn` over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def encoder_flops(layers: int, batch: int, tokens: int, d: int, f: int) -> float:
    """Forward FLOPs of one encoder call (PERF.md)."""
    return layers * (batch * tokens * (8 * d * d + 4 * d * f) + 4 * batch * tokens * tokens * d)


def main() -> None:
    """Measure and print one table row per preset."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--presets", nargs="+", default=list(WORKLOADS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"GLIBC_TUNABLES={'set' if os.environ.get('GLIBC_TUNABLES') else 'unset'}, "
        f"median of {args.repeats} after {args.warmup} warm-ups; cpu_gemm auto -> "
        f"{resolve_backend('auto')}"
    )
    header = (
        f"{'preset':<7}{'batch':>6}{'tokens':>8}{'step s':>9}{'tokens/s':>11}"
        f"{'GFLOP/s':>9}{'mm GFLOP/s':>12}{'ratio':>7}{'BLAS step s':>13}{'speed-up':>10}"
    )
    print(header)
    for name in args.presets:
        batch, side = WORKLOADS[name]
        cfg = get_preset(name, image_size=side)
        model = build_model(cfg).train()
        images = torch.randn(batch, 3, side, side)
        tokens = 1 + cfg.grid_size**2

        def step(model: torch.nn.Module = model, images: torch.Tensor = images) -> None:
            model.zero_grad(set_to_none=True)
            out = model(task_type="image_classification", visual=images)
            out.features.sum().backward()

        times: dict[str, list[float]] = {"auto": [], "torch": []}
        for backend in times:
            set_cpu_gemm(model, backend)  # type: ignore[arg-type]
            for _ in range(args.warmup):
                step()
        for _ in range(args.repeats):
            for backend, spent in times.items():
                set_cpu_gemm(model, backend)  # type: ignore[arg-type]
                start = time.perf_counter()
                step()
                spent.append(time.perf_counter() - start)
        seconds = statistics.median(times["auto"])
        blas_seconds = statistics.median(times["torch"])
        flops = 3 * encoder_flops(cfg.num_layers, batch, tokens, cfg.hidden_size, cfg.ffn_size)
        a = torch.randn(batch * tokens, cfg.hidden_size)
        b = torch.randn(cfg.hidden_size, cfg.ffn_size)
        mm_seconds = median_seconds(
            lambda a=a, b=b: [torch.mm(a, b) for _ in range(MM_REPS)], args.warmup, args.repeats
        )
        mm_rate = 2 * a.shape[0] * a.shape[1] * b.shape[1] * MM_REPS / mm_seconds
        rate = flops / seconds
        print(
            f"{name:<7}{batch:>6}{tokens:>8}{seconds:>9.3f}{batch * tokens / seconds:>11.0f}"
            f"{rate / 1e9:>9.1f}{mm_rate / 1e9:>12.1f}{rate / mm_rate:>7.2f}"
            f"{blas_seconds:>13.3f}{blas_seconds / seconds:>9.2f}x"
        )


if __name__ == "__main__":
    main()
