"""Bad data: broken media is skipped, counted, named and limited; malformed annotations fail fast.

Two small datasets hold broken items among good ones:

* images (`coco_captions`): a corrupt JPEG (position 3) and a missing file (position 8) among 12;
* videos (`video_classification`): an mp4 cut in half (its index at the end: fails to open,
  position 2), an mp4 cut at 60% with its index first (opens, fails to decode, position 5) and a
  missing mp4 (position 8) among 10.

With `on_error: skip` the loaders go on, each skipped item is named in a warning, the batches carry
the skips to the main process (also from DataLoader workers) where a `BadDataMonitor` counts them
exactly, and past `max_bad_fraction` the run stops with a `DataError`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from data_media import truncate, write_faststart_mp4, write_jpeg, write_mp4, write_png

from uniperceiver_cli.data.build import bad_data_monitor, build_loader
from uniperceiver_cli.data.errors import DataError
from uniperceiver_cli.data.formats.captions import parse_coco_captions
from uniperceiver_cli.data.formats.coco_captions import CocoCaptionsDataset
from uniperceiver_cli.data.formats.video_classification import VideoClassificationDataset
from uniperceiver_cli.data.health import BadDataMonitor, SkippedItem
from uniperceiver_cli.data.options import CocoCaptionsOptions, VideoClassificationOptions
from uniperceiver_cli.data.tokenizer import ClipTokenizer
from uniperceiver_cli.data.video import ClipSpec, torchcodec_problem

IMAGE_BAD = {3: "corrupt.jpg", 8: "missing.jpg"}
VIDEO_BAD = {2: "cut.mp4", 5: "cut_faststart.mp4", 8: "missing.mp4"}


def _images(tmp_path: Path, **kwargs: object) -> CocoCaptionsOptions:
    root = tmp_path / "img"
    images, annotations = [], []
    for i in range(12):
        if i == 3:
            name = "corrupt.jpg"  # a JPEG header followed by garbage
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF" + bytes(range(256)) * 4)
        elif i == 8:
            name = "missing.jpg"  # listed in the JSON, absent on disk
        elif i % 2:
            name = f"good{i}.jpg"
            write_jpeg(root / name, (20 * i, 0, 0))
        else:
            name = f"good{i}.png"
            write_png(root / name, (0, 20 * i, 0), size=(16, 16))
        images.append({"id": i, "file_name": name})
        annotations.append({"image_id": i, "id": i, "caption": f"picture number {i}"})
    ann = tmp_path / "captions_val.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations}))
    return CocoCaptionsOptions(
        annotation_file=str(ann),
        images_dir=str(root),
        split="val",
        **kwargs,  # type: ignore[arg-type]
    )


def _videos(tmp_path: Path, **kwargs: object) -> VideoClassificationOptions:
    root = tmp_path / "vid"
    rows = ["path,label"]
    for i in range(10):
        label = "up" if i % 2 else "down"
        if i == 2:
            name = "cut.mp4"
            truncate(write_mp4(root / name, num_frames=12))
        elif i == 5:
            name = "cut_faststart.mp4"
            truncate(write_faststart_mp4(root / name, num_frames=30), 0.6)
        elif i == 8:
            name = "missing.mp4"
        else:
            name = f"good{i}.mp4"
            write_mp4(root / name, num_frames=12)
        rows.append(f"{name},{label}")
    csv = tmp_path / "videos.csv"
    csv.write_text("\n".join(rows) + "\n")
    return VideoClassificationOptions(
        annotation_file=str(csv),
        videos_dir=str(root),
        split="val",
        **kwargs,  # type: ignore[arg-type]
    )


def _names(items: tuple[SkippedItem, ...] | list[SkippedItem]) -> set[str]:
    return {Path(s.name).name for s in items}


@pytest.mark.parametrize("workers", [0, 2])
def test_broken_images_are_skipped_counted_and_named(
    tmp_path: Path, tok: ClipTokenizer, caplog: pytest.LogCaptureFixture, workers: int
) -> None:
    ds = CocoCaptionsDataset(
        _images(tmp_path, on_error="skip", max_bad_fraction=0.25), tokenizer=tok
    )
    monitor = bad_data_monitor(ds)
    assert monitor.dataset_size == 12 and monitor.max_bad_fraction == 0.25
    loader = build_loader(ds, batch_size=4, train=False, num_workers=workers)
    with caplog.at_level(logging.WARNING):
        batches = list(monitor.watch(loader))
    positions = torch.cat([b.indices for b in batches]).tolist()
    # One pass goes on past the broken items: each is replaced by the next position.
    assert len(positions) == 12
    assert positions == [0, 1, 2, 4, 4, 5, 6, 7, 9, 9, 10, 11]
    assert monitor.served == 12 and monitor.events == 2 and monitor.distinct_bad == 2
    assert _names(list(monitor.items.values())) == set(IMAGE_BAD.values())
    by_name = {Path(s.name).name: s.reason for s in monitor.items.values()}
    assert "cannot decode image" in by_name["corrupt.jpg"]
    assert "image file not found" in by_name["missing.jpg"]
    # Warnings in the main process name each file, and so does the summary.
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for name in IMAGE_BAD.values():
        assert any(name in w and "skipped broken item" in w for w in warnings), name
    summary = [w for w in warnings if w.startswith("bad-data summary")]
    assert len(summary) == 1
    assert "12 samples served, 2 skips of 2 distinct broken items" in summary[0]
    assert "corrupt.jpg" in summary[0] and "missing.jpg" in summary[0]
    assert monitor.summary()["bad_files"][0]["name"].endswith("corrupt.jpg")


def test_skips_repeat_per_epoch_but_count_once_with_workers(
    tmp_path: Path, tok: ClipTokenizer
) -> None:
    ds = CocoCaptionsDataset(
        _images(tmp_path, on_error="skip", max_bad_fraction=0.25), tokenizer=tok
    )
    monitor = bad_data_monitor(ds, "coco")
    loader = build_loader(ds, batch_size=4, train=True, seed=5, num_workers=2)
    it = monitor.watch(loader)
    for _ in range(6):  # 24 samples = 2 epochs of 12: each broken item drawn twice
        next(it)
    assert monitor.served == 24 and monitor.events == 4 and monitor.distinct_bad == 2
    assert _names(list(monitor.items.values())) == set(IMAGE_BAD.values())


@pytest.mark.parametrize(("workers", "decoder"), [(0, "pyav"), (2, "auto"), (0, "torchcodec")])
def test_truncated_and_missing_videos_are_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, workers: int, decoder: str
) -> None:
    if decoder != "pyav" and torchcodec_problem() is not None:
        pytest.skip("TorchCodec unavailable")
    opts = _videos(tmp_path, on_error="skip", max_bad_fraction=0.3, decoder=decoder)
    ds = VideoClassificationDataset(opts, clip=ClipSpec(num_frames=4, frame_stride=60))
    monitor = bad_data_monitor(ds)
    loader = build_loader(ds, batch_size=5, train=False, num_workers=workers)
    with caplog.at_level(logging.WARNING):
        batches = list(monitor.watch(loader))
    positions = torch.cat([b.indices for b in batches]).tolist()
    assert positions == [0, 1, 3, 3, 4, 6, 6, 7, 9, 9]
    assert all(b.pixels.shape[1:] == (4, 3, 32, 32) for b in batches)
    assert monitor.served == 10 and monitor.events == 3 and monitor.distinct_bad == 3
    by_name = {Path(s.name).name: s.reason for s in monitor.items.values()}
    assert set(by_name) == set(VIDEO_BAD.values())
    assert "cannot open video" in by_name["cut.mp4"]
    assert "cannot decode frames" in by_name["cut_faststart.mp4"]
    assert "video file not found" in by_name["missing.mp4"]
    text = caplog.text
    assert all(name in text for name in VIDEO_BAD.values())


def test_past_max_bad_fraction_the_run_stops(tmp_path: Path, tok: ClipTokenizer) -> None:
    # Default limit 1%: the first broken item of 12 (8%) stops the run, in a worker too.
    strict = CocoCaptionsDataset(_images(tmp_path, on_error="skip"), tokenizer=tok)
    assert strict.max_bad_fraction == 0.01
    with pytest.raises(DataError, match=r"1 of 12 items are broken .*above max_bad_fraction"):
        list(build_loader(strict, batch_size=4, train=False, num_workers=0))
    with pytest.raises(DataError, match=r"corrupt\.jpg.*raise max_bad_fraction"):
        list(build_loader(strict, batch_size=4, train=False, num_workers=2))
    # The main-process monitor holds the exact count over workers to its own limit.
    lenient = CocoCaptionsDataset(
        _images(tmp_path, on_error="skip", max_bad_fraction=1.0), tokenizer=tok
    )
    monitor = BadDataMonitor("coco val", max_bad_fraction=0.1, dataset_size=12)
    loader = build_loader(lenient, batch_size=4, train=False, num_workers=2)
    with pytest.raises(DataError, match=r"coco val: 2 of 12 items are broken \(16\.67%\)"):
        list(monitor.watch(loader))
    # raise: the first broken item stops the run, naming the file.
    raising = CocoCaptionsDataset(_images(tmp_path), tokenizer=tok)
    with pytest.raises(DataError, match=r"corrupt\.jpg: cannot decode image"):
        list(build_loader(raising, batch_size=4, train=False))


def test_stream_monitor_judges_the_fraction_of_records_read() -> None:
    class FakeBatch:
        def __init__(self, n: int, skipped: tuple[SkippedItem, ...] = ()) -> None:
            self.batch_size = n
            self.skipped = skipped

    item = SkippedItem(source="shards", key="s0:k1", name="s0: k1", reason="s0: member k1.jpg")
    monitor = BadDataMonitor("web", max_bad_fraction=0.05, min_seen=100)
    monitor.update(FakeBatch(10, (item,)))  # 1 of 11 read: not judged before 100 records
    for _ in range(9):
        monitor.update(FakeBatch(10))
    assert monitor.served == 100 and monitor.events == 1
    other = SkippedItem(source="shards", key="s0:k2", name="s0: k2", reason="bad")
    for _ in range(4):
        monitor.update(FakeBatch(1, (other,)))  # the same item met again counts as an event
    assert monitor.distinct_bad == 2 and monitor.events == 5  # 5 of 109 read: 4.6% <= 5%
    with pytest.raises(DataError, match=r"web: 6 of 111 items are broken \(5\.41%\)"):
        monitor.update(FakeBatch(1, (other,)))
    with pytest.raises(ValueError, match="between 0 and 1"):
        BadDataMonitor("x", max_bad_fraction=1.5)


def _coco(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "captions_bad.json"
    path.write_text(json.dumps(data))
    return path


def test_malformed_coco_json_names_file_record_and_field(tmp_path: Path) -> None:
    good_images = [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}]
    cases = [
        (
            {"images": good_images, "annotations": [{"image_id": 1, "caption": "ok"},
                                                    {"image_id": 2, "caption": "ok"},
                                                    {"image_id": 2, "caption": 5}]},
            r"captions_bad\.json: annotations record 2: 'caption' must be a string, found int 5",
        ),
        (
            {"images": [good_images[0], {"id": 2, "filename": "b.jpg"}], "annotations": []},
            r"captions_bad\.json: images record 1: missing 'file_name'",
        ),
        (
            {"images": good_images, "annotations": [{"image_id": [1], "caption": "x"}]},
            r"annotations record 0: 'image_id' must be an integer or a string, found list",
        ),
        (
            {"images": good_images, "annotations": [{"image_id": 3, "caption": "x"}]},
            r"annotations record 0: image_id 3 is not in 'images'",
        ),
        (
            {"images": good_images, "annotations": [{"caption": "x"}]},
            r"annotations record 0: missing 'image_id'",
        ),
        (
            {"images": [{"id": 1.5, "file_name": "a.jpg"}], "annotations": []},
            r"images record 0: 'id' must be an integer or a string, found float",
        ),
        (
            {"images": [{"id": 1, "file_name": ""}], "annotations": []},
            r"images record 0 \(id 1\): 'file_name' must be a non-empty string",
        ),
        (
            {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}],
             "annotations": []},
            r"images record 1: id 1 already names .*a\.jpg",
        ),
        ({"images": {}, "annotations": []}, r"'images' must be a list, found dict"),
        ([1, 2], r"expected a COCO-style object with 'images' and 'annotations'"),
    ]  # fmt: skip
    for data, message in cases:
        with pytest.raises(DataError, match=message):
            parse_coco_captions(_coco(tmp_path, data), tmp_path)
    (tmp_path / "broken.json").write_text('{"images": [}')
    with pytest.raises(DataError, match=r"broken\.json: not valid JSON \(line 1, column 13"):
        parse_coco_captions(tmp_path / "broken.json", tmp_path)


def test_multi_task_stream_accounts_bad_data_per_task(
    tmp_path: Path, tok: ClipTokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    from uniperceiver_cli.data.build import MultiTaskStream, build_dataset
    from uniperceiver_cli.data.options import ToyOptions
    from uniperceiver_cli.data.sampler import TaskSampler

    coco = CocoCaptionsDataset(
        _images(tmp_path, on_error="skip", max_bad_fraction=0.25), tokenizer=tok
    )
    toy = build_dataset(ToyOptions(num_samples=8, image_size=8), task_type="image_classification")
    loaders = {
        "cap": build_loader(coco, batch_size=4, train=True, seed=1, num_workers=2),
        "cls": build_loader(toy, batch_size=4, train=True, seed=1),
    }
    monitors = {"cap": bad_data_monitor(coco, "cap"), "cls": bad_data_monitor(toy, "cls")}
    stream = MultiTaskStream(
        loaders, TaskSampler({"cap": 1.0, "cls": 1.0}, seed=3), {"cap": 4, "cls": 4}, monitors
    )
    tasks = []
    while stream.consumed["cap"] < 24:  # two epochs of the caption data
        task, _ = next(stream)
        tasks.append(task)
    assert monitors["cap"].served == 24 and monitors["cap"].distinct_bad == 2
    assert monitors["cap"].events == 4 and monitors["cls"].events == 0
    assert monitors["cls"].served == 4 * tasks.count("cls")
    with caplog.at_level(logging.INFO):
        stream.log_bad_data_summary()
    assert "cap: 24 samples served, 4 skips of 2 distinct broken items" in caplog.text
    assert "cls: " in caplog.text and "0 skips of 0 distinct" in caplog.text
