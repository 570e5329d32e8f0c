"""`uniperceiver data toy --out DIR`, then every written format read back through the real readers
gives the same samples as the in-memory toy world: the same pixels (PNG, lossless), captions,
labels, sentences and questions; mp4 frames within the codec tolerance below."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from uniperceiver_cli.data.build import build_dataset
from uniperceiver_cli.data.formats.coco_captions import CocoCaptionsDataset
from uniperceiver_cli.data.formats.image_folder import ImageFolderDataset
from uniperceiver_cli.data.formats.jsonl_pairs import JsonlPairsDataset
from uniperceiver_cli.data.formats.karpathy import KarpathyDataset
from uniperceiver_cli.data.formats.text_corpus import TextCorpusDataset
from uniperceiver_cli.data.formats.video_captions import VideoCaptionsDataset
from uniperceiver_cli.data.formats.video_classification import VideoClassificationDataset
from uniperceiver_cli.data.formats.vqa import VQADataset
from uniperceiver_cli.data.formats.webdataset import WebDatasetStream
from uniperceiver_cli.data.options import (
    CocoCaptionsOptions,
    ImageFolderOptions,
    JsonlPairsOptions,
    KarpathyOptions,
    TextCorpusOptions,
    ToyOptions,
    VideoCaptionsOptions,
    VideoClassificationOptions,
    WebDatasetOptions,
)
from uniperceiver_cli.data.tokenizer import ClipTokenizer
from uniperceiver_cli.data.toy import MOTIONS, SHAPES, ToyWorld
from uniperceiver_cli.data.video import ClipSpec

SEED = 5
SPLITS = ("train", "val", "test")
#: The toy mp4s are H.264 with full chroma at CRF 0 (lossless in YUV): only the RGB <-> YUV
#: rounding remains. Bounds in grey levels per pixel; measured mean 0.37-0.63, max 2.
MP4_MEAN_TOLERANCE = 1.0
MP4_MAX_TOLERANCE = 4


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    typer_testing = pytest.importorskip("typer.testing")
    from uniperceiver_cli.cli.app import app

    out = tmp_path_factory.mktemp("cli") / "toy"
    result = typer_testing.CliRunner().invoke(
        app,
        ["data", "toy", "--out", str(out), "--seed", str(SEED), "--num-images", "20",
         "--num-videos", "10", "--image-size", "32", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and report["out"] == str(out)
    return {k: Path(v) for k, v in report["paths"].items()}


@pytest.fixture(scope="module")
def world() -> ToyWorld:
    return ToyWorld(SEED, image_size=32, num_frames=16)  # the CLI's defaults


def _split_index(path: Path) -> tuple[str, int]:
    split, number = path.stem.split("_")
    return split, int(number)


def _u8(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels * 255).round().to(torch.uint8)


def test_every_written_path_exists(written: dict[str, Path]) -> None:
    expected = {"images", "image_classes", "karpathy", "shards", "videos", "video_classes"}
    expected |= {"category_mapping", "kinetics_annotations", "vqa_answers"}
    for split in SPLITS:
        expected |= {f"captions_{split}", f"jsonl_{split}", f"vqa_{split}", f"corpus_{split}"}
        expected |= {f"videos_{split}_csv", f"video_captions_{split}"}
    assert expected <= set(written)
    for key, path in written.items():
        assert key == "shards" or path.exists(), key
    assert written["image_classes"].read_text().split() == list(SHAPES)


def test_image_folder_matches_in_memory(written: dict[str, Path], world: ToyWorld) -> None:
    for split, count in zip(SPLITS, (16, 2, 2), strict=True):
        ds = ImageFolderDataset(
            ImageFolderOptions(
                root=str(written["images"]),
                class_names_file=str(written["image_classes"]),
                split=split,
            )
        )
        assert len(ds) == count and ds.class_names == SHAPES
        memory: Any = build_dataset(
            ToyOptions(num_samples=count, image_size=32, seed=SEED),
            task_type="image_classification",
            split=split,
        )
        for k in range(count):
            sample = ds[k]
            s, i = _split_index(ds.items[k][0])
            assert s == split
            image, scene = world.image(i, split)
            assert torch.equal(_u8(sample.pixels), image)  # PNG: pixel for pixel
            assert sample.label == scene.label
            same = memory[i]
            assert torch.equal(sample.pixels, same.pixels) and sample.label == same.label


def _caption_readers(written: dict[str, Path], split: str, tok: ClipTokenizer) -> list[Any]:
    images = str(written["images"])
    return [
        CocoCaptionsDataset(
            CocoCaptionsOptions(
                annotation_file=str(written[f"captions_{split}"]), images_dir=images, split=split
            ),
            tokenizer=tok,
            caption_mode="all",
        ),
        KarpathyDataset(
            KarpathyOptions(
                annotation_file=str(written["karpathy"]), images_dir=images, split=split
            ),
            tokenizer=tok,
            caption_mode="all",
        ),
        JsonlPairsDataset(
            JsonlPairsOptions(file=str(written[f"jsonl_{split}"]), images_dir=images, split=split),
            tokenizer=tok,
            caption_mode="all",
        ),
    ]


def test_caption_formats_match_in_memory(
    written: dict[str, Path], world: ToyWorld, tok: ClipTokenizer
) -> None:
    for split, count in zip(SPLITS, (16, 2, 2), strict=True):
        memory: Any = build_dataset(
            ToyOptions(num_samples=count, image_size=32, seed=SEED),
            task_type="image_caption",
            split=split,
            caption_mode="all",
            tokenizer=tok,
        )
        for reader in _caption_readers(written, split, tok):
            assert len(reader) == count, (type(reader).__name__, split)
            for k in range(count):
                sample = reader[k]
                _, i = _split_index(reader.items[k].path)
                image, scene = world.image(i, split)
                assert torch.equal(_u8(sample.pixels), image)
                assert sample.captions == scene.captions
                same = memory[i]
                assert sample.captions == same.captions
                assert all(
                    torch.equal(a, b) for a, b in zip(sample.text_ids, same.text_ids, strict=True)
                )


def test_webdataset_shards_match_in_memory(
    written: dict[str, Path], world: ToyWorld, tok: ClipTokenizer
) -> None:
    for caption_key in ("txt", "json"):
        stream = WebDatasetStream(
            WebDatasetOptions(shards=str(written["shards"]), caption_key=caption_key, split="val"),
            tokenizer=tok,
        )
        samples = list(stream)
        assert [int(s.item_id) for s in samples] == list(range(16))
        for s in samples:
            image, scene = world.image(int(s.item_id), "train")
            assert torch.equal(_u8(s.pixels), image)
            want = scene.captions[:1] if caption_key == "txt" else scene.captions
            assert s.captions == want


def _check_clip(pixels: torch.Tensor, frames: torch.Tensor) -> None:
    diff = (_u8(pixels).int() - frames.int()).abs()
    assert diff.float().mean() <= MP4_MEAN_TOLERANCE, float(diff.float().mean())
    assert diff.max() <= MP4_MAX_TOLERANCE, int(diff.max())


def test_video_formats_match_in_memory(
    written: dict[str, Path], world: ToyWorld, tok: ClipTokenizer
) -> None:
    every_frame = ClipSpec(num_frames=16, frame_stride=1)  # eval clip from 0, step 1 at 30 fps
    videos = str(written["videos"])
    for split, count in zip(SPLITS, (8, 1, 1), strict=True):
        kinetics = VideoClassificationDataset(
            VideoClassificationOptions(
                layout="kinetics",
                annotation_file=str(written["kinetics_annotations"]),
                videos_dir=videos,
                class_names_file=str(written["category_mapping"]),
                extension=".mp4",
                split=split,
            ),
            clip=every_frame,
        )
        csv = VideoClassificationDataset(
            VideoClassificationOptions(
                annotation_file=str(written[f"videos_{split}_csv"]),
                videos_dir=videos,
                class_names_file=str(written["video_classes"]),
                split=split,
            ),
            clip=every_frame,
            train=False,
        )
        captions = VideoCaptionsDataset(
            VideoCaptionsOptions(
                annotation_file=str(written[f"video_captions_{split}"]),
                videos_dir=videos,
                split=split,
            ),
            clip=every_frame,
            tokenizer=tok,
            caption_mode="all",
            train=False,
        )
        for reader in (kinetics, csv):
            assert len(reader) == count and reader.class_names == tuple(MOTIONS)
            for k in range(count):
                _, i = _split_index(reader.items[k][0])
                frames, scene = world.video(i, split)
                sample = reader[k]
                assert sample.label == scene.label
                _check_clip(sample.pixels, frames)
        assert len(captions) == count
        for k in range(count):
            _, i = _split_index(captions.items[k].path)
            frames, scene = world.video(i, split)
            captioned = captions[k]
            assert captioned.captions == scene.captions
            _check_clip(captioned.pixels, frames)


def test_text_corpus_matches_in_memory(written: dict[str, Path], world: ToyWorld) -> None:
    for split, count in zip(SPLITS, (1600, 200, 200), strict=True):
        corpus = TextCorpusDataset(
            TextCorpusOptions(file=str(written[f"corpus_{split}"]), min_words=8)
        )
        assert len(corpus) == count
        assert all(corpus.line(i) == world.sentence(i, split) for i in range(count))


def test_vqa_matches_in_memory(
    written: dict[str, Path], world: ToyWorld, tok: ClipTokenizer
) -> None:
    assert written["vqa_answers"].read_text().split("\n")[:-1] == list(world.vqa_answers)
    for split, count in zip(SPLITS, (16, 2, 2), strict=True):
        reader = VQADataset(
            JsonlPairsOptions(
                file=str(written[f"vqa_{split}"]),
                images_dir=str(written["images"]),
                answers_file=str(written["vqa_answers"]),
                split=split,
            ),
            tokenizer=tok,
            train=False,
        )
        memory: Any = build_dataset(
            ToyOptions(num_samples=count, image_size=32, seed=SEED),
            task_type="vqa",
            split=split,
            tokenizer=tok,
            train=False,
        )
        assert len(reader) == count and reader.answers == memory.answers
        for i in range(count):
            got, same = reader[i], memory[i]
            q = world.vqa(i, split)
            assert (got.question, got.answers, got.scores) == (q.question, q.answers, q.scores)
            assert torch.equal(_u8(got.pixels), world.image(i, split)[0])
            assert torch.equal(got.pixels, same.pixels) and torch.equal(got.ids, same.ids)
            assert (got.slot, got.target, got.answer_labels) == (
                same.slot,
                same.target,
                same.answer_labels,
            )
