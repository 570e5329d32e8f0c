"""METEOR 1.5 re-implementation: normaliser, synonym look-up, alignment rules, scoring (no Java).

Expected values were recorded from meteor-1.5.jar (pycocoevalcap 1.2) by probing it with
``-writeAlignments`` (normalised text, alignments) and ``-m 'exact stem'`` (scores).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from uniperceiver_cli.metrics.caption.meteor import (
    MeteorResources,
    MeteorStats,
    load_meteor_resources,
    meteor,
    normalize_for_meteor,
    segment_stats,
)
from uniperceiver_cli.metrics.caption.meteor_align import (
    EXACT,
    PARAPHRASE,
    STEM,
    Match,
    align,
    candidate_matches,
    java_string_hash,
)
from uniperceiver_cli.metrics.caption.meteor_data import FUNCTION_WORDS, synonym_ids
from uniperceiver_cli.metrics.caption.meteor_norm import NONBREAKING_PREFIXES

BUILTIN = MeteorResources(function_words=FUNCTION_WORDS)

# input -> the jar's normalised text (``-norm``).
JAR_NORMALISED = {
    "a.b.": "ab",
    "x a. y": "x a. y",
    "a. 5": "a . 5",
    "mr. x": "mr. x",
    "mr. 5": "mr . 5",
    "Mr. X": "mr. x",
    "No. 5": "no. 5",
    "no. 5": "no . 5",
    "pp. 5": "pp. 5",
    "u.s. x": "us x",
    "at 5:30 p.m. in the u.s.": "at 5 : 30 pm in the us",
    "x 1.5. y": "x 1.5. y",
    "1.5.": "1.5 .",
    "a...b": "a ... b",
    "..a": ".. a",
    "a-b-c": "a b-c",
    "a---b": "a--b",
    "x -- y": "x - y",
    ".-b": ". b",
    "a-.b": "a-.b",
    "3-4.": "3 4 .",
    "well-known t-shirt": "well known t shirt",
    "a,b,c": "a , b,c",
    "1,2,a": "1,2 , a",
    "1,000.": "1,000 .",
    "'90s": "' 90s",
    "1'a": "1'a",
    "a'1": "a ' 1",
    "rock'n'roll": "rock 'n'roll",
    "rock 'n' roll": "rock ' n ' roll",
    "ca n't": "ca n 't",
    "it 's": "it ' s",
    "o'clock": "o 'clock",
    "a''b": 'a " b',
    "`a": "' a",
    "a_b": "a _ b",
    "$1,000.00": "$ 1,000.00",
    "&amp;": "& amp ;",
    "a\u2013b": "a - b",
    "a\u2019s": "a 's",
    "\u201ca\u201d": '" a "',
    "x\u00b2": "x \u00b2",
    "caf\u00e9": "caf\u00e9",
    "\u03b1\u03b2\u03b3": "\u03b1 \u03b2 \u03b3",
    "\u043f\u0440\u0438\u0432\u0435\u0442": "\u043f\u0440\u0438\u0432\u0435\u0442",
    "\u65e5\u672c\u8a9e": "\u65e5 \u672c \u8a9e",
    "a. \u00e9b": "a . \u00e9b",
    "12:30:45": "12 : 30 : 45",
    "-lrb- x -rrb-": "-lrb- x -rrb-",
    "e.g.": "eg",
    "www.example.com.": "wwwexamplecom",
    "etc. -lsb- blurry -rsb-": "etc . -lsb- blurry -rsb-",
    "\u00c9COLE": "\u00e9cole",
    "  a \t b  ": "a b",
}


@pytest.mark.parametrize(("text", "expected"), sorted(JAR_NORMALISED.items()))
def test_normaliser_matches_the_jar(text: str, expected: str) -> None:
    assert normalize_for_meteor(text) == expected.split()


# (hypothesis, reference, jar score with -m 'exact stem'), scored with the jar's function words.
JAR_EXACT_STEM = [
    ("walk walk", "walking", 0.0),
    ("walk", "walking walked", 0.0),
    ("walk walk", "walking walking", 0.0),
    ("y walk walk", "y walking", 0.35547509731893995),
    ("y walk walk", "walking y", 0.18604651162790697),
    ("walk walk y", "walking y", 0.35547509731893995),
    ("walking y", "y walk walk", 0.14035087719298242),
    ("walking x y", "walk walk z y", 0.10389610389610389),
    ("park y parked", "park y x park", 0.24814008416744182),
    ("walk", "walking", 0.6),
    ("park", "parked y", 0.1297297297297297),
    ("walk park", "parked walking", 0.24),
    ("walk y park", "walking z parked", 0.16000000000000003),
    ("park park", "parked park", 0.8),
    ("park parked", "parked park", 0.4),
    ("parked park", "parked park", 1.0),
    ("park parked", "parked parked", 0.8),
    ("walk", "walking walk", 0.2162162162162162),
    ("y walk walk", "walking y walking", 0.2547571530785736),
    ("the cat sat", "on the mat the cat sat", 0.32253203916506945),
]


@pytest.mark.parametrize(("hyp", "ref", "expected"), JAR_EXACT_STEM)
def test_exact_stem_alignment_matches_the_jar(hyp: str, ref: str, expected: float) -> None:
    stats = segment_stats(normalize_for_meteor(hyp), normalize_for_meteor(ref), BUILTIN)
    assert stats.score() == pytest.approx(expected, abs=1e-12)


def test_lone_stem_match_next_to_a_definite_one_is_not_taken() -> None:
    # The jar aligns only ``parked``/``parked`` (0.186); the exhaustive search also finds the
    # adjacent ``park``/``parked`` stem match.
    stats = segment_stats(["x", "park", "parked"], ["parked", "parked"], BUILTIN)
    assert stats.score() == pytest.approx(0.18604651162790697, abs=1e-12)


def test_words_compare_by_java_string_hash() -> None:
    assert java_string_hash("hello") == 99162322
    assert java_string_hash("polygenelubricants") == -(2**31)
    assert java_string_hash("Aa") == java_string_hash("BB")
    # The jar's exact module compares hashes, so colliding words match.
    assert align(candidate_matches(["x", "Aa"], ["x", "BB"], BUILTIN)) == [
        Match(0, 1, 0, 1, EXACT),
        Match(1, 1, 1, 1, EXACT),
    ]


def test_paraphrase_matches_from_both_directions_in_table_order() -> None:
    table = {("jumps",): [("is",)], ("the", "train"): [("a", "train")]}
    hyp = ["a", "train", "jumps", "a", "kitchen"]
    ref = ["a", "dog", "is", "on", "the", "train"]
    candidates = candidate_matches(hyp, ref, BUILTIN, table)
    assert candidates.by_ref_start[2] == [Match(2, 1, 2, 1, PARAPHRASE)]
    assert candidates.by_ref_start[4] == [Match(0, 2, 4, 2, PARAPHRASE)]
    # A paraphrase counts every word it covers: `train`/`train` is no longer definite.
    assert candidates.hyp_coverage == [2, 2, 1, 1, 0]
    assert candidates.ref_coverage == [2, 0, 1, 0, 1, 2]
    # As the jar aligns "a train carries a kitchen ..." with "... the train tracks": the lone
    # paraphrase is definite, and on equal words and chunks the distance picks the two-word one.
    assert align(candidates) == [
        Match(0, 2, 4, 2, PARAPHRASE),
        Match(2, 1, 2, 1, PARAPHRASE),
        Match(3, 1, 0, 1, EXACT),
    ]


def test_ambiguous_stem_matches_need_an_unambiguous_neighbour() -> None:
    hyp, ref = ["y", "walk", "walk"], ["y", "walking"]
    assert align(candidate_matches(hyp, ref, BUILTIN)) == [
        Match(0, 1, 0, 1, EXACT),
        Match(1, 1, 1, 1, STEM),
    ]
    assert align(candidate_matches(["walk", "walk"], ["walking"], BUILTIN)) == []


def test_segment_statistics_layout() -> None:
    stats = segment_stats(
        ["a", "man", "rides", "a", "bike"], ["a", "man", "is", "riding", "a", "bicycle"], BUILTIN
    )
    # jar (exact stem): 5 6 2 3 | exact 1 1 2 2 | stem 1 1 0 0 | chunks 2 | 4 4 matched words
    assert (stats.hyp_len, stats.ref_len, stats.hyp_function, stats.ref_function) == (5, 6, 2, 3)
    assert stats.hyp_matched[0] == [1, 2] and stats.ref_matched[0] == [1, 2]
    assert stats.hyp_matched[1] == [1, 0] and stats.ref_matched[1] == [1, 0]
    assert (stats.chunks, stats.hyp_words, stats.ref_words) == (2, 4, 4)


def test_corpus_score_counts_perfect_segments_as_zero_chunks() -> None:
    perfect = segment_stats(["a", "cat"], ["a", "cat"], BUILTIN)
    partial = segment_stats(
        ["the", "cat", "sat"], ["on", "the", "mat", "the", "cat", "sat"], BUILTIN
    )
    assert perfect.score() == 1.0
    total = MeteorStats()
    total.add(perfect)
    total.add(partial)
    assert total.chunks == partial.chunks
    corpus, per_caption = meteor(
        ["a cat", "the cat sat"], [["a cat"], ["on the mat the cat sat"]], BUILTIN
    )
    assert per_caption == pytest.approx([1.0, 0.32253203916506945], abs=1e-12)
    assert corpus == pytest.approx(total.score(), abs=1e-15)


def test_best_reference_and_empty_hypothesis() -> None:
    corpus, per_caption = meteor(["", "a dog"], [["a dog"], ["a cat", "a dog"]], BUILTIN)
    assert per_caption[0] == 0.0
    assert per_caption[1] == 1.0
    assert 0.0 < corpus < 1.0


def test_fallback_resources_are_exact_and_stem_only() -> None:
    assert BUILTIN.modules == ("exact", "stem")
    assert BUILTIN.source == "builtin"


def _jar() -> Path:
    resources = load_meteor_resources()
    if resources.source != "meteor-1.5.jar" or resources.paraphrase_file is None:
        pytest.skip("pycocoevalcap 1.2 (with METEOR 1.5 and its paraphrase table) is not installed")
    return resources.paraphrase_file.parent.parent / "meteor-1.5.jar"


def test_builtin_lists_equal_the_jar_files() -> None:
    with zipfile.ZipFile(_jar()) as archive:
        words = archive.read("function/english.words").decode("utf-8").split()
        prefixes = archive.read("nonbreaking/english.prefixes").decode("utf-8").split("\n")
    assert frozenset(words) == FUNCTION_WORDS
    expected: dict[str, int] = {}
    for line in prefixes:
        if line.strip() and not line.startswith("#"):
            expected[line.split()[0]] = 2 if "#NUMERIC_ONLY#" in line else 1
    assert expected == NONBREAKING_PREFIXES
    assert load_meteor_resources().modules == ("exact", "stem", "synonym", "paraphrase")


# Word pairs the jar's synonym module (-m synonym) does / does not match.
SYNONYMS = [
    ("going", "go", True),
    ("carries", "holding", True),
    ("larger", "big", True),
    ("skateboarder", "skateboard", True),
    ("am", "are", True),
    ("best", "good", True),
    ("being", "be", False),
    ("1", "is", False),
    ("rides", "sitting", True),
    ("bike", "bicycle", True),
    ("cat", "dog", False),
]


@pytest.mark.parametrize(("a", "b", "match"), SYNONYMS)
def test_synonym_lookup_matches_the_jar(a: str, b: str, match: bool) -> None:
    _jar()
    resources = load_meteor_resources()
    assert (not synonym_ids(a, resources).isdisjoint(synonym_ids(b, resources))) is match
