"""Image decoding into uint8 tensors, with `DataError`s that name the file."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image

from uniperceiver_cli.data.errors import DataError

#: File suffixes treated as images by folder readers (lower case).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


def decode_image_bytes(data: bytes | Tensor, name: str) -> Tensor:
    """Decode encoded image bytes (JPEG, PNG, GIF, WebP) into RGB.

    Args:
        data: the encoded file content.
        name: what to call the image in errors (file or archive member).

    Returns:
        `(3, H, W)` uint8.

    Raises:
        DataError: the bytes are empty or not a decodable image.
    """
    raw = data if isinstance(data, Tensor) else torch.frombuffer(bytearray(data), dtype=torch.uint8)
    if raw.numel() == 0:
        raise DataError(f"{name}: empty image file; re-download or remove it")
    try:
        image: Tensor = decode_image(raw, mode=ImageReadMode.RGB)
        return image
    except (RuntimeError, ValueError) as exc:
        raise DataError(
            f"{name}: cannot decode image ({exc}); re-download it or set on_error: skip"
        ) from exc


def read_image(path: str | Path) -> Tensor:
    """Read and decode an image file into RGB `(3, H, W)` uint8.

    Raises:
        DataError: the file is missing, unreadable or not a decodable image.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError as exc:
        raise DataError(f"{p}: image file not found; check images_dir/root") from exc
    except OSError as exc:
        raise DataError(f"{p}: cannot read image file ({exc})") from exc
    return decode_image_bytes(data, str(p))
