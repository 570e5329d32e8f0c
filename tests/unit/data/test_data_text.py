from __future__ import annotations

from pathlib import Path

import pytest
import torch

from uniperceiver_cli.data.errors import DataError
from uniperceiver_cli.data.formats.glue_tsv import GLUE_LABEL_WORDS, GlueTsvDataset
from uniperceiver_cli.data.formats.text_corpus import TextCorpusDataset
from uniperceiver_cli.data.options import GlueTsvOptions, TextCorpusOptions
from uniperceiver_cli.data.sampler import SampleKey
from uniperceiver_cli.data.text import (
    EOT_ID,
    SPE_ID,
    VOCAB_SIZE,
    encode_caption,
    split_words,
    truncate_keep_last,
    whole_word_mask,
)
from uniperceiver_cli.data.tokenizer import ClipTokenizer


def test_whole_word_masking_statistics() -> None:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 4, (30_000,), generator=g).tolist()
    words = []
    next_id = 1000
    for n in lengths:
        words.append(list(range(next_id, next_id + n)))
        next_id += n
    ids, labels = whole_word_mask(words, mask_prob=0.15, generator=g)
    original = torch.tensor([t for w in words for t in w])
    assert torch.equal(labels[labels >= 0], original[labels >= 0])
    n_sel = n_spe = n_keep = n_rand = 0
    start = 0
    for w in words:
        sl = slice(start, start + len(w))
        start += len(w)
        lab = labels[sl]
        assert bool((lab >= 0).all()) or bool((lab < 0).all())  # whole words only
        if lab[0] < 0:
            assert torch.equal(ids[sl], original[sl])
            continue
        n_sel += 1
        if bool((ids[sl] == SPE_ID).all()):
            n_spe += 1
        elif torch.equal(ids[sl], original[sl]):
            n_keep += 1
        else:
            n_rand += 1
            assert bool(((ids[sl] >= 0) & (ids[sl] < VOCAB_SIZE)).all())
    assert abs(n_sel / len(words) - 0.15) < 0.01
    assert abs(n_spe / n_sel - 0.8) < 0.025
    assert abs(n_keep / n_sel - 0.1) < 0.02 and abs(n_rand / n_sel - 0.1) < 0.02


def test_whole_word_mask_always_selects_a_word() -> None:
    _, labels = whole_word_mask(
        [[5], [6, 7]], mask_prob=1e-9, generator=torch.Generator().manual_seed(1)
    )
    assert (labels >= 0).sum() >= 1


def test_text_helpers(tok: ClipTokenizer) -> None:
    assert split_words("The cat's  HAT, 42! <|endoftext|>") == [
        "the", "cat", "'s", "hat", ",", "4", "2", "!", "<|endoftext|>"
    ]  # fmt: skip
    assert truncate_keep_last([1, 2, 3, 4], 3) == [1, 2, 4]
    ids = encode_caption(tok, "a photo of a cat", max_len=4)
    assert ids.tolist() == [*tok.encode("a photo of a cat")[:3], EOT_ID]


def _corpus(tmp_path: Path) -> Path:
    f = tmp_path / "corpus.txt"
    f.write_text("the red circle is left .\n\nthe blue square moves up .\na cat\n")
    return f


def test_text_corpus_joins_lines_with_eot_and_truncates(tmp_path: Path, tok: ClipTokenizer) -> None:
    ds = TextCorpusDataset(
        TextCorpusOptions(file=str(_corpus(tmp_path)), min_words=10), tokenizer=tok, max_text_len=64
    )
    assert len(ds) == 4 and ds.line(2) == "the blue square moves up ."
    assert ds.words(0) == [
        *["the", "red", "circle", "is", "left", "."],
        "<|endoftext|>",
        *["the", "blue", "square", "moves", "up", "."],
        "<|endoftext|>",
    ]
    s = ds[SampleKey(0, 11)]
    full = [
        *tok.encode("the red circle is left ."),
        EOT_ID,
        *tok.encode("the blue square moves up ."),
        EOT_ID,
    ]
    assert len(s.ids) == len(full)
    assert torch.equal(s.labels[s.labels >= 0], torch.tensor(full)[s.labels >= 0])
    assert torch.equal(ds[SampleKey(0, 11)].ids, s.ids)
    short = TextCorpusDataset(
        TextCorpusOptions(file=str(_corpus(tmp_path)), min_words=10), tokenizer=tok, max_text_len=5
    )
    t = short[SampleKey(0, 11)]
    assert len(t.ids) == 5 and (int(t.labels[-1]) in (-1, EOT_ID))
    wrap = ds.words(3)  # last line wraps to the start of the file
    assert wrap[:3] == ["a", "cat", "<|endoftext|>"] and wrap[3] == "the"


