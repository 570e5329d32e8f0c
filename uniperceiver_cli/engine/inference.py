"""Ad-hoc inference on the user's own files: `zero-shot classify`, `caption` and `retrieve`.

Files are images (`.jpg`, `.png`, ...) or videos (`.mp4`, `.avi`, `.mkv`, `.webm`, `.mov`, `.m4v`, or a folder
of frames); videos are decoded with the data engine's video sources (TorchCodec, else PyAV) and `frames` frames
evenly spaced over the whole clip are kept (user clips are often shorter than the reference's 32-frame stride).
Pre-processing is the evaluation pipeline of SPEC §3.3: classification images are resized to 256/224·S and
centre-cropped, caption/retrieval images resized to S and centre-cropped (ImageNet mean/std); video frames are
resized to S and centre-cropped (mean = std = 0.5).

* `classify_files(model, files, labels, template=...)`: softmax over the encoded labels (`template.format(label)`;
  the reference uses bare class names, i.e. `{}`), temperature of image/video classification.
* `caption_files(model, files, ...)`: beam search (SPEC §1.11).
* `retrieve_files(model, files, queries, top_k=...)`: rank the files for each text query by cosine similarity.

Every function returns plain records (lists of dicts) that the CLI prints as a table or as JSON lines.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from uniperceiver_cli.data.errors import DataError
from uniperceiver_cli.data.images import IMAGE_SUFFIXES, read_image
from uniperceiver_cli.model.heads import l2_normalize
from uniperceiver_cli.model.uniperceiver import UniPerceiver

__all__ = [
    "VIDEO_SUFFIXES",
    "InferenceError",
    "MediaFile",
    "caption_files",
    "classify_files",
    "list_media",
    "load_media",
    "read_queries",
    "retrieve_files",
]

logger = logging.getLogger(__name__)

#: File suffixes read as videos (lower case); a folder of image files is read as a video's frames.
VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg"})

Pipeline = Literal["classification", "caption"]


class InferenceError(ValueError):
    """The inputs of an ad-hoc command cannot be used (unknown file type, no files, bad template)."""


@dataclass(frozen=True)
class MediaFile:
    """One decoded input.

    Attributes:
        path: the file (or frame folder).
        kind: `image` or `video`.
        pixels: `(3, S, S)` image or `(T, 3, S, S)` clip, normalised float32.
    """

    path: Path
    kind: Literal["image", "video"]
    pixels: Tensor


def media_kind(path: Path) -> Literal["image", "video"] | None:
    """`image`, `video` (file or frame folder) or None for anything else."""
    if path.is_dir():
        has_frames = any(f.suffix.lower() in IMAGE_SUFFIXES for f in path.iterdir() if f.is_file())
        return "video" if has_frames else None
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in VIDEO_SUFFIXES:
        return "video"
    return None


def list_media(folder: str | Path) -> list[Path]:
    """Images and videos directly inside `folder`, sorted by name.

    Raises:
        InferenceError: the folder is missing or holds no image or video files.
    """
    root = Path(folder)
    if not root.is_dir():
        raise InferenceError(f"{root}: expected a folder of images or videos, found no folder")
    found = sorted(
        p for p in root.iterdir() if (p.is_file() or p.is_dir()) and media_kind(p) is not None
    )
    if not found:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES | VIDEO_SUFFIXES))
        raise InferenceError(f"{root}: holds no image or video files ({suffixes})")
    return found


def read_queries(path: str | Path) -> list[str]:
    """Text queries, one per non-empty line.

    Raises:
        InferenceError: the file is missing or has no query.
    """
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InferenceError(f"{p}: text file not found; expected one query per line") from None
    queries = [line.strip() for line in lines if line.strip()]
    if not queries:
        raise InferenceError(f"{p}: no queries; expected one query per line")
    return queries


def _image_pipeline(pipeline: Pipeline, size: int) -> Callable[[Tensor], Tensor]:
    from uniperceiver_cli.data.transforms import caption_transform, classification_transform

    if pipeline == "classification":
        return classification_transform(size, train=False)
    return caption_transform(size, train=False)


def _read_video(path: Path, frames: int, size: int) -> Tensor:
    from uniperceiver_cli.data.transforms import video_transform
    from uniperceiver_cli.data.video import open_video, resolve_backend

    backend = resolve_backend("frames" if path.is_dir() else "auto")
    source = open_video(path, backend)
    try:
        total = source.num_frames
        indices = torch.linspace(0, total - 1, frames).round().to(torch.int64).tolist()
        clip = source.get_frames(indices)
    finally:
        source.close()
    out: Tensor = video_transform(size, train=False)(clip)
    return out


def load_media(
    files: Sequence[str | Path], *, image_size: int, frames: int, pipeline: Pipeline
) -> list[MediaFile]:
    """Decode and pre-process images and videos.

    Args:
        files: image or video files (or frame folders).
        image_size: side S.
        frames: frames kept per video, evenly spaced over the clip.
        pipeline: `classification` or `caption` image pre-processing.

    Returns:
        One `MediaFile` per input, in order.

    Raises:
        InferenceError: a file that is neither an image nor a video, or no files.
        DataError: a file that cannot be read or decoded.
    """
    if not files:
        raise InferenceError("no input files given")
    if frames < 1:
        raise InferenceError(f"--frames must be >= 1, got {frames}")
    transform = _image_pipeline(pipeline, image_size)
    out: list[MediaFile] = []
    for f in files:
        path = Path(f)
        if not path.exists():
            raise InferenceError(f"{path}: no such file")
        kind = media_kind(path)
        if kind is None:
            suffixes = ", ".join(sorted(IMAGE_SUFFIXES | VIDEO_SUFFIXES))
            raise InferenceError(f"{path}: not an image or video file (expected one of {suffixes})")
        if kind == "image":
            pixels = transform(read_image(path))
        else:
            pixels = _read_video(path, frames, image_size)
        out.append(MediaFile(path, kind, pixels))
    return out


def _groups(items: Sequence[MediaFile], batch_size: int) -> list[tuple[list[int], Tensor, str]]:
    """Batches of equal kind: (positions, stacked pixels, kind)."""
    groups: list[tuple[list[int], Tensor, str]] = []
    for kind in ("image", "video"):
        rows = [i for i, m in enumerate(items) if m.kind == kind]
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            groups.append((chunk, torch.stack([items[i].pixels for i in chunk]), kind))
    return groups


def _device(model: UniPerceiver) -> torch.device:
    return model.embed.word.weight.device


def _frames_for(model: UniPerceiver, frames: int | None) -> int:
    limit = model.config.max_frames
    if frames is None:
        return limit
    if not 1 <= frames <= limit:
        raise InferenceError(f"--frames must be between 1 and the model's {limit}, got {frames}")
    return frames


@torch.no_grad()
def _visual_features(
    model: UniPerceiver, items: Sequence[MediaFile], batch_size: int, kind_task: dict[str, str]
) -> Tensor:
    """L2-normalised SPE features (N, D) of the media, in input order."""
    dev = _device(model)
    feats: Tensor | None = None
    for rows, pixels, kind in _groups(items, batch_size):
        out = model.visual_features(pixels.to(dev), task_type=kind_task[kind]).features
        z = l2_normalize(out).float()
        if feats is None:
            feats = torch.empty(len(items), z.shape[1], device=z.device)
        feats[torch.tensor(rows, device=z.device)] = z
    assert feats is not None
    return feats


def classify_files(
    model: UniPerceiver,
    files: Sequence[str | Path],
    labels: Sequence[str],
    *,
    template: str = "{}",
    frames: int | None = None,
    top_k: int = 5,
    batch_size: int = 16,
) -> list[dict[str, Any]]:
    """Zero-shot classification of images/videos against free-form labels.

    Args:
        model: the model (eval mode).
        files: images or videos.
        labels: class names.
        template: prompt with one `{}` for the label (the reference uses `{}`).
        frames: frames per video (default: the model's maximum, 8).
        top_k: labels listed per file.
        batch_size: inputs encoded at once.

    Returns:
        Per file: `{"file", "kind", "label", "score", "top": [{"label", "score"}]}` (softmax probabilities).

    Raises:
        InferenceError: empty or duplicated labels, a template without `{}`, or unusable files.
    """
    from uniperceiver_cli.engine.candidates import encode_bucketed, tokenize_names

    names = [label.strip() for label in labels]
    if len(names) < 1 or any(not n for n in names):
        raise InferenceError(f"--labels needs at least one non-empty label, got {list(labels)!r}")
    if len(set(names)) != len(names):
        raise InferenceError(f"--labels lists a label twice: {names!r}")
    if "{}" not in template:
        raise InferenceError(f"--template must contain '{{}}' for the label, got {template!r}")
    items = load_media(
        files,
        image_size=model.config.image_size,
        frames=_frames_for(model, frames),
        pipeline="classification",
    )
    dev = _device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            tokens = tokenize_names([template.format(n) for n in names])
            classes, _ = encode_bucketed(
                model, tokens.ids.to(dev), tokens.padding.to(dev), kind="classes", task="classes"
            )
            feats = _visual_features(
                model,
                items,
                batch_size,
                {"image": "image_classification", "video": "video_classification"},
            )
            records: list[dict[str, Any]] = []
            k = min(top_k, len(names))
            for i, item in enumerate(items):
                task = "img_cls" if item.kind == "image" else "video_cls"
                probs = model.head.logits(feats[i : i + 1], classes, task).softmax(dim=-1)[0]
                top = probs.topk(k)
                best = int(top.indices[0])
                records.append(
                    {
                        "file": str(item.path),
                        "kind": item.kind,
                        "label": names[best],
                        "score": float(probs[best]),
                        "top": [
                            {"label": names[int(c)], "score": float(s)}
                            for s, c in zip(top.values, top.indices, strict=True)
                        ],
                    }
                )
    finally:
        model.train(was_training)
    return records


def caption_files(
    model: UniPerceiver,
    files: Sequence[str | Path],
    *,
    beam_size: int = 2,
    max_len: int = 21,
    length_penalty: float = 0.0,
    frames: int | None = None,
    batch_size: int = 16,
) -> list[dict[str, Any]]:
    """Caption images/videos with beam search over the whole vocabulary (encoded once, cached on the model).

    Returns:
        Per file: `{"file", "kind", "caption"}`.
    """
    from uniperceiver_cli.engine.evaluate import decode_captions
    from uniperceiver_cli.model.decode import caption_search

    items = load_media(
        files, image_size=model.config.image_size, frames=_frames_for(model, frames),
        pipeline="caption",
    )  # fmt: skip
    dev = _device(model)
    captions: list[str] = [""] * len(items)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            vocab = model.vocabulary_features()
            for rows, pixels, kind in _groups(items, batch_size):
                result = caption_search(
                    model,
                    pixels.to(dev),
                    beam_size=beam_size,
                    max_len=max_len,
                    length_penalty=length_penalty,
                    vocab_features=vocab,
                    task_type=f"{kind}_caption",
                )
                for row, text in zip(rows, decode_captions(model, result.ids), strict=True):
                    captions[row] = text
    finally:
        model.train(was_training)
    return [
        {"file": str(item.path), "kind": item.kind, "caption": captions[i]}
        for i, item in enumerate(items)
    ]


def retrieve_files(
    model: UniPerceiver,
    files: Sequence[str | Path],
    queries: Sequence[str],
    *,
    top_k: int = 5,
    frames: int | None = None,
    batch_size: int = 16,
) -> list[dict[str, Any]]:
    """Rank files for each text query by cosine similarity of the retrieval features.

    Returns:
        Per query: `{"query", "results": [{"file", "kind", "score"}]}`, best first.

    Raises:
        InferenceError: no queries or unusable files.
    """
    if not queries:
        raise InferenceError("no text queries given")
    items = load_media(
        files, image_size=model.config.image_size, frames=_frames_for(model, frames),
        pipeline="caption",
    )  # fmt: skip
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            feats = _visual_features(
                model, items, batch_size, {"image": "image_retrieval", "video": "video_retrieval"}
            )
            texts = model.encode_texts(list(queries)).float()
            sim = texts @ feats.t()  # (Q, N) cosine
    finally:
        model.train(was_training)
    k = min(top_k, len(items))
    top = sim.topk(k, dim=1)
    out: list[dict[str, Any]] = []
    for q, query in enumerate(queries):
        results = [
            {"file": str(items[int(c)].path), "kind": items[int(c)].kind, "score": float(s)}
            for s, c in zip(top.values[q], top.indices[q], strict=True)
        ]
        out.append({"query": query, "results": results})
    return out


def is_data_error(exc: BaseException) -> bool:
    """Whether an exception is a data problem the CLI reports as a bad input (exit 2)."""
    return isinstance(exc, DataError | InferenceError)
