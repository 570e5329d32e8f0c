"""`text_corpus` reader: masked-language-modelling samples from a one-sentence-per-line file.

A sample starts at line i and keeps appending the following lines (wrapping at the end of the
file), each followed by an EOT, until it holds at least `min_words` word units; its words are
then masked (whole-word masking, 80/10/10, SPEC §3.2.3) and the sequence is cut to `max_text_len`
tokens keeping the last one. Lines are found through a byte-offset index, so the file is never
held in memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from uniperceiver_cli.data.errors import DataError
from uniperceiver_cli.data.formats.base import MapDataset
from uniperceiver_cli.data.options import TextCorpusOptions
from uniperceiver_cli.data.samples import MLMSample, collate_mlm
from uniperceiver_cli.data.text import (
    EOT_ID,
    EOT_TEXT,
    TextTokenizer,
    default_tokenizer,
    encode_words,
    split_words,
    truncate_keep_last,
    whole_word_mask,
)

_CHUNK = 1 << 24


def line_offsets(path: Path) -> np.ndarray:
    """Byte offset of the start of every line of a file, `(num_lines + 1,)` int64 (last = size)."""
    starts = [np.zeros(1, dtype=np.int64)]
    size = 0
    with path.open("rb") as fh:
        while True:
            chunk = fh.read(_CHUNK)
            if not chunk:
                break
            nl = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 10).astype(np.int64)
            starts.append(nl + size + 1)
            size += len(chunk)
    offsets = np.concatenate(starts)
    if offsets[-1] != size:  # the last line has no trailing newline
        offsets = np.append(offsets, size)
    return offsets


class TextCorpusDataset(MapDataset[MLMSample]):
    """MLM samples, one per starting line.

    Args:
        options: the `text_corpus` options.
        split: overrides `options.split` (informational: the file holds one split).
        tokenizer: default: the packaged CLIP tokenizer.
        max_text_len: tokens per sample (128 in the reference).
    """

    collate_fn = staticmethod(collate_mlm)

    def __init__(
        self,
        options: TextCorpusOptions,
        *,
        split: str | None = None,
        tokenizer: TextTokenizer | None = None,
        max_text_len: int = 128,
    ) -> None:
        path = Path(options.file)
        super().__init__(
            source=str(path),
            on_error=options.on_error,
            max_samples=options.max_samples,
            max_bad_fraction=options.max_bad_fraction,
        )
        if not path.is_file():
            raise DataError(f"{path}: text corpus not found; check data.file")
        if not 0.0 < options.mask_prob <= 1.0:
            raise ValueError(f"expected 0 < mask_prob <= 1, found {options.mask_prob}")
        self.path = path
        self.split = split or options.split
        self.min_words = options.min_words
        self.mask_prob = options.mask_prob
        self.max_text_len = max_text_len
        self._offsets = line_offsets(path)
        if len(self._offsets) < 2 or self._offsets[-1] == 0:
            raise DataError(f"{path}: text corpus is empty; expected one sentence per line")
        self._tokenizer = tokenizer

    @property
    def tokenizer(self) -> TextTokenizer:
        """The tokenizer (the packaged CLIP tokenizer unless one was given)."""
        if self._tokenizer is None:
            self._tokenizer = default_tokenizer()
        return self._tokenizer

    def _num_items(self) -> int:
        return len(self._offsets) - 1

    def line(self, index: int) -> str:
        """Line `index` of the file, without its newline."""
        start, end = int(self._offsets[index]), int(self._offsets[index + 1])
        with self.path.open("rb") as fh:
            fh.seek(start)
            raw = fh.read(end - start)
        try:
            return raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as exc:
            raise DataError(
                f"{self.path}: line {index + 1}: not valid UTF-8 ({exc.reason})"
            ) from exc

    def words(self, index: int) -> list[str]:
        """Word units of the sample starting at line `index` (lines joined with EOT)."""
        n = self._num_items()
        words: list[str] = []
        for step in range(n):
            text = self.line((index + step) % n)
            if not text.strip():
                continue
            words.extend(split_words(text))
            words.append(EOT_TEXT)
            if len(words) >= self.min_words:
                break
        return words

    def load(self, index: int) -> MLMSample:
        word_ids = encode_words(self.tokenizer, self.words(index))
        word_ids = [w for w in word_ids if w]
        if not word_ids:
            word_ids = [[EOT_ID]]
        ids, labels = whole_word_mask(word_ids, mask_prob=self.mask_prob)
        keep = truncate_keep_last(list(range(int(ids.shape[0]))), self.max_text_len)
        return MLMSample(ids=ids[keep], labels=labels[keep], index=index)
