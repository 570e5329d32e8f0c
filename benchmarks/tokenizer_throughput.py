"""Tokenizer throughput: ClipTokenizer against open_clip's CLIP tokenizer, measured in one run.

Usage:
    .venv/bin/python benchmarks/tokenizer_throughput.py            # 20,000 strings per corpus
    .venv/bin/python benchmarks/tokenizer_throughput.py --n 5000 --repeats 3

Two deterministic corpora of caption-like strings:

* ``captions``: COCO-like captions from a small word list, mostly ASCII; about 5% carry accents,
  emoji, CJK or HTML entities (these take the full ftfy path).
* ``diverse``: the same sentences with two made-up words each (random letter strings), so that
  most pieces are new and the BPE merge loop, not the cache, dominates the first pass.

"cold" is the first pass of a freshly built tokenizer (empty BPE cache), "warm" a later pass of the
same instance (best of --repeats). Ratios > 1 mean ours is faster than the baseline measured in the
same run on the same strings.
"""

from __future__ import annotations

import argparse
import html
import random
import re
import string
import time
from collections.abc import Callable, Sequence
from typing import Any

import ftfy
import torch

from uniperceiver_cli.data.tokenizer import ClipTokenizer, normalize_text

SUBJECTS = [
    "a man",
    "a woman",
    "two dogs",
    "a cat",
    "a group of people",
    "a young boy",
    "an old lady",
    "a brown horse",
    "three birds",
    "a red car",
    "a yellow bus",
    "a surfer",
    "a chef",
    "a skier",
    "a little girl",
    "a giraffe",
    "a herd of elephants",
    "a baseball player",
    "a teddy bear",
]
VERBS = [
    "riding",
    "holding",
    "sitting on",
    "standing next to",
    "walking along",
    "looking at",
    "eating",
    "playing with",
    "jumping over",
    "flying above",
    "parked near",
    "lying on",
]
OBJECTS = [
    "a wave",
    "the beach",
    "a wooden bench",
    "a frisbee",
    "a pizza",
    "a snowy mountain",
    "a busy street",
    "the kitchen counter",
    "a laptop",
    "a tennis racket",
    "a river bank",
    "a field of flowers",
    "the train station",
    "an umbrella",
    "a plate of broccoli",
]
TAILS = [
    "",
    ".",
    " .",
    "!",
    " at sunset.",
    " in the rain",
    ", smiling.",
    " on a sunny day.",
    " (2 of them)",
]
EXOTIC_TAILS = (" with a café behind", " &amp; friends", " — blurry", " 😀", " 東京", " naïve")


def make_captions(count: int, seed: int, *, made_up_words: int = 0) -> list[str]:
    """Return ``count`` deterministic caption-like strings.

    Args:
        count: Number of strings.
        seed: Generator seed.
        made_up_words: Random letter strings (4-12 letters) appended to each caption.
    """
    rng = random.Random(seed)
    captions = []
    for _ in range(count):
        text = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
        for _ in range(made_up_words):
            text += " " + "".join(rng.choices(string.ascii_lowercase, k=rng.randint(4, 12)))
        text += rng.choice(EXOTIC_TAILS) if rng.random() < 0.05 else rng.choice(TAILS)
        if rng.random() < 0.5:
            text = text[0].upper() + text[1:]
        captions.append(text)
    return captions


def timed(run: Callable[[], Any]) -> float:
    """Return the wall time of one call, in seconds."""
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def best_of(run: Callable[[], Any], repeats: int) -> float:
    """Return the fastest of ``repeats`` calls, in seconds."""
    return min(timed(run) for _ in range(repeats))


def reference_normalize(text: str) -> str:
    """Normalisation without the ASCII fast path (always ftfy + html.unescape)."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip().lower()


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark and print strings/s and ratios."""
    parser = argparse.ArgumentParser(description="ClipTokenizer vs open_clip throughput")
    parser.add_argument("--n", type=int, default=20_000, help="strings per corpus")
    parser.add_argument("--repeats", type=int, default=3, help="warm passes; best one counts")
    parser.add_argument("--seed", type=int, default=0, help="caption generator seed")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    import open_clip
    from open_clip.tokenizer import SimpleTokenizer

    batch_tokenizer = open_clip.get_tokenizer("ViT-B-32")
    corpora = {
        "captions": make_captions(args.n, args.seed),
        "diverse": make_captions(args.n, args.seed, made_up_words=2),
    }
    header = f"{'corpus / measurement':38s} {'ours str/s':>11s} {'base str/s':>11s} {'ratio':>6s}"
    print(f"{header}  baseline")
    for name, texts in corpora.items():
        chars = sum(map(len, texts)) / len(texts)
        print(f"-- {name}: {len(texts)} strings, {chars:.1f} chars on average")
        report(texts, SimpleTokenizer(), batch_tokenizer, args.repeats)


def report(texts: list[str], simple: Any, batch_tokenizer: Any, repeats: int) -> None:
    """Time one corpus with a fresh ClipTokenizer and a fresh open_clip tokenizer; print rows."""
    n = len(texts)
    ours = ClipTokenizer()
    ours_cold = timed(lambda: [ours.encode(t) for t in texts])
    ours_warm = best_of(lambda: [ours.encode(t) for t in texts], repeats)
    theirs_cold = timed(lambda: [simple.encode(t) for t in texts])
    theirs_warm = best_of(lambda: [simple.encode(t) for t in texts], repeats)
    ours_batch = best_of(lambda: ours.encode_batch(texts, max_len=77), repeats)
    theirs_batch = best_of(lambda: batch_tokenizer(texts), repeats)
    fast_norm = best_of(lambda: [normalize_text(t) for t in texts], repeats)
    slow_norm = best_of(lambda: [reference_normalize(t) for t in texts], repeats)
    rows = [
        ("encode, cold cache", ours_cold, theirs_cold, "SimpleTokenizer.encode, cold"),
        ("encode, warm cache", ours_warm, theirs_warm, "SimpleTokenizer.encode, warm"),
        ("encode_batch(max_len=77), warm", ours_batch, theirs_batch, "get_tokenizer(ViT-B-32)"),
        ("normalize_text", fast_norm, slow_norm, "ftfy + unescape on every string"),
    ]
    for label, ours_s, base_s, baseline in rows:
        print(
            f"{label:38s} {n / ours_s:11,.0f} {n / base_s:11,.0f} {base_s / ours_s:6.2f}  "
            f"{baseline}"
        )
    print(
        f"{'warm / cold speed-up':38s} {ours_cold / ours_warm:11.2f} "
        f"{theirs_cold / theirs_warm:11.2f}"
    )


if __name__ == "__main__":
    main()
