"""A Python METEOR 1.5 (English, ``-norm``) approximation: exact, stem and synonym matching.

METEOR 1.5 is a Java program. This module re-implements its scoring from the published description
(Denkowski & Lavie, "Meteor Universal", 2014) with the English defaults the jar reports:
alpha 0.85, beta 0.2, gamma 0.6, delta 0.75, module weights exact 1.0, stem 0.6, synonym 0.8,
paraphrase 0.6. Per caption the best-scoring reference is kept; the corpus score is computed from the
summed statistics of those best matches, as ``EVAL`` does in the jar.

Differences from the jar (measured in the parity tests, see the report): the alignment is an exhaustive
search over one-to-one word matches (most matched words, then fewest chunks, then smallest total
distance) instead of the jar's beam search; paraphrase matching is not implemented; the jar's ``-norm`` text
normaliser is approximated by `normalize_for_meteor`. The function-word list and WordNet synonym data are read from the jar
shipped inside pycocoevalcap when it is installed; without it a built-in function-word list is used and
synonym matching is off (recorded in the result metadata). Torch-free.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from uniperceiver_cli.metrics.caption.stemmer import stem

__all__ = ["MeteorResources", "load_meteor_resources", "meteor", "normalize_for_meteor"]

logger = logging.getLogger(__name__)

ALPHA, BETA, GAMMA, DELTA = 0.85, 0.2, 0.6, 0.75
WEIGHTS = (1.0, 0.6, 0.8)  # exact, stem, synonym

# Used only when pycocoevalcap (and its METEOR jar) is absent: common English function words.
_BUILTIN_FUNCTION_WORDS = frozenset(
    [
        "the",
        "to",
        "of",
        "and",
        "a",
        "in",
        "that",
        "for",
        "is",
        "on",
        "'s",
        "it",
        "with",
        "was",
        "as",
        "said",
        "at",
        "he",
        "by",
        "be",
        "from",
        "have",
        "has",
        "are",
        "his",
        "but",
        "an",
        "this",
        "not",
        "i",
        "will",
        "they",
        "who",
        "their",
        "had",
        "we",
        "which",
        "were",
        "been",
        "more",
        "or",
        "s",
        "its",
        "would",
        "about",
        "one",
        "after",
        "you",
        "also",
        "up",
        "when",
        "there",
        "than",
        "all",
        "out",
        "her",
        "she",
        "can",
        "if",
        "into",
        "some",
        "what",
        "so",
        "no",
        "could",
        "other",
        "over",
        "'t",
    ]
)

# WordNet-style suffix detachment for synonym look-up (noun and verb rules of `morphy`).
_DETACH = (
    ("ses", "s"),
    ("xes", "x"),
    ("zes", "z"),
    ("ches", "ch"),
    ("shes", "sh"),
    ("men", "man"),
    ("ies", "y"),
    ("s", ""),
    ("es", "e"),
    ("es", ""),
    ("ed", "e"),
    ("ed", ""),
    ("ing", "e"),
    ("ing", ""),
    ("er", ""),
    ("est", ""),
    ("er", "e"),
    ("est", "e"),
)


@dataclass(frozen=True)
class MeteorResources:
    """Language data for the matcher.

    Attributes:
        function_words: words weighted by (1 - delta) instead of delta.
        synsets: word -> WordNet synset ids (empty: synonym matching off).
        exceptions: irregular inflected form -> base forms.
        source: where the data came from ("meteor-1.5.jar" or "builtin").
    """

    function_words: frozenset[str]
    synsets: dict[str, frozenset[str]] = field(default_factory=dict)
    exceptions: dict[str, tuple[str, ...]] = field(default_factory=dict)
    source: str = "builtin"


def _jar_path() -> Path | None:
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        return None
    jar = Path(next(iter(spec.submodule_search_locations))) / "meteor" / "meteor-1.5.jar"
    return jar if jar.is_file() else None


def _pairs(lines: list[str]) -> list[tuple[str, str]]:
    return list(zip(lines[0::2], lines[1::2], strict=False))


@lru_cache(maxsize=1)
def load_meteor_resources() -> MeteorResources:
    """Read METEOR's English data from pycocoevalcap's jar, or fall back to built-in data.

    Returns:
        The resources; ``source`` says which were used.
    """
    jar = _jar_path()
    if jar is None:
        logger.info("pycocoevalcap not installed: METEOR uses exact + stem matching only")
        return MeteorResources(function_words=_BUILTIN_FUNCTION_WORDS)
    with zipfile.ZipFile(jar) as archive:
        function_words = archive.read("function/english.words").decode("utf-8").split("\n")
        synset_lines = archive.read("synonym/english.synsets").decode("utf-8").split("\n")
        exception_lines = archive.read("synonym/english.exceptions").decode("utf-8").split("\n")
    synsets = {word: frozenset(ids.split()) for word, ids in _pairs(synset_lines) if word}
    exceptions = {form: tuple(bases.split()) for form, bases in _pairs(exception_lines) if form}
    return MeteorResources(
        function_words=frozenset(w for w in function_words if w),
        synsets=synsets,
        exceptions=exceptions,
        source="meteor-1.5.jar",
    )


_SPLIT_SYMBOLS = re.compile(r"([+*=/_?!#@$%&^~|\\<>:;\"])")
_HYPHEN_INSIDE = re.compile(r"(?<=\w)-+(?=\w)")
_LETTER_ACRONYM = re.compile(r"^(?:[^\W\d_]\.){2,}$")


def normalize_for_meteor(text: str) -> list[str]:
    """Approximate the jar's ``-norm`` re-tokenisation of an already PTB-tokenised caption.

    Measured against ``edu.cmu.meteor.util.Normalizer``: symbols become tokens, hyphens inside words
    become spaces, letter acronyms lose their periods (``p.m.`` -> ``pm``), a leading apostrophe is
    split off (``'s`` -> ``' s``), ``n't`` becomes ``n 't`` and a period ending the line is split off.

    Args:
        text: a space-joined tokenised caption.

    Returns:
        The tokens METEOR aligns.
    """
    out: list[str] = []
    for token in text.split():
        if _LETTER_ACRONYM.match(token):
            out.append(token.replace(".", ""))
            continue
        if token == "n't":
            out.extend(["n", "'t"])
            continue
        if len(token) > 1 and token[0] == "'":
            out.extend(["'", token[1:]])
            continue
        if "'" in token[1:]:
            head, _, tail = token.partition("'")
            out.extend([head, "'" + tail] if tail else [head, "'"])
            continue
        token = _HYPHEN_INSIDE.sub(" ", token)
        out.extend(_SPLIT_SYMBOLS.sub(r" \1 ", token).split())
    if out and len(out[-1]) > 1 and out[-1].endswith("."):
        out[-1:] = [out[-1][:-1], "."]
    return out


def _synonym_ids(word: str, res: MeteorResources) -> frozenset[str]:
    ids: set[str] = set(res.synsets.get(word, ()))
    for base in res.exceptions.get(word, ()):
        ids |= res.synsets.get(base, frozenset())
    for suffix, repl in _DETACH:
        if word.endswith(suffix) and len(word) > len(suffix):
            ids |= res.synsets.get(word[: -len(suffix)] + repl, frozenset())
    return frozenset(ids)


@dataclass
class _Stats:
    """Sufficient statistics of one hypothesis/reference alignment (METEOR's MeteorStats)."""

    test_content: int = 0
    test_function: int = 0
    ref_content: int = 0
    ref_function: int = 0
    test_stage: list[list[int]] = field(default_factory=lambda: [[0, 0] for _ in WEIGHTS])
    ref_stage: list[list[int]] = field(default_factory=lambda: [[0, 0] for _ in WEIGHTS])
    chunks: int = 0
    matches: int = 0

    def add(self, other: _Stats) -> None:
        self.test_content += other.test_content
        self.test_function += other.test_function
        self.ref_content += other.ref_content
        self.ref_function += other.ref_function
        for mine, theirs in zip(
            self.test_stage + self.ref_stage, other.test_stage + other.ref_stage, strict=True
        ):
            mine[0] += theirs[0]
            mine[1] += theirs[1]
        self.chunks += other.chunks
        self.matches += other.matches

    def score(self) -> float:
        test_len = self.test_content + self.test_function
        ref_len = self.ref_content + self.ref_function
        if self.matches == 0 or test_len == 0 or ref_len == 0:
            return 0.0
        p_num = sum(
            w * (DELTA * c + (1 - DELTA) * f)
            for w, (c, f) in zip(WEIGHTS, self.test_stage, strict=True)
        )
        r_num = sum(
            w * (DELTA * c + (1 - DELTA) * f)
            for w, (c, f) in zip(WEIGHTS, self.ref_stage, strict=True)
        )
        p = p_num / (DELTA * self.test_content + (1 - DELTA) * self.test_function)
        r = r_num / (DELTA * self.ref_content + (1 - DELTA) * self.ref_function)
        if p == 0 or r == 0:
            return 0.0
        f_mean = p * r / (ALPHA * p + (1 - ALPHA) * r)
        frag = self.chunks / self.matches
        return float((1 - GAMMA * frag**BETA) * f_mean)


def _align(
    hyp: list[str], ref: list[str], stage_of: dict[tuple[int, int], int]
) -> list[tuple[int, int]]:
    """Best one-to-one alignment: most matches, fewest chunks, least distance, best modules."""
    candidates: list[list[int]] = [[] for _ in hyp]
    for i, j in stage_of:
        candidates[i].append(j)
    best: tuple[tuple[float, ...], list[tuple[int, int]]] = ((0.0, 0.0, 0.0, 0.0), [])
    best_key: tuple[float, ...] | None = None
    used: set[int] = set()
    path: list[tuple[int, int]] = []
    remaining = [0] * (len(hyp) + 1)
    for i in range(len(hyp) - 1, -1, -1):
        remaining[i] = remaining[i + 1] + (1 if candidates[i] else 0)
    budget = [20000]

    def visit(i: int, chunks: int, dist: int, stage_sum: float) -> None:
        nonlocal best, best_key
        if budget[0] <= 0:
            return
        budget[0] -= 1
        if best_key is not None and len(path) + remaining[i] < -best_key[0]:
            return
        if i == len(hyp):
            key = (-len(path), chunks, dist, stage_sum)
            if best_key is None or key < best_key:
                best_key = key
                best = (key, list(path))
            return
        for j in sorted(candidates[i], key=lambda c: abs(c - i)):
            if j in used:
                continue
            new_chunk = not (path and path[-1] == (i - 1, j - 1))
            used.add(j)
            path.append((i, j))
            visit(i + 1, chunks + new_chunk, dist + abs(i - j), stage_sum + stage_of[(i, j)])
            path.pop()
            used.discard(j)
        visit(i + 1, chunks, dist, stage_sum)

    visit(0, 0, 0, 0.0)
    return best[1]


def _segment_stats(hyp: list[str], ref: list[str], res: MeteorResources) -> _Stats:
    stage_of: dict[tuple[int, int], int] = {}
    hyp_syn = [_synonym_ids(w, res) if res.synsets else frozenset() for w in hyp]
    ref_syn = [_synonym_ids(w, res) if res.synsets else frozenset() for w in ref]
    for i, h in enumerate(hyp):
        for j, r in enumerate(ref):
            if h == r:
                stage_of[(i, j)] = 0
            elif stem(h) == stem(r):
                stage_of[(i, j)] = 1
            elif hyp_syn[i] & ref_syn[j]:
                stage_of[(i, j)] = 2
    alignment = _align(hyp, ref, stage_of)
    stats = _Stats()
    for word in hyp:
        if word in res.function_words:
            stats.test_function += 1
        else:
            stats.test_content += 1
    for word in ref:
        if word in res.function_words:
            stats.ref_function += 1
        else:
            stats.ref_content += 1
    previous: tuple[int, int] | None = None
    for i, j in alignment:
        stage = stage_of[(i, j)]
        stats.test_stage[stage][hyp[i] in res.function_words] += 1
        stats.ref_stage[stage][ref[j] in res.function_words] += 1
        if previous is None or previous != (i - 1, j - 1):
            stats.chunks += 1
        previous = (i, j)
    stats.matches = len(alignment)
    if stats.chunks == 1 and stats.matches == len(hyp) == len(ref):
        # A perfect one-chunk match has no fragmentation; the jar records it as zero chunks, which
        # also matters for the corpus score computed from summed statistics.
        stats.chunks = 0
    return stats


def meteor(
    hypotheses: Sequence[str],
    references: Sequence[Sequence[str]],
    resources: MeteorResources | None = None,
) -> tuple[float, list[float]]:
    """Corpus METEOR and per-caption METEOR on tokenised captions.

    Args:
        hypotheses: I tokenised hypotheses (space-joined).
        references: I lists of tokenised references.
        resources: language data; defaults to `load_meteor_resources()`.

    Returns:
        (corpus score from summed statistics of each caption's best reference, I per-caption scores).
    """
    res = resources if resources is not None else load_meteor_resources()
    total = _Stats()
    per_caption: list[float] = []
    for hyp, refs in zip(hypotheses, references, strict=True):
        hyp_words = normalize_for_meteor(hyp)
        best_stats: _Stats | None = None
        best_score = -1.0
        for ref in refs:
            stats = _segment_stats(hyp_words, normalize_for_meteor(ref), res)
            value = stats.score()
            if value > best_score:
                best_score, best_stats = value, stats
        per_caption.append(max(best_score, 0.0))
        if best_stats is not None:
            total.add(best_stats)
    return total.score(), per_caption
