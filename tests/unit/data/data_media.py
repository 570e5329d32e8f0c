"""Helpers of the data-engine tests that write small images and videos."""

from __future__ import annotations

from pathlib import Path

import torch

from uniperceiver_cli.data.toy import encode_mp4


def write_png(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (12, 16)) -> Path:
    from torchvision.io import write_png as _write

    path.parent.mkdir(parents=True, exist_ok=True)
    img = torch.empty(3, *size, dtype=torch.uint8)
    for c in range(3):
        img[c] = colour[c]
    _write(img, str(path))
    return path


def ramp_video(num_frames: int = 12, size: int = 32) -> torch.Tensor:
    """Frames whose brightness encodes the frame index (robust to lossy coding)."""
    frames = torch.zeros(num_frames, 3, size, size, dtype=torch.uint8)
    for t in range(num_frames):
        frames[t] = int(10 + 240 * t / max(1, num_frames - 1))
    return frames


def write_mp4(path: Path, num_frames: int = 12, size: int = 32, fps: float = 30.0) -> Path:
    encode_mp4(ramp_video(num_frames, size), path, fps)
    return path
