"""METEOR 1.5 word/phrase matching and alignment search, re-created to give the jar's alignments.

Written from the algorithm as METEOR 1.5 (LGPL, Denkowski & Lavie) documents and implements it;
every line here is our own. Terms: the *hypothesis* is the jar's line 1 (test), the *reference*
its line 2.

Candidates (`candidate_matches`): each enabled module adds matches, in module order, to a list
per reference start position, and counts how many candidates start on each word (coverage):

* exact: equal words; stem: different words with equal Snowball stems; synonym: different words
  sharing a WordNet synset (`synonym_ids`). One-word matches; both words' coverage goes up.
* paraphrase: a table phrase found in the reference with its paraphrase found in the hypothesis,
  then a table phrase found in the hypothesis with its paraphrase in the reference (shorter
  phrases first, then table order). Every word of both spans counts towards coverage.
* words are compared through Java's ``String.hashCode`` (as the jar does), and when both
  sentences are identical only the exact module runs.

Search (`align`): a candidate that is the only one starting at its reference position and whose
words all have coverage 1 is *definite* and fixed up front. The rest is a left-to-right beam
search (beam 40) over reference positions: at each position a path either takes one of the
candidates starting there whose words are unused, or skips the position. Paths are ranked by
(1) matched words, where each match adds ``int(length x weight)`` per side with search weights
1.0 (exact) and 0.5 (other modules), so a one-word non-exact match adds nothing; (2) fewer chunks;
(3) smaller distance. As in the jar, the distance of a candidate is added to the path it was
*extended from* (the skip path and later siblings inherit it), not to the path that took it.
Ties keep insertion order (stable sorts). Torch-free.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

from uniperceiver_cli.metrics.caption.meteor_data import MeteorResources, synonym_ids
from uniperceiver_cli.metrics.caption.stemmer import stem

__all__ = [
    "BEAM_SIZE",
    "EXACT",
    "PARAPHRASE",
    "STEM",
    "SYNONYM",
    "Candidates",
    "Match",
    "ParaphraseTable",
    "align",
    "candidate_matches",
    "count_chunks",
    "java_string_hash",
]

EXACT, STEM, SYNONYM, PARAPHRASE = 0, 1, 2, 3
BEAM_SIZE = 40
# What the alignment search weighs each module's matched words by (the scores use other weights).
_SEARCH_WEIGHTS = (1.0, 0.5, 0.5, 0.5)

#: Table phrase -> its paraphrases, in table order (one direction, as the table lists them).
ParaphraseTable = Mapping[tuple[str, ...], Sequence[tuple[str, ...]]]


class Match(NamedTuple):
    """One candidate or chosen match.

    Attributes:
        hyp_start, hyp_len: the hypothesis span.
        ref_start, ref_len: the reference span.
        module: EXACT, STEM, SYNONYM or PARAPHRASE.
    """

    hyp_start: int
    hyp_len: int
    ref_start: int
    ref_len: int
    module: int


@dataclass
class Candidates:
    """Every candidate match of one hypothesis/reference pair, as the search consumes them.

    Attributes:
        by_ref_start: M lists, the candidates starting at each reference position, in the
            order the modules produced them.
        hyp_coverage: N counts of candidates covering each hypothesis word.
        ref_coverage: M counts of candidates covering each reference word.
    """

    by_ref_start: list[list[Match]]
    hyp_coverage: list[int]
    ref_coverage: list[int]

    def add(self, match: Match) -> None:
        """Record `match` and count the words it covers on each side."""
        self.by_ref_start[match.ref_start].append(match)
        for x in range(match.hyp_start, match.hyp_start + match.hyp_len):
            self.hyp_coverage[x] += 1
        for x in range(match.ref_start, match.ref_start + match.ref_len):
            self.ref_coverage[x] += 1


@lru_cache(maxsize=65536)
def java_string_hash(text: str) -> int:
    """Java's ``String.hashCode`` (over UTF-16 code units), as a signed 32-bit integer.

    Args:
        text: any string.

    Returns:
        The hash the jar compares words by.
    """
    value = 0
    data = text.encode("utf-16-be")
    for k in range(0, len(data), 2):
        value = (31 * value + (data[k] << 8 | data[k + 1])) & 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def candidate_matches(
    hyp: Sequence[str],
    ref: Sequence[str],
    resources: MeteorResources,
    paraphrases: ParaphraseTable | None = None,
) -> Candidates:
    """Every match the enabled modules propose, in the jar's order (see the module docstring).

    Args:
        hyp: N normalised hypothesis tokens.
        ref: M normalised reference tokens.
        resources: language data (synonyms on when it has synsets).
        paraphrases: the paraphrase table (None: paraphrase module off).

    Returns:
        The candidates per reference start position, with word coverage counts.
    """
    out = Candidates([[] for _ in ref], [0] * len(hyp), [0] * len(ref))
    hyp_keys = [java_string_hash(w) for w in hyp]
    ref_keys = [java_string_hash(w) for w in ref]
    for j, ref_key in enumerate(ref_keys):
        for i, hyp_key in enumerate(hyp_keys):
            if hyp_key == ref_key:
                out.add(Match(i, 1, j, 1, EXACT))
    if hyp_keys == ref_keys:
        return out
    hyp_stems = [java_string_hash(stem(w)) for w in hyp]
    ref_stems = [java_string_hash(stem(w)) for w in ref]
    for j, ref_stem in enumerate(ref_stems):
        for i, hyp_stem in enumerate(hyp_stems):
            if hyp_stem == ref_stem and hyp_keys[i] != ref_keys[j]:
                out.add(Match(i, 1, j, 1, STEM))
    if resources.synsets:
        hyp_syn = [synonym_ids(w, resources) for w in hyp]
        ref_syn = [synonym_ids(w, resources) for w in ref]
        for j, ref_ids in enumerate(ref_syn):
            for i, hyp_ids in enumerate(hyp_syn):
                if hyp_keys[i] != ref_keys[j] and not hyp_ids.isdisjoint(ref_ids):
                    out.add(Match(i, 1, j, 1, SYNONYM))
    if paraphrases:
        _add_paraphrases(out, hyp, ref, paraphrases)
    return out


def _phrases_at(
    words: Sequence[str], start: int, table: ParaphraseTable
) -> list[tuple[int, tuple[str, ...]]]:
    """(phrase length, paraphrase) for every table phrase starting at `start`, shortest first."""
    found: list[tuple[int, tuple[str, ...]]] = []
    for end in range(start + 1, len(words) + 1):
        for paraphrase in table.get(tuple(words[start:end]), ()):
            found.append((end - start, paraphrase))
    return found


def _occurrences(words: Sequence[str], phrase: tuple[str, ...]) -> list[int]:
    n = len(phrase)
    return [k for k in range(len(words) - n + 1) if tuple(words[k : k + n]) == phrase]


def _add_paraphrases(
    out: Candidates, hyp: Sequence[str], ref: Sequence[str], table: ParaphraseTable
) -> None:
    for j in range(len(ref)):
        for length, paraphrase in _phrases_at(ref, j, table):
            for i in _occurrences(hyp, paraphrase):
                out.add(Match(i, len(paraphrase), j, length, PARAPHRASE))
    for i in range(len(hyp)):
        for length, paraphrase in _phrases_at(hyp, i, table):
            for j in _occurrences(ref, paraphrase):
                out.add(Match(i, length, j, len(paraphrase), PARAPHRASE))


def _span_mask(start: int, length: int) -> int:
    return ((1 << length) - 1) << start


@dataclass(slots=True)
class _Path:
    """One partial alignment of the beam search (the jar's search state)."""

    chosen: list[Match | None]  # by reference start position
    used_hyp: int  # bit mask of used hypothesis words
    used_ref: int  # bit mask of used reference words
    matched: int = 0  # search-weighted matched words, truncated as the jar does
    chunks: int = 0
    idx: int = 0
    last_end: int = -1  # hypothesis end of the open chunk, -1 when none is open
    distance: int = 0

    def copy(self) -> _Path:
        return _Path(
            list(self.chosen),
            self.used_hyp,
            self.used_ref,
            self.matched,
            self.chunks,
            self.idx,
            self.last_end,
            self.distance,
        )

    def extend(self, match: Match) -> None:
        """Account for `match` as the next match in reference order."""
        weight = _SEARCH_WEIGHTS[match.module]
        self.matched += int(match.hyp_len * weight) + int(match.ref_len * weight)
        if self.last_end != -1 and match.hyp_start != self.last_end:
            self.chunks += 1
        self.idx = match.ref_start + match.ref_len
        self.last_end = match.hyp_start + match.hyp_len


def _rank(path: _Path) -> tuple[int, int, int]:
    return (-path.matched, path.chunks, path.distance)


def _definite_start(candidates: Candidates) -> _Path:
    """The initial path: every lone candidate whose words no other candidate covers."""
    path = _Path([None] * len(candidates.by_ref_start), 0, 0)
    for j, options in enumerate(candidates.by_ref_start):
        if len(options) != 1:
            continue
        m = options[0]
        ref_span = range(j, j + m.ref_len)
        hyp_span = range(m.hyp_start, m.hyp_start + m.hyp_len)
        if all(candidates.ref_coverage[x] == 1 for x in ref_span) and all(
            candidates.hyp_coverage[x] == 1 for x in hyp_span
        ):
            path.chosen[j] = m
            path.used_ref |= _span_mask(j, m.ref_len)
            path.used_hyp |= _span_mask(m.hyp_start, m.hyp_len)
    return path


def _search_step(path: _Path, current: int, options: Sequence[Match], out: list[_Path]) -> None:
    """Extend `path` at reference position `current` (appends the resulting paths to `out`)."""
    if path.used_ref >> current & 1:
        if current < path.idx:
            out.append(path)
            return
        fixed = path.chosen[path.idx]
        if fixed is not None:
            path.extend(fixed)
            path.distance += abs(fixed.ref_start - fixed.hyp_start)
            out.append(path)
        return
    for m in options:
        if path.used_ref & _span_mask(m.ref_start, m.ref_len) or path.used_hyp & _span_mask(
            m.hyp_start, m.hyp_len
        ):
            continue
        taken = path.copy()
        taken.used_ref |= _span_mask(m.ref_start, m.ref_len)
        taken.used_hyp |= _span_mask(m.hyp_start, m.hyp_len)
        taken.chosen[current] = m
        taken.extend(m)
        path.distance += abs(m.ref_start - m.hyp_start)
        out.append(taken)
    if path.last_end != -1:
        path.chunks += 1
        path.last_end = -1
    path.idx += 1
    out.append(path)


def align(candidates: Candidates, beam_size: int = BEAM_SIZE) -> list[Match]:
    """Choose the alignment the jar chooses (see the module docstring for the search).

    Args:
        candidates: the output of `candidate_matches`.
        beam_size: paths kept per reference position (the jar's default is 40).

    Returns:
        The chosen matches, sorted by hypothesis position.
    """
    positions = len(candidates.by_ref_start)
    paths = [_definite_start(candidates)]
    for current in range(positions + 1):
        ranked = sorted(paths, key=_rank)
        paths = []
        for path in ranked[:beam_size]:
            if current == positions:
                if path.last_end != -1:
                    path.chunks += 1
                paths.append(path)
            else:
                _search_step(path, current, candidates.by_ref_start[current], paths)
        if not paths:
            paths.append(ranked[0])
    best = min(paths, key=_rank)
    return sorted(m for m in best.chosen if m is not None)


def count_chunks(matches: Sequence[Match]) -> int:
    """Runs of matches contiguous and identically ordered in both sentences.

    Args:
        matches: K matches (any order).

    Returns:
        The number of chunks.
    """
    chunks = 0
    previous: Match | None = None
    for match in sorted(matches, key=lambda m: m.ref_start):
        if previous is None or not (
            match.hyp_start == previous.hyp_start + previous.hyp_len
            and match.ref_start == previous.ref_start + previous.ref_len
        ):
            chunks += 1
        previous = match
    return chunks
