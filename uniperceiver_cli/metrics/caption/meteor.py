"""METEOR 1.5 (English, ``-norm``) in Python, as pycocoevalcap 1.2 runs it: ``meteor(hyps, refs)``.

Re-implemented (our own code) from METEOR 1.5's algorithm (Denkowski & Lavie; its LGPL release
documents the alignment search) and checked against the jar: text is re-tokenised by
`normalize_for_meteor`; matches come from the exact, stem, synonym and paraphrase modules and the
jar's alignment search (`meteor_align`); English "rank" parameters alpha 0.85, beta 0.2, gamma 0.6,
delta 0.75 and module weights 1.0 / 0.6 / 0.8 / 0.6. Equal to pycocoevalcap 1.2 to float rounding.

Per segment (``SCORE``), with content/function counts of matched words per module:
P and R are delta-weighted module-weighted match fractions of hypothesis and reference,
Fmean = P R / (alpha P + (1 - alpha) R), frag = chunks / mean(matched words of both sides)
(0 when every word of both sides is matched in one chunk), score = Fmean (1 - gamma frag^beta).
Each caption keeps its best-scoring reference (the first on ties); the corpus score (``EVAL``) is
the same formula over the summed statistics of those best matches, a perfect one-chunk segment
counting 0 chunks. Without pycocoevalcap only exact and stem matching run (recorded in
`MeteorResources.modules`). Torch-free.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from uniperceiver_cli.metrics.caption.meteor_align import (
    ParaphraseTable,
    align,
    candidate_matches,
    count_chunks,
)
from uniperceiver_cli.metrics.caption.meteor_data import (
    MeteorResources,
    load_meteor_resources,
    load_paraphrases,
)
from uniperceiver_cli.metrics.caption.meteor_norm import normalize_for_meteor

__all__ = [
    "MeteorResources",
    "MeteorStats",
    "load_meteor_resources",
    "meteor",
    "normalize_for_meteor",
    "segment_stats",
]

logger = logging.getLogger(__name__)

ALPHA, BETA, GAMMA, DELTA = 0.85, 0.2, 0.6, 0.75
WEIGHTS = (1.0, 0.6, 0.8, 0.6)  # exact, stem, synonym, paraphrase


def _zero_pairs() -> list[list[int]]:
    return [[0, 0] for _ in WEIGHTS]


@dataclass
class MeteorStats:
    """Sufficient statistics of one alignment (the numbers the jar's ``SCORE`` prints).

    Attributes:
        hyp_len, ref_len: tokens in hypothesis and reference.
        hyp_function, ref_function: function words among them.
        hyp_matched, ref_matched: per module, [content, function] matched words on each side.
        chunks: chunks of the alignment.
        hyp_words, ref_words: matched words on each side.
    """

    hyp_len: int = 0
    ref_len: int = 0
    hyp_function: int = 0
    ref_function: int = 0
    hyp_matched: list[list[int]] = field(default_factory=_zero_pairs)
    ref_matched: list[list[int]] = field(default_factory=_zero_pairs)
    chunks: int = 0
    hyp_words: int = 0
    ref_words: int = 0

    def is_perfect(self) -> bool:
        """Every word of both sides matched, in one chunk."""
        return (
            self.chunks == 1 and self.hyp_words == self.hyp_len and self.ref_words == self.ref_len
        )

    def add(self, other: MeteorStats, perfect_as_zero_chunks: bool = True) -> None:
        """Accumulate `other` into these corpus statistics (as the jar's ``EVAL`` does)."""
        self.hyp_len += other.hyp_len
        self.ref_len += other.ref_len
        self.hyp_function += other.hyp_function
        self.ref_function += other.ref_function
        for mine, theirs in zip(
            self.hyp_matched + self.ref_matched,
            other.hyp_matched + other.ref_matched,
            strict=True,
        ):
            mine[0] += theirs[0]
            mine[1] += theirs[1]
        self.chunks += 0 if perfect_as_zero_chunks and other.is_perfect() else other.chunks
        self.hyp_words += other.hyp_words
        self.ref_words += other.ref_words

    def score(self) -> float:
        """METEOR of these statistics (0 when nothing matched)."""
        hyp_content = self.hyp_len - self.hyp_function
        ref_content = self.ref_len - self.ref_function
        p_den = DELTA * hyp_content + (1 - DELTA) * self.hyp_function
        r_den = DELTA * ref_content + (1 - DELTA) * self.ref_function
        p_num = sum(
            w * (DELTA * c + (1 - DELTA) * f)
            for w, (c, f) in zip(WEIGHTS, self.hyp_matched, strict=True)
        )
        r_num = sum(
            w * (DELTA * c + (1 - DELTA) * f)
            for w, (c, f) in zip(WEIGHTS, self.ref_matched, strict=True)
        )
        precision = p_num / p_den if p_den > 0 else 0.0
        recall = r_num / r_den if r_den > 0 else 0.0
        if precision <= 0 or recall <= 0:
            return 0.0
        f_mean = precision * recall / (ALPHA * precision + (1 - ALPHA) * recall)
        frag = 0.0
        if not self.is_perfect():
            frag = self.chunks / ((self.hyp_words + self.ref_words) / 2)
        return float(f_mean * (1 - GAMMA * frag**BETA))


def segment_stats(
    hyp: Sequence[str],
    ref: Sequence[str],
    resources: MeteorResources,
    paraphrases: ParaphraseTable | None = None,
) -> MeteorStats:
    """Align one normalised hypothesis with one normalised reference and count the statistics.

    Args:
        hyp: N hypothesis tokens (from `normalize_for_meteor`).
        ref: M reference tokens.
        resources: language data.
        paraphrases: the (restricted) paraphrase table, or None for no paraphrase module.

    Returns:
        The statistics of the chosen alignment.
    """
    function_words = resources.function_words
    alignment = align(candidate_matches(hyp, ref, resources, paraphrases))
    stats = MeteorStats(
        hyp_len=len(hyp),
        ref_len=len(ref),
        hyp_function=sum(w in function_words for w in hyp),
        ref_function=sum(w in function_words for w in ref),
        chunks=count_chunks(alignment),
    )
    for match in alignment:
        for x in range(match.hyp_start, match.hyp_start + match.hyp_len):
            stats.hyp_matched[match.module][hyp[x] in function_words] += 1
        for x in range(match.ref_start, match.ref_start + match.ref_len):
            stats.ref_matched[match.module][ref[x] in function_words] += 1
        stats.hyp_words += match.hyp_len
        stats.ref_words += match.ref_len
    return stats


def _jar_segments(hypothesis: str, references: Sequence[str]) -> tuple[str, list[str]]:
    """What pycocoevalcap sends: hypothesis without ``|||``, references split at ``|||``."""
    hyp = hypothesis.replace("|||", "").replace("  ", " ")
    refs = [part for ref in references for part in ref.split("|||")]
    return hyp, refs


def meteor(
    hypotheses: Sequence[str],
    references: Sequence[Sequence[str]],
    resources: MeteorResources | None = None,
) -> tuple[float, list[float]]:
    """Corpus METEOR and per-caption METEOR, as pycocoevalcap 1.2's ``Meteor.compute_score``.

    Args:
        hypotheses: I tokenised hypotheses (space-joined, as the PTB tokenizer returns them).
        references: I lists of tokenised references.
        resources: language data; defaults to `load_meteor_resources()`.

    Returns:
        (corpus score from the summed statistics of each caption's best reference,
        I per-caption scores).
    """
    res = resources if resources is not None else load_meteor_resources()
    segments = [_jar_segments(h, refs) for h, refs in zip(hypotheses, references, strict=True)]
    normalised = [
        (normalize_for_meteor(hyp), [normalize_for_meteor(r) for r in refs])
        for hyp, refs in segments
    ]
    paraphrases = None
    if res.paraphrase_file is not None:
        vocabulary = frozenset(
            w for hyp, refs in normalised for tokens in (hyp, *refs) for w in tokens
        )
        paraphrases = load_paraphrases(res.paraphrase_file, vocabulary)
    total = MeteorStats()
    per_caption: list[float] = []
    for hyp, refs in normalised:
        best: MeteorStats | None = None
        best_score = -1.0
        for ref in refs:
            stats = segment_stats(hyp, ref, res, paraphrases)
            value = stats.score()
            if value > best_score:
                best_score, best = value, stats
        per_caption.append(max(best_score, 0.0))
        if best is not None:
            total.add(best)
    return total.score(), per_caption
