from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from data_media import write_png

from uniperceiver_cli.data.errors import DataError
from uniperceiver_cli.data.formats.coco_captions import CocoCaptionsDataset
from uniperceiver_cli.data.formats.jsonl_pairs import JsonlPairsDataset
from uniperceiver_cli.data.formats.karpathy import KarpathyDataset
from uniperceiver_cli.data.options import CocoCaptionsOptions, JsonlPairsOptions, KarpathyOptions
from uniperceiver_cli.data.sampler import SampleKey
from uniperceiver_cli.data.samples import collate_visual_text
from uniperceiver_cli.data.text import EOT_ID
from uniperceiver_cli.data.tokenizer import ClipTokenizer


def _coco(
    tmp_path: Path, annotations: list[dict[str, object]] | None = None
) -> CocoCaptionsOptions:
    write_png(tmp_path / "img" / "val2014" / "a.png", (10, 20, 30))
    write_png(tmp_path / "img" / "b.png", (40, 50, 60))
    data = {
        "images": [
            {"id": 7, "file_path": "val2014", "file_name": "a.png"},
            {"id": 8, "file_name": "b.png"},
            {"id": 9, "file_name": "nocaption.png"},
        ],
        "annotations": annotations
        if annotations is not None
        else [
            {"image_id": 7, "id": 1, "caption": "A red cat."},
            {"image_id": 8, "id": 2, "caption": "a blue dog"},
            {"image_id": 7, "id": 3, "caption": "a cat sitting"},
        ],
    }
    path = tmp_path / "captions_test5k.json"
    path.write_text(json.dumps(data))
    return CocoCaptionsOptions(
        annotation_file=str(path), images_dir=str(tmp_path / "img"), split="test"
    )


def test_coco_eval_serves_all_captions(tmp_path: Path, tok: ClipTokenizer) -> None:
    ds = CocoCaptionsDataset(_coco(tmp_path), tokenizer=tok)
    assert len(ds) == 2  # the uncaptioned image is dropped
    s = ds[0]
    assert s.item_id == 7 and s.captions == ("A red cat.", "a cat sitting")
    assert s.text_ids[0].tolist() == [*tok.encode("A red cat."), EOT_ID]
    assert ds.references() == {7: ["A red cat.", "a cat sitting"], 8: ["a blue dog"]}
    b = collate_visual_text([ds[0], ds[1]])
    assert b.text_owner.tolist() == [0, 0, 1]


def test_coco_train_random_caption_is_seeded(tmp_path: Path, tok: ClipTokenizer) -> None:
    opts = _coco(tmp_path)
    ds = CocoCaptionsDataset(opts, split="train", tokenizer=tok, max_text_len=3)
    picks = {ds[SampleKey(0, seed)].captions for seed in range(30)}
    assert picks == {("A red cat.",), ("a cat sitting",)}
    assert ds[SampleKey(0, 5)].captions == ds[SampleKey(0, 5)].captions
    ids = ds[SampleKey(0, 1)].text_ids[0]
    assert len(ids) == 3 and int(ids[-1]) == EOT_ID  # truncated, EOT kept
    pairs = CocoCaptionsDataset(opts, caption_mode="pairs", tokenizer=tok)
    assert len(pairs) == 3 and [pairs[i].captions[0] for i in range(3)] == [
        "A red cat.",
        "a cat sitting",
        "a blue dog",
    ]


@pytest.mark.parametrize(
    ("annotations", "message"),
    [
        (
            [{"id": 1, "caption": "x"}],
            r"captions_test5k.json: annotations record 0: missing 'image_id'",
        ),
        (
            [{"image_id": 7, "caption": "x"}, {"image_id": 99, "caption": "y"}],
            r"annotations record 1: image_id 99 is not in 'images'",
        ),
        ([{"image_id": 7}], r"annotations record 0: missing 'caption'"),
    ],
)
def test_coco_bad_records(
    tmp_path: Path, annotations: list[dict[str, object]], message: str
) -> None:
    with pytest.raises(DataError, match=message):
        CocoCaptionsDataset(_coco(tmp_path, annotations))


def test_coco_bad_json(tmp_path: Path) -> None:
    bad = tmp_path / "c.json"
    bad.write_text('{"images": [')
    with pytest.raises(DataError, match=r"c.json: not valid JSON \(line 1"):
        CocoCaptionsDataset(CocoCaptionsOptions(annotation_file=str(bad), images_dir=str(tmp_path)))


