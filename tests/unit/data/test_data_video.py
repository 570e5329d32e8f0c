from __future__ import annotations

import itertools
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from data_media import ramp_video, write_mp4, write_png

from uniperceiver_cli.data.errors import DataError
from uniperceiver_cli.data.formats.video_captions import VideoCaptionsDataset
from uniperceiver_cli.data.formats.video_classification import VideoClassificationDataset
from uniperceiver_cli.data.options import VideoCaptionsOptions, VideoClassificationOptions
from uniperceiver_cli.data.sampler import SampleKey
from uniperceiver_cli.data.tokenizer import ClipTokenizer
from uniperceiver_cli.data.transforms import video_transform
from uniperceiver_cli.data.video import (
    ClipSpec,
    FrameFolderSource,
    PyAVSource,
    TorchCodecSource,
    eval_clip_indices,
    frame_step,
    open_video,
    read_clip,
    resolve_backend,
    torchcodec_problem,
    train_clip_indices,
)

needs_torchcodec = pytest.mark.skipif(
    torchcodec_problem() is not None, reason=f"TorchCodec unavailable: {torchcodec_problem()}"
)


@needs_torchcodec
def test_torchcodec_and_pyav_decode_the_same_frames(tmp_path: Path) -> None:
    path = write_mp4(tmp_path / "v.mp4", num_frames=12, size=32, fps=24.0)
    tc, pa = TorchCodecSource(path), PyAVSource(path)
    assert tc.num_frames == pa.num_frames == 12
    assert tc.fps == pytest.approx(24.0) and pa.fps == pytest.approx(24.0)
    idx = [7, 0, 7, 11, 3]
    a, b = tc.get_frames(idx), pa.get_frames(idx)
    assert a.shape == (5, 3, 32, 32) and a.dtype == torch.uint8
    assert torch.equal(a, b)
    brightness = a.float().mean((1, 2, 3))
    expected = ramp_video(12)[idx].float().mean((1, 2, 3))
    assert torch.allclose(brightness, expected, atol=4.0)  # lossy coding keeps the ramp
    with pytest.raises(DataError, match=r"outside 0\.\.11"):
        tc.get_frames([12])


def test_fallback_to_pyav_when_torchcodec_import_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)
    assert torchcodec_problem() is not None
    with caplog.at_level(logging.WARNING):
        assert resolve_backend("auto") == "pyav"
    notices = [r for r in caplog.records if "PyAV" in r.getMessage()]
    assert len(notices) == 1 and "\n" not in notices[0].getMessage()
    with pytest.raises(DataError, match="'torchcodec' is unavailable"):
        resolve_backend("torchcodec")
    path = write_mp4(tmp_path / "v.mp4", num_frames=6)
    src = open_video(path, resolve_backend("auto"))
    assert isinstance(src, PyAVSource) and src.get_frames([5]).shape == (1, 3, 32, 32)


def test_frame_folder_source(tmp_path: Path) -> None:
    for t in range(5):
        write_png(tmp_path / "clip" / f"{t:04d}.png", (t * 50, 0, 0), size=(8, 10))
    src = open_video(tmp_path / "clip", "torchcodec")  # folders always read as frames
    assert isinstance(src, FrameFolderSource) and src.num_frames == 5 and src.fps == 30.0
    assert src.get_frames([4, 1])[:, 0, 0, 0].tolist() == [200, 50]
    with pytest.raises(DataError, match="frame folder holds no image files"):
        (tmp_path / "empty").mkdir()
        FrameFolderSource(tmp_path / "empty")


@pytest.mark.parametrize("backend", ["torchcodec", "pyav"])
def test_missing_and_corrupt_video_name_the_file(tmp_path: Path, backend: str) -> None:
    if backend == "torchcodec" and torchcodec_problem() is not None:
        pytest.skip("TorchCodec unavailable")
    with pytest.raises(DataError, match=r"nope\.mp4: video file not found"):
        open_video(tmp_path / "nope.mp4", backend)  # type: ignore[arg-type]
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42 definitely not a video" * 4)
    with pytest.raises(DataError, match=r"bad\.mp4: cannot open video"):
        open_video(bad, backend)  # type: ignore[arg-type]


def test_frame_sampling_rules() -> None:
    assert frame_step(32, 30.0) == 32 and frame_step(32, 15.0) == 16 and frame_step(2, 5.0) == 1
    g = torch.Generator().manual_seed(0)
    starts = set()
    for _ in range(200):
        idx = train_clip_indices(100, 4, 10.0, generator=g)
        assert [b - a for a, b in itertools.pairwise(idx)] == [10, 10, 10]
        starts.add(idx[0])
    assert min(starts) == 0 and max(starts) == 68  # start in [0, 100 - 31)
    assert train_clip_indices(10, 4, 4.0) == [0, 4, 8, 2]  # too short: start 0, wrap modulo
    assert eval_clip_indices(100, 4, 10.0) == [[0, 10, 20, 30]]
    assert eval_clip_indices(100, 2, 10.0, views=3) == [[0, 10], [44, 54], [89, 99]]
    inter = eval_clip_indices(300, 8, 32.0, views=4, mode="interleaved")
    assert inter[0][:2] == [0, 32] and inter[1][:2] == [8, 40] and inter[3][-1] == 248


