"""Training-step cost of the engine's two candidate-set levers, against the reference's way, in one run.

1. Caption step (forward + backward): the reference encodes the whole 49,411-entry vocabulary with gradients at
   every step; the engine scores the batch's words plus `--negatives` sampled ids (`vocab_negatives`). The full
   vocabulary is timed on a `--vocab-slice` of it and scaled linearly (encoding cost is linear in the number of
   entries), because the whole vocabulary does not fit comfortably in memory for wider models.
2. Classification step: class names encoded padded to the longest name (the reference) vs length-bucketed
   (the engine; identical features, no padded positions).

Prints median seconds and ratios (baseline / engine). Example:

    GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736 \\
        python benchmarks/train_step.py --preset tiny --reps 3
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from uniperceiver_cli.engine.build import build_for_config
from uniperceiver_cli.engine.candidates import encode_bucketed
from uniperceiver_cli.model.embed import EOT_ID
from uniperceiver_cli.model.presets import get_preset

logger = logging.getLogger("benchmarks.train_step")


def _median_time(fn: Callable[[], None], reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    """Run both comparisons and log the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny", help="model preset (tiny, small, base)")
    parser.add_argument("--batch", type=int, default=16, help="images per step")
    parser.add_argument("--negatives", type=int, default=1024, help="sampled vocabulary negatives")
    parser.add_argument(
        "--vocab-slice", type=int, default=8192, help="vocabulary entries timed for the baseline"
    )
    parser.add_argument(
        "--classes", type=int, default=1000, help="class names in the classification step"
    )
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = get_preset(args.preset)
    model = build_for_config(cfg).train()
    s = cfg.image_size
    images = torch.randn(args.batch, 3, s, s)
    words = torch.randint(0, 49000, (args.batch, 20))
    words[:, -1] = EOT_ID

    def caption_step(ids: torch.Tensor) -> None:
        model.zero_grad(set_to_none=True)
        seqs = torch.stack([ids, torch.full_like(ids, EOT_ID)], dim=1)
        vocab = model.target_features(seqs, None, kind="vocabulary", task="vocabulary").features
        scores = model.caption_logits(images, words, None, vocab)
        target = torch.searchsorted(ids, words.clamp(max=int(ids.max()))).clamp(max=ids.numel() - 1)
        F.cross_entropy(scores.logits.flatten(0, 1), target.flatten()).backward()

    present = torch.unique(words)
    sampled = torch.unique(
        torch.cat([present, torch.randint(0, cfg.vocab_size, (args.negatives,))])
    )
    sliced = torch.unique(torch.cat([present, torch.arange(args.vocab_slice)]))
    t_sampled = _median_time(lambda: caption_step(sampled), args.reps)
    t_slice = _median_time(lambda: caption_step(sliced), args.reps)
    # Linear extrapolation of the vocabulary part to all V entries (the rest of the step is shared).
    per_entry = max(0.0, (t_slice - t_sampled) / max(1, sliced.numel() - sampled.numel()))
    t_full = t_sampled + per_entry * (cfg.vocab_size - sampled.numel())
    logger.info(
        "caption step (%s, batch %d): sampled %d candidates %.3f s; full vocabulary ~%.2f s (from %d entries "
        "%.3f s); ratio full / sampled = %.1fx",
        args.preset,
        args.batch,
        sampled.numel(),
        t_sampled,
        t_full,
        sliced.numel(),
        t_slice,
        t_full / t_sampled,
    )

    lengths = torch.randint(2, 9, (args.classes,))
    lengths[0] = 12  # one long name sets the padded width, as in real class-name sets
    width = int(lengths.max())
    names = torch.randint(0, 49000, (args.classes, width))
    pad = torch.arange(width)[None, :] >= lengths[:, None]
    names[torch.arange(args.classes), lengths - 1] = EOT_ID
    names = names.masked_fill(pad, 0)
    labels = torch.randint(0, args.classes, (args.batch,))

    def cls_step(bucketed: bool) -> None:
        model.zero_grad(set_to_none=True)
        inp = model.visual_features(images)
        if bucketed:
            cls, _ = encode_bucketed(model, names, pad, kind="classes", task="c")
        else:
            cls = model.target_features(names, pad, kind="classes", task="c").features
        F.cross_entropy(model.head.logits(inp.features, cls, "img_cls"), labels).backward()

    t_padded = _median_time(lambda: cls_step(False), args.reps)
    t_bucket = _median_time(lambda: cls_step(True), args.reps)
    logger.info(
        "classification step (%d class names, %.0f%% padding): padded %.3f s, length-bucketed %.3f s; "
        "ratio = %.2fx",
        args.classes,
        100.0 * float(pad.float().mean()),
        t_padded,
        t_bucket,
        t_padded / t_bucket,
    )


if __name__ == "__main__":
    main()
