"""Typed samples (what a dataset returns) and batches (what a collate function returns).

One sample/batch pair per task family:

| family | sample | batch | task types |
|---|---|---|---|
| visual classification | `ClassificationSample` | `ClassificationBatch` | image/video classification |
| visual + text | `VisualTextSample` | `VisualTextBatch` | image/video caption and retrieval |
| masked language modelling | `MLMSample` | `MLMBatch` | mlm |
| cloze text classification | `TextClassificationSample` | `TextClassificationBatch` | GLUE |

Pixel layouts: an image is `(3, S, S)`; a clip `(T, 3, S, S)`; an evaluation video with several
views `(V, T, 3, S, S)` (V = temporal views × spatial crops). Batches add a leading `B`. Text is
int64 token ids padded with 0, with a boolean `padding` mask (True = padding). Token targets use -1
for "no target".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, cast

import torch
from torch import Tensor

VisualModality = Literal["image", "video"]

_B = TypeVar("_B", bound="_TensorBatch")


class _TensorBatch:
    """Device moves and pinning for dataclass batches (every tensor field moves, the rest stays)."""

    def _map_tensors(self: _B, fn: Callable[[Tensor], Tensor]) -> _B:
        changes: dict[str, Tensor] = {}
        for f in dataclasses.fields(cast(Any, self)):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                changes[f.name] = fn(value)
        return cast(_B, dataclasses.replace(cast(Any, self), **changes))

    def to(self: _B, device: torch.device | str, *, non_blocking: bool = False) -> _B:
        """Return a copy with every tensor on `device`."""
        return self._map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self: _B) -> _B:
        """Return a copy with every tensor in pinned memory (called by DataLoader(pin_memory=True))."""
        return self._map_tensors(lambda t: t.pin_memory())


# ----------------------------------------------------------------------------------------------
# samples


@dataclass(frozen=True)
class ClassificationSample:
    """One image or video with its class.

    Attributes:
        pixels: `(3, S, S)` image, `(T, 3, S, S)` clip, or `(V, T, 3, S, S)` evaluation views; float.
        label: class index.
        index: position of the sample in its dataset.
    """

    pixels: Tensor
    label: int
    index: int


@dataclass(frozen=True)
class VisualTextSample:
    """One image or video with captions.

    In training the dataset serves one caption per sample (a random one of the image's captions, or
    the caption of a flattened pair); in evaluation it serves all captions of the item.

    Attributes:
        pixels: `(3, S, S)` image, `(T, 3, S, S)` clip or `(V, T, 3, S, S)` views; float.
        text_ids: token ids of each served caption, each `(n_i,)` int64 ending with EOT.
        captions: the raw served captions, aligned with `text_ids`.
        item_id: id of the image or video in its annotation file (COCO `image_id`).
        index: position of the sample in its dataset.
    """

    pixels: Tensor
    text_ids: tuple[Tensor, ...]
    captions: tuple[str, ...]
    item_id: int | str
    index: int


@dataclass(frozen=True)
class MLMSample:
    """One masked-language-modelling sequence (SPEC §3.2.3).

    Attributes:
        ids: `(n,)` int64 corrupted token ids (masked words are SPE, random or unchanged).
        labels: `(n,)` int64 original ids at the sub-tokens of selected words, -1 elsewhere.
        index: position of the sample in its dataset.
    """

    ids: Tensor
    labels: Tensor
    index: int


@dataclass(frozen=True)
class TextClassificationSample:
    """One cloze-formatted sentence (pair) with its label (SPEC §3.2.9).

    Attributes:
        ids: `(n,)` int64 token ids of the template-filled text.
        slot: position of the SPE slot whose output is compared with the label words.
        label: class index (order of the label words).
        index: position of the sample in its dataset.
    """

    ids: Tensor
    slot: int
    label: int
    index: int


# ----------------------------------------------------------------------------------------------
# batches


@dataclass(frozen=True)
class ClassificationBatch(_TensorBatch):
    """A batch of images or videos with class targets.

    Attributes:
        pixels: `(B, 3, S, S)` images, `(B, T, 3, S, S)` clips or `(B, V, T, 3, S, S)` eval views.
        labels: `(B,)` int64 class indices.
        indices: `(B,)` int64 dataset positions.
        modality: `image` or `video`.
        soft_labels: `(B, C)` float soft targets after Mixup/CutMix, else None.
    """

    pixels: Tensor
    labels: Tensor
    indices: Tensor
    modality: VisualModality
    soft_labels: Tensor | None = None

    @property
    def batch_size(self) -> int:
        """Number of samples B."""
        return int(self.labels.shape[0])

    @property
    def num_views(self) -> int:
        """Evaluation views per video V (1 for images and single-view clips)."""
        return int(self.pixels.shape[1]) if self.pixels.ndim == 6 else 1


@dataclass(frozen=True)
class VisualTextBatch(_TensorBatch):
    """A batch of images or videos with captions (caption and retrieval tasks).

    Captions are flattened: `M` captions in total, `text_owner[m]` says which of the `B` items
    caption `m` belongs to (in training M = B and `text_owner = arange(B)`).

    Attributes:
        pixels: `(B, 3, S, S)`, `(B, T, 3, S, S)` or `(B, V, T, 3, S, S)`.
        text_ids: `(M, L)` int64 caption ids padded with 0, each ending with EOT.
        text_padding: `(M, L)` bool, True at padding.
        text_owner: `(M,)` int64 index of the item each caption belongs to.
        indices: `(B,)` int64 dataset positions.
        item_ids: B annotation ids of the items (COCO `image_id`).
        captions: M raw captions aligned with `text_ids`.
        modality: `image` or `video`.
    """

    pixels: Tensor
    text_ids: Tensor
    text_padding: Tensor
    text_owner: Tensor
    indices: Tensor
    item_ids: tuple[int | str, ...]
    captions: tuple[str, ...]
    modality: VisualModality

    @property
    def batch_size(self) -> int:
        """Number of visual items B."""
        return int(self.indices.shape[0])


@dataclass(frozen=True)
class MLMBatch(_TensorBatch):
    """A batch of masked-language-modelling sequences.

    Attributes:
        ids: `(B, L)` int64 corrupted ids padded with 0.
        padding: `(B, L)` bool, True at padding.
        labels: `(B, L)` int64 original ids at masked sub-tokens, -1 elsewhere (and at padding).
        indices: `(B,)` int64 dataset positions.
    """

    ids: Tensor
    padding: Tensor
    labels: Tensor
    indices: Tensor

    @property
    def batch_size(self) -> int:
        """Number of sequences B."""
        return int(self.ids.shape[0])


@dataclass(frozen=True)
class TextClassificationBatch(_TensorBatch):
    """A batch of cloze-formatted sentences.

    Attributes:
        ids: `(B, L)` int64 ids padded with 0.
        padding: `(B, L)` bool, True at padding.
        slots: `(B,)` int64 position of each sequence's SPE slot.
        labels: `(B,)` int64 class indices.
        indices: `(B,)` int64 dataset positions.
    """

    ids: Tensor
    padding: Tensor
    slots: Tensor
    labels: Tensor
    indices: Tensor

    @property
    def batch_size(self) -> int:
        """Number of sequences B."""
        return int(self.ids.shape[0])


Batch = ClassificationBatch | VisualTextBatch | MLMBatch | TextClassificationBatch


# ----------------------------------------------------------------------------------------------
# collate


def pad_sequences(seqs: Sequence[Tensor], *, pad_value: int = 0) -> tuple[Tensor, Tensor]:
    """Right-pad 1-D int64 sequences to a common length.

    Args:
        seqs: N tensors of shape `(n_i,)`.
        pad_value: value written at padding positions.

    Returns:
        `ids (N, L)` with `L = max n_i` (at least 1) and `padding (N, L)` bool, True at padding.
    """
    length = max([int(s.shape[0]) for s in seqs] + [1])
    ids = torch.full((len(seqs), length), pad_value, dtype=torch.int64)
    padding = torch.ones((len(seqs), length), dtype=torch.bool)
    for i, s in enumerate(seqs):
        n = int(s.shape[0])
        ids[i, :n] = s
        padding[i, :n] = False
    return ids, padding


def _modality(pixels: Tensor) -> VisualModality:
    return "image" if pixels.ndim == 3 else "video"


def _stack_pixels(samples: Sequence[ClassificationSample | VisualTextSample]) -> Tensor:
    shapes = {tuple(s.pixels.shape) for s in samples}
    if len(shapes) != 1:
        raise ValueError(
            f"expected samples with one pixel shape per batch, found {sorted(shapes)}; "
            "use the same transform (image size, frames, views) for every sample"
        )
    return torch.stack([s.pixels for s in samples])


def collate_classification(samples: Sequence[ClassificationSample]) -> ClassificationBatch:
    """Stack classification samples into a `ClassificationBatch`."""
    if not samples:
        raise ValueError("expected at least one sample to collate, found none")
    pixels = _stack_pixels(samples)
    return ClassificationBatch(
        pixels=pixels,
        labels=torch.tensor([s.label for s in samples], dtype=torch.int64),
        indices=torch.tensor([s.index for s in samples], dtype=torch.int64),
        modality=_modality(samples[0].pixels),
    )


def collate_visual_text(samples: Sequence[VisualTextSample]) -> VisualTextBatch:
    """Stack visual-text samples and flatten their captions into a `VisualTextBatch`."""
    if not samples:
        raise ValueError("expected at least one sample to collate, found none")
    pixels = _stack_pixels(samples)
    seqs: list[Tensor] = []
    owners: list[int] = []
    captions: list[str] = []
    for b, s in enumerate(samples):
        seqs.extend(s.text_ids)
        captions.extend(s.captions)
        owners.extend([b] * len(s.text_ids))
    ids, padding = pad_sequences(seqs)
    return VisualTextBatch(
        pixels=pixels,
        text_ids=ids,
        text_padding=padding,
        text_owner=torch.tensor(owners, dtype=torch.int64),
        indices=torch.tensor([s.index for s in samples], dtype=torch.int64),
        item_ids=tuple(s.item_id for s in samples),
        captions=tuple(captions),
        modality=_modality(samples[0].pixels),
    )


def collate_mlm(samples: Sequence[MLMSample]) -> MLMBatch:
    """Pad MLM samples into an `MLMBatch` (labels padded with -1)."""
    if not samples:
        raise ValueError("expected at least one sample to collate, found none")
    ids, padding = pad_sequences([s.ids for s in samples])
    labels, _ = pad_sequences([s.labels for s in samples], pad_value=-1)
    return MLMBatch(
        ids=ids,
        padding=padding,
        labels=labels,
        indices=torch.tensor([s.index for s in samples], dtype=torch.int64),
    )


def collate_text_classification(
    samples: Sequence[TextClassificationSample],
) -> TextClassificationBatch:
    """Pad cloze samples into a `TextClassificationBatch`."""
    if not samples:
        raise ValueError("expected at least one sample to collate, found none")
    ids, padding = pad_sequences([s.ids for s in samples])
    return TextClassificationBatch(
        ids=ids,
        padding=padding,
        slots=torch.tensor([s.slot for s in samples], dtype=torch.int64),
        labels=torch.tensor([s.label for s in samples], dtype=torch.int64),
        indices=torch.tensor([s.index for s in samples], dtype=torch.int64),
    )


Sample = ClassificationSample | VisualTextSample | MLMSample | TextClassificationSample


def collate(samples: Sequence[Sample]) -> Batch:
    """Collate samples of one family, dispatching on the type of the first sample."""
    if not samples:
        raise ValueError("expected at least one sample to collate, found none")
    first = samples[0]
    if isinstance(first, ClassificationSample):
        return collate_classification(samples)  # type: ignore[arg-type]
    if isinstance(first, VisualTextSample):
        return collate_visual_text(samples)  # type: ignore[arg-type]
    if isinstance(first, MLMSample):
        return collate_mlm(samples)  # type: ignore[arg-type]
    if isinstance(first, TextClassificationSample):
        return collate_text_classification(samples)  # type: ignore[arg-type]
    raise TypeError(f"expected a data sample dataclass, found {type(first).__name__}")
