"""METEOR 1.5 word/phrase matching and alignment resolution, re-created from the jar's behaviour.

Candidate matches (spans in the hypothesis and the reference) come from four modules, each run
over every word pair independently, so one pair can be proposed by several modules:

* exact: identical tokens;
* stem: different tokens with the same Snowball stem;
* synonym: different tokens sharing a WordNet synset (`synonym_ids`);
* paraphrase: a hypothesis n-gram and a reference n-gram listed as paraphrases (either direction).

Resolution, as far as probing meteor-1.5.jar showed it (see the parity tests for what still
differs): a non-exact candidate is *ambiguous* when one of its words is proposed by another
candidate (of any module, exact included); a non-exact candidate that a strictly longer candidate
with the same start in both sentences contains is dropped. The alignment maximises the number of
covered words (hypothesis + reference), then minimises the number of chunks, subject to every
chunk that holds an ambiguous non-exact match also holding an unambiguous match (the jar never
resolves ambiguous stem, synonym or paraphrase matches on their own: ``walk walk`` vs ``walking``
aligns nothing, ``y walk walk`` vs ``y walking`` aligns ``walk``/``walking`` next to ``y``).
Torch-free.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from uniperceiver_cli.metrics.caption.meteor_data import MeteorResources, synonym_ids
from uniperceiver_cli.metrics.caption.stemmer import stem

__all__ = ["EXACT", "PARAPHRASE", "STEM", "SYNONYM", "Match", "align", "candidate_matches"]

EXACT, STEM, SYNONYM, PARAPHRASE = 0, 1, 2, 3
_SEARCH_BUDGET = 200_000


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


def candidate_matches(
    hyp: Sequence[str],
    ref: Sequence[str],
    resources: MeteorResources,
    paraphrases: Mapping[str, frozenset[str]] | None = None,
) -> list[Match]:
    """Every match the enabled modules propose (one entry per module and span pair).

    Args:
        hyp: N normalised hypothesis tokens.
        ref: M normalised reference tokens.
        resources: language data (synonyms on when it has synsets).
        paraphrases: phrase -> paraphrases (None: paraphrase module off).

    Returns:
        The candidates, exact ones first for each word pair.
    """
    out: list[Match] = []
    hyp_stems = [stem(w) for w in hyp]
    ref_stems = [stem(w) for w in ref]
    use_synonyms = bool(resources.synsets)
    hyp_syn = [synonym_ids(w, resources) for w in hyp] if use_synonyms else []
    ref_syn = [synonym_ids(w, resources) for w in ref] if use_synonyms else []
    for i, word in enumerate(hyp):
        for j, other in enumerate(ref):
            if word == other:
                out.append(Match(i, 1, j, 1, EXACT))
                continue
            if hyp_stems[i] == ref_stems[j]:
                out.append(Match(i, 1, j, 1, STEM))
            if use_synonyms and not hyp_syn[i].isdisjoint(ref_syn[j]):
                out.append(Match(i, 1, j, 1, SYNONYM))
    if paraphrases:
        out.extend(_paraphrase_matches(hyp, ref, paraphrases))
    return out


def _paraphrase_matches(
    hyp: Sequence[str], ref: Sequence[str], paraphrases: Mapping[str, frozenset[str]]
) -> list[Match]:
    longest = max((phrase.count(" ") + 1 for phrase in paraphrases), default=0)
    ref_spans: dict[str, list[tuple[int, int]]] = {}
    for j in range(len(ref)):
        for n in range(1, min(longest, len(ref) - j) + 1):
            ref_spans.setdefault(" ".join(ref[j : j + n]), []).append((j, n))
    out: list[Match] = []
    for i in range(len(hyp)):
        for n in range(1, min(longest, len(hyp) - i) + 1):
            for other in paraphrases.get(" ".join(hyp[i : i + n]), ()):
                for j, m in ref_spans.get(other, ()):
                    out.append(Match(i, n, j, m, PARAPHRASE))
    return out


def _adjacent(a: Match, b: Match) -> bool:
    return (a.hyp_start + a.hyp_len == b.hyp_start and a.ref_start + a.ref_len == b.ref_start) or (
        b.hyp_start + b.hyp_len == a.hyp_start and b.ref_start + b.ref_len == a.ref_start
    )


def count_chunks(matches: Sequence[Match]) -> int:
    """Runs of matches contiguous and identically ordered in both sentences.

    Args:
        matches: K matches (any order).

    Returns:
        The number of chunks.
    """
    chunks = 0
    previous: Match | None = None
    for match in sorted(matches):
        if previous is None or not (
            match.hyp_start == previous.hyp_start + previous.hyp_len
            and match.ref_start == previous.ref_start + previous.ref_len
        ):
            chunks += 1
        previous = match
    return chunks


def _prune_and_flag(candidates: Sequence[Match]) -> tuple[list[Match], set[Match]]:
    """Drop dominated nested candidates; merge duplicates; flag ambiguous non-exact ones."""
    kept = [
        m
        for m in candidates
        if m.module == EXACT
        or not any(
            o.hyp_start == m.hyp_start
            and o.ref_start == m.ref_start
            and o.hyp_len + o.ref_len > m.hyp_len + m.ref_len
            for o in candidates
        )
    ]
    hyp_cover: Counter[int] = Counter()
    ref_cover: Counter[int] = Counter()
    for m in kept:
        hyp_cover.update(range(m.hyp_start, m.hyp_start + m.hyp_len))
        ref_cover.update(range(m.ref_start, m.ref_start + m.ref_len))
    first: dict[tuple[int, int, int, int], Match] = {}
    for m in kept:
        key = (m.hyp_start, m.hyp_len, m.ref_start, m.ref_len)
        if key not in first or m.module < first[key].module:
            first[key] = m
    ambiguous = {
        m
        for m in first.values()
        if m.module != EXACT
        and (
            any(hyp_cover[x] > 1 for x in range(m.hyp_start, m.hyp_start + m.hyp_len))
            or any(ref_cover[x] > 1 for x in range(m.ref_start, m.ref_start + m.ref_len))
        )
    }
    return sorted(first.values()), ambiguous


def align(candidates: Sequence[Match]) -> list[Match]:
    """Resolve candidates into one alignment (see the module docstring for the rules).

    Args:
        candidates: K candidate matches from `candidate_matches`.

    Returns:
        The chosen matches, sorted by hypothesis position.
    """
    options, ambiguous = _prune_and_flag(candidates)
    if not options:
        return []
    # Optimistic coverage still reachable from option k on: best span per hypothesis start.
    reach = [0] * (len(options) + 1)
    best_at: dict[int, int] = {}
    for k in range(len(options) - 1, -1, -1):
        m = options[k]
        size = m.hyp_len + m.ref_len
        gain = max(0, size - best_at.get(m.hyp_start, 0))
        best_at[m.hyp_start] = max(best_at.get(m.hyp_start, 0), size)
        reach[k] = reach[k + 1] + gain
    best_key: tuple[int, int] | None = None
    best: list[Match] = []
    chosen: list[Match] = []
    used_hyp: set[int] = set()
    used_ref: set[int] = set()
    budget = [_SEARCH_BUDGET]

    def valid() -> bool:
        # Every chunk holding an ambiguous match must also hold an unambiguous one.
        anchored = True
        needs_anchor = False
        previous: Match | None = None
        for m in sorted(chosen):
            if previous is None or not _adjacent(previous, m):
                if needs_anchor and not anchored:
                    return False
                anchored, needs_anchor = False, False
            if m in ambiguous:
                needs_anchor = True
            else:
                anchored = True
            previous = m
        return anchored or not needs_anchor

    def visit(k: int, covered: int) -> None:
        nonlocal best_key, best
        budget[0] -= 1
        if budget[0] < 0:
            return
        if best_key is not None and -(covered + reach[k]) > best_key[0]:
            return
        if k == len(options):
            key = (-covered, count_chunks(chosen))
            if (best_key is None or key < best_key) and valid():
                best_key, best = key, list(chosen)
            return
        m = options[k]
        hyp_span = range(m.hyp_start, m.hyp_start + m.hyp_len)
        ref_span = range(m.ref_start, m.ref_start + m.ref_len)
        if used_hyp.isdisjoint(hyp_span) and used_ref.isdisjoint(ref_span):
            chosen.append(m)
            used_hyp.update(hyp_span)
            used_ref.update(ref_span)
            visit(k + 1, covered + m.hyp_len + m.ref_len)
            chosen.pop()
            used_hyp.difference_update(hyp_span)
            used_ref.difference_update(ref_span)
        visit(k + 1, covered)

    visit(0, 0)
    return sorted(best)
