from __future__ import annotations

import json
from pathlib import Path

import torch

from uniperceiver_cli.data.build import build_dataset, build_loader
from uniperceiver_cli.data.formats.coco_captions import CocoCaptionsDataset
from uniperceiver_cli.data.formats.image_folder import ImageFolderDataset
from uniperceiver_cli.data.formats.karpathy import KarpathyDataset
from uniperceiver_cli.data.formats.text_corpus import TextCorpusDataset
from uniperceiver_cli.data.formats.video_captions import VideoCaptionsDataset
from uniperceiver_cli.data.formats.video_classification import VideoClassificationDataset
from uniperceiver_cli.data.options import (
    CocoCaptionsOptions,
    ImageFolderOptions,
    KarpathyOptions,
    TextCorpusOptions,
    ToyOptions,
    VideoCaptionsOptions,
    VideoClassificationOptions,
)
from uniperceiver_cli.data.samples import ClassificationBatch, MLMBatch, TextClassificationBatch
from uniperceiver_cli.data.tokenizer import ClipTokenizer
from uniperceiver_cli.data.toy import COLOURS, SHAPES, SIZES, ToyWorld
from uniperceiver_cli.data.toy_files import ToyWorldSummary, write_toy_world
from uniperceiver_cli.data.video import ClipSpec


def test_toy_world_is_deterministic_by_seed() -> None:
    a, b, c = ToyWorld(1), ToyWorld(1), ToyWorld(2)
    img_a, scene_a = a.image(5)
    img_b, scene_b = b.image(5)
    assert torch.equal(img_a, img_b) and scene_a == scene_b
    assert img_a.shape == (3, 32, 32) and img_a.dtype == torch.uint8
    assert any(not torch.equal(a.image(i)[0], c.image(i)[0]) for i in range(5))
    assert not torch.equal(a.image(0, "train")[0], a.image(0, "val")[0])
    vid_a, _ = a.video(3, num_frames=6)
    assert vid_a.shape == (6, 3, 32, 32) and torch.equal(vid_a, b.video(3, num_frames=6)[0])
    assert a.sentence(4) == b.sentence(4)


def test_toy_images_show_the_labelled_shape_in_its_colour() -> None:
    w = ToyWorld(0, image_size=48)
    for i in range(20):
        img, scene = w.image(i)
        rgb = torch.tensor(COLOURS[scene.colour]).view(3, 1, 1)
        close = ((img.to(torch.int64) - rgb).abs().sum(0) <= 45).float().mean()
        assert close > 0.01, (i, scene)  # the shape's colour covers part of the image
        assert scene.shape in scene.captions[0] or scene.colour in scene.captions[0]


def test_toy_video_shape_moves_in_the_labelled_direction() -> None:
    w = ToyWorld(0, image_size=32, num_frames=8)
    for i in range(12):
        frames, scene = w.video(i)
        rgb = torch.tensor(COLOURS[scene.colour]).view(1, 3, 1, 1)
        mask = ((frames.to(torch.int64) - rgb).abs().sum(1) <= 45).float()  # (T, S, S)
        ys = torch.arange(32).float().view(1, 32, 1)
        xs = torch.arange(32).float().view(1, 1, 32)
        area = mask.sum((1, 2)).clamp(min=1)
        cy, cx = (mask * ys).sum((1, 2)) / area, (mask * xs).sum((1, 2)) / area
        dy, dx = float(cy[-1] - cy[0]), float(cx[-1] - cx[0])
        expect = {
            "moving left": dx < -3,
            "moving right": dx > 3,
            "moving up": dy < -3,
            "moving down": dy > 3,
        }
        assert expect[scene.motion], (scene.motion, dy, dx)


def test_image_and_video_captions_share_words() -> None:
    w = ToyWorld(0)
    image_words = {word for i in range(50) for c in w.image_scene(i).captions for word in c.split()}
    video_words = {word for i in range(50) for c in w.video_scene(i).captions for word in c.split()}
    assert set(SHAPES) | set(COLOURS) | set(SIZES) <= image_words & video_words


