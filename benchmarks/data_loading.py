"""Data-loading benchmark: TorchCodec vs PyAV clip sampling, and the image pipeline's images/s.

Everything runs on a toy world written to a temporary folder (or `--out`), in one process, with
baseline and candidate interleaved so machine drift hits both alike (PERF.md). Printed numbers are
medians over `--repeats` rounds and ratios against the baseline measured in the same run.

    python benchmarks/data_loading.py                      # defaults: 24 videos of 64 px, 48 frames
    python benchmarks/data_loading.py --size 128 --frames 96 --videos 16 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from uniperceiver_cli.data.formats.image_folder import ImageFolderDataset
from uniperceiver_cli.data.options import ImageFolderOptions
from uniperceiver_cli.data.sampler import SampleKey
from uniperceiver_cli.data.toy_files import write_toy_world
from uniperceiver_cli.data.transforms import caption_transform, classification_transform
from uniperceiver_cli.data.video import (
    ClipSpec,
    PyAVSource,
    TorchCodecSource,
    VideoSource,
    eval_clip_indices,
    frame_step,
    torchcodec_problem,
)


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_video(videos: list[Path], clip: ClipSpec, repeats: int) -> None:
    """Open every video and decode one evaluation clip with each backend."""

    def run(open_source: Callable[[Path], VideoSource]) -> Callable[[], None]:
        def go() -> None:
            for path in videos:
                src = open_source(path)
                step = frame_step(clip.frame_stride, src.fps)
                idx = eval_clip_indices(src.num_frames, clip.num_frames, step)[0]
                src.get_frames(idx)
                src.close()

        return go

    backends: dict[str, Callable[[Path], VideoSource]] = {"pyav": PyAVSource}
    problem = torchcodec_problem()
    if problem is None:
        backends["torchcodec"] = TorchCodecSource
    else:
        print(f"TorchCodec unavailable ({problem}); timing PyAV only")
    timings: dict[str, list[float]] = {name: [] for name in backends}
    for make in backends.values():  # warm-up
        run(make)()
    for _ in range(repeats):  # interleaved rounds
        for name, make in backends.items():
            timings[name].append(_median_time(run(make), 1))
    per_clip = {k: statistics.median(v) / len(videos) * 1e3 for k, v in timings.items()}
    print(f"\nvideo: {len(videos)} clips of T={clip.num_frames}, stride {clip.frame_stride}")
    for name, ms in per_clip.items():
        print(f"  {name:<11} {ms:8.2f} ms/clip")
    if "torchcodec" in per_clip:
        ratio = per_clip["pyav"] / per_clip["torchcodec"]
        print(f"  TorchCodec speed-up over PyAV (baseline): {ratio:.2f}x")


def bench_images(root: Path, size: int, repeats: int) -> None:
    """Images/s of decoding alone (baseline) and of the caption and classification pipelines."""
    opts = ImageFolderOptions(root=str(root), split="train")
    variants: dict[str, ImageFolderDataset] = {
        "decode only": ImageFolderDataset(opts),
        "caption train": ImageFolderDataset(opts, transform=caption_transform(size, train=True)),
        "cls eval": ImageFolderDataset(opts, transform=classification_transform(size, train=False)),
        "cls train": ImageFolderDataset(opts, transform=classification_transform(size, train=True)),
    }
    n = len(variants["decode only"])

    def plain(ds: ImageFolderDataset) -> Callable[[], None]:
        def go() -> None:
            for i in range(n):
                ds[i]

        return go

    def keyed(ds: ImageFolderDataset) -> Callable[[], None]:
        def go() -> None:
            for i in range(n):
                ds[SampleKey(i, i)]

        return go

    runs: dict[str, Callable[[], None]] = {name: plain(ds) for name, ds in variants.items()}
    runs["cls train, seeded keys"] = keyed(variants["cls train"])
    timings: dict[str, list[float]] = {name: [] for name in runs}
    for fn in runs.values():
        fn()
    for _ in range(repeats):
        for name, fn in runs.items():
            timings[name].append(_median_time(fn, 1))
    base = statistics.median(timings["decode only"])
    print(f"\nimages: {n} PNGs -> {size} px")
    for name, ts in timings.items():
        t = statistics.median(ts)
        print(f"  {name:<24} {n / t:9.0f} img/s   time vs decode only: {t / base:5.2f}x")
    cls = statistics.median(timings["cls train"])
    keyed_t = statistics.median(timings["cls train, seeded keys"])
    print(f"  per-sample seeding overhead: {keyed_t / cls:.3f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=24, help="toy videos to time")
    parser.add_argument("--frames", type=int, default=48, help="frames per toy video")
    parser.add_argument("--size", type=int, default=64, help="toy image/frame side (even)")
    parser.add_argument("--images", type=int, default=400, help="toy images to time")
    parser.add_argument("--crop", type=int, default=48, help="output side of the image pipelines")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--out", type=Path, default=None, help="reuse/write the toy world here")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        t0 = time.perf_counter()
        summary = write_toy_world(
            out,
            num_images=args.images,
            num_videos=args.videos * 10 // 8 + 1,
            image_size=args.size,
            frames_per_video=args.frames,
            num_sentences=10,
        )
        print(f"toy world written in {time.perf_counter() - t0:.1f} s under {out}")
        videos = sorted((out / "videos" / "training").rglob("*.mp4"))[: args.videos]
        bench_video(
            videos, ClipSpec(num_frames=8, frame_stride=max(1, args.frames // 8)), args.repeats
        )
        bench_images(summary.paths["images"], args.crop, args.repeats)


if __name__ == "__main__":
    main()
