"""The toy world: rendered shapes and moving shapes with labels and captions, plus a text corpus.

Everything is a pure function of `(seed, split, index)`, drawn with numpy, so the same seed always
gives the same pixels and words, and no files or downloads are needed. Images show one shape
(class = shape) of a colour and size at a position over a varied background; videos show a shape
moving in one direction (class = motion); captions come from templates that share the shape,
colour and size words between images and videos, so a model trained on image-text pairs can
retrieve toy videos zero-shot. The text corpus uses the same language.

`ToyWorld` serves items in memory (the `toy` data format and unit tests); `write_toy_world` writes
the world in the real on-disk formats (ImageFolder, COCO caption JSON, Karpathy JSON, JSON lines,
VQA JSON lines, WebDataset shards, Kinetics-style mp4 + annotation.json + CSV, MSVD-style caption JSON, a text
corpus) so demos and tests go through the real readers.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
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


# ---------------------------------------------------------------------------------------------
# writing the toy world to disk


@dataclass(frozen=True)
class ToyWorldSummary:
    """What `write_toy_world` wrote, with the options the real readers need.

    Attributes:
        out_dir: root folder.
        seed: world seed.
        image_size: image and frame side.
        num_images: images per split.
        num_videos: videos per split.
        frames_per_video: frames in each mp4.
        fps: frame rate of the mp4 files.
        image_classes: image class names (index order).
        video_classes: video class names (index order).
        paths: named paths (see `write_toy_world`).
    """

    out_dir: Path
    seed: int
    image_size: int
    num_images: dict[str, int]
    num_videos: dict[str, int]
    frames_per_video: int
    fps: float
    image_classes: tuple[str, ...]
    video_classes: tuple[str, ...]
    paths: dict[str, Path] = field(default_factory=dict)


def _split_counts(total: int) -> dict[str, int]:
    val = max(1, total // 10) if total >= 3 else 0
    test = val
    return {"train": total - val - test, "val": val, "test": test}


def _encode_png(pixels: Tensor) -> bytes:
    from torchvision.io import encode_png

    return bytes(encode_png(pixels).numpy().tobytes())


def encode_mp4(
    frames: Tensor,
    path: Path,
    fps: float,
    *,
    crf: int = 0,
    pixel_format: str = "yuv444p",
) -> None:
    """Write `(T, 3, H, W)` uint8 frames as an H.264 mp4 (TorchCodec, else PyAV).

    The defaults (full-resolution chroma, constant rate factor 0 = lossless in YUV) keep the
    decoded frames within a few grey levels of `frames` (only the RGB/YUV rounding remains), so
    the on-disk toy videos match the in-memory ones; `crf=18, pixel_format="yuv420p"` gives
    the usual lossy web-video settings instead.

    Args:
        frames: `(T, 3, H, W)` uint8, H and W even.
        path: the mp4 to write (parent folders are created).
        fps: frame rate.
        crf: x264 constant rate factor (0 = lossless, 18 = visually lossless, 23 = default).
        pixel_format: `yuv444p` (full chroma) or `yuv420p` (subsampled chroma).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        from torchcodec.encoders import VideoEncoder

        VideoEncoder(frames, frame_rate=fps).to_file(
            str(path), codec="libx264", crf=crf, pixel_format=pixel_format
        )
        return
    except (ImportError, RuntimeError) as exc:
        logger.debug("TorchCodec cannot encode %s (%s); using PyAV", path, exc)
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=round(fps))
        stream.height, stream.width = int(frames.shape[2]), int(frames.shape[3])
        stream.pix_fmt = pixel_format
        stream.options = {"crf": str(crf)}
        for frame in frames:
            vf = av.VideoFrame.from_ndarray(frame.permute(1, 2, 0).numpy(), format="rgb24")
            for packet in stream.encode(vf):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _coco_json(
    items: list[tuple[int, str, str, tuple[str, ...]]],
) -> dict[str, list[dict[str, object]]]:
    images: list[dict[str, object]] = []
    annotations: list[dict[str, object]] = []
    for item_id, file_path, file_name, captions in items:
        images.append({"id": item_id, "file_path": file_path, "file_name": file_name})
        for cap in captions:
            annotations.append({"image_id": item_id, "id": len(annotations), "caption": cap})
    return {"images": images, "annotations": annotations}


