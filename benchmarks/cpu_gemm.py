"""float32 CPU matmul: oneDNN (`model.gemm`) against `torch.mm`, measured in the same run.

For the three products of a linear layer (forward x Wᵀ, input gradient g W, weight gradient gᵀ x)
at a few transformer widths, each a median over --reps interleaved rounds, plus what
`runtime.cpu_gemm: auto` resolves to on this machine.

Run:
    python benchmarks/cpu_gemm.py [--reps 7] [--threads 1]
"""

from __future__ import annotations

import argparse

import torch
from moe_layer import interleaved  # this folder (run as a script)

from uniperceiver_cli.model import gemm

SHAPES = ((1024, 768, 3072), (1024, 3072, 768), (4096, 768, 768), (256, 512, 512))


def main() -> None:
    """Print a markdown table of torch.mm / oneDNN times per product."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not gemm.onednn_available():
        print("this torch build has no oneDNN float32 linear; nothing to compare")
        return
    print(
        f"torch {torch.__version__}, threads {args.threads}, reps {args.reps}; "
        f"cpu_gemm auto -> {gemm.resolve_backend('auto')}"
    )
    print("| product | M x K x N | torch.mm | oneDNN | torch / oneDNN | GFLOPS (oneDNN) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for rows, din, dout in SHAPES:
        x, w, g = torch.randn(rows, din), torch.randn(dout, din), torch.randn(rows, dout)
        products = {
            "forward x Wᵀ": (x, w.t()),
            "input grad g W": (g, w),
            "weight grad gᵀ x": (g.t(), x),
        }
        for label, (a, b) in products.items():
            seconds = interleaved(
                {
                    "torch": lambda a=a, b=b: torch.mm(a, b),
                    "onednn": lambda a=a, b=b: gemm.mm(a, b, backend="onednn"),
                },
                args.reps,
                warmup=1,
            )
            medians = {name: value * 1e3 for name, value in seconds.items()}
            m, k, n = a.shape[0], a.shape[1], b.shape[1]
            flops = 2 * m * k * n / (medians["onednn"] * 1e-3) / 1e9
            print(
                f"| {label} | {m} x {k} x {n} | {medians['torch']:.2f} ms | "
                f"{medians['onednn']:.2f} ms | {medians['torch'] / medians['onednn']:.2f}x | "
                f"{flops:.0f} |"
            )


if __name__ == "__main__":
    main()
