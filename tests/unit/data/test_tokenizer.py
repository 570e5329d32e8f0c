"""Tests for the CLIP BPE tokenizer against the official fixtures and open_clip."""

from __future__ import annotations

import gzip
import html
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import ftfy
import pytest
import regex
import torch

from uniperceiver_cli.data.tokenizer import (
    EOT_ID,
    GEN_ID,
    MASK_ID,
    NUM_MERGES,
    SOT_ID,
    SPE_ID,
    SPECIAL_TOKENS,
    VOCAB_FILENAME,
    VOCAB_SIZE,
    ClipTokenizer,
    TokenizerError,
    get_tokenizer,
    normalize_text,
)

REPO_ROOT = Path(__file__).resolve().parents[3]


def _fixture_dir() -> Path:
    """Return the official_tiny fixture folder, or skip when it is not available.

    `UNIPERCEIVER_FIXTURES` may name the official_tiny folder itself or the folder holding it.
    """
    override = os.environ.get("UNIPERCEIVER_FIXTURES")
    if override:
        base = Path(override)
        directory = base / "official_tiny" if (base / "official_tiny").is_dir() else base
    else:
        directory = REPO_ROOT / ".." / "shared" / "fixtures" / "official_tiny"
    if not (directory / "tokenizer.json").is_file():
        pytest.skip(f"official_tiny fixtures not found at {directory} (set UNIPERCEIVER_FIXTURES)")
    return directory


@pytest.fixture(scope="module")
def tok() -> ClipTokenizer:
    return get_tokenizer()


@pytest.fixture(scope="module")
def tokenizer_cases() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((_fixture_dir() / "tokenizer.json").read_text("utf-8"))
    return data


@pytest.fixture(scope="module")
def inputs_json() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((_fixture_dir() / "inputs.json").read_text("utf-8"))
    return data


