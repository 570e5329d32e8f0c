"""Inference latency of the folded ONNX export against the routed eager MoE model and a dense model.

One run, same inputs, round-robin (median of --reps after --warmup), image encoder and text encoder:

* `routed eager`  (baseline): the MoE model in eval mode, `encode_images` / `target_features` (weight-merge
  routing with cached merged weights);
* `folded eager`: the same model after `fold_for_task` (plain linears per routing key);
* `folded onnx`:  the folded entry points exported with `torch.onnx.export(dynamo=True)`, run by onnxruntime;
* `dense eager`:  a dense model of the same active size (same D, F, L: what one token computes with top-2
  weight merging), in eval mode.

Ratios are time / routed-eager time (below 1 is faster). Random weights; the numbers are about speed only.

Run: GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736 \
     python benchmarks/export_latency.py [--preset small --experts 8 --batch 8 --text-len 16 --threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from uniperceiver_cli.export.entry import build_entry_points
from uniperceiver_cli.export.onnx import check_onnx_available, export_onnx, load_sessions
from uniperceiver_cli.model.build import build_model, count_parameters
from uniperceiver_cli.model.config import MoEConfig
from uniperceiver_cli.model.heads import l2_normalize
from uniperceiver_cli.model.presets import get_preset


def interleaved_medians(
    variants: dict[str, Callable[[], object]], warmup: int, reps: int
) -> dict[str, float]:
    """Median wall time per variant; each repetition times every variant once, in turn.

    Round-robin timing spreads the load spikes of a shared machine over all variants alike.
    """
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(reps):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    """Parse flags, build the models, export, time and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--text-len", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    check_onnx_available()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = get_preset(args.preset)
    moe_cfg = get_preset(
        args.preset,
        moe=MoEConfig(num_experts=args.experts, layers=tuple(range(0, base.num_layers, 2))),
    )
    routed = build_model(moe_cfg).eval()
    dense = build_model(base).eval()
    entry = build_entry_points(routed)
    folded = entry.model
    s = base.image_size
    images = torch.randn(args.batch, 3, s, s)
    ids = torch.randint(0, 49_000, (args.batch, args.text_len))
    ids[:, -1] = 49_407
    pad = torch.zeros_like(ids, dtype=torch.bool)

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        folder, report, _ = export_onnx(
            entry, Path(tmp) / "onnx", names=["image_encoder", "text_encoder"], cases=((1, 4, 1),)
        )
        export_s = time.perf_counter() - start
        sessions = load_sessions(folder)
        feeds_img = {"images": images.numpy()}
        feeds_txt = {"ids": ids.numpy(), "padding": pad.numpy()}

        def eager_img(model: torch.nn.Module) -> Callable[[], object]:
            def run() -> object:
                with torch.inference_mode():
                    return model.encode_images(images)  # type: ignore[operator]

            return run

        def eager_txt(model: torch.nn.Module) -> Callable[[], object]:
            def run() -> object:
                with torch.inference_mode():
                    out = model.target_features(ids, pad, kind="captions")  # type: ignore[operator]
                    return l2_normalize(out.features)

            return run

        def onnx_run(name: str, feeds: dict[str, np.ndarray]) -> Callable[[], object]:
            return lambda: sessions[name].run(None, feeds)

        rows = {
            "image encoder": {
                "routed eager": eager_img(routed),
                "folded eager": eager_img(folded),
                "folded onnx": onnx_run("image_encoder", feeds_img),
                "dense eager": eager_img(dense),
            },
            "text encoder": {
                "routed eager": eager_txt(routed),
                "folded eager": eager_txt(folded),
                "folded onnx": onnx_run("text_encoder", feeds_txt),
                "dense eager": eager_txt(dense),
            },
        }
        results = {
            name: interleaved_medians(variants, args.warmup, args.reps)
            for name, variants in rows.items()
        }

    print(
        f"preset {args.preset}, E={args.experts}, MoE layers {list(moe_cfg.moe.layers)}, "  # type: ignore[union-attr]
        f"batch {args.batch}, text length {args.text_len}, threads {args.threads}"
    )
    print(
        f"parameters: routed {count_parameters(routed) / 1e6:.2f}M, folded "
        f"{count_parameters(folded) / 1e6:.2f}M, dense {count_parameters(dense) / 1e6:.2f}M; "
        f"ONNX export + verify {export_s:.1f} s, max |onnx - eager| "
        f"{max(report.max_diff(n) for n in ('image_encoder', 'text_encoder')):.2g}"
    )
    print(f"{'entry':<14} {'variant':<13} {'ms':>9} {'vs routed':>10}")
    for entry_name, times in results.items():
        baseline = times["routed eager"]
        for variant, t in times.items():
            print(f"{entry_name:<14} {variant:<13} {t * 1e3:>9.2f} {t / baseline:>9.2f}x")


if __name__ == "__main__":
    main()
