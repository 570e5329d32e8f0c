"""Typed samples (what a dataset returns) and batches (what a collate function returns).

One sample/batch pair per task family:

| family | sample | batch | task types |
|---|---|---|---|
| visual classification | `ClassificationSample` | `ClassificationBatch` | image/video classification |
| visual + text | `VisualTextSample` | `VisualTextBatch` | image/video caption and retrieval |
| masked language modelling | `MLMSample` | `MLMBatch` | mlm |
| cloze text classification | `TextClassificationSample` | `TextClassificationBatch` | GLUE |
| visual question answering | `VQASample` | `VQABatch` | vqa |

Pixel layouts: an image is `(3, S, S)`; a clip `(T, 3, S, S)`; an evaluation video with several
views `(V, T, 3, S, S)` (V = temporal views × spatial crops). Batches add a leading `B`. Text is
int64 token ids padded with 0, with a boolean `padding` mask (True = padding). Token targets use -1
for "no target".

Every sample and batch has a `skipped` field: the broken items a reader skipped (with
`on_error: skip`) before serving it, so bad-data counts travel with the batches from DataLoader
workers to the main process (`uniperceiver_cli.data.health.BadDataMonitor`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, cast

import torch
from torch import Tensor

from uniperceiver_cli.data.health import SkippedItem

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
        skipped: broken items skipped before this sample was served.
    """

    pixels: Tensor
    label: int
    index: int
    skipped: tuple[SkippedItem, ...] = ()


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
        skipped: broken items skipped before this sample was served.
    """

    pixels: Tensor
    text_ids: tuple[Tensor, ...]
    captions: tuple[str, ...]
    item_id: int | str
    index: int
    skipped: tuple[SkippedItem, ...] = ()


@dataclass(frozen=True)
class MLMSample:
    """One masked-language-modelling sequence (SPEC §3.2.3).

    Attributes:
        ids: `(n,)` int64 corrupted token ids (masked words are SPE, random or unchanged).
        labels: `(n,)` int64 original ids at the sub-tokens of selected words, -1 elsewhere.
        index: position of the sample in its dataset.
        skipped: broken items skipped before this sample was served.
    """

    ids: Tensor
    labels: Tensor
    index: int
    skipped: tuple[SkippedItem, ...] = ()


@dataclass(frozen=True)
class TextClassificationSample:
    """One cloze-formatted sentence (pair) with its label (SPEC §3.2.9).

    Attributes:
        ids: `(n,)` int64 token ids of the template-filled text.
        slot: position of the SPE slot whose output is compared with the label words.
        label: class index (order of the label words).
        index: position of the sample in its dataset.
        skipped: broken items skipped before this sample was served.
    """

    ids: Tensor
    slot: int
    label: int
    index: int
    skipped: tuple[SkippedItem, ...] = ()


@dataclass(frozen=True)
class VQASample:
    """One image with a question and its soft-scored answers (SPEC §1.10.6).

    The text is `question tokens + [SPE, EOT]`: the model's output at the SPE slot is compared
    with the encoded answer vocabulary (`targets.answer_targets`).

    Attributes:
        pixels: `(3, S, S)` float image.
        ids: `(n,)` int64 question ids followed by SPE and EOT.
        slot: position of the SPE slot in `ids` (n - 2).
        question: the raw question (after any left/right swap of a training flip).
        answers: the distinct answers given for the question.
        scores: soft score of each answer in [0, 1], aligned with `answers`.
        answer_labels: index of each answer in the answer vocabulary, -1 when absent from it.
        target: training target: an answer-vocabulary index drawn in proportion to the scores of
            the answers in the vocabulary (-1 when none is).
        item_id: question id (or record index).
        index: position of the sample in its dataset.
        skipped: broken items skipped before this sample was served.
    """

    pixels: Tensor
    ids: Tensor
    slot: int
    question: str
    answers: tuple[str, ...]
    scores: tuple[float, ...]
    answer_labels: tuple[int, ...]
    target: int
    item_id: int | str
    index: int
    skipped: tuple[SkippedItem, ...] = ()


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
        skipped: broken items the readers skipped while serving this batch.
    """

    pixels: Tensor
    labels: Tensor
    indices: Tensor
    modality: VisualModality
    soft_labels: Tensor | None = None
    skipped: tuple[SkippedItem, ...] = ()

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
        skipped: broken items the readers skipped while serving this batch.
    """

    pixels: Tensor
    text_ids: Tensor
    text_padding: Tensor
    text_owner: Tensor
    indices: Tensor
    item_ids: tuple[int | str, ...]
    captions: tuple[str, ...]
    modality: VisualModality
    skipped: tuple[SkippedItem, ...] = ()

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
        skipped: broken items the readers skipped while serving this batch.
    """

    ids: Tensor
    padding: Tensor
    labels: Tensor
    indices: Tensor
    skipped: tuple[SkippedItem, ...] = ()

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
        skipped: broken items the readers skipped while serving this batch.
    """

    ids: Tensor
    padding: Tensor
    slots: Tensor
    labels: Tensor
    indices: Tensor
    skipped: tuple[SkippedItem, ...] = ()

    @property
    def batch_size(self) -> int:
        """Number of sequences B."""
        return int(self.ids.shape[0])


@dataclass(frozen=True)
class VQABatch(_TensorBatch):
    """A batch of images with questions and soft-scored answers.

    Attributes:
        pixels: `(B, 3, S, S)` images.
        ids: `(B, L)` int64 question ids + SPE + EOT, padded with 0.
        padding: `(B, L)` bool, True at padding.
        slots: `(B,)` int64 position of each sequence's SPE slot.
        targets: `(B,)` int64 sampled training answer index (-1 = no answer in the vocabulary).
        answer_labels: `(B, A)` int64 answer-vocabulary index of each given answer, -1 at padding
            and for answers outside the vocabulary.
        answer_scores: `(B, A)` float soft score of each given answer (0 at padding).
        indices: `(B,)` int64 dataset positions.
        item_ids: B question ids.
        questions: B raw questions.
        answers: per sample, the distinct answers given.
        skipped: broken items the readers skipped while serving this batch.
    """

    pixels: Tensor
    ids: Tensor
    padding: Tensor
    slots: Tensor
    targets: Tensor
    answer_labels: Tensor
    answer_scores: Tensor
    indices: Tensor
    item_ids: tuple[int | str, ...]
    questions: tuple[str, ...]
    answers: tuple[tuple[str, ...], ...]
    skipped: tuple[SkippedItem, ...] = ()

    @property
    def batch_size(self) -> int:
        """Number of questions B."""
        return int(self.ids.shape[0])

    def soft_scores(self, num_answers: int) -> Tensor:
        """Dense `(B, num_answers)` float soft scores over the answer vocabulary (VQA accuracy)."""
        dense = torch.zeros(self.batch_size, num_answers, dtype=torch.float32)
        valid = self.answer_labels >= 0
        rows = torch.arange(self.batch_size).unsqueeze(1).expand_as(self.answer_labels)
        dense[rows[valid], self.answer_labels[valid]] = self.answer_scores[valid].float()
        return dense


Batch = ClassificationBatch | VisualTextBatch | MLMBatch | TextClassificationBatch | VQABatch


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


def _skipped(samples: Sequence[Any]) -> tuple[SkippedItem, ...]:
    return tuple(item for s in samples for item in getattr(s, "skipped", ()))


def _modality(pixels: Tensor) -> VisualModality:
    return "image" if pixels.ndim == 3 else "video"


def _require_samples(samples: Sequence[Any]) -> None:
    """Raise a `ValueError` for an empty batch."""
    if not samples:
        raise ValueError("expected at least one sample to collate, found none")


def _indices(samples: Sequence[Any]) -> Tensor:
    """`(B,)` int64 dataset positions of the samples."""
    return torch.tensor([s.index for s in samples], dtype=torch.int64)


def _stack_pixels(
    samples: Sequence[ClassificationSample | VisualTextSample | VQASample],
    *,
    settings: str = "image size, frames, views",
) -> Tensor:
    """Stack the samples' pixels into `(B, ...)`; `settings` names what must match in the hint."""
    shapes = {tuple(s.pixels.shape) for s in samples}
    if len(shapes) != 1:
        raise ValueError(
            f"expected samples with one pixel shape per batch, found {sorted(shapes)}; "
            f"use the same transform ({settings}) for every sample"
        )
    return torch.stack([s.pixels for s in samples])


