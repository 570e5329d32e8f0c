from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from uniperceiver_cli.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BatchMixer,
    caption_transform,
    classification_transform,
    spatial_crops,
    video_transform,
)


def _image() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (3, 40, 56), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize(
    "make",
    [
        lambda train: classification_transform(24, train=train),
        lambda train: caption_transform(24, train=train),
    ],
)
@pytest.mark.parametrize("train", [True, False])
def test_image_pipelines_shapes_and_determinism(
    make: Callable[[bool], Callable[[torch.Tensor], torch.Tensor]], train: bool
) -> None:
    tf = make(train)
    torch.manual_seed(3)
    a = tf(_image())
    torch.manual_seed(3)
    b = tf(_image())
    assert a.shape == (3, 24, 24) and a.dtype == torch.float32 and torch.equal(a, b)
    outs = []
    for s in range(4):
        torch.manual_seed(s)
        outs.append(tf(_image()))
    assert any(not torch.equal(outs[0], o) for o in outs[1:]) == train


def test_eval_caption_transform_is_resize_and_centre_crop() -> None:
    img = torch.zeros(3, 24, 48, dtype=torch.uint8)
    img[:, :, 12:36] = 255  # bright centre band
    out = caption_transform(24, train=False)(img)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(out * std + mean, torch.ones(3, 24, 24), atol=1e-5)


def test_video_train_uses_one_crop_for_all_frames() -> None:
    frame = _image()
    clip = frame.unsqueeze(0).repeat(4, 1, 1, 1)
    torch.manual_seed(0)
    out = video_transform(24, train=True)(clip)
    assert out.shape == (4, 3, 24, 24)
    assert all(torch.equal(out[0], out[t]) for t in range(1, 4))
    assert abs(float(out.mean()) - (float(frame.float().mean()) / 255 - 0.5) / 0.5) < 0.1


def test_video_eval_three_crops_positions() -> None:
    clip = torch.arange(60, dtype=torch.uint8).view(1, 1, 1, 60).repeat(2, 3, 20, 1)
    crops = spatial_crops(clip, 20, 3)
    assert crops.shape == (3, 2, 3, 20, 20)
    assert [int(c[0, 0, 0, 0]) for c in crops] == [0, 20, 40]
    tall = clip.transpose(-1, -2)
    assert [int(c[0, 0, 0, 0]) for c in spatial_crops(tall, 20, 3)] == [0, 20, 40]
    out = video_transform(20, train=False, num_spatial_crops=3)(clip)
    assert out.shape == (3, 2, 3, 20, 20)
    assert torch.allclose(out[1, 0, 0, 0, 0], torch.tensor((20 / 255 - 0.5) / 0.5), atol=1e-3)


def test_batch_mixer_targets() -> None:
    mixer = BatchMixer(5, label_smoothing=0.1)
    smooth = mixer.smooth(torch.tensor([2]))
    assert torch.allclose(smooth, torch.tensor([[0.02, 0.02, 0.92, 0.02, 0.02]]))
    pixels = torch.stack([torch.zeros(3, 8, 8), torch.ones(3, 8, 8)])
    labels = torch.tensor([0, 1])
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        mixed, targets = mixer(pixels, labels, generator=g)
        assert torch.allclose(targets.sum(1), torch.ones(2))
        # The share of image 1 in sample 0 equals the weight of class 1 in its target (minus smoothing).
        share = float(mixed[0].mean())
        assert share == pytest.approx((float(targets[0, 1]) - 0.02) / 0.9, abs=1e-5)
    off = BatchMixer(5, prob=0.0)
    same, t = off(pixels, labels)
    assert torch.equal(same, pixels) and t.argmax(1).tolist() == [0, 1]


def test_plain_transform_resizes_and_normalises_without_augmentation() -> None:
    from uniperceiver_cli.data.transforms import IMAGENET_MEAN, IMAGENET_STD, plain_transform

    image = torch.full((3, 16, 16), 255, dtype=torch.uint8)
    out = plain_transform(32)(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    expected = (1.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(out[:, 5, 7], expected)
    assert torch.equal(plain_transform(32)(image), out)  # deterministic: no random ops
    clip = torch.zeros((4, 3, 32, 32), dtype=torch.uint8)
    video = plain_transform(32, video=True)(clip)
    assert video.shape == (4, 3, 32, 32)
    assert torch.allclose(video, torch.full_like(video, -1.0))  # (0 - 0.5) / 0.5
    with pytest.raises(ValueError, match="expected pixels"):
        plain_transform(8)(torch.zeros((1, 8, 8), dtype=torch.uint8))
