"""Text helpers shared by the readers: the tokenizer seam, caption encoding and whole-word masking.

Readers accept any object with `encode(text) -> list[int]` (`TextTokenizer`), so tests can pass a
tiny stand-in; by default they use the packaged CLIP tokenizer (`default_tokenizer`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import regex
import torch
from torch import Tensor

from uniperceiver_cli.data.tokenizer import EOT_ID, SPE_ID, VOCAB_SIZE, normalize_text

__all__ = [
    "EOT_ID",
    "SPE_ID",
    "VOCAB_SIZE",
    "TextTokenizer",
    "default_tokenizer",
    "encode_caption",
    "encode_words",
    "split_words",
    "truncate_keep_last",
    "whole_word_mask",
]

#: Text of the end-of-text special as it appears in target strings (`name + " <|endoftext|>"`).
EOT_TEXT = "<|endoftext|>"

# Word units for whole-word masking: the specials, English contractions, letter runs, single
# digits and punctuation runs (the CLIP pre-tokenisation units, SPEC §1.3 / §3.2.3).
_WORDS = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|<\|spe\|>|<\|gen\|>"
    r"|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
)


class TextTokenizer(Protocol):
    """What the readers need from a tokenizer."""

    def encode(self, text: str) -> list[int]:
        """Return the token ids of `text`, without EOT."""
        ...


def default_tokenizer() -> TextTokenizer:
    """Return the shared packaged CLIP tokenizer."""
    from uniperceiver_cli.data.tokenizer import get_tokenizer

    return get_tokenizer()


def truncate_keep_last(ids: Sequence[int], max_len: int) -> list[int]:
    """Cut `ids` to at most `max_len` tokens, always keeping the last one (EOT stays the end)."""
    if max_len < 1:
        raise ValueError(f"expected max_len >= 1, found {max_len}")
    if len(ids) <= max_len:
        return list(ids)
    return [*ids[: max_len - 1], ids[-1]]


def encode_caption(tokenizer: TextTokenizer, text: str, max_len: int | None = None) -> Tensor:
    """Encode a caption as `ids + [EOT]`, truncated to `max_len` keeping EOT (SPEC §7).

    Args:
        tokenizer: the tokenizer.
        text: the caption.
        max_len: maximum length including EOT; None keeps everything.

    Returns:
        `(n,)` int64 ids ending with `EOT_ID`.
    """
    ids = [*tokenizer.encode(text), EOT_ID]
    if max_len is not None:
        ids = truncate_keep_last(ids, max_len)
    return torch.tensor(ids, dtype=torch.int64)


def split_words(text: str) -> list[str]:
    """Split text into the word units of whole-word masking (after the tokenizer's normalisation)."""
    return [str(w) for w in _WORDS.findall(normalize_text(text))]


def encode_words(tokenizer: TextTokenizer, words: Sequence[str]) -> list[list[int]]:
    """Encode each word unit on its own; `<|endoftext|>` and `<|spe|>` map to their single ids."""
    out: list[list[int]] = []
    for w in words:
        low = w.lower()
        if low == EOT_TEXT:
            out.append([EOT_ID])
        elif low == "<|spe|>":
            out.append([SPE_ID])
        else:
            out.append(list(tokenizer.encode(w)))
    return out


def whole_word_mask(
    word_ids: Sequence[Sequence[int]],
    *,
    mask_prob: float = 0.15,
    mask_id: int = SPE_ID,
    vocab_size: int = VOCAB_SIZE,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Whole-word masking with the 80/10/10 rule (SPEC §3.2.3).

    Each word is selected independently with probability `mask_prob`. A selected word has, with
    probability 0.8, every sub-token replaced by `mask_id`; with 0.1 each sub-token replaced by a
    uniform random id in `[0, vocab_size)` (specials included); with 0.1 it is kept. Labels hold the
    original ids at every sub-token of a selected word and -1 elsewhere. If no word is selected,
    one uniformly chosen word is (so every sample has a target).

    Args:
        word_ids: sub-token ids of each word, in order.
        mask_prob: word selection probability.
        mask_id: id written by the 80% branch (SPE in the reference).
        vocab_size: range of random replacement ids.
        generator: torch generator; None uses torch's global RNG.

    Returns:
        `ids (n,)` corrupted ids and `labels (n,)`, both int64, n = total sub-tokens.
    """
    num_words = len(word_ids)
    flat = [t for w in word_ids for t in w]
    ids = torch.tensor(flat, dtype=torch.int64)
    labels = torch.full_like(ids, -1)
    if num_words == 0:
        return ids, labels
    selected = torch.rand(num_words, generator=generator) < mask_prob
    if not bool(selected.any()):
        selected[int(torch.randint(num_words, (1,), generator=generator))] = True
    action = torch.rand(num_words, generator=generator)
    start = 0
    for w, pieces in enumerate(word_ids):
        end = start + len(pieces)
        if selected[w] and end > start:
            labels[start:end] = ids[start:end]
            a = float(action[w])
            if a < 0.8:
                ids[start:end] = mask_id
            elif a < 0.9:
                ids[start:end] = torch.randint(vocab_size, (end - start,), generator=generator)
        start = end
    return ids, labels