def collate_classification(samples: Sequence[ClassificationSample]) -> ClassificationBatch:
    """Stack classification samples into a `ClassificationBatch`."""
    _require_samples(samples)
    pixels = _stack_pixels(samples)
    return ClassificationBatch(
        pixels=pixels,
        labels=torch.tensor([s.label for s in samples], dtype=torch.int64),
        indices=_indices(samples),
        modality=_modality(samples[0].pixels),
        skipped=_skipped(samples),
    )


def collate_visual_text(samples: Sequence[VisualTextSample]) -> VisualTextBatch:
    """Stack visual-text samples and flatten their captions into a `VisualTextBatch`."""
    _require_samples(samples)
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
        indices=_indices(samples),
        item_ids=tuple(s.item_id for s in samples),
        captions=tuple(captions),
        modality=_modality(samples[0].pixels),
        skipped=_skipped(samples),
    )


def collate_mlm(samples: Sequence[MLMSample]) -> MLMBatch:
    """Pad MLM samples into an `MLMBatch` (labels padded with -1)."""
    _require_samples(samples)
    ids, padding = pad_sequences([s.ids for s in samples])
    labels, _ = pad_sequences([s.labels for s in samples], pad_value=-1)
    return MLMBatch(
        ids=ids,
        padding=padding,
        labels=labels,
        indices=_indices(samples),
        skipped=_skipped(samples),
    )


