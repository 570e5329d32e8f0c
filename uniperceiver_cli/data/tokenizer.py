"""CLIP byte-level BPE tokenizer with Uni-Perceiver's five special tokens (SPEC §1.3).

What lives here:

* `ClipTokenizer`: text -> token ids and back, reproducing the reference tokenizer id for id.
* `normalize_text`: the reference text clean-up (ftfy, double HTML unescape, whitespace collapse,
  lower-casing) that `ClipTokenizer.encode` applies first.
* `get_tokenizer`: a cached factory for the tokenizer built on the packaged vocabulary.
* Vocabulary constants (`VOCAB_SIZE`, the special ids) and `TokenizerError`.

The vocabulary is CLIP's `bpe_simple_vocab_16e6.txt.gz`, shipped in `uniperceiver_cli/assets`
(origin, licence and hash in docs/third_party.md). Ids 0..255 are the 256 byte symbols, 256..511
the same symbols with the end-of-word marker `</w>`, 512..49405 the 48,894 merges in file order,
and 49406..49410 the specials `<|startoftext|>`, `<|endoftext|>`, `<|mask|>`, `<|gen|>`, `<|spe|>`.
The four specials other than `<|mask|>` are also recognised inside text (case-insensitively), so
`"a cat <|endoftext|>"` ends in the single id `EOT_ID`; `<|mask|>` in text is split like any other
punctuation, as in the reference.

Importing this module does not import torch; `ClipTokenizer.encode_batch` imports it on first use.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import html
import importlib.resources
import itertools
import logging
import operator
import re
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final, SupportsIndex

import ftfy
import regex

if TYPE_CHECKING:
    import torch

__all__ = [
    "EOT_ID",
    "GEN_ID",
    "MASK_ID",
    "NUM_MERGES",
    "SOT_ID",
    "SPECIAL_TOKENS",
    "SPE_ID",
    "VOCAB_FILENAME",
    "VOCAB_SHA256",
    "VOCAB_SIZE",
    "ClipTokenizer",
    "TokenizerError",
    "get_tokenizer",
    "normalize_text",
]

logger = logging.getLogger(__name__)

#: Number of merge rules used: lines 1..48894 of the vocabulary file (line 0 is a header).
NUM_MERGES: Final = 48_894
#: Total vocabulary: 512 byte symbols + merges + 5 specials.
VOCAB_SIZE: Final = 49_411
SOT_ID: Final = 49_406
EOT_ID: Final = 49_407
MASK_ID: Final = 49_408
GEN_ID: Final = 49_409
SPE_ID: Final = 49_410
#: Special tokens in id order, starting at `SOT_ID`.
SPECIAL_TOKENS: Final = ("<|startoftext|>", "<|endoftext|>", "<|mask|>", "<|gen|>", "<|spe|>")

VOCAB_FILENAME: Final = "bpe_simple_vocab_16e6.txt.gz"
#: sha256 of the CLIP vocabulary file the reference (and the released checkpoints) used.
VOCAB_SHA256: Final = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
_ASSET_PACKAGE: Final = "uniperceiver_cli.assets"
_END_OF_WORD: Final = "</w>"
#: Default bound on the per-instance word -> ids cache (entries, not bytes).
DEFAULT_CACHE_SIZE: Final = 100_000

# Reference pre-tokenisation: the four in-text specials, English contractions, letter runs, single
# digits, and runs of anything that is neither whitespace, a letter nor a digit. IGNORECASE is kept
# as in the reference: the text is already lower-cased, but case folding also lets e.g. "<|ſpe|>"
# (long s) match as one piece, which is then not a special but BPE-encoded like a word.
_PRETOKENIZE: Final = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|<\|spe\|>|<\|gen\|>"
    r"|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
)
_IN_TEXT_SPECIALS: Final = ("<|startoftext|>", "<|endoftext|>", "<|gen|>", "<|spe|>")
# The reference collapses runs of stdlib `re` `\s` (Unicode whitespace, the str.isspace set).
_WHITESPACE_RUN: Final = re.compile(r"\s+")
# ASCII characters that ftfy.fix_text may change: control characters other than tab and newline
# (removed, or \r rewritten as a line break) and "&" (HTML entities). Text made only of the other
# ASCII characters passes through ftfy and html.unescape unchanged, so they can be skipped.
_FTFY_SENSITIVE_ASCII: Final = re.compile(r"[^\t\n\x20-\x25\x27-\x7e]")


class TokenizerError(Exception):
    """The BPE vocabulary cannot be loaded, or a token / id is not in the vocabulary."""


def _byte_alphabet() -> list[tuple[int, str]]:
    """Return the reversible byte -> printable character map of CLIP's byte-level BPE.

    Bytes that are visible Latin-1 characters (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) stand for
    themselves; the other 68 bytes (controls, space, DEL, NBSP, soft hyphen) are assigned the code
    points 256, 257, ... in increasing byte order. The list order is the base vocabulary order:
    visible bytes first, then the remapped ones.

    Returns:
        256 pairs (byte value, character), in vocabulary order.
    """
    visible = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    visible_set = set(visible)
    remapped = [value for value in range(256) if value not in visible_set]
    alphabet = [(value, chr(value)) for value in visible]
    alphabet.extend((value, chr(256 + offset)) for offset, value in enumerate(remapped))
    return alphabet


def normalize_text(text: str) -> str:
    """Clean text the way the reference tokenizer does before splitting it.

    Steps: ``ftfy.fix_text`` -> ``html.unescape`` twice -> collapse every whitespace run to one
    space -> strip -> lower-case. Printable ASCII text without ``&`` (most captions) skips the
    first two steps, which cannot change it.

    Args:
        text: Raw text.

    Returns:
        The normalised text.

    Raises:
        TypeError: If ``text`` is not a ``str``.
    """
    if not isinstance(text, str):
        raise TypeError(
            f"expected text as str, found {type(text).__name__}; decode bytes to str first"
        )
    if not (
        text.isascii()
        and "&" not in text
        and (text.isprintable() or _FTFY_SENSITIVE_ASCII.search(text) is None)
    ):
        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return _WHITESPACE_RUN.sub(" ", text).strip().lower()


def _read_vocab_bytes(vocab_path: str | Path | None) -> tuple[bytes, str]:
    """Read the raw vocabulary file.

    Args:
        vocab_path: A file path, or None for the copy packaged in `uniperceiver_cli.assets`.

    Returns:
        The file contents and a printable name of where they came from.

    Raises:
        TokenizerError: If the file does not exist or cannot be read.
    """
    if vocab_path is None:
        resource = importlib.resources.files(_ASSET_PACKAGE).joinpath(VOCAB_FILENAME)
        label = str(resource)
        hint = "the packaged copy is missing; reinstall uniperceiver-cli or pass vocab_path"
    else:
        resource = Path(vocab_path).expanduser()
        label = str(resource)
        hint = f"pass the path of CLIP's {VOCAB_FILENAME}, or vocab_path=None for the packaged copy"
    if not resource.is_file():
        raise TokenizerError(f"BPE vocabulary file not found at {label}; {hint}")
    try:
        return resource.read_bytes(), label
    except OSError as exc:
        raise TokenizerError(f"cannot read the BPE vocabulary file {label}: {exc}; {hint}") from exc


def _parse_merges(data: bytes, label: str) -> list[tuple[str, str]]:
    """Decode a gzip-compressed CLIP vocabulary file into its first `NUM_MERGES` merge rules.

    Args:
        data: The compressed file contents.
        label: Where the data came from, for error messages.

    Returns:
        `NUM_MERGES` pairs of symbols, in rank order (rank 0 first).

    Raises:
        TokenizerError: If the data is not gzip-compressed UTF-8 text with a header line followed
            by at least `NUM_MERGES` lines of two space-separated symbols.
    """
    expected = (
        f"expected CLIP's {VOCAB_FILENAME} (gzip-compressed UTF-8, a header line, then one merge "
        f"'left right' per line; sha256 {VOCAB_SHA256})"
    )
    try:
        text = gzip.decompress(data).decode("utf-8")
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise TokenizerError(
            f"BPE vocabulary file {label} is corrupt ({type(exc).__name__}: {exc}); {expected}. "
            "Reinstall the package or pass an intact copy as vocab_path."
        ) from exc
    lines = text.split("\n")
    if len(lines) < NUM_MERGES + 1:
        raise TokenizerError(
            f"BPE vocabulary file {label} has {len(lines)} lines, fewer than the "
            f"{NUM_MERGES + 1} needed; {expected}"
        )
    merges: list[tuple[str, str]] = []
    for line_number, line in enumerate(lines[1 : NUM_MERGES + 1], start=1):
        parts = line.split()
        if len(parts) != 2:
            raise TokenizerError(
                f"line {line_number} of BPE vocabulary file {label} should hold two symbols "
                f"separated by a space, found {line!r}; {expected}"
            )
        merges.append((parts[0], parts[1]))
    return merges


class ClipTokenizer:
    """CLIP byte-level BPE with Uni-Perceiver's specials; ids match the reference tokenizer.

    Encoding: `normalize_text`, split with the reference pattern, map each piece's UTF-8 bytes to
    byte symbols, apply BPE merges (lowest rank first, all non-overlapping occurrences left to
    right), look the symbols up. BPE results are cached per piece in a bounded per-instance dict.

    Args:
        vocab_path: Path of `bpe_simple_vocab_16e6.txt.gz`; None uses the packaged copy.
        cache_size: Maximum number of cached pieces; the cache is emptied when full. 0 disables it.

    Raises:
        TokenizerError: If the vocabulary file is missing or corrupt.
        ValueError: If ``cache_size`` is negative.
    """

    def __init__(
        self, vocab_path: str | Path | None = None, *, cache_size: int = DEFAULT_CACHE_SIZE
    ) -> None:
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0 (0 disables the cache), got {cache_size}")
        data, label = _read_vocab_bytes(vocab_path)
        merges = _parse_merges(data, label)
        digest = hashlib.sha256(data).hexdigest()
        if digest != VOCAB_SHA256:
            logger.warning(
                "BPE vocabulary %s has sha256 %s, not CLIP's %s: token ids will not match "
                "checkpoints trained with the reference vocabulary",
                label,
                digest,
                VOCAB_SHA256,
            )

        alphabet = _byte_alphabet()
        symbols = [char for _, char in alphabet]
        tokens = [
            *symbols,
            *(symbol + _END_OF_WORD for symbol in symbols),
            *(left + right for left, right in merges),
            *SPECIAL_TOKENS,
        ]
        token_to_id = {token: index for index, token in enumerate(tokens)}
        if len(token_to_id) != len(tokens):
            duplicates = sorted(token for token, count in Counter(tokens).items() if count > 1)
            raise TokenizerError(
                f"BPE vocabulary file {label} yields {len(tokens) - len(token_to_id)} duplicate "
                f"tokens (e.g. {duplicates[:5]}); expected CLIP's {VOCAB_FILENAME} with unique "
                "merge results"
            )

        byte_to_char = [""] * 256
        for value, char in alphabet:
            byte_to_char[value] = char
        self.vocab_path: str = label
        self._byte_to_char: tuple[str, ...] = tuple(byte_to_char)
        self._char_to_byte: dict[str, int] = {char: value for value, char in alphabet}
        self._id_to_token: tuple[str, ...] = tuple(tokens)
        self._token_to_id: dict[str, int] = token_to_id
        self._merge_ranks: dict[tuple[str, str], int] = {
            pair: rank for rank, pair in enumerate(merges)
        }
        self._in_text_special_ids: dict[str, int] = {
            token: token_to_id[token] for token in _IN_TEXT_SPECIALS
        }
        self._cache: dict[str, tuple[int, ...]] = {}
        self._cache_size = cache_size

    def __repr__(self) -> str:
        """Return a short description naming the vocabulary file."""
        return f"ClipTokenizer(vocab_path={self.vocab_path!r}, vocab_size={self.vocab_size})"

    @property
    def vocab_size(self) -> int:
        """Number of token ids (49,411 for the CLIP vocabulary)."""
        return len(self._id_to_token)

    def token_to_id(self, token: str) -> int:
        """Return the id of a vocabulary token (a byte-symbol string such as ``"cat</w>"``).

        Raises:
            TokenizerError: If ``token`` is not in the vocabulary.
        """
        try:
            return self._token_to_id[token]
        except KeyError:
            raise TokenizerError(
                f"token {token!r} is not in the vocabulary; tokens are byte-level BPE symbols "
                "(a word's last symbol ends in '</w>') or one of "
                f"{', '.join(SPECIAL_TOKENS)}; use encode() for raw text"
            ) from None

    def id_to_token(self, token_id: int) -> str:
        """Return the vocabulary token of an id.

        Raises:
            TokenizerError: If ``token_id`` is outside ``[0, vocab_size)``.
        """
        self._check_id(token_id)
        return self._id_to_token[token_id]

    def _check_id(self, token_id: int) -> None:
        if not 0 <= token_id < len(self._id_to_token):
            raise TokenizerError(
                f"token id {token_id} is outside the vocabulary [0, {len(self._id_to_token)}); "
                "check that the ids come from this tokenizer"
            )

    def _bpe(self, word: str) -> list[str]:
        """Apply the merge rules to one pre-tokenised piece.

        Args:
            word: The piece as byte symbols (one character per UTF-8 byte), non-empty.

        Returns:
            Its BPE symbols; the last one carries the ``</w>`` marker.
        """
        symbols = [*word[:-1], word[-1] + _END_OF_WORD]
        ranks = self._merge_ranks
        no_rank = len(ranks)
        while len(symbols) > 1:
            best_rank = no_rank
            best_pair: tuple[str, str] | None = None
            for pair in itertools.pairwise(symbols):
                rank = ranks.get(pair, no_rank)
                if rank < best_rank:
                    best_rank = rank
                    best_pair = pair
            if best_pair is None:
                break
            # Merge every occurrence of the best pair, scanning left to right without overlap
            # (so "a a a" with rule "a a" becomes "aa a").
            left, right = best_pair
            joined = left + right
            merged: list[str] = []
            index = 0
            last = len(symbols) - 1
            while index <= last:
                if index < last and symbols[index] == left and symbols[index + 1] == right:
                    merged.append(joined)
                    index += 2
                else:
                    merged.append(symbols[index])
                    index += 1
            symbols = merged
        return symbols

    def _encode_piece(self, piece: str) -> tuple[int, ...]:
        """Return the ids of one pre-tokenised piece, through the bounded cache."""
        special_id = self._in_text_special_ids.get(piece)
        if special_id is not None:
            ids: tuple[int, ...] = (special_id,)
        else:
            byte_to_char = self._byte_to_char
            word = "".join([byte_to_char[value] for value in piece.encode("utf-8")])
            token_to_id = self._token_to_id
            ids = tuple([token_to_id[symbol] for symbol in self._bpe(word)])
        if self._cache_size:
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
            self._cache[piece] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Tokenise text into ids (no EOT is added; see `encode_batch`).

        Args:
            text: Raw text; it is normalised first (`normalize_text`).

        Returns:
            Token ids (N,), possibly empty.
        """
        ids: list[int] = []
        cache = self._cache
        for piece in _PRETOKENIZE.findall(normalize_text(text)):
            piece_ids = cache.get(piece)
            if piece_ids is None:
                piece_ids = self._encode_piece(piece)
            ids.extend(piece_ids)
        return ids

    def decode(
        self, ids: Iterable[SupportsIndex], skip_special: bool = False, *, strip: bool = True
    ) -> str:
        """Turn ids back into text.

        BPE symbols are concatenated, mapped back to bytes and decoded as UTF-8 (invalid
        sequences become U+FFFD); each ``</w>`` becomes a space. Specials decode to their literal
        strings (without a following space).

        Args:
            ids: Token ids (N,): Python ints, or integer scalars such as the items of a 1-D int
                tensor or numpy array.
            skip_special: Drop the five special tokens.
            strip: Strip leading and trailing whitespace. The reference's own ``decode`` does not
                strip (a sentence ends in a space); pass False to reproduce its string exactly.

        Returns:
            The decoded text.

        Raises:
            TokenizerError: If an id is outside the vocabulary.
            TypeError: If an id is not an integer.
        """
        pieces: list[str] = []
        for raw_id in ids:
            token_id = operator.index(raw_id)
            self._check_id(token_id)
            if skip_special and token_id >= SOT_ID:
                continue
            pieces.append(self._id_to_token[token_id])
        char_to_byte = self._char_to_byte
        raw = bytes([char_to_byte[char] for char in "".join(pieces)])
        text = raw.decode("utf-8", errors="replace").replace(_END_OF_WORD, " ")
        return text.strip() if strip else text

    def encode_batch(
        self,
        texts: Sequence[str],
        *,
        max_len: int | None = None,
        append_eot: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenise several texts into a right-padded id matrix and its padding mask.

        With ``append_eot`` each sequence is ``encode(text) + [EOT_ID]``, which equals the
        reference's ``encode(text + " <|endoftext|>")``. A sequence longer than ``max_len`` keeps
        its first ``max_len - 1`` ids and its last id (the EOT when ``append_eot``), like the
        reference datasets.

        Args:
            texts: B strings.
            max_len: Longest sequence to keep (>= 1), or None for no limit.
            append_eot: Append `EOT_ID` to every sequence.

        Returns:
            ``(ids, padding)``: ids (B, L) int64 right-padded with 0, and padding (B, L) bool with
            True at padded positions; L is the longest sequence after truncation (0 if all are
            empty or B == 0).

        Raises:
            TypeError: If ``texts`` is a single string instead of a sequence of strings.
            ValueError: If ``max_len`` < 1.
        """
        import torch

        if isinstance(texts, str):
            raise TypeError(
                "encode_batch expects a sequence of strings, found a single str; wrap it in a "
                "list or call encode()"
            )
        if max_len is not None and max_len < 1:
            raise ValueError(f"max_len must be >= 1 or None, got {max_len}")
        sequences: list[list[int]] = []
        for text in texts:
            ids = self.encode(text)
            if append_eot:
                ids.append(EOT_ID)
            if max_len is not None and len(ids) > max_len:
                ids = [*ids[: max_len - 1], ids[-1]]
            sequences.append(ids)
        lengths = [len(ids) for ids in sequences]
        width = max(lengths, default=0)
        padded = [ids + [0] * (width - len(ids)) for ids in sequences]
        token_ids = torch.tensor(padded, dtype=torch.int64).reshape(len(sequences), width)
        padding = torch.arange(width) >= torch.tensor(lengths, dtype=torch.int64).reshape(-1, 1)
        return token_ids, padding


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> ClipTokenizer:
    """Return a shared `ClipTokenizer` on the packaged vocabulary, built on first call."""
    return ClipTokenizer()
