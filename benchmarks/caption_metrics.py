"""Time the builtin caption metrics against pycocoevalcap 1.2 (Java start included) on one set.

Usage: python benchmarks/caption_metrics.py [--images 5000] [--refs 5]
Prints both wall times, their ratio and the per-metric differences on the same synthetic captions.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "unit" / "metrics"))

from synth_captions import coco_oracle_available, synth_set

from uniperceiver_cli.metrics.caption import compute_caption_metrics

METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--refs", type=int, default=5)
    args = parser.parse_args()
    preds, refs = synth_set(args.images, args.refs, seed=0)
    start = time.perf_counter()
    ours = compute_caption_metrics(preds, refs)
    builtin_s = time.perf_counter() - start
    print(f"builtin: {builtin_s:.2f} s for {args.images} captions x {args.refs} references")
    if not coco_oracle_available():
        print("pycocoevalcap or java missing: no baseline to compare against")
        return
    start = time.perf_counter()
    coco = compute_caption_metrics(preds, refs, backend="coco")
    coco_s = time.perf_counter() - start
    print(f"pycocoevalcap: {coco_s:.2f} s (two tokenizer JVMs + METEOR JVM)")
    print(f"speed ratio pycocoevalcap / builtin: {coco_s / builtin_s:.2f}x")
    for name in METRICS:
        a, b = getattr(ours, name), getattr(coco, name)
        print(f"{name:8s} builtin={a:.8f} coco={b:.8f} |diff|={abs(a - b):.2e}")


if __name__ == "__main__":
    main()
