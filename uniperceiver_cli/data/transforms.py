"""Image and video pipelines on `torchvision.transforms.v2` (SPEC §3.3), plus batch Mixup/CutMix.

Inputs are decoded uint8 tensors: images `(3, H, W)`, clips `(T, 3, H, W)`. Outputs are normalised
float32: images `(3, S, S)`; clips `(T, 3, S, S)`, or `(V, T, 3, S, S)` when an evaluation transform
takes several spatial crops. All randomness comes from torch's global RNG, which the readers seed
per sample (`uniperceiver_cli.data.sampler.seeded_scope`), so a pipeline is deterministic under a
seed.

| pipeline | train | eval |
|---|---|---|
| `classification_transform` | RandomResizedCrop(S, bicubic) + h-flip + RandAugment(2, 9) + normalise + RandomErasing(0.25, per-pixel noise) | resize short side to int(256/224·S) (bicubic) + centre crop |
| `caption_transform` | resize short side to S (bicubic) + RandomCrop(S) + h-flip | resize S + centre crop |
| `video_transform` | short side to U[int(256/224·S), int(320/224·S)] (bilinear) + h-flip + RandomCrop(S); mean = std = 0.5 | short side S + 1 centre or 3 spatial crops |
| `plain_transform` (toy world) | resize to S×S (bilinear) + normalise | same |

torchvision's RandAugment stands in for timm's `rand-m9-mstd0.5-inc1` (two ops at magnitude 9; timm
additionally jitters the magnitude with std 0.5 and uses "increasing" op variants).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, cast

import numpy as np
import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VIDEO_MEAN = (0.5, 0.5, 0.5)
VIDEO_STD = (0.5, 0.5, 0.5)

ImageTransform = Callable[[Tensor], Tensor]
VideoTransform = Callable[[Tensor], Tensor]
ImagePipeline = Literal["classification", "caption"]


def _check_size(size: int) -> None:
    if size < 1:
        raise ValueError(f"expected an image size >= 1, found {size}")


def to_float_image(image: Tensor) -> Tensor:
    """Default image transform: uint8 `(…, 3, H, W)` → float32 in [0, 1], no resizing."""
    return image.to(torch.float32).div_(255.0)


def classification_transform(
    size: int,
    *,
    train: bool,
    rand_augment: bool = True,
    random_erasing: float = 0.25,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> ImageTransform:
    """ImageNet-style classification pipeline (SPEC §3.3, timm `create_transform`).

    Args:
        size: output side S.
        train: training augmentation, else the evaluation resize + centre crop.
        rand_augment: add RandAugment (2 ops, magnitude 9) in training.
        random_erasing: RandomErasing probability in training (0 disables).
        mean: normalisation mean.
        std: normalisation std.

    Returns:
        A callable mapping uint8 `(3, H, W)` to float32 `(3, S, S)`.
    """
    _check_size(size)
    ops: list[Callable[..., object]] = []
    if train:
        ops += [
            v2.RandomResizedCrop(size, interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(),
        ]
        if rand_augment:
            ops.append(v2.RandAugment(num_ops=2, magnitude=9))
    else:
        ops += [
            v2.Resize(
                int(256 / 224 * size), interpolation=InterpolationMode.BICUBIC, antialias=True
            ),
            v2.CenterCrop(size),
        ]
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if train and random_erasing > 0:
        ops.append(v2.RandomErasing(p=random_erasing, value="random"))
    return cast(ImageTransform, v2.Compose(ops))


def caption_transform(
    size: int,
    *,
    train: bool,
    flip: bool = True,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> ImageTransform:
    """Caption / retrieval pipeline (`clip_transforms`, SPEC §3.3).

    Args:
        size: output side S.
        train: random crop (+ flip) instead of the centre crop.
        flip: horizontal flip with p = 0.5 in training (VQA turns it off).
        mean: normalisation mean.
        std: normalisation std.

    Returns:
        A callable mapping uint8 `(3, H, W)` to float32 `(3, S, S)`.
    """
    _check_size(size)
    ops: list[Callable[..., object]] = [
        v2.Resize(size, interpolation=InterpolationMode.BICUBIC, antialias=True)
    ]
    if train:
        ops.append(v2.RandomCrop(size))
        if flip:
            ops.append(v2.RandomHorizontalFlip())
    else:
        ops.append(v2.CenterCrop(size))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return cast(ImageTransform, v2.Compose(ops))


def image_transform(pipeline: ImagePipeline, size: int, *, train: bool) -> ImageTransform:
    """Pick an image pipeline by name (`classification` or `caption`)."""
    if pipeline == "classification":
        return classification_transform(size, train=train)
    if pipeline == "caption":
        return caption_transform(size, train=train)
    raise ValueError(f"expected image pipeline 'classification' or 'caption', found {pipeline!r}")


class PlainTransform:
    """Resize to S×S and normalise, without augmentation (the built-in toy world in training and eval).

    The toy world's classes depend on the whole shape, its colour and its position, so the paper's
    crops and colour augmentations would change the label; rendered toy images are therefore only
    resized (bilinear, antialiased, when the rendered side differs) and normalised.

    Args:
        size: output side S.
        mean: normalisation mean.
        std: normalisation std.
    """

    def __init__(
        self,
        size: int,
        *,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        _check_size(size)
        self.size = size
        self.mean = mean
        self.std = std

    def __call__(self, pixels: Tensor) -> Tensor:
        """Map uint8 `(..., 3, H, W)` (an image or a clip) to float32 `(..., 3, S, S)`."""
        if pixels.ndim < 3 or pixels.shape[-3] != 3:
            raise ValueError(f"expected pixels (..., 3, H, W), found {tuple(pixels.shape)}")
        x = pixels.to(torch.float32) / 255.0
        if x.shape[-2:] != (self.size, self.size):
            lead = x.shape[:-3]
            flat = torch.nn.functional.interpolate(
                x.reshape(-1, *x.shape[-3:]),
                size=(self.size, self.size),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )
            x = flat.reshape(*lead, 3, self.size, self.size)
        m = torch.tensor(self.mean).view(3, 1, 1)
        s = torch.tensor(self.std).view(3, 1, 1)
        return (x - m) / s


def plain_transform(size: int, *, video: bool = False) -> PlainTransform:
    """`PlainTransform` with the image (ImageNet) or video (0.5) normalisation."""
    if video:
        return PlainTransform(size, mean=VIDEO_MEAN, std=VIDEO_STD)
    return PlainTransform(size)


def spatial_crops(clip: Tensor, size: int, num_crops: int) -> Tensor:
    """Take `num_crops` (1 or 3) square crops along the long side of frames resized to short side S.

    One crop is the centre; three are start, centre and end (left/centre/right for landscape,
    top/centre/bottom for portrait).

    Args:
        clip: `(T, 3, H, W)` with min(H, W) == size.
        size: crop side S.
        num_crops: 1 or 3.

    Returns:
        `(num_crops, T, 3, S, S)`.
    """
    if num_crops not in (1, 3):
        raise ValueError(f"expected 1 or 3 spatial crops, found {num_crops}")
    h, w = int(clip.shape[-2]), int(clip.shape[-1])
    if min(h, w) < size:
        raise ValueError(f"expected frames with short side >= {size}, found {h}x{w}")
    top_c, left_c = (h - size) // 2, (w - size) // 2
    if num_crops == 1:
        offsets = [(top_c, left_c)]
    elif w >= h:
        offsets = [(top_c, 0), (top_c, left_c), (top_c, w - size)]
    else:
        offsets = [(0, left_c), (top_c, left_c), (h - size, left_c)]
    return torch.stack([clip[..., t : t + size, lf : lf + size] for t, lf in offsets])


class VideoClipTransform:
    """Video pipeline (TimeSformer augmentation, SPEC §3.3); one set of parameters for all frames.

    Args:
        size: output side S.
        train: scale jitter + flip + random crop, else resize + spatial crops.
        num_spatial_crops: evaluation crops per clip (1 = centre, 3 = along the long side).
        mean: normalisation mean (0.5 in the reference).
        std: normalisation std (0.5 in the reference).
    """

    def __init__(
        self,
        size: int,
        *,
        train: bool,
        num_spatial_crops: int = 1,
        mean: tuple[float, float, float] = VIDEO_MEAN,
        std: tuple[float, float, float] = VIDEO_STD,
    ) -> None:
        _check_size(size)
        self.size = size
        self.train = train
        self.num_spatial_crops = num_spatial_crops
        self._normalize = v2.Compose(
            [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
        )
        if train:
            lo, hi = int(256 / 224 * size), int(320 / 224 * size)
            self._augment: Callable[..., Tensor] = v2.Compose(
                [
                    v2.RandomResize(lo, hi + 1, interpolation=InterpolationMode.BILINEAR),
                    v2.RandomHorizontalFlip(),
                    v2.RandomCrop(size),
                ]
            )
        else:
            self._resize = v2.Resize(size, interpolation=InterpolationMode.BILINEAR, antialias=True)

    def __call__(self, clip: Tensor) -> Tensor:
        """Map uint8 `(T, 3, H, W)` to float `(T, 3, S, S)` (train, or eval with one crop) or
        `(3, T, 3, S, S)` (eval with three crops)."""
        if clip.ndim != 4 or clip.shape[1] != 3:
            raise ValueError(f"expected a clip (T, 3, H, W), found {tuple(clip.shape)}")
        video = tv_tensors.Video(clip)
        if self.train:
            out = torch.as_tensor(self._augment(video))
            return cast(Tensor, self._normalize(out))
        resized = torch.as_tensor(self._resize(video))
        crops = cast(
            Tensor, self._normalize(spatial_crops(resized, self.size, self.num_spatial_crops))
        )
        return crops[0] if self.num_spatial_crops == 1 else crops


def video_transform(size: int, *, train: bool, num_spatial_crops: int = 1) -> VideoTransform:
    """Build the video pipeline; see `VideoClipTransform`."""
    return VideoClipTransform(size, train=train, num_spatial_crops=num_spatial_crops)


class BatchMixer:
    """Batch-level Mixup / CutMix with label smoothing (timm `Mixup` semantics, SPEC §3.3 / §4.3).

    With probability `prob` the batch is mixed with its flipped self: CutMix with probability
    `switch_prob` when both are enabled, else Mixup; λ ~ Beta(α, α) (CutMix λ is corrected to
    the pasted box area). Targets are smoothed one-hot vectors mixed with the same λ.

    Args:
        num_classes: C.
        mixup_alpha: Mixup α (0 disables Mixup).
        cutmix_alpha: CutMix α (0 disables CutMix).
        prob: probability of mixing a batch.
        switch_prob: probability of CutMix when both are enabled.
        label_smoothing: ε; targets are (1 - ε)·onehot + ε/C before mixing.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.1,
    ) -> None:
        if mixup_alpha <= 0 and cutmix_alpha <= 0:
            raise ValueError("expected mixup_alpha > 0 or cutmix_alpha > 0, found both 0")
        self.num_classes = num_classes
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = cutmix_alpha
        self.prob = prob
        self.switch_prob = switch_prob
        self.label_smoothing = label_smoothing

    def smooth(self, labels: Tensor) -> Tensor:
        """`(B,)` int64 → `(B, C)` smoothed one-hot targets."""
        eps = self.label_smoothing
        onehot = torch.nn.functional.one_hot(labels, self.num_classes).to(torch.float32)
        return onehot * (1.0 - eps) + eps / self.num_classes

    def __call__(
        self, pixels: Tensor, labels: Tensor, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Mix a batch.

        Args:
            pixels: `(B, 3, S, S)` float images.
            labels: `(B,)` int64 classes.
            generator: RNG for the mixing decisions; None uses torch's global RNG.

        Returns:
            Mixed `(B, 3, S, S)` pixels and `(B, C)` soft targets.
        """
        targets = self.smooth(labels)
        if float(torch.rand((), generator=generator)) >= self.prob:
            return pixels, targets
        use_cutmix = self.cutmix_alpha > 0 and (
            self.mixup_alpha <= 0 or float(torch.rand((), generator=generator)) < self.switch_prob
        )
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        # torch's Beta sampler takes no generator: draw λ with numpy, seeded from the torch RNG.
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        lam = float(np.random.default_rng(seed).beta(alpha, alpha))
        flipped = pixels.flip(0)
        if use_cutmix:
            h, w = int(pixels.shape[-2]), int(pixels.shape[-1])
            cut = (1.0 - lam) ** 0.5
            ch, cw = int(h * cut), int(w * cut)
            cy = int(torch.randint(h, (1,), generator=generator))
            cx = int(torch.randint(w, (1,), generator=generator))
            y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
            x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
            mixed = pixels.clone()
            mixed[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)
        else:
            mixed = pixels * lam + flipped * (1.0 - lam)
        return mixed, targets * lam + targets.flip(0) * (1.0 - lam)