def test_write_toy_world_reads_back_through_real_readers(
    toy_dir: ToyWorldSummary, tok: ClipTokenizer
) -> None:
    p = toy_dir.paths
    assert toy_dir.num_images == {"train": 32, "val": 4, "test": 4}
    folder = ImageFolderDataset(
        ImageFolderOptions(root=str(p["images"]), class_names_file=str(p["image_classes"]))
    )
    assert len(folder) == 32 and folder.class_names == SHAPES
    world = ToyWorld(3, image_size=32)
    sample = folder[0]
    # The first image of the "circle" folder is a train image rendered as a circle, pixel for pixel.
    name = folder.items[0][0].stem
    img, scene = world.image(int(name.split("_")[1]), "train")
    assert scene.shape == folder.folders[sample.label]
    assert torch.equal((sample.pixels * 255).round().to(torch.uint8), img)

    coco = CocoCaptionsDataset(
        CocoCaptionsOptions(
            annotation_file=str(p["captions_test"]), images_dir=str(p["images"]), split="test"
        ),
        tokenizer=tok,
    )
    refs = coco.references()
    assert len(refs) == 4 and all(3 <= len(c) <= 5 for c in refs.values())
    assert coco[0].captions == tuple(refs[coco[0].item_id])

    karpathy = KarpathyDataset(
        KarpathyOptions(
            annotation_file=str(p["karpathy"]), images_dir=str(p["images"]), split="val"
        ),
        tokenizer=tok,
    )
    assert len(karpathy) == 4

    videos = VideoClassificationDataset(
        VideoClassificationOptions(
            layout="kinetics",
            annotation_file=str(p["kinetics_annotations"]),
            videos_dir=str(p["videos"]),
            class_names_file=str(p["category_mapping"]),
            extension=".mp4",
        ),
        clip=ClipSpec(num_frames=4, frame_stride=4),
    )
    assert len(videos) == toy_dir.num_videos["train"]
    assert videos.class_names == toy_dir.video_classes
    v = videos[0]
    assert v.pixels.shape == (4, 3, 32, 32)
    assert (
        v.label
        == ToyWorld(3).video_scene(int(videos.items[0][0].stem.split("_")[1]), "train").label
    )

    vcap = VideoCaptionsDataset(
        VideoCaptionsOptions(
            annotation_file=str(p["video_captions_val"]), videos_dir=str(p["videos"]), split="val"
        ),
        clip=ClipSpec(num_frames=2, frame_stride=8),
        tokenizer=tok,
    )
    assert len(vcap) == toy_dir.num_videos["val"] and vcap[0].pixels.shape == (2, 3, 32, 32)

    corpus = TextCorpusDataset(
        TextCorpusOptions(file=str(p["corpus_train"]), min_words=20), tokenizer=tok
    )
    assert len(corpus) == 48
    assert corpus.line(0) == ToyWorld(3).sentence(0, "train")

    shards = json.loads(p["karpathy"].read_text())["images"]
    assert {r["split"] for r in shards} == {"train", "val", "test"}


def test_write_toy_world_is_deterministic(tmp_path: Path) -> None:
    a = write_toy_world(tmp_path / "a", seed=9, num_images=10, num_videos=3, num_sentences=10)
    b = write_toy_world(tmp_path / "b", seed=9, num_images=10, num_videos=3, num_sentences=10)
    for key in ("captions_train", "video_captions_train", "corpus_train", "videos_train_csv"):
        assert a.paths[key].read_bytes() == b.paths[key].read_bytes()
    pngs_a = sorted((tmp_path / "a" / "images").rglob("*.png"))
    assert [x.read_bytes() for x in pngs_a] == [
        (tmp_path / "b" / x.relative_to(tmp_path / "a")).read_bytes() for x in pngs_a
    ]


def test_in_memory_toy_serves_every_task(tok: ClipTokenizer) -> None:
    opts = ToyOptions(num_samples=8, image_size=32, num_frames=6)
    cls = build_dataset(opts, task_type="image_classification", image_size=32, tokenizer=tok)
    batch = next(iter(build_loader(cls, batch_size=4, train=True, seed=0)))
    assert isinstance(batch, ClassificationBatch) and batch.pixels.shape == (4, 3, 32, 32)
    vid = build_dataset(
        opts.__class__(num_samples=8, split="val"),
        task_type="video_classification",
        image_size=32,
        clip=ClipSpec(num_frames=3, temporal_views=2, spatial_crops=3),
    )
    assert vid[0].pixels.shape == (6, 3, 3, 32, 32)
    mlm = build_dataset(opts, task_type="mlm", tokenizer=tok, max_text_len=24)
    mb = next(iter(build_loader(mlm, batch_size=2, train=True)))
    assert isinstance(mb, MLMBatch) and mb.ids.shape == (2, 24) and (mb.labels >= 0).any()
    pair = build_dataset(opts, task_type="text_classification", tokenizer=tok, max_text_len=40)
    pb = next(iter(build_loader(pair, batch_size=4, train=False)))
    assert isinstance(pb, TextClassificationBatch)
    assert (pb.ids[torch.arange(4), pb.slots] == 49410).all()