def _reference_normalize(text: str) -> str:
    """The reference clean-up written out step by step, without any fast path."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip().lower()


# --------------------------------------------------------------------------- vocabulary


def test_vocab_size_and_special_ids(tok: ClipTokenizer, tokenizer_cases: dict[str, Any]) -> None:
    assert tok.vocab_size == VOCAB_SIZE == tokenizer_cases["vocab_size"] == 49411
    assert [SOT_ID, EOT_ID, MASK_ID, GEN_ID, SPE_ID] == [49406, 49407, 49408, 49409, 49410]
    for token, token_id in tokenizer_cases["special_ids"].items():
        assert tok.token_to_id(token) == token_id, token
        assert tok.id_to_token(token_id) == token, token_id
    assert list(SPECIAL_TOKENS) == list(tokenizer_cases["special_ids"])


def test_base_vocabulary_layout(tok: ClipTokenizer) -> None:
    # Visible bytes come first ("!" is id 0), then remapped bytes (space is U+0120 "Ġ").
    assert tok.id_to_token(0) == "!"
    assert tok.id_to_token(256) == "!</w>"
    assert tok.id_to_token(269) == ".</w>"
    assert tok.token_to_id("Ġ") == 188 + 32  # 188 visible bytes, then bytes 0..31, then space
    assert tok.id_to_token(511) == tok.id_to_token(255) + "</w>"
    # First merge of the file is "i n", last used one is line 48894.
    assert tok.id_to_token(512) == "in"
    assert tok.id_to_token(512 + NUM_MERGES - 1) == "jekyll</w>"
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.id_to_token(VOCAB_SIZE)
    with pytest.raises(TokenizerError, match="not in the vocabulary"):
        tok.token_to_id("not-a-token")


# --------------------------------------------------------------------------- reference parity


def test_every_official_tokenizer_case(tok: ClipTokenizer, tokenizer_cases: dict[str, Any]) -> None:
    failures = []
    for case in tokenizer_cases["cases"]:
        text = case["text"]
        ids = tok.encode(text)
        symbols = [tok.id_to_token(i) for i in ids]
        raw = tok.decode(ids, strip=False)
        if ids != case["ids"]:
            failures.append(f"{text!r}: ids {ids} != reference {case['ids']}")
        if symbols != case["bpe"]:
            failures.append(f"{text!r}: bpe {symbols} != reference {case['bpe']}")
        if raw != case["decoded"]:
            failures.append(
                f"{text!r}: decode(strip=False) {raw!r} != reference {case['decoded']!r}"
            )
        if tok.decode(ids) != case["decoded"].strip():
            failures.append(f"{text!r}: decode() {tok.decode(ids)!r} != stripped reference")
    assert len(tokenizer_cases["cases"]) == 27
    assert not failures, "\n".join(failures)


def test_every_inputs_json_token_list(tok: ClipTokenizer, inputs_json: dict[str, Any]) -> None:
    failures = []

    def check(label: str, text: str, expected: list[int], max_len: int | None = None) -> None:
        via_suffix = tok.encode(text + " <|endoftext|>")
        if max_len is not None and len(via_suffix) > max_len:
            via_suffix = [*via_suffix[: max_len - 1], via_suffix[-1]]
        batch, padding = tok.encode_batch([text], max_len=max_len)
        via_batch = batch[0][~padding[0]].tolist()
        if via_suffix != expected:
            failures.append(f"{label} {text!r}: encode(text + eot) {via_suffix} != {expected}")
        if via_batch != expected:
            failures.append(f"{label} {text!r}: encode_batch {via_batch} != {expected}")

    checked = 0
    for key in ("imagenet", "k400"):
        names, tokens = inputs_json[f"{key}_class_names"], inputs_json[f"{key}_class_tokens"]
        assert len(names) == len(tokens)
        for name, expected in zip(names, tokens, strict=True):
            check(key, name, expected)
            checked += 1
    for key, max_len in (("image", 30), ("video", 77)):
        for texts, token_lists in zip(
            inputs_json[f"{key}_captions"], inputs_json[f"{key}_caption_tokens"], strict=True
        ):
            for text, expected in zip(texts, token_lists, strict=True):
                check(f"{key} caption", text, expected, max_len)
                checked += 1
    check("caption_tf", inputs_json["caption_tf_text"], inputs_json["caption_tf_tokens"])
    for sample in inputs_json["mlm"]:  # these texts already end in " <|endoftext|>"
        if tok.encode(sample["text"]) != sample["original_ids"]:
            failures.append(f"mlm {sample['text']!r}: {tok.encode(sample['text'])}")
        checked += 1
    assert checked == 7 + 5 + 6 + 4 + 2
    assert not failures, "\n".join(failures)


def test_truncation_keeps_final_eot(tok: ClipTokenizer, inputs_json: dict[str, Any]) -> None:
    long_caption = inputs_json["image_captions"][2][1]
    full = tok.encode(long_caption)
    assert len(full) + 1 > 30  # the fixture caption really is truncated
    ids, padding = tok.encode_batch([long_caption], max_len=30)
    assert ids.shape == (1, 30)
    assert not padding.any()
    assert ids[0].tolist() == [*full[:29], EOT_ID]
    assert ids[0].tolist() == inputs_json["image_caption_tokens"][2][1]


def test_encode_batch_matches_collated_fixture_tensors(
    tok: ClipTokenizer, inputs_json: dict[str, Any]
) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    tensors = safetensors_torch.load_file(str(_fixture_dir() / "inputs.safetensors"))
    image_captions = [c for pair in inputs_json["image_captions"] for c in pair]
    video_captions = [c for pair in inputs_json["video_captions"] for c in pair]
    batches = {
        "imagenet_target": (inputs_json["imagenet_class_names"], None),
        "k400_target": (inputs_json["k400_class_names"], None),
        "image_captions": (image_captions, 30),
        "image_first_caption": ([pair[0] for pair in inputs_json["image_captions"]], 30),
        "video_captions": (video_captions, 77),
    }
    for name, (texts, max_len) in batches.items():
        ids, padding = tok.encode_batch(texts, max_len=max_len)
        expected_ids = tensors[f"{name}_tokens"]
        expected_padding = tensors[f"{name}_invalid_mask"].bool()
        assert ids.dtype == torch.int64 and padding.dtype == torch.bool, name
        assert ids.shape == expected_ids.shape, f"{name}: {tuple(ids.shape)}"
        assert torch.equal(ids, expected_ids), name
        assert torch.equal(padding, expected_padding), name


# --------------------------------------------------------------------------- open_clip parity

ORDINARY_SENTENCES = [
    "a photo of a cat.",
    "A dog running on the beach at sunset",
    "two people riding bicycles down a busy street",
    "Is this the real life? Is this just fantasy?",
    "the quick brown fox jumps over the lazy dog",
    'She said: "hello, world!" and left.',
    "prices rose 12.5% in 2023, to $4,200",
    "call me at 555-0199 or e-mail info@example.org",
    "it's a dog's life; they're happy, we've won, I'm here, you'll see, he'd go",
    "rock'n'roll isn't dead",
    "naïve café résumé",
    "Ça va? Übermäßig große Straße",
    "東京タワーの写真",
    "中文 русский العربية ελληνικά",
    "emoji 😀 🚀 👍 in a caption",
    "tom &amp; jerry",
    "&lt;b&gt;bold&lt;/b&gt; text",
    "fish &amp; chips &quot;today&quot;",
    "non\u00a0breaking space",
    "tabs\tand\nnewlines   and   spaces",
    "   leading and trailing   ",
    "hyphen-ated under_score slash/path back\\slash",
    "(parentheses) [brackets] {braces} <angles>",
    "ellipsis... and dashes -- and — em",
    "ALL CAPS SHOUTING!!!",
    "MiXeD CaSe WoRdS",
    "supercalifragilisticexpialidocious",
    "antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis",
    "a man in a red shirt holding a frisbee",
    "Kite (bird of prey)",
    "ring-necked snake",
    "bouncing ball (not juggling)",
    "1st 2nd 3rd 4th",
    "x = y + z * 2 / 3",
    "#hashtag @mention ~tilde ^caret |pipe",
    "ﬁ ligature and ｆｕｌｌｗｉｄｔｈ",
]


@pytest.fixture(scope="module")
def open_clip_tokenizer() -> Any:
    open_clip_tokenizer_module = pytest.importorskip("open_clip.tokenizer")
    return open_clip_tokenizer_module.SimpleTokenizer()


@pytest.mark.parametrize("sentence", ORDINARY_SENTENCES)
def test_matches_open_clip_on_ordinary_text(
    tok: ClipTokenizer, open_clip_tokenizer: Any, sentence: str
) -> None:
    normalized = normalize_text(sentence)
    expected = open_clip_tokenizer.encode(normalized)
    assert tok.encode(sentence) == expected
    assert tok.encode(normalized) == expected


# --------------------------------------------------------------------------- normalisation


def test_normalize_matches_reference_steps() -> None:
    for sentence in ORDINARY_SENTENCES:
        assert normalize_text(sentence) == _reference_normalize(sentence), sentence
    assert normalize_text("&amp;amp;amp;") == _reference_normalize("&amp;amp;amp;") == "&"
    assert normalize_text("a\r\nb\x1b[31mc\x00d") == _reference_normalize("a\r\nb\x1b[31mc\x00d")


def test_ascii_fast_path_equals_ftfy_path() -> None:
    # The fast path skips ftfy/html.unescape for printable ASCII without "&"; check it on random
    # strings drawn from exactly that alphabet, plus tab and newline.
    alphabet = [chr(c) for c in range(0x20, 0x7F) if chr(c) != "&"] + ["\t", "\n"]
    rng = random.Random(1234)
    for _ in range(2000):
        text = "".join(rng.choices(alphabet, k=rng.randint(0, 40)))
        assert normalize_text(text) == _reference_normalize(text), repr(text)


def test_normalize_rejects_non_str() -> None:
    with pytest.raises(TypeError, match="expected text as str"):
        normalize_text(b"bytes")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- round trip, specials

_WORDS = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+")


@pytest.mark.parametrize("sentence", ORDINARY_SENTENCES)
def test_decode_round_trips(tok: ClipTokenizer, sentence: str) -> None:
    normalized = normalize_text(sentence)
    decoded = tok.decode(tok.encode(sentence))
    # Every pre-tokenised piece ends a word, so decoding puts exactly one space between pieces.
    assert decoded == " ".join(_WORDS.findall(normalized))
    assert decoded.replace(" ", "") == normalized.replace(" ", "")
    assert tok.encode(decoded) == tok.encode(sentence)


def test_specials_in_text_are_single_ids(tok: ClipTokenizer) -> None:
    for token, token_id in (
        ("<|startoftext|>", SOT_ID),
        ("<|endoftext|>", EOT_ID),
        ("<|gen|>", GEN_ID),
        ("<|spe|>", SPE_ID),
    ):
        for variant in (token, token.upper(), token.title()):
            ids = tok.encode(f"a {variant} b")
            assert ids == [tok.encode("a")[0], token_id, tok.encode("b")[0]], variant
        assert tok.encode(token) == [token_id]
    assert tok.encode("x<|spe|><|spe|>y") == [*tok.encode("x"), SPE_ID, SPE_ID, *tok.encode("y")]


def test_case_folded_special_lookalike_is_one_bpe_word(tok: ClipTokenizer) -> None:
    # The reference regex (IGNORECASE) matches "<|ſpe|>" (long s) as a single piece, but only the
    # exact special strings map to special ids, so the piece is BPE-encoded as one word.
    ids = tok.encode("<|ſpe|> x")
    symbols = [tok.id_to_token(i) for i in ids]
    assert SPE_ID not in ids
    assert symbols[-1] == "x</w>"
    assert [s.endswith("</w>") for s in symbols[:-1]] == [False] * (len(symbols) - 2) + [True]
    assert tok.decode(ids) == "<|ſpe|> x"


def test_mask_is_not_a_special_in_text(tok: ClipTokenizer) -> None:
    ids = tok.encode("<|mask|>")
    assert MASK_ID not in ids
    assert [tok.id_to_token(i) for i in ids] == ["<", "|</w>", "mask</w>", "|", "></w>"]
    assert tok.decode([MASK_ID]) == "<|mask|>"


def test_decode_specials_and_skip_special(tok: ClipTokenizer) -> None:
    ids = [SOT_ID, *tok.encode("a cat"), SPE_ID, MASK_ID, GEN_ID, EOT_ID]
    assert tok.decode(ids) == "<|startoftext|>a cat <|spe|><|mask|><|gen|><|endoftext|>"
    assert tok.decode(ids, skip_special=True) == "a cat"
    assert tok.decode(torch.tensor(ids), skip_special=True) == "a cat"
    assert tok.decode([]) == ""
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.decode([1, -1])
    with pytest.raises(TypeError):
        tok.decode([1.5])  # type: ignore[list-item]


def test_decode_replaces_broken_utf8(tok: ClipTokenizer) -> None:
    # "é" is two bytes; decoding only the first one must give U+FFFD, not raise.
    first_byte_id = tok.token_to_id("Ã")
    assert tok.decode([first_byte_id]) == "\ufffd"


# --------------------------------------------------------------------------- encode_batch


def test_encode_batch_shapes_and_padding(tok: ClipTokenizer) -> None:
    texts = ["a cat", "", "a very small brown dog"]
    ids, padding = tok.encode_batch(texts)
    lengths = [len(tok.encode(t)) + 1 for t in texts]
    assert ids.shape == padding.shape == (3, max(lengths))
    for row, (text, length) in enumerate(zip(texts, lengths, strict=True)):
        assert ids[row, :length].tolist() == [*tok.encode(text), EOT_ID]
        assert ids[row, length:].eq(0).all()
        assert padding[row].tolist() == [False] * length + [True] * (ids.shape[1] - length)


def test_encode_batch_append_eot_false_and_truncation(tok: ClipTokenizer) -> None:
    text = "one two three four five six"
    plain = tok.encode(text)
    ids, padding = tok.encode_batch([text, "one"], append_eot=False)
    assert ids[0].tolist() == plain
    assert padding[1].tolist() == [False] + [True] * (len(plain) - 1)
    truncated, truncated_padding = tok.encode_batch([text], max_len=4, append_eot=False)
    assert truncated[0].tolist() == [*plain[:3], plain[-1]]
    assert not truncated_padding.any()
    only_eot, _ = tok.encode_batch([text], max_len=1)
    assert only_eot.tolist() == [[EOT_ID]]
    # With room to spare, max_len does not pad beyond the longest sequence.
    short, _ = tok.encode_batch(["a cat"], max_len=77)
    assert short.shape == (1, 3)


def test_encode_batch_edge_cases(tok: ClipTokenizer) -> None:
    ids, padding = tok.encode_batch([])
    assert ids.shape == padding.shape == (0, 0)
    ids, padding = tok.encode_batch(["", "  "], append_eot=False)
    assert ids.shape == padding.shape == (2, 0)
    with pytest.raises(ValueError, match="max_len must be >= 1"):
        tok.encode_batch(["a"], max_len=0)
    with pytest.raises(TypeError, match="single str"):
        tok.encode_batch("a cat")


# --------------------------------------------------------------------------- loading and caching


def test_missing_vocab_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / VOCAB_FILENAME
    with pytest.raises(TokenizerError, match=re.escape(str(missing))):
        ClipTokenizer(missing)


def test_corrupt_vocab_files_name_the_path(tmp_path: Path) -> None:
    original = (REPO_ROOT / "uniperceiver_cli" / "assets" / VOCAB_FILENAME).read_bytes()
    lines = gzip.decompress(original).decode("utf-8").split("\n")
    cases = {
        "not_gzip.txt.gz": (b"this is not gzip data", "corrupt"),
        "truncated.txt.gz": (original[: len(original) // 2], "corrupt"),
        "short.txt.gz": (gzip.compress("\n".join(lines[:100]).encode()), "fewer than"),
        "bad_line.txt.gz": (
            gzip.compress("\n".join([*lines[:10], "onlyone", *lines[11:]]).encode()),
            "line 10 of",
        ),
        "duplicate.txt.gz": (
            gzip.compress("\n".join([*lines[:3], lines[1], *lines[4:]]).encode()),
            "duplicate",
        ),
    }
    for name, (payload, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(payload)
        with pytest.raises(TokenizerError, match=message) as info:
            ClipTokenizer(path)
        assert str(path) in str(info.value), name


def test_explicit_path_matches_packaged_vocab(tok: ClipTokenizer) -> None:
    path = REPO_ROOT / "uniperceiver_cli" / "assets" / VOCAB_FILENAME
    other = ClipTokenizer(str(path))
    assert other.encode("a photo of a cat.") == tok.encode("a photo of a cat.")
    assert get_tokenizer() is get_tokenizer()


def test_cache_is_bounded_and_transparent(tok: ClipTokenizer) -> None:
    small = ClipTokenizer(cache_size=3)
    uncached = ClipTokenizer(cache_size=0)
    sentences = ORDINARY_SENTENCES * 2
    for sentence in sentences:
        assert small.encode(sentence) == tok.encode(sentence) == uncached.encode(sentence)
        assert len(small._cache) <= 3
    assert len(uncached._cache) == 0
    with pytest.raises(ValueError, match="cache_size"):
        ClipTokenizer(cache_size=-1)


def test_import_does_not_load_torch() -> None:
    code = (
        "import sys, uniperceiver_cli.data.tokenizer as t; "
        "assert t.get_tokenizer().encode('a cat') == [320, 2368]; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
