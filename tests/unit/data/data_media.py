"""Helpers of the data-engine tests that write small images and videos."""

from __future__ import annotations

from pathlib import Path

import torch

from uniperceiver_cli.data.toy_files import encode_mp4


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


def write_jpeg(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (16, 16)) -> Path:
    from torchvision.io import encode_jpeg

    path.parent.mkdir(parents=True, exist_ok=True)
    img = torch.empty(3, *size, dtype=torch.uint8)
    for c in range(3):
        img[c] = colour[c]
    path.write_bytes(bytes(encode_jpeg(img, quality=95).numpy().tobytes()))
    return path


def write_faststart_mp4(path: Path, num_frames: int = 12, size: int = 32) -> Path:
    """An mp4 with its index (moov) before the data, so a truncated copy still opens."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    frames = ramp_video(num_frames, size)
    with av.open(str(path), mode="w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=30)
        stream.height, stream.width, stream.pix_fmt = size, size, "yuv420p"
        for frame in frames:
            vf = av.VideoFrame.from_ndarray(frame.permute(1, 2, 0).numpy(), format="rgb24")
            for packet in stream.encode(vf):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def truncate(path: Path, fraction: float = 0.5) -> Path:
    """Cut a file to `fraction` of its bytes, in place."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path