def write_toy_world(
    out_dir: str | Path,
    *,
    seed: int = 0,
    num_images: int = 600,
    num_videos: int = 120,
    image_size: int = 32,
    frames_per_video: int = 16,
    fps: float = 30.0,
    num_sentences: int = 2000,
    images_per_shard: int = 100,
) -> ToyWorldSummary:
    """Write the toy world in the real on-disk formats (80/10/10 train/val/test splits).

    Layout under `out_dir` (keys of `ToyWorldSummary.paths` in brackets):

    * `images/<split>/<shape>/<split>_<i>.png` ImageFolder [`images`], `images/classes.txt`
      [`image_classes`];
    * `captions/captions_<split>.json` COCO-style JSON (`file_path` = `<split>/<shape>`, relative
      to `images/`) [`captions_<split>`]; `captions/dataset_toy.json` Karpathy JSON [`karpathy`];
      `captions/<split>.jsonl` JSON lines `{"image", "caption": [...]}` [`jsonl_<split>`];
    * `vqa/<split>.jsonl` VQA JSON lines `{"question_id", "image", "question", "answers",
      "scores"}` about the same images (image paths relative to `images/`) [`vqa_<split>`],
      `vqa/answers.txt` the answer vocabulary [`vqa_answers`];
    * `shards/train-<k>.tar` img2dataset-style WebDataset shards of the train images (`.png`,
      `.txt` first caption, `.json` all captions) [`shards`];
    * `videos/<subset>/<motion_label>/<name>.mp4` with subset `training`/`validation`/`testing`,
      `videos/annotation.json` (Kinetics layout) [`kinetics_annotations`],
      `videos/category_mapping.txt` [`category_mapping`], `videos/<split>.csv` (`path,label`)
      [`videos_<split>_csv`], `videos/classes.txt` [`video_classes`];
    * `video_captions/caption_toy_<split>_cocostyle.json` MSVD-style JSON whose `file_name` is the
      video path relative to `videos/` without `.mp4` [`video_captions_<split>`];
    * `text/corpus_<split>.txt` one line per sentence [`corpus_<split>`].

    Args:
        out_dir: folder to write into (created; existing files are overwritten).
        seed: world seed.
        num_images: images over all splits.
        num_videos: videos over all splits.
        image_size: image and frame side (even, >= 8; H.264 needs even sides).
        frames_per_video: frames per mp4.
        fps: frame rate written into the mp4 files.
        num_sentences: corpus lines over all splits.
        images_per_shard: train images per WebDataset shard.

    Returns:
        A `ToyWorldSummary`.
    """
    if image_size % 2:
        raise ValueError(
            f"expected an even image_size (H.264 needs even sides), found {image_size}"
        )
    root = Path(out_dir)
    world = ToyWorld(seed, image_size=image_size, num_frames=frames_per_video)
    paths: dict[str, Path] = {}
    image_counts = _split_counts(num_images)
    video_counts = _split_counts(num_videos)

    img_root = root / "images"
    cap_root = root / "captions"
    cap_root.mkdir(parents=True, exist_ok=True)
    img_root.mkdir(parents=True, exist_ok=True)
    (img_root / "classes.txt").write_text("\n".join(SHAPES) + "\n")
    paths["images"] = img_root
    paths["image_classes"] = img_root / "classes.txt"
    vqa_root = root / "vqa"
    vqa_root.mkdir(parents=True, exist_ok=True)
    (vqa_root / "answers.txt").write_text("\n".join(world.vqa_answers) + "\n")
    paths["vqa_answers"] = vqa_root / "answers.txt"
    karpathy_images: list[dict[str, object]] = []
    train_records: list[tuple[str, bytes, tuple[str, ...]]] = []
    next_id = 0
    for split, count in image_counts.items():
        coco_items: list[tuple[int, str, str, tuple[str, ...]]] = []
        jsonl_lines: list[str] = []
        vqa_lines: list[str] = []
        for i in range(count):
            pixels, scene = world.image(i, split)
            rel_dir = f"{split}/{scene.shape}"
            name = f"{split}_{i:05d}.png"
            (img_root / rel_dir).mkdir(parents=True, exist_ok=True)
            data = _encode_png(pixels)
            (img_root / rel_dir / name).write_bytes(data)
            coco_items.append((next_id, rel_dir, name, scene.captions))
            jsonl_lines.append(
                json.dumps({"image": f"{rel_dir}/{name}", "caption": list(scene.captions)})
            )
            question = world.vqa(i, split)
            vqa_lines.append(
                json.dumps(
                    {
                        "question_id": next_id,
                        "image": f"{rel_dir}/{name}",
                        "question": question.question,
                        "answers": list(question.answers),
                        "scores": list(question.scores),
                    }
                )
            )
            karpathy_images.append(
                {
                    "filepath": rel_dir,
                    "filename": name,
                    "imgid": next_id,
                    "split": split,
                    "sentences": [{"raw": c, "tokens": c.split()} for c in scene.captions],
                }
            )
            if split == "train":
                train_records.append((f"{i:09d}", data, scene.captions))
            next_id += 1
        path = cap_root / f"captions_{split}.json"
        path.write_text(json.dumps(_coco_json(coco_items)))
        paths[f"captions_{split}"] = path
        jsonl = cap_root / f"{split}.jsonl"
        jsonl.write_text("\n".join(jsonl_lines) + ("\n" if jsonl_lines else ""))
        paths[f"jsonl_{split}"] = jsonl
        vqa = vqa_root / f"{split}.jsonl"
        vqa.write_text("\n".join(vqa_lines) + ("\n" if vqa_lines else ""))
        paths[f"vqa_{split}"] = vqa
    karpathy = cap_root / "dataset_toy.json"
    karpathy.write_text(json.dumps({"dataset": "toy", "images": karpathy_images}))
    paths["karpathy"] = karpathy

    shard_root = root / "shards"
    shard_root.mkdir(parents=True, exist_ok=True)
    num_shards = max(1, -(-len(train_records) // images_per_shard))
    for k in range(num_shards):
        with tarfile.open(shard_root / f"train-{k:05d}.tar", "w") as tar:
            for key, data, caps in train_records[k * images_per_shard : (k + 1) * images_per_shard]:
                meta = json.dumps({"caption": caps[0], "captions": list(caps)}).encode()
                for suffix, blob in ((".png", data), (".txt", caps[0].encode()), (".json", meta)):
                    info = tarfile.TarInfo(key + suffix)
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
    paths["shards"] = shard_root / f"train-{{00000..{num_shards - 1:05d}}}.tar"

    vid_root = root / "videos"
    vcap_root = root / "video_captions"
    vid_root.mkdir(parents=True, exist_ok=True)
    vcap_root.mkdir(parents=True, exist_ok=True)
    motions = list(MOTIONS)
    (vid_root / "classes.txt").write_text("\n".join(motions) + "\n")
    (vid_root / "category_mapping.txt").write_text(
        "".join(f"{m}\t{i}\n" for i, m in enumerate(motions))
    )
    paths["video_classes"] = vid_root / "classes.txt"
    paths["category_mapping"] = vid_root / "category_mapping.txt"
    paths["videos"] = vid_root
    subsets = {"train": "training", "val": "validation", "test": "testing"}
    database: dict[str, dict[str, object]] = {}
    next_vid = 0
    for split, count in video_counts.items():
        csv_rows = ["path,label"]
        coco_items = []
        for i in range(count):
            frames, vscene = world.video(i, split)
            label_dir = class_folder(vscene.motion)
            name = f"{split}_{i:05d}"
            rel = f"{subsets[split]}/{label_dir}/{name}"
            encode_mp4(frames, vid_root / f"{rel}.mp4", fps)
            database[name] = {"subset": subsets[split], "annotations": {"label": label_dir}}
            csv_rows.append(f"{rel}.mp4,{vscene.motion}")
            coco_items.append((next_vid, "", rel, vscene.captions))
            next_vid += 1
        csv_path = vid_root / f"{split}.csv"
        csv_path.write_text("\n".join(csv_rows) + "\n")
        paths[f"videos_{split}_csv"] = csv_path
        vjson = _coco_json(coco_items)
        for img in vjson["images"]:
            img.pop("file_path")
        vpath = vcap_root / f"caption_toy_{split}_cocostyle.json"
        vpath.write_text(json.dumps(vjson))
        paths[f"video_captions_{split}"] = vpath
    annotation = vid_root / "annotation.json"
    annotation.write_text(json.dumps({"database": database}))
    paths["kinetics_annotations"] = annotation

    text_root = root / "text"
    text_root.mkdir(parents=True, exist_ok=True)
    for split, count in _split_counts(num_sentences).items():
        p = text_root / f"corpus_{split}.txt"
        p.write_text("".join(world.sentence(i, split) + "\n" for i in range(count)))
        paths[f"corpus_{split}"] = p

    logger.info(
        "wrote the toy world (seed %d): %d images, %d videos, %d sentences under %s",
        seed,
        num_images,
        num_videos,
        num_sentences,
        root,
    )
    return ToyWorldSummary(
        out_dir=root,
        seed=seed,
        image_size=image_size,
        num_images=image_counts,
        num_videos=video_counts,
        frames_per_video=frames_per_video,
        fps=fps,
        image_classes=SHAPES,
        video_classes=tuple(motions),
        paths=paths,
    )