def collate_text_classification(
    samples: Sequence[TextClassificationSample],
) -> TextClassificationBatch:
    """Pad cloze samples into a `TextClassificationBatch`."""
    _require_samples(samples)
    ids, padding = pad_sequences([s.ids for s in samples])
    return TextClassificationBatch(
        ids=ids,
        padding=padding,
        slots=torch.tensor([s.slot for s in samples], dtype=torch.int64),
        labels=torch.tensor([s.label for s in samples], dtype=torch.int64),
        indices=_indices(samples),
        skipped=_skipped(samples),
    )


def collate_vqa(samples: Sequence[VQASample]) -> VQABatch:
    """Stack VQA samples into a `VQABatch` (answers padded with label -1 and score 0)."""
    _require_samples(samples)
    pixels = _stack_pixels(samples, settings="image size")
    ids, padding = pad_sequences([s.ids for s in samples])
    width = max([len(s.answers) for s in samples] + [1])
    labels = torch.full((len(samples), width), -1, dtype=torch.int64)
    scores = torch.zeros((len(samples), width), dtype=torch.float32)
    for b, s in enumerate(samples):
        n = len(s.answers)
        labels[b, :n] = torch.tensor(s.answer_labels, dtype=torch.int64)
        scores[b, :n] = torch.tensor(s.scores, dtype=torch.float32)
    return VQABatch(
        pixels=pixels,
        ids=ids,
        padding=padding,
        slots=torch.tensor([s.slot for s in samples], dtype=torch.int64),
        targets=torch.tensor([s.target for s in samples], dtype=torch.int64),
        answer_labels=labels,
        answer_scores=scores,
        indices=_indices(samples),
        item_ids=tuple(s.item_id for s in samples),
        questions=tuple(s.question for s in samples),
        answers=tuple(s.answers for s in samples),
        skipped=_skipped(samples),
    )


Sample = ClassificationSample | VisualTextSample | MLMSample | TextClassificationSample | VQASample


def collate(samples: Sequence[Sample]) -> Batch:
    """Collate samples of one family, dispatching on the type of the first sample."""
    _require_samples(samples)
    first = samples[0]
    if isinstance(first, ClassificationSample):
        return collate_classification(samples)  # type: ignore[arg-type]
    if isinstance(first, VisualTextSample):
        return collate_visual_text(samples)  # type: ignore[arg-type]
    if isinstance(first, MLMSample):
        return collate_mlm(samples)  # type: ignore[arg-type]
    if isinstance(first, TextClassificationSample):
        return collate_text_classification(samples)  # type: ignore[arg-type]
    if isinstance(first, VQASample):
        return collate_vqa(samples)  # type: ignore[arg-type]
    raise TypeError(f"expected a data sample dataclass, found {type(first).__name__}")
