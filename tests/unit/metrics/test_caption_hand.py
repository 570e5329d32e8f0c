"""Hand-computed caption metric values and PTB tokenisation cases (no Java needed)."""

from __future__ import annotations

import math

import pytest

from uniperceiver_cli.metrics.caption import CaptionMetricsError, compute_caption_metrics
from uniperceiver_cli.metrics.caption.meteor import MeteorResources, meteor, normalize_for_meteor
from uniperceiver_cli.metrics.caption.ngrams import bleu_scores, cider_d, rouge_l
from uniperceiver_cli.metrics.caption.ptb import tokenize_caption, tokenize_captions
from uniperceiver_cli.metrics.caption.stemmer import stem

# Outputs of Stanford PTBTokenizer 3.4.1 (-preserveLines -lowerCase) + pycocoevalcap's filter.
PTB_CASES = [
    ("A man's dog isn't running.", "a man 's dog is n't running"),
    ('Two people (a man and a woman) are walking... down', "two people -lrb- a man and a woman -rrb- are walking down"),
    ("I'm sure they'll go, we've done it, he'd say.", "i 'm sure they 'll go we 've done it he 'd say"),
    ("A 3.5 inch, 1,000-pound thing at 5:30 p.m. in the U.S.", "a 3.5 inch 1,000-pound thing at 5:30 p.m. in the u.s."),
    ("costs $5.00 or £3 or 50%", "costs $ 5.00 or # 3 or 50 %"),
    ("cannot gonna 'tis", "can not gon na 't is"),
    ("ok!!! what?? hmm?! yes-no", "ok !!! what ?? hmm ?! yes-no"),
    ('"Hello," she said.', "hello she said"),
    ("the boys' toys; James' book.", "the boys toys james book"),
    ("it’s emoji 😀 — dash", "it 's emoji dash"),
    ("mr. smith vs. the dog. fig. 2", "mr. smith vs. the dog fig 2"),
    ("rock 'n' roll o'clock y'all", "rock 'n' roll o'clock y' all"),
    ("x/y a*b a&b AT&T", "x/y a * b a & b at&t"),
    ("", ""),
]  # fmt: skip


@pytest.mark.parametrize(("raw", "expected"), PTB_CASES)
def test_ptb_tokenisation(raw: str, expected: str) -> None:
    assert " ".join(tokenize_caption(raw)) == expected


def test_single_letter_abbreviation_looks_at_next_caption() -> None:
    # CoreNLP keeps "b." unless a sentence-start word follows, even on the next line.
    assert tokenize_captions(["plan b.", "The end", "plan b.", "the end", "plan b."]) == [
        "plan b",
        "the end",
        "plan b.",
        "the end",
        "plan b.",
    ]


def test_bleu_hand_values() -> None:
    tiny, small = 1e-15, 1e-9
    corpus, per_image = bleu_scores(["a b"], [["a c"]])
    assert corpus[0] == pytest.approx(1 / 2, abs=1e-9)
    assert corpus[1] == pytest.approx(math.sqrt(0.5 * tiny / (1 + small)), rel=1e-9)
    # Brevity penalty with the closest reference length (4 beats 9).
    corpus, _ = bleu_scores(["a b"], [["a b c d", "a b c d e f g h i"]])
    assert corpus[0] == pytest.approx(math.exp(1 - 2), rel=1e-9)
    # Ties of |len diff| pick the shorter reference: refs of 1 and 3 words for a 2-word hypothesis.
    corpus, _ = bleu_scores(["a b"], [["a b c", "a"]])
    assert corpus[0] == pytest.approx(1.0, abs=1e-9)
    # Clipping: "the the the" vs "the cat" -> 1 / 3 unigram precision.
    corpus, per_image = bleu_scores(["the the the"], [["the cat"]])
    assert corpus[0] == pytest.approx(1 / 3, abs=1e-9)
    assert per_image[0][0] == pytest.approx(1 / 3, abs=1e-9)


