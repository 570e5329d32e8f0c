"""BLEU-1..4, ROUGE-L and CIDEr-D on tokenised captions, numerically matching pycocoevalcap 1.2.

Inputs are already tokenised, space-joined captions (see ``ptb.py``). The arithmetic follows the
reference order of operations so results agree to the last bit or two:

* BLEU: corpus BLEU over clipped n-gram counts, the "closest" reference length per caption (ties go
  to the shorter reference), smoothing constants 1e-15 / 1e-9, cumulative geometric means.
* ROUGE-L: LCS F-measure with beta = 1.2 from the best precision and the best recall over the
  references (taken independently), averaged over images.
* CIDEr-D: tf-idf n-gram vectors (n = 1..4), document frequencies from the references of the evaluated
  images, idf = log(#images) - log(max(1, df)), clipped hypothesis weights, Gaussian length penalty
  with sigma = 6 where "length" is the caption's *bigram* count (a pycocoevalcap quirk), ×10, mean
  over references and images.
Torch-free (numpy only).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np

__all__ = ["bleu_scores", "cider_d", "rouge_l"]

NGram = tuple[str, ...]


def _ngram_counts(words: Sequence[str], n: int) -> Counter[NGram]:
    counts: Counter[NGram] = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


def bleu_scores(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], n: int = 4
) -> tuple[list[float], list[list[float]]]:
    """Corpus BLEU-1..n and per-caption BLEU-1..n exactly as pycocoevalcap's ``Bleu(4)``.

    Args:
        hypotheses: I tokenised hypotheses, one per image.
        references: I lists of tokenised references.
        n: highest n-gram order.

    Returns:
        (corpus scores [BLEU-1..n], per-image scores as n lists of I floats).
    """
    tiny, small = 1e-15, 1e-9
    total_guess = [0] * n
    total_correct = [0] * n
    total_test = 0
    total_ref: float = 0
    per_image: list[list[float]] = [[] for _ in range(n)]
    for hyp, refs in zip(hypotheses, references, strict=True):
        hyp_words = hyp.split()
        max_counts: dict[NGram, int] = {}
        ref_lens = []
        for ref in refs:
            words = ref.split()
            ref_lens.append(len(words))
            for gram, count in _ngram_counts(words, n).items():
                if count > max_counts.get(gram, 0):
                    max_counts[gram] = count
        test_len = len(hyp_words)
        ref_len = min((abs(length - test_len), length) for length in ref_lens)[1]
        guess = [max(0, test_len - k + 1) for k in range(1, n + 1)]
        correct = [0] * n
        for gram, count in _ngram_counts(hyp_words, n).items():
            correct[len(gram) - 1] += min(max_counts.get(gram, 0), count)
        total_test += test_len
        total_ref += ref_len
        score = 1.0
        ratio = (test_len + tiny) / (ref_len + small)
        for k in range(n):
            total_guess[k] += guess[k]
            total_correct[k] += correct[k]
            score *= (float(correct[k]) + tiny) / (float(guess[k]) + small)
            value = score ** (1.0 / (k + 1))
            if ratio < 1:
                value *= math.exp(1 - 1 / ratio)
            per_image[k].append(value)
    corpus = []
    score = 1.0
    for k in range(n):
        score *= float(total_correct[k] + tiny) / (total_guess[k] + small)
        corpus.append(score ** (1.0 / (k + 1)))
    ratio = (total_test + tiny) / (total_ref + small)
    if ratio < 1:
        corpus = [value * math.exp(1 - 1 / ratio) for value in corpus]
    return corpus, per_image


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0] * (len(b) + 1)
        for j, other in enumerate(b, start=1):
            current[j] = previous[j - 1] + 1 if token == other else max(previous[j], current[j - 1])
        previous = current
    return previous[len(b)]


def rouge_l(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], beta: float = 1.2
) -> tuple[float, list[float]]:
    """Mean ROUGE-L F-measure (pycocoevalcap ``Rouge``); tokens split on single spaces.

    Args:
        hypotheses: I tokenised hypotheses.
        references: I lists of tokenised references.
        beta: recall weight (1.2 in the COCO evaluation).

    Returns:
        (mean score, I per-image scores).
    """
    scores: list[float] = []
    for hyp, refs in zip(hypotheses, references, strict=True):
        hyp_tokens = hyp.split(" ")
        precisions, recalls = [], []
        for ref in refs:
            ref_tokens = ref.split(" ")
            lcs = _lcs_length(ref_tokens, hyp_tokens)
            precisions.append(lcs / float(len(hyp_tokens)))
            recalls.append(lcs / float(len(ref_tokens)))
        p, r = max(precisions), max(recalls)
        if p != 0 and r != 0:
            scores.append(((1 + beta**2) * p * r) / float(r + beta**2 * p))
        else:
            scores.append(0.0)
    return float(np.mean(np.array(scores))), scores


def cider_d(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0
) -> tuple[float, list[float]]:
    """CIDEr-D as pycocoevalcap 1.2's ``Cider`` computes it (see module docstring).

    Args:
        hypotheses: I tokenised hypotheses.
        references: I lists of tokenised references (also the document-frequency corpus).
        n: highest n-gram order.
        sigma: standard deviation of the Gaussian length penalty.

    Returns:
        (mean score, I per-image scores).
    """
    ref_counts = [[_ngram_counts(ref.split(), n) for ref in refs] for refs in references]
    doc_freq: Counter[NGram] = Counter()
    for refs in ref_counts:
        doc_freq.update({gram for counts in refs for gram in counts})
    log_images = np.log(float(len(ref_counts)))
    penalty_scale = 2 * sigma**2

    def to_vector(counts: Counter[NGram]) -> tuple[list[dict[NGram, float]], list[float], int]:
        vec: list[dict[NGram, float]] = [{} for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for gram, tf in counts.items():
            order = len(gram) - 1
            weight = float(tf) * (log_images - np.log(max(1.0, doc_freq.get(gram, 0.0))))
            vec[order][gram] = weight
            norm[order] += pow(weight, 2)
            if order == 1:
                length += tf
        return vec, [np.sqrt(v) for v in norm], length

    scores: list[float] = []
    for hyp, refs in zip(hypotheses, ref_counts, strict=True):
        vec, norm, length = to_vector(_ngram_counts(hyp.split(), n))
        total = np.zeros(n)
        for ref in refs:
            vec_ref, norm_ref, length_ref = to_vector(ref)
            delta = float(length - length_ref)
            val = np.zeros(n)
            for order in range(n):
                for gram, weight in vec[order].items():
                    ref_weight = vec_ref[order].get(gram, 0.0)
                    val[order] += min(weight, ref_weight) * ref_weight
                if norm[order] != 0 and norm_ref[order] != 0:
                    val[order] /= norm[order] * norm_ref[order]
                val[order] *= np.e ** (-(delta**2) / penalty_scale)
            total += val
        score = np.mean(total)
        score /= len(refs)
        score *= 10.0
        scores.append(float(score))
    return float(np.mean(np.array(scores))), scores
