from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import pytest
import torch
from torchvision.io import encode_png

from uniperceiver_cli.data.build import build_loader
from uniperceiver_cli.data.errors import DataError
from uniperceiver_cli.data.formats.webdataset import WebDatasetStream, expand_braces, list_shards
from uniperceiver_cli.data.options import WebDatasetOptions
from uniperceiver_cli.data.tokenizer import ClipTokenizer


def _png(value: int) -> bytes:
    return bytes(encode_png(torch.full((3, 8, 8), value, dtype=torch.uint8)).numpy().tobytes())


def _shard(path: Path, members: list[tuple[str, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, blob in members:
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def _shards(tmp_path: Path, num_shards: int = 4, per_shard: int = 3) -> str:
    for s in range(num_shards):
        members: list[tuple[str, bytes]] = []
        for i in range(per_shard):
            key = f"{s:03d}{i:03d}"
            members += [
                (f"{key}.png", _png(s * 10 + i)),
                (f"{key}.txt", f"caption {key}".encode()),
                (f"{key}.json", json.dumps({"caption": [f"json {key}", f"other {key}"]}).encode()),
            ]
        _shard(tmp_path / f"shard-{s:05d}.tar", members)
    return str(tmp_path / f"shard-{{00000..{num_shards - 1:05d}}}.tar")


def test_brace_and_glob_expansion(tmp_path: Path) -> None:
    assert expand_braces("a-{08..11}.tar") == ["a-08.tar", "a-09.tar", "a-10.tar", "a-11.tar"]
    assert expand_braces("{x,y}/{1..2}") == ["x/1", "x/2", "y/1", "y/2"]
    pattern = _shards(tmp_path, 2)
    assert len(list_shards(pattern)) == 2 and len(list_shards(str(tmp_path / "*.tar"))) == 2
    with pytest.raises(DataError, match="no shard matches"):
        list_shards(str(tmp_path / "none-*.tar"))


def test_eval_pass_reads_every_sample_in_order(tmp_path: Path, tok: ClipTokenizer) -> None:
    ds = WebDatasetStream(WebDatasetOptions(shards=_shards(tmp_path), split="val"), tokenizer=tok)
    samples = list(ds)
    assert [s.item_id for s in samples] == [f"{s:03d}{i:03d}" for s in range(4) for i in range(3)]
    assert samples[4].captions == ("caption 001001",)
    assert int((samples[4].pixels[0, 0, 0] * 255).round()) == 11
    js = list(
        WebDatasetStream(
            WebDatasetOptions(shards=_shards(tmp_path), caption_key="json", split="val"),
            tokenizer=tok,
        )
    )
    assert js[0].captions == ("json 000000", "other 000000")


def test_ranks_and_workers_split_the_shards(tmp_path: Path, tok: ClipTokenizer) -> None:
    pattern = _shards(tmp_path, num_shards=4)
    seen: list[str] = []
    for rank in range(2):
        ds = WebDatasetStream(
            WebDatasetOptions(shards=pattern, split="val"), tokenizer=tok, rank=rank, world_size=2
        )
        seen += [s.item_id for s in ds]  # type: ignore[misc]
    assert sorted(seen) == sorted(f"{s:03d}{i:03d}" for s in range(4) for i in range(3))
    # More consumers than shards: every consumer reads all shards and keeps every n-th sample.
    few = _shards(tmp_path / "few", num_shards=1, per_shard=6)
    parts = [
        [
            s.item_id
            for s in WebDatasetStream(
                WebDatasetOptions(shards=few, split="val"), tokenizer=tok, rank=r, world_size=3
            )
        ]
        for r in range(3)
    ]
    assert parts == [["000000", "000003"], ["000001", "000004"], ["000002", "000005"]]


def test_training_stream_is_endless_shuffled_and_seeded(tmp_path: Path, tok: ClipTokenizer) -> None:
    opts = WebDatasetOptions(shards=_shards(tmp_path), shuffle_buffer=4)
    a = WebDatasetStream(opts, tokenizer=tok, seed=1)
    it = iter(a)
    first = [next(it).item_id for _ in range(30)]  # more than one epoch (12 samples)
    assert sorted(first[:12]) == sorted(f"{s:03d}{i:03d}" for s in range(4) for i in range(3))
    assert first[:12] != sorted(first[:12])
    again = iter(WebDatasetStream(opts, tokenizer=tok, seed=1))
    assert [next(again).item_id for _ in range(30)] == first
    loader = build_loader(
        WebDatasetStream(opts, tokenizer=tok, max_text_len=4), batch_size=5, train=True
    )
    batch = next(iter(loader))
    assert batch.pixels.shape == (5, 3, 8, 8) and batch.text_ids.shape[1] <= 4


def test_corrupt_members_raise_or_are_skipped(
    tmp_path: Path, tok: ClipTokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    _shard(
        tmp_path / "bad.tar",
        [
            ("a.png", _png(1)), ("a.txt", b"good one"),
            ("b.png", b"\x89PNG broken"), ("b.txt", b"broken image"),
            ("c.txt", b"no image at all"),
            ("d.png", _png(2)), ("d.txt", b"good two"),
        ],
    )  # fmt: skip
    with pytest.raises(DataError, match=r"bad\.tar: member b\.png: cannot decode image"):
        list(
            WebDatasetStream(
                WebDatasetOptions(shards=str(tmp_path / "bad.tar"), split="val"), tokenizer=tok
            )
        )
    ds = WebDatasetStream(
        WebDatasetOptions(
            shards=str(tmp_path / "bad.tar"), split="val", on_error="skip", max_bad_fraction=0.5
        ),
        tokenizer=tok,
    )
    with caplog.at_level(logging.WARNING):
        samples = list(ds)
    assert [s.captions[0] for s in samples] == ["good one", "good two"] and ds.skipped == 2
    assert "sample c: no image member" in caplog.text
    # The two skipped records travel with the next sample served (d).
    assert samples[0].skipped == ()
    assert [k.name.rsplit(": ", 1)[1] for k in samples[1].skipped] == ["b", "c"]
    # 2 broken of 4 records is above the default 1%: the end of the pass stops the run.
    strict = WebDatasetStream(
        WebDatasetOptions(shards=str(tmp_path / "bad.tar"), split="val", on_error="skip"),
        tokenizer=tok,
    )
    with pytest.raises(DataError, match=r"2 of 4 items are broken"):
        list(strict)


def test_truncated_shard_is_reported(
    tmp_path: Path, tok: ClipTokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    _shards(tmp_path, num_shards=1, per_shard=3)
    whole = tmp_path / "shard-00000.tar"
    with tarfile.open(whole) as tar:
        members = tar.getmembers()
    data = whole.read_bytes()
    fourth = members[3]  # 000001.png, cut in the middle of its data
    (tmp_path / "cut.tar").write_bytes(data[: fourth.offset_data + fourth.size // 2])
    (tmp_path / "boundary.tar").write_bytes(data[: fourth.offset])
    with caplog.at_level(logging.WARNING):
        ok = list(
            WebDatasetStream(
                WebDatasetOptions(shards=str(tmp_path / "boundary.tar"), split="val"), tokenizer=tok
            )
        )
    assert [s.item_id for s in ok] == ["000000"] and "no end-of-archive marker" in caplog.text
    with pytest.raises(DataError, match=r"cut\.tar: member 000001\.png: unreadable"):
        list(
            WebDatasetStream(
                WebDatasetOptions(shards=str(tmp_path / "cut.tar"), split="val"), tokenizer=tok
            )
        )
    ds = WebDatasetStream(
        WebDatasetOptions(
            shards=str(tmp_path / "cut.tar"), split="val", on_error="skip", max_bad_fraction=1.0
        ),
        tokenizer=tok,
    )
    assert [s.item_id for s in ds] == ["000000"] and ds.skipped >= 1