def test_text_corpus_missing_or_empty(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nothing.txt: text corpus not found"):
        TextCorpusDataset(TextCorpusOptions(file=str(tmp_path / "nothing.txt")))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty"):
        TextCorpusDataset(TextCorpusOptions(file=str(tmp_path / "empty.txt")))


def _glue(tmp_path: Path, task: str, split: str, text: str) -> GlueTsvOptions:
    folder = tmp_path / task / "processed"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}.tsv").write_text(text)
    return GlueTsvOptions(root=str(tmp_path), glue_task=task, split=split)  # type: ignore[arg-type]


def test_glue_sst2_template_and_header(tmp_path: Path, tok: ClipTokenizer) -> None:
    opts = _glue(tmp_path, "SST-2", "dev", "sentence\tlabel\na great movie\t1\nboring .\t0\n")
    ds = GlueTsvDataset(opts, tokenizer=tok)
    assert len(ds) == 2 and ds.labels == [1, 0] and ds.label_words == ("bad", "wonderful")
    s = ds[0]
    expect = [
        *tok.encode("a great movie"),
        EOT_ID,
        *tok.encode("It is"),
        SPE_ID,
        *tok.encode("."),
        EOT_ID,
    ]
    assert s.ids.tolist() == expect and int(s.ids[s.slot]) == SPE_ID and s.label == 1


def test_glue_cola_slot_third_from_last(tmp_path: Path, tok: ClipTokenizer) -> None:
    ds = GlueTsvDataset(
        _glue(tmp_path, "CoLA", "dev", "gj04\t1\t\tThe book was read.\n"), tokenizer=tok
    )
    s = ds[0]
    assert s.slot == len(s.ids) - 3 and int(s.ids[s.slot]) == SPE_ID


@pytest.mark.parametrize(
    ("task", "row", "label", "first"),
    [
        (
            "RTE",
            "0\tA man runs.\tA person moves.\tentailment",
            1,
            "A man runs ? <|endoftext|> it is",
        ),
        ("QNLI", "0\tWho runs?\tA man runs.\tnot_entailment", 0, "Who runs? <|endoftext|> it is"),
        ("MRPC", "1\tid1\tid2\tHe left.\tHe went away.", 1, "He left ."),
        ("QQP", "0\t1\t2\tHow to cook?\tHow do I cook?\t0", 0, "How to cook? <|endoftext|>"),
        (
            "MNLI",
            "\t".join(["0"] * 8 + ["He left.", "He stayed.", "x", "contradiction"]),
            0,
            "He left.",
        ),
    ],
)
def test_glue_pair_templates(
    tmp_path: Path, tok: ClipTokenizer, task: str, row: str, label: int, first: str
) -> None:
    ds = GlueTsvDataset(_glue(tmp_path, task, "dev", row + "\n"), tokenizer=tok)
    s = ds[0]
    assert s.label == label and len(ds.label_words) == len(GLUE_LABEL_WORDS[task])
    assert s.ids[: s.slot].tolist() == tok.encode(first)
    assert int(s.ids[s.slot]) == SPE_ID and int(s.ids[-1]) == EOT_ID
    assert s.ids[s.slot + 1 : s.slot + 2].tolist() == tok.encode(",")


def test_glue_truncation_and_train_repeat(tmp_path: Path, tok: ClipTokenizer) -> None:
    long = " ".join(["word"] * 100)
    ds = GlueTsvDataset(
        _glue(tmp_path, "RTE", "train", f"0\t{long}\t{long}\tentailment\n"),
        tokenizer=tok,
        max_text_len=32,
    )
    assert len(ds) == 200  # one row repeated to >= 200
    s = ds[0]
    assert len(s.ids) == 32 and len(s.ids) - s.slot == 16 and int(s.ids[-1]) == EOT_ID


def test_glue_bad_label_and_mnli_dev_matched(tmp_path: Path, tok: ClipTokenizer) -> None:
    with pytest.raises(DataError, match=r"dev.tsv: line 2: unknown RTE label 'maybe'"):
        GlueTsvDataset(_glue(tmp_path, "RTE", "dev", "0\ta\tb\tentailment\n1\ta\tb\tmaybe\n"))
    folder = tmp_path / "MNLI" / "processed"
    folder.mkdir(parents=True)
    (folder / "dev_matched.tsv").write_text("\t".join(["0"] * 8 + ["a .", "b", "neutral"]) + "\n")
    ds = GlueTsvDataset(
        GlueTsvOptions(root=str(tmp_path), glue_task="MNLI", split="dev"), tokenizer=tok
    )
    assert ds[0].label == 1