class _FakeSource:
    num_frames = 40
    fps = 30.0

    def get_frames(self, indices: Sequence[int]) -> torch.Tensor:
        out = torch.zeros(len(indices), 3, 24, 36, dtype=torch.uint8)
        for k, i in enumerate(indices):
            out[k] = i
        return out

    def close(self) -> None:
        pass


def test_read_clip_views_and_shapes() -> None:
    spec = ClipSpec(num_frames=4, frame_stride=8, temporal_views=2, spatial_crops=3)
    tf = video_transform(16, train=False, num_spatial_crops=3)
    views = read_clip(_FakeSource(), spec, train=False, transform=tf)
    assert views.shape == (6, 4, 3, 16, 16)
    frame_value = ((views[:, :, 0, 0, 0] * 0.5 + 0.5) * 255).round()
    assert frame_value[0].tolist() == [0, 8, 16, 24] and frame_value[3].tolist() == [15, 23, 31, 39]
    train = read_clip(_FakeSource(), spec, train=True, transform=video_transform(16, train=True))
    assert train.shape == (4, 3, 16, 16)


def _kinetics(tmp_path: Path) -> VideoClassificationOptions:
    root = tmp_path / "k"
    write_mp4(root / "training" / "playing_chess" / "a.mp4", num_frames=8)
    write_mp4(root / "training" / "juggling" / "b.mp4", num_frames=8)
    write_mp4(root / "validation" / "juggling" / "c.mp4", num_frames=8)
    db = {
        "a": {"subset": "training", "annotations": {"label": "playing_chess"}},
        "b": {"subset": "training", "annotations": {"label": "juggling"}},
        "c": {"subset": "validation", "annotations": {"label": "juggling"}},
    }
    (root / "annotation.json").write_text(json.dumps({"database": db}))
    (root / "category_mapping.txt").write_text("juggling\t0\nplaying chess\t1\n")
    return VideoClassificationOptions(
        layout="kinetics",
        annotation_file=str(root / "annotation.json"),
        videos_dir=str(root),
        class_names_file=str(root / "category_mapping.txt"),
        extension=".mp4",
    )


def test_kinetics_layout(tmp_path: Path) -> None:
    opts = _kinetics(tmp_path)
    train = VideoClassificationDataset(opts, clip=ClipSpec(num_frames=2, frame_stride=30))
    assert train.class_names == ("juggling", "playing chess")
    assert [lab for _, lab in train.items] == [1, 0]
    s = train[SampleKey(0, 3)]
    assert s.pixels.shape == (2, 3, 32, 32) and s.label == 1
    assert torch.equal(s.pixels, train[SampleKey(0, 3)].pixels)
    val = VideoClassificationDataset(
        opts,
        split="val",
        transform=video_transform(16, train=False, num_spatial_crops=3),
        clip=ClipSpec(num_frames=2, frame_stride=30, spatial_crops=3),
    )
    assert len(val) == 1 and val[0].pixels.shape == (3, 2, 3, 16, 16)


def test_video_csv_layout_and_errors(tmp_path: Path) -> None:
    write_mp4(tmp_path / "v" / "x.mp4", num_frames=6)
    csv = tmp_path / "train.csv"
    csv.write_text("path,label\nv/x.mp4,Moving Left\nv/x.mp4,moving_right\n")
    names = tmp_path / "classes.txt"
    names.write_text("moving left\nmoving right\n")
    opts = VideoClassificationOptions(
        annotation_file=str(csv), videos_dir=str(tmp_path), class_names_file=str(names)
    )
    ds = VideoClassificationDataset(opts, clip=ClipSpec(num_frames=3, frame_stride=30))
    assert [lab for _, lab in ds.items] == [0, 1] and ds[0].pixels.shape == (3, 3, 32, 32)
    csv.write_text("v/x.mp4,jumping\n")
    with pytest.raises(DataError, match=r"train.csv: record 0: unknown class 'jumping'"):
        VideoClassificationDataset(opts)
    csv.write_text("v/missing.mp4,moving left\n")
    with pytest.raises(DataError, match=r"missing\.mp4: video file not found"):
        VideoClassificationDataset(opts)[0]


def test_video_captions_reader(tmp_path: Path, tok: ClipTokenizer) -> None:
    write_mp4(tmp_path / "clips" / "vid1.mp4", num_frames=10)
    data = {
        "images": [{"id": 1, "file_name": "vid1"}],
        "annotations": [
            {"image_id": 1, "caption": "a man is cooking"},
            {"image_id": 1, "caption": "cooking"},
        ],
    }
    ann = tmp_path / "caption_msvd_test_cocostyle.json"
    ann.write_text(json.dumps(data))
    opts = VideoCaptionsOptions(
        annotation_file=str(ann), videos_dir=str(tmp_path / "clips"), split="test"
    )
    ds = VideoCaptionsDataset(opts, clip=ClipSpec(num_frames=4, frame_stride=2), tokenizer=tok)
    s = ds[0]
    assert s.pixels.shape == (4, 3, 32, 32) and s.captions == ("a man is cooking", "cooking")
    # Eval clips start at frame 0; stride 2 at 30 fps on a 30 fps video = frames 0, 2, 4, 6.
    assert (
        (s.pixels[:, 0, 0, 0] * 255).round() - ramp_video(10)[[0, 2, 4, 6], 0, 0, 0].float()
    ).abs().max() < 8
    pairs = VideoCaptionsDataset(
        opts, caption_mode="pairs", tokenizer=tok, clip=ClipSpec(num_frames=2)
    )
    assert len(pairs) == 2
