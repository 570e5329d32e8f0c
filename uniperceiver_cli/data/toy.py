"""The toy world: rendered shapes and moving shapes with labels and captions, plus a text corpus.

Everything is a pure function of `(seed, split, index)`, drawn with numpy, so the same seed always
gives the same pixels and words, and no files or downloads are needed. Images show one shape
(class = shape) of a colour and size at a position over a varied background; videos show a shape
moving in one direction (class = motion); captions come from templates that share the shape,
colour and size words between images and videos, so a model trained on image-text pairs can
retrieve toy videos zero-shot. The text corpus uses the same language.

`ToyWorld` serves items in memory (the `toy` data format and unit tests);
`uniperceiver_cli.data.toy_files.write_toy_world` writes it in the real on-disk formats.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

logger = logging.getLogger(__name__)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.5, 0.27),
    "right": (0.5, 0.73),
    "top": (0.27, 0.5),
    "bottom": (0.73, 0.5),
    "center": (0.5, 0.5),
}
MOTIONS: dict[str, tuple[float, float]] = {
    "moving left": (0.0, -1.0),
    "moving right": (0.0, 1.0),
    "moving up": (-1.0, 0.0),
    "moving down": (1.0, 0.0),
}
BACKGROUNDS: tuple[str, ...] = ("plain", "gradient", "noise", "stripes")

_WHERE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the middle",
}
_DIRECTION = {
    "moving left": "left",
    "moving right": "right",
    "moving up": "up",
    "moving down": "down",
}
_IMAGE_TEMPLATES = (
    "a {size} {colour} {shape} {where}",
    "there is a {colour} {shape} {where}",
    "a photo of a {size} {colour} {shape}",
    "a {shape} that is {colour} and {size}",
    "a {colour} {shape} {where} of the picture",
    "the {size} {shape} is {colour}",
)
_VIDEO_TEMPLATES = (
    "a {size} {colour} {shape} moving {direction}",
    "a {colour} {shape} moves {direction}",
    "there is a {colour} {shape} that moves {direction}",
    "a video of a {size} {colour} {shape} going {direction}",
    "the {shape} is {colour} and moves {direction}",
)
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
_KIND_CODES = {"image": 11, "video": 12, "text": 13, "pair": 14, "vqa": 15}
Kind = Literal["image", "video", "text", "pair", "vqa"]

#: Answer vocabulary of the toy VQA task: shapes, colours, sizes, positions, yes/no.
VQA_ANSWERS: tuple[str, ...] = (*SHAPES, *COLOURS, *SIZES, *POSITIONS, "yes", "no")


def _split_code(split: str) -> int:
    if split in _SPLIT_CODES:
        return _SPLIT_CODES[split]
    # Any other split name gets its own stream, stable across runs.
    return 100 + sum((i + 1) * ord(c) for i, c in enumerate(split))


def class_folder(name: str) -> str:
    """Folder name of a class (spaces → `_`, as in the Kinetics layout)."""
    return name.replace(" ", "_")


@dataclass(frozen=True)
class ToyImageScene:
    """What one toy image shows."""

    shape: str
    colour: str
    size: str
    position: str
    background: str
    label: int
    captions: tuple[str, ...]


@dataclass(frozen=True)
class ToyVideoScene:
    """What one toy video shows."""

    shape: str
    colour: str
    size: str
    motion: str
    background: str
    label: int
    captions: tuple[str, ...]


@dataclass(frozen=True)
class ToyPair:
    """A toy sentence pair for cloze classification: does sentence 2 agree with sentence 1?"""

    first: str
    second: str
    label: int


@dataclass(frozen=True)
class ToyQuestion:
    """A toy VQA question about image `index` of a split (the image of `ToyWorld.image`)."""

    question: str
    answers: tuple[str, ...]
    scores: tuple[float, ...]
    kind: str


def _background(rng: np.random.Generator, kind: str, size: int, avoid: np.ndarray) -> np.ndarray:
    def colour() -> np.ndarray:
        for _ in range(50):
            c = rng.integers(0, 256, 3)
            if np.abs(c.astype(np.int64) - avoid).sum() > 200:
                return c.astype(np.float32)
        return (255 - avoid).astype(np.float32)

    c0 = colour()
    if kind == "plain":
        img = np.broadcast_to(c0, (size, size, 3)).copy()
    elif kind == "gradient":
        c1 = colour()
        t = np.linspace(0.0, 1.0, size, dtype=np.float32)
        ramp = t[:, None] if rng.random() < 0.5 else t[None, :]
        ramp = np.broadcast_to(ramp, (size, size))[..., None]
        img = c0 * (1.0 - ramp) + c1 * ramp
    elif kind == "noise":
        img = c0 + rng.normal(0.0, 25.0, (size, size, 3))
    else:
        c1 = colour()
        period = max(2, size // int(rng.integers(3, 7)))
        coords = np.arange(size)
        band = ((coords // period) % 2).astype(np.float32)
        band2d = band[:, None] if rng.random() < 0.5 else band[None, :]
        mask = np.broadcast_to(band2d, (size, size))[..., None]
        img = c0 * (1.0 - mask) + c1 * mask
    return np.asarray(np.clip(img, 0, 255), dtype=np.float32)


def _shape_mask(shape: str, size: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dy, dx = yy - cy, xx - cx
    if shape == "circle":
        return np.asarray(dx * dx + dy * dy <= r * r)
    if shape == "square":
        return np.asarray(np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * r)
    if shape == "triangle":
        half = (dy + r) / (1.8 * r) * 0.95 * r
        return np.asarray((dy >= -r) & (dy <= 0.8 * r) & (np.abs(dx) <= half))
    if shape == "diamond":
        return np.asarray(np.abs(dx) + np.abs(dy) <= 1.1 * r)
    if shape == "cross":
        arm = r / 3.0
        return np.asarray(
            ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
        )
    raise ValueError(f"expected a toy shape in {SHAPES}, found {shape!r}")


def _radius(size_word: str, image_size: int, rng: np.random.Generator) -> float:
    base = 0.12 if size_word == "small" else 0.21
    return float(image_size * base * rng.uniform(0.9, 1.1))


def _paint(img: np.ndarray, mask: np.ndarray, rgb: np.ndarray) -> None:
    img[mask] = rgb


class ToyWorld:
    """Deterministic generator of toy images, videos, captions, sentences and sentence pairs.

    Args:
        seed: world seed.
        image_size: side S of rendered images and video frames (>= 8).
        num_frames: frames per rendered video (>= 2).
    """

    def __init__(self, seed: int = 0, *, image_size: int = 32, num_frames: int = 8) -> None:
        if image_size < 8:
            raise ValueError(f"expected image_size >= 8 for the toy world, found {image_size}")
        if num_frames < 2:
            raise ValueError(f"expected num_frames >= 2 for toy videos, found {num_frames}")
        self.seed = int(seed)
        self.image_size = image_size
        self.num_frames = num_frames

    # -- names -------------------------------------------------------------------------------
    @property
    def image_classes(self) -> tuple[str, ...]:
        """Class names of the image classification task (the shapes)."""
        return SHAPES

    @property
    def video_classes(self) -> tuple[str, ...]:
        """Class names of the video classification task (the motions)."""
        return tuple(MOTIONS)

    @property
    def pair_label_words(self) -> tuple[str, ...]:
        """Label words of the toy sentence-pair task, in class order."""
        return ("no", "yes")

    @property
    def vqa_answers(self) -> tuple[str, ...]:
        """Answer vocabulary of the toy VQA task (shape, colour, size, position, yes/no)."""
        return VQA_ANSWERS

    def _rng(self, kind: Kind, split: str, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _split_code(split), _KIND_CODES[kind], index])

    # -- images ------------------------------------------------------------------------------
    def image_scene(self, index: int, split: str = "train") -> ToyImageScene:
        """Attributes and captions of image `index` of `split`."""
        rng = self._rng("image", split, index)
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        size = SIZES[int(rng.integers(len(SIZES)))]
        position = list(POSITIONS)[int(rng.integers(len(POSITIONS)))]
        background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
        n_caps = int(rng.integers(3, 6))
        templates = rng.choice(len(_IMAGE_TEMPLATES), size=n_caps, replace=False)
        words = {"shape": shape, "colour": colour, "size": size, "where": _WHERE[position]}
        captions = tuple(_IMAGE_TEMPLATES[int(t)].format(**words) for t in templates)
        return ToyImageScene(
            shape, colour, size, position, background, SHAPES.index(shape), captions
        )

    def image(self, index: int, split: str = "train") -> tuple[Tensor, ToyImageScene]:
        """Render image `index`: `(3, S, S)` uint8 and its scene."""
        scene = self.image_scene(index, split)
        rng = np.random.default_rng([self.seed, _split_code(split), 21, index])
        s = self.image_size
        rgb = np.asarray(COLOURS[scene.colour], dtype=np.int64)
        img = _background(rng, scene.background, s, rgb)
        r = _radius(scene.size, s, rng)
        fy, fx = POSITIONS[scene.position]
        cy = float(np.clip(fy * s + rng.uniform(-0.04, 0.04) * s, r, s - r))
        cx = float(np.clip(fx * s + rng.uniform(-0.04, 0.04) * s, r, s - r))
        jitter = rng.integers(-15, 16, 3)
        _paint(img, _shape_mask(scene.shape, s, cy, cx, r), np.clip(rgb + jitter, 0, 255))
        pixels = torch.from_numpy(np.ascontiguousarray(img.astype(np.uint8).transpose(2, 0, 1)))
        return pixels, scene

    # -- videos ------------------------------------------------------------------------------
    def video_scene(self, index: int, split: str = "train") -> ToyVideoScene:
        """Attributes and captions of video `index` of `split`."""
        rng = self._rng("video", split, index)
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        size = SIZES[int(rng.integers(len(SIZES)))]
        motion = list(MOTIONS)[int(rng.integers(len(MOTIONS)))]
        background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
        n_caps = int(rng.integers(2, 5))
        templates = rng.choice(len(_VIDEO_TEMPLATES), size=n_caps, replace=False)
        words = {"shape": shape, "colour": colour, "size": size, "direction": _DIRECTION[motion]}
        captions = tuple(_VIDEO_TEMPLATES[int(t)].format(**words) for t in templates)
        label = list(MOTIONS).index(motion)
        return ToyVideoScene(shape, colour, size, motion, background, label, captions)

    def video(
        self, index: int, split: str = "train", num_frames: int | None = None
    ) -> tuple[Tensor, ToyVideoScene]:
        """Render video `index`: `(T, 3, S, S)` uint8 (the shape crosses the frame) and its scene."""
        scene = self.video_scene(index, split)
        t_count = self.num_frames if num_frames is None else num_frames
        rng = np.random.default_rng([self.seed, _split_code(split), 22, index])
        s = self.image_size
        rgb = np.asarray(COLOURS[scene.colour], dtype=np.int64)
        background = _background(rng, scene.background, s, rgb)
        r = _radius(scene.size, s, rng)
        vy, vx = MOTIONS[scene.motion]
        lo, hi = r + 0.5, s - r - 0.5
        # Start near one border and travel to the other along the motion axis.
        along = np.linspace(lo, hi, t_count) if t_count > 1 else np.array([lo])
        across = float(rng.uniform(lo, hi))
        colour = np.clip(rgb + rng.integers(-15, 16, 3), 0, 255)
        frames = np.empty((t_count, 3, s, s), dtype=np.uint8)
        for t in range(t_count):
            pos = along[t] if (vy + vx) > 0 else along[t_count - 1 - t]
            cy, cx = (pos, across) if vy != 0 else (across, pos)
            img = background.copy()
            _paint(img, _shape_mask(scene.shape, s, float(cy), float(cx), r), colour)
            frames[t] = img.astype(np.uint8).transpose(2, 0, 1)
        return torch.from_numpy(frames), scene

    # -- text --------------------------------------------------------------------------------
    def sentence(self, index: int, split: str = "train") -> str:
        """Corpus line `index`: one or two sentences about shapes, ending with " ."."""
        rng = self._rng("text", split, index)
        parts: list[str] = []
        for _ in range(int(rng.integers(1, 3))):
            kind = int(rng.integers(4))
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
            size = SIZES[int(rng.integers(len(SIZES)))]
            if kind == 0:
                where = _WHERE[list(POSITIONS)[int(rng.integers(len(POSITIONS)))]]
                t = _IMAGE_TEMPLATES[int(rng.integers(len(_IMAGE_TEMPLATES)))]
                parts.append(t.format(shape=shape, colour=colour, size=size, where=where))
            elif kind == 1:
                direction = list(_DIRECTION.values())[int(rng.integers(len(_DIRECTION)))]
                t = _VIDEO_TEMPLATES[int(rng.integers(len(_VIDEO_TEMPLATES)))]
                parts.append(t.format(shape=shape, colour=colour, size=size, direction=direction))
            elif kind == 2:
                other = SHAPES[int(rng.integers(len(SHAPES)))]
                other_colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
                side = ("left of", "right of", "above", "below")[int(rng.integers(4))]
                parts.append(f"the {colour} {shape} is {side} the {other_colour} {other}")
            else:
                parts.append(f"the {shape} is {size} and {colour}")
        return " . ".join(parts) + " ."

    def pair(self, index: int, split: str = "train") -> ToyPair:
        """Sentence pair `index`: label 1 (`yes`) when the second sentence agrees with the first."""
        rng = self._rng("pair", split, index)
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        colours = list(COLOURS)
        colour = colours[int(rng.integers(len(colours)))]
        size = SIZES[int(rng.integers(len(SIZES)))]
        first = f"the {size} {shape} is {colour} ."
        label = int(rng.integers(2))
        if rng.random() < 0.5:
            other = colour if label else colours[(colours.index(colour) + 1) % len(colours)]
            second = f"the {shape} is {other}"
        else:
            other_size = size if label else SIZES[1 - SIZES.index(size)]
            second = f"the {shape} is {other_size}"
        return ToyPair(first, second, label)

    def vqa(self, index: int, split: str = "train") -> ToyQuestion:
        """VQA question `index`: about the shape, colour, size or position of image `index`."""
        scene = self.image_scene(index, split)
        rng = self._rng("vqa", split, index)
        kind = ("shape", "colour", "size", "where", "exists", "side")[int(rng.integers(6))]
        if kind == "shape":
            question, answer = "what shape is in the picture?", scene.shape
        elif kind == "colour":
            question, answer = f"what colour is the {scene.shape}?", scene.colour
        elif kind == "size":
            question, answer = f"is the {scene.shape} small or large?", scene.size
        elif kind == "where":
            question, answer = f"where is the {scene.colour} {scene.shape}?", scene.position
        elif kind == "exists":
            colours = list(COLOURS)
            truth = bool(rng.integers(2))
            colour = (
                scene.colour
                if truth
                else colours[
                    (colours.index(scene.colour) + 1 + int(rng.integers(5))) % len(colours)
                ]
            )
            question, answer = f"is there a {colour} {scene.shape}?", "yes" if truth else "no"
        else:
            side = ("left", "right")[int(rng.integers(2))]
            question = f"is the {scene.shape} on the {side}?"
            answer = "yes" if scene.position == side else "no"
        return ToyQuestion(question, (answer,), (1.0,), kind)
