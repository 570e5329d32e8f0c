"""Evaluation speed: retrieval ranking vs encoding, and cached vs uncached vocabulary encoding.

One run measures, on this machine:

1. Ranking a COCO-5k-sized retrieval split (5,000 images x 25,000 captions, random L2-normalised features of
   width D): the similarity matrix, R@1/5/10 both ways (`metrics.retrieval`) and the top-10 rows written as
   predictions (`engine.evaluate.rank_retrieval`). Baseline: the time to *encode* the same split with the model,
   extrapolated from encoding a sample of images and captions.
2. The whole-vocabulary encoding captioning needs (49,411 sequences): encoded (uncached), read back from the
   on-disk cache keyed by the checkpoint's SHA-256, and served from the model's in-memory cache.

Usage:
    python benchmarks/eval_speed.py                    # small preset (D 192, 12 layers, 224 px)
    python benchmarks/eval_speed.py --preset tiny      # quick check
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from uniperceiver_cli.engine.evaluate import rank_retrieval, vocabulary_features_cached
from uniperceiver_cli.model.build import build_model
from uniperceiver_cli.model.checkpoint import save_pretrained
from uniperceiver_cli.model.presets import get_preset


def _timed(fn: object, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", help="model preset (tiny, small, base)")
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--sample", type=int, default=32, help="images encoded to extrapolate")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(get_preset(args.preset)).eval()
    cfg = model.config
    n_img, n_txt = args.images, args.images * args.captions_per_image

    # ---- 1. ranking vs encoding -------------------------------------------------------------------
    visual = torch.nn.functional.normalize(torch.randn(n_img, cfg.hidden_size), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(n_txt, cfg.hidden_size), dim=-1)
    owner = torch.arange(n_img).repeat_interleave(args.captions_per_image)
    rank_s = _timed(lambda: rank_retrieval(visual, texts, owner), repeats=2)

    s = cfg.image_size
    images = torch.randn(args.sample, 3, s, s)
    captions = ["a man riding a wave on top of a surfboard in the ocean ."] * (
        args.sample * args.captions_per_image
    )
    with torch.no_grad():
        model.encode_images(images[:2])  # warm-up
        img_s = _timed(lambda: model.encode_images(images))
        txt_s = _timed(lambda: model.encode_texts(captions, chunk_size=256))
    encode_s = img_s * n_img / args.sample + txt_s * n_txt / len(captions)
    print(f"model {args.preset}: D {cfg.hidden_size}, {cfg.num_layers} layers, {s} px, "
          f"{torch.get_num_threads()} thread(s)")  # fmt: skip
    print(f"retrieval split: {n_img} images x {n_txt} captions")
    print(f"  encode (extrapolated from {args.sample} images): {encode_s:9.1f} s  (baseline)")
    print(f"  rank + R@K + top-10 predictions:          {rank_s:9.2f} s  "
          f"= {rank_s / encode_s:.4f} x encode")  # fmt: skip

    # ---- 2. vocabulary: uncached vs disk cache vs memory ------------------------------------------
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = save_pretrained(model, Path(tmp) / "ckpt")
        from uniperceiver_cli.engine.evaluate import checkpoint_sha256

        sha = checkpoint_sha256(ckpt)
        cache = Path(tmp) / "cache"
        with torch.no_grad():
            model._vocab_cache = None  # start cold: the benchmark measures the encoding itself
            t0 = time.perf_counter()
            _, src_a = vocabulary_features_cached(model, fingerprint=sha, cache_dir=cache)
            uncached = time.perf_counter() - t0
            t0 = time.perf_counter()
            _, src_b = vocabulary_features_cached(model, fingerprint=sha, cache_dir=cache)
            disk = time.perf_counter() - t0
            t0 = time.perf_counter()
            model.vocabulary_features()
            memory = time.perf_counter() - t0
    assert (src_a, src_b) == ("encoded", "disk")
    print(f"vocabulary ({cfg.vocab_size} entries):")
    print(f"  encoded (uncached, baseline): {uncached:8.2f} s")
    print(
        f"  disk cache (per checkpoint):  {disk:8.3f} s  = {uncached / max(disk, 1e-9):7.1f}x faster"
    )
    print(f"  in-memory cache:              {memory:8.5f} s  = "
          f"{uncached / max(memory, 1e-9):7.0f}x faster")  # fmt: skip


if __name__ == "__main__":
    main()