def test_rouge_l_hand_value() -> None:
    p, r = 2 / 3, 2 / 4
    expected = (1 + 1.44) * p * r / (r + 1.44 * p)
    score, _ = rouge_l(["a b c"], [["a c d e", "x y"]])
    assert score == pytest.approx(expected, abs=1e-12)
    assert rouge_l(["q"], [["a b"]])[0] == 0.0


def test_cider_d_hand_value() -> None:
    # Identical single-reference pairs on 2 images: unigram and bigram cosines are 1, 3/4-grams
    # are empty (0), so the mean over n is 0.5, times 10.
    score, per = cider_d(["a b", "c d"], [["a b"], ["c d"]])
    assert per == pytest.approx([5.0, 5.0])
    # An n-gram found in every image's references has idf 0.
    score, _ = cider_d(["a", "a"], [["a"], ["a"]])
    assert score == 0.0
    # Length penalty uses the bigram count: 3 vs 5 words -> delta 2.
    score, per = cider_d(["a b c", "x"], [["a b c d e"], ["y"]])
    assert per[0] < 10 and per[1] == 0.0


def test_meteor_hand_values() -> None:
    res = MeteorResources(function_words=frozenset({"a", "the"}))
    assert meteor(["a man riding a horse"], [["a man riding a horse"]], res)[0] == 1.0
    # Two content matches in two chunks: P = R = 1, penalty 0.6 * (2/2)^0.2.
    assert meteor(["dog cat"], [["cat dog"]], res)[0] == pytest.approx(0.4)
    # Stem match (weight 0.6) for "riding"/"rides": P = R = (1 + 0.6) / 2; one chunk covering both
    # sentences has no fragmentation penalty (the jar returns 0.8 here too).
    assert meteor(["man riding"], [["man rides"]], res)[0] == pytest.approx(0.8)
    # Hypothesis "dog cat" vs "dog cat is" (is = content here): P = 1, R = 2/3, one chunk of 2.
    p, r = 1.0, 2 / 3
    expected = p * r / (0.85 * p + 0.15 * r) * (1 - 0.6 * (1 / 2) ** 0.2)
    assert meteor(["dog cat"], [["dog cat is"]], res)[0] == pytest.approx(expected)


def test_meteor_normalisation_like_the_jar() -> None:
    # Outputs of edu.cmu.meteor.util.Normalizer (the jar's -norm) on PTB-tokenised text.
    assert " ".join(normalize_for_meteor("it 's ca n't o'clock x-ray a/b # 1 @home")) == (
        "it ' s ca n 't o 'clock x ray a / b # 1 @ home"
    )
    assert " ".join(normalize_for_meteor("at 5:30 p.m. etc.")) == "at 5 : 30 pm etc ."


def test_stemmer_examples() -> None:
    words = ["riding", "rides", "horses", "running", "generously", "ponies", "skies", "meetings"]
    assert [stem(w) for w in words] == [
        "ride",
        "ride",
        "hors",
        "run",
        "generous",
        "poni",
        "sky",
        "meet",
    ]


def test_compute_caption_metrics_builtin_shapes_and_errors() -> None:
    scores = compute_caption_metrics(
        {1: "a dog runs."}, {1: ["A dog runs.", "a dog is running"], 2: ["x"]}
    )
    assert scores.implementation == "builtin"
    assert scores.num_images == 1
    assert scores.bleu1 == pytest.approx(1.0, abs=1e-6)
    assert "meteor" in scores.versions
    assert scores.as_dict()["BLEU-4"] == scores.bleu4
    with pytest.raises(CaptionMetricsError, match="no references"):
        compute_caption_metrics({3: "x"}, {1: ["x"]})
    with pytest.raises(CaptionMetricsError, match="backend"):
        compute_caption_metrics({1: "x"}, {1: ["x"]}, backend="java")  # type: ignore[arg-type]