def _karpathy(tmp_path: Path, restval: bool = True) -> KarpathyOptions:
    write_png(tmp_path / "train2014" / "t.png", (1, 1, 1))
    write_png(tmp_path / "val2014" / "r.png", (2, 2, 2))
    write_png(tmp_path / "val2014" / "v.png", (3, 3, 3))
    images = [
        {"filepath": "train2014", "filename": "t.png", "imgid": 0, "cocoid": 100, "split": "train",
         "sentences": [{"raw": "a train image", "tokens": ["a"]}]},
        {"filepath": "val2014", "filename": "r.png", "imgid": 1, "cocoid": 101, "split": "restval",
         "sentences": [{"tokens": ["restval", "image"]}]},
        {"filepath": "val2014", "filename": "v.png", "imgid": 2, "split": "test",
         "sentences": [{"raw": "one"}, {"raw": "two"}]},
    ]  # fmt: skip
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"dataset": "coco", "images": images}))
    return KarpathyOptions(
        annotation_file=str(path), images_dir=str(tmp_path), restval_as_train=restval
    )


def test_karpathy_splits_and_restval(tmp_path: Path, tok: ClipTokenizer) -> None:
    train = KarpathyDataset(_karpathy(tmp_path), tokenizer=tok)
    assert [it.item_id for it in train.items] == [100, 101]
    assert train.items[1].captions == ("restval image",)
    only_train = KarpathyDataset(_karpathy(tmp_path, restval=False), tokenizer=tok)
    assert len(only_train) == 1
    test = KarpathyDataset(_karpathy(tmp_path), split="test", tokenizer=tok)
    assert test.references() == {2: ["one", "two"]}
    assert torch.allclose(test[0].pixels[:, 0, 0] * 255, torch.full((3,), 3.0))


def test_karpathy_missing_field(tmp_path: Path) -> None:
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(
        json.dumps(
            {"images": [{"filename": "a.jpg", "split": "test", "sentences": []}, {"split": "test"}]}
        )
    )
    with pytest.raises(DataError, match=r"dataset_flickr30k.json: record 1: missing 'filename'"):
        KarpathyDataset(
            KarpathyOptions(annotation_file=str(path), images_dir=str(tmp_path), split="test")
        )


def test_jsonl_pairs_strings_lists_and_words(tmp_path: Path, tok: ClipTokenizer) -> None:
    write_png(tmp_path / "images" / "0.png", (9, 9, 9))
    lines = [
        {"image": "images.zip@/0.png", "caption": "a grey square"},  # zip marker dropped
        {"image": "images/0.png", "caption": ["first caption", "second caption"]},
        {"id": "x7", "image": "images/0.png", "caption": ["grey", "square"]},
    ]
    f = tmp_path / "pairs.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    ds = JsonlPairsDataset(JsonlPairsOptions(file=str(f), split="val"), tokenizer=tok)
    assert [it.captions for it in ds.items] == [
        ("a grey square",),
        ("first caption", "second caption"),
        ("grey", "square"),
    ]
    assert ds[0].pixels.shape == (3, 12, 16)
    words = JsonlPairsDataset(
        JsonlPairsOptions(file=str(f), caption_words=True, split="val"), tokenizer=tok
    )
    assert words.items[2].captions == ("grey square .",) and words.items[2].item_id == "x7"


def test_jsonl_pairs_bad_lines(tmp_path: Path) -> None:
    f = tmp_path / "pairs.jsonl"
    f.write_text('{"image": "a.png", "caption": "x"}\n{"image": "b.png"\n')
    with pytest.raises(DataError, match=r"pairs.jsonl: record 1: not valid JSON"):
        JsonlPairsDataset(JsonlPairsOptions(file=str(f)))
    f.write_text('{"image": "a.png", "caption": "x"}\n{"img": "b.png", "caption": "y"}\n')
    with pytest.raises(DataError, match=r"pairs.jsonl: record 1: missing 'image'"):
        JsonlPairsDataset(JsonlPairsOptions(file=str(f)))
    f.write_text('{"image": "a.png", "caption": 3}\n')
    with pytest.raises(
        DataError, match=r"record 0: 'caption' must be a string or a list of strings"
    ):
        JsonlPairsDataset(JsonlPairsOptions(file=str(f)))
