"""Video decoding behind one `VideoSource` protocol, and clip/frame sampling (SPEC §3.3, §6-§7).

Sources:

* `TorchCodecSource` (default): exact frame-accurate decoding with TorchCodec; needs the system
  FFmpeg shared libraries.
* `PyAVSource`: PyAV (bundles its own FFmpeg); decodes sequentially up to the last wanted frame.
  `resolve_backend("auto")` falls back to it, with one logged notice, when TorchCodec or FFmpeg is
  missing.
* `FrameFolderSource`: a folder of pre-extracted frames (`*.jpg`, `*.png`, sorted by name).

Frame sampling: the stride is given in frames at 30 fps and scaled by `fps / 30` for the actual
video. Training draws a random start in `[0, total - span)` with `span = step·(T-1) + 1`; indices
wrap modulo the video length. Evaluation starts at frame 0 (`linspace` of starts for several
temporal views), or, in `interleaved` mode (the Kinetics-400 protocol), samples `T·V` frames at
`step / V` and deals them out to V interleaved clips.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import torch
from torch import Tensor

from uniperceiver_cli.data.errors import DataError
from uniperceiver_cli.data.images import IMAGE_SUFFIXES, read_image

logger = logging.getLogger(__name__)

Backend = Literal["torchcodec", "pyav", "frames"]
BackendRequest = Literal["auto", "torchcodec", "pyav", "frames"]
ViewMode = Literal["uniform", "interleaved"]

#: Frame rate at which strides are expressed (SPEC §3.3).
BASE_FPS = 30.0


class VideoSource(Protocol):
    """A decodable video: frame count, frame rate and random access to frames."""

    @property
    def num_frames(self) -> int:
        """Number of frames."""
        ...

    @property
    def fps(self) -> float:
        """Average frame rate."""
        ...

    def get_frames(self, indices: Sequence[int]) -> Tensor:
        """Frames at `indices` (any order, repeats allowed) as `(N, 3, H, W)` uint8."""
        ...

    def close(self) -> None:
        """Release decoder resources."""
        ...


def _gather(unique: list[int], frames: Tensor, indices: Sequence[int]) -> Tensor:
    pos = {idx: i for i, idx in enumerate(unique)}
    return frames[torch.tensor([pos[i] for i in indices], dtype=torch.int64)]


def _check_indices(indices: Sequence[int], total: int, path: str) -> list[int]:
    unique = sorted({int(i) for i in indices})
    if unique and (unique[0] < 0 or unique[-1] >= total):
        raise DataError(f"{path}: frame indices {unique[0]}..{unique[-1]} outside 0..{total - 1}")
    return unique


class TorchCodecSource:
    """A video decoded with TorchCodec (`seek_mode="exact"`).

    Raises:
        DataError: missing file or a file FFmpeg cannot open.
    """

    def __init__(self, path: str | Path) -> None:
        from torchcodec.decoders import VideoDecoder

        self.path = str(path)
        if not Path(path).is_file():
            raise DataError(f"{self.path}: video file not found; check videos_dir")
        try:
            self._decoder = VideoDecoder(self.path, seek_mode="exact", dimension_order="NCHW")
            meta = self._decoder.metadata
        except (RuntimeError, ValueError) as exc:
            raise DataError(
                f"{self.path}: cannot open video ({exc}); re-encode or remove it"
            ) from exc
        self._num_frames = int(meta.num_frames or 0)
        self._fps = float(meta.average_fps or BASE_FPS)
        if self._num_frames <= 0:
            raise DataError(f"{self.path}: video has no frames")

    @property
    def num_frames(self) -> int:
        """Number of frames (scanned from the content)."""
        return self._num_frames

    @property
    def fps(self) -> float:
        """Average frame rate."""
        return self._fps

    def get_frames(self, indices: Sequence[int]) -> Tensor:
        """Frames at `indices` as `(N, 3, H, W)` uint8."""
        unique = _check_indices(indices, self._num_frames, self.path)
        try:
            batch = self._decoder.get_frames_at(unique)
        except (RuntimeError, ValueError, IndexError) as exc:
            raise DataError(f"{self.path}: cannot decode frames ({exc})") from exc
        return _gather(unique, batch.data, indices)

    def close(self) -> None:
        """Drop the decoder."""
        self._decoder = None


class PyAVSource:
    """A video decoded with PyAV, sequentially from the start up to the last wanted frame.

    Raises:
        DataError: missing file or a file PyAV cannot open.
    """

    def __init__(self, path: str | Path) -> None:
        import av

        self.path = str(path)
        if not Path(path).is_file():
            raise DataError(f"{self.path}: video file not found; check videos_dir")
        try:
            with av.open(self.path) as container:
                if not container.streams.video:
                    raise DataError(f"{self.path}: no video stream")
                stream = container.streams.video[0]
                rate = stream.average_rate or stream.guessed_rate
                self._fps = float(rate) if rate else BASE_FPS
                count = int(stream.frames or 0)
                if count <= 0:  # no count in the header (e.g. some AVI/WebM): count packets
                    count = sum(1 for p in container.demux(stream) if p.size)
        except av.FFmpegError as exc:
            raise DataError(
                f"{self.path}: cannot open video ({exc}); re-encode or remove it"
            ) from exc
        if count <= 0:
            raise DataError(f"{self.path}: video has no frames")
        self._num_frames = count

    @property
    def num_frames(self) -> int:
        """Number of frames (from the header, else counted)."""
        return self._num_frames

    @property
    def fps(self) -> float:
        """Average frame rate."""
        return self._fps

    def get_frames(self, indices: Sequence[int]) -> Tensor:
        """Frames at `indices` as `(N, 3, H, W)` uint8."""
        import av

        unique = _check_indices(indices, self._num_frames, self.path)
        wanted = set(unique)
        got: dict[int, Tensor] = {}
        last = unique[-1] if unique else -1
        try:
            with av.open(self.path) as container:
                for i, frame in enumerate(container.decode(video=0)):
                    if i in wanted:
                        rgb = frame.to_ndarray(format="rgb24")
                        got[i] = torch.from_numpy(rgb).permute(2, 0, 1).contiguous()
                    if i >= last:
                        break
        except av.FFmpegError as exc:
            raise DataError(f"{self.path}: cannot decode frames ({exc})") from exc
        if len(got) != len(unique):
            missing = sorted(wanted - set(got))
            raise DataError(f"{self.path}: video ended before frame(s) {missing[:5]}")
        frames = torch.stack([got[i] for i in unique]) if unique else torch.empty(0, 3, 0, 0)
        return _gather(unique, frames, indices)

    def close(self) -> None:
        """Nothing to release (files are opened per call)."""


class FrameFolderSource:
    """Pre-extracted frames: image files in one folder, in name order.

    Args:
        path: the folder.
        fps: frame rate the frames were extracted at.
    """

    def __init__(self, path: str | Path, *, fps: float = BASE_FPS) -> None:
        self.path = str(path)
        folder = Path(path)
        if not folder.is_dir():
            raise DataError(f"{self.path}: frame folder not found; check videos_dir")
        self._files = sorted(
            f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
        )
        if not self._files:
            raise DataError(f"{self.path}: frame folder holds no image files")
        self._fps = fps

    @property
    def num_frames(self) -> int:
        """Number of frame files."""
        return len(self._files)

    @property
    def fps(self) -> float:
        """The frame rate given at construction."""
        return self._fps

    def get_frames(self, indices: Sequence[int]) -> Tensor:
        """Frames at `indices` as `(N, 3, H, W)` uint8."""
        unique = _check_indices(indices, len(self._files), self.path)
        frames = torch.stack([read_image(self._files[i]) for i in unique])
        return _gather(unique, frames, indices)

    def close(self) -> None:
        """Nothing to release."""


def torchcodec_problem() -> str | None:
    """Why TorchCodec cannot decode here (missing package or FFmpeg libraries), or None if it can."""
    try:
        from torchcodec.decoders import VideoDecoder  # noqa: F401
    except (ImportError, RuntimeError, OSError) as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()
    return None


def resolve_backend(requested: BackendRequest) -> Backend:
    """Choose the decoding backend for a request; `auto` falls back from TorchCodec to PyAV.

    The fallback logs one notice (per call: readers resolve once, at construction).

    Raises:
        DataError: an explicitly requested backend is unavailable.
    """
    if requested == "frames":
        return "frames"
    if requested in ("auto", "torchcodec"):
        problem = torchcodec_problem()
        if problem is None:
            return "torchcodec"
        if requested == "torchcodec":
            raise DataError(
                f"video decoder 'torchcodec' is unavailable ({problem}); install the system FFmpeg "
                "libraries (e.g. apt-get install ffmpeg) or set decoder: pyav"
            )
        logger.warning(
            "TorchCodec is unavailable (%s); decoding video with PyAV instead (2-3x slower)",
            problem,
        )
    try:
        import av  # noqa: F401
    except ImportError as exc:
        raise DataError(f"video decoder 'pyav' is unavailable ({exc}); pip install av") from exc
    return "pyav"


def open_video(path: str | Path, backend: Backend, *, fps: float = BASE_FPS) -> VideoSource:
    """Open a video with a resolved backend; a folder always opens as a frame folder.

    Args:
        path: video file or frame folder.
        backend: from `resolve_backend`.
        fps: frame rate of frame folders.
    """
    if backend == "frames" or Path(path).is_dir():
        return FrameFolderSource(path, fps=fps)
    if backend == "torchcodec":
        return TorchCodecSource(path)
    return PyAVSource(path)


# ---------------------------------------------------------------------------------------------
# frame sampling


@dataclass(frozen=True)
class ClipSpec:
    """How clips are cut from a video.

    Attributes:
        num_frames: frames per clip (T).
        frame_stride: stride in frames at 30 fps (scaled by fps / 30).
        temporal_views: clips per video at evaluation.
        spatial_crops: crops per clip at evaluation (1 or 3).
        view_mode: `uniform` (clip starts spread from frame 0) or `interleaved` (Kinetics-400).
    """

    num_frames: int = 8
    frame_stride: int = 32
    temporal_views: int = 1
    spatial_crops: int = 1
    view_mode: ViewMode = "uniform"

    def __post_init__(self) -> None:
        if self.num_frames < 1 or self.frame_stride < 1 or self.temporal_views < 1:
            raise ValueError(
                "expected num_frames, frame_stride and temporal_views >= 1, found "
                f"{self.num_frames}, {self.frame_stride}, {self.temporal_views}"
            )
        if self.spatial_crops not in (1, 3):
            raise ValueError(f"expected spatial_crops 1 or 3, found {self.spatial_crops}")

    @property
    def num_views(self) -> int:
        """Evaluation views per video, V = temporal views × spatial crops."""
        return self.temporal_views * self.spatial_crops


def frame_step(frame_stride: int, fps: float) -> float:
    """Stride in frames of a video at `fps`, for a stride given at 30 fps (at least 1)."""
    return max(1.0, frame_stride * fps / BASE_FPS)


def train_clip_indices(
    total: int, num_frames: int, step: float, *, generator: torch.Generator | None = None
) -> list[int]:
    """Frame indices of a random training clip (wrapping modulo `total`)."""
    if total < 1:
        raise ValueError(f"expected a video with frames, found {total}")
    span = int(step * (num_frames - 1)) + 1
    high = total - span
    start = int(torch.randint(high, (1,), generator=generator)) if high > 0 else 0
    return [int(start + step * i) % total for i in range(num_frames)]


def eval_clip_indices(
    total: int, num_frames: int, step: float, *, views: int = 1, mode: ViewMode = "uniform"
) -> list[list[int]]:
    """Frame indices of the evaluation clips of a video, one list per temporal view."""
    if total < 1:
        raise ValueError(f"expected a video with frames, found {total}")
    if mode == "interleaved":
        sub = step / views
        return [[int(v * sub + step * i) % total for i in range(num_frames)] for v in range(views)]
    span = int(step * (num_frames - 1)) + 1
    last_start = max(total - span, 0)
    starts = torch.linspace(0, last_start, views).tolist() if views > 1 else [0.0]
    return [[int(s + step * i) % total for i in range(num_frames)] for s in starts]


def read_clip(
    source: VideoSource,
    spec: ClipSpec,
    *,
    train: bool,
    transform: Callable[[Tensor], Tensor],
) -> Tensor:
    """Sample, decode and transform the clip(s) of one video.

    Args:
        source: the opened video.
        spec: clip settings.
        train: one random clip, else the evaluation views.
        transform: uint8 `(T, 3, H, W)` → float `(T, 3, S, S)` or `(C, T, 3, S, S)` (C crops).

    Returns:
        `(T, 3, S, S)` for training or a single evaluation view, else `(V, T, 3, S, S)` with the
        views ordered temporal-major (view = t · C + c).
    """
    step = frame_step(spec.frame_stride, source.fps)
    if train:
        clips = [train_clip_indices(source.num_frames, spec.num_frames, step)]
    else:
        clips = eval_clip_indices(
            source.num_frames,
            spec.num_frames,
            step,
            views=spec.temporal_views,
            mode=spec.view_mode,
        )
    flat = [i for clip in clips for i in clip]
    frames = source.get_frames(flat)
    outs = []
    for k in range(len(clips)):
        out = transform(frames[k * spec.num_frames : (k + 1) * spec.num_frames])
        outs.append(out if out.ndim == 5 else out.unsqueeze(0))
    views = torch.cat(outs)
    return views[0] if views.shape[0] == 1 else views
