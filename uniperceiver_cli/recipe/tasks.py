"""Task sections of a recipe, discriminated on `type` (torch-free).

Every task names its data, batch size, sampling and loss weights and the candidate (target) set it is scored
against. Defaults mirror the reference recipes (SPEC §1.10, §3.3, §4).
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import Field

from uniperceiver_cli.model.config import LOGIT_SCALE_NAMES
from uniperceiver_cli.recipe.base import (
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Probability,
    Section,
    as_number,
)
from uniperceiver_cli.recipe.data import FORMATS_FOR_TASK, DataSpec

TemperatureName = Literal[
    "img_cls",
    "video_cls",
    "text_mlm",
    "text_caption",
    "caption",
    "mlm",
    "retrieve",
    "tqa_mlm",
    "tqa_caption",
    "tqa_retrieve",
    "downstream",
]
if set(typing.get_args(TemperatureName)) != set(LOGIT_SCALE_NAMES):  # keeps the two lists in sync
    raise ImportError("TemperatureName and LOGIT_SCALE_NAMES disagree")

_TASK_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class MixupSpec(Section):
    """Mixup / CutMix for image classification (timm-style, SPEC §4.3)."""

    mixup_alpha: float = Field(
        0.8, ge=0, description="Mixup Beta(α, α) parameter; 0 disables Mixup."
    )
    cutmix_alpha: float = Field(
        1.0, ge=0, description="CutMix Beta(α, α) parameter; 0 disables CutMix."
    )
    prob: Probability = Field(1.0, description="Probability of mixing a batch.")
    switch_prob: Probability = Field(
        0.5, description="Probability of CutMix instead of Mixup when both are on."
    )

    @classmethod
    def cross_field_problems(cls, values: Mapping[str, Any]) -> list[str]:
        """At least one of Mixup and CutMix must be on."""
        if (
            as_number(values.get("mixup_alpha", 0.8)) == 0
            and as_number(values.get("cutmix_alpha", 1.0)) == 0
        ):
            return [
                "mixup_alpha (0) and cutmix_alpha (0) are both 0: remove `mixup` to turn it off"
            ]
        return []


class _TaskBase(Section):
    name: str = Field(
        description="Unique task name (letters, digits, `_`, `-`, `.`); used in logs, metrics and task routing.",
        pattern=_TASK_NAME_PATTERN,
    )
    data: DataSpec = Field(
        description="Training (or evaluated) data source, discriminated on `format`."
    )
    eval_data: DataSpec | None = Field(
        None, description="Held-out data evaluated during training; optional."
    )
    batch_size: PositiveInt = Field(description="Samples per batch per process.")
    sampling_weight: PositiveFloat = Field(
        1.0, description="Relative probability of picking this task at a training step (SPEC §3.5)."
    )
    loss_weight: PositiveFloat = Field(1.0, description="Multiplier of this task's loss.")
    label_smoothing: float = Field(
        0.1, ge=0, lt=1, description="Label smoothing ε of the cross-entropy (0 = plain CE)."
    )
    temperature: TemperatureName | None = Field(
        None,
        description="Which learnable logit scale scores this task; default by task type (SPEC §1.9).",
    )

    @classmethod
    def cross_field_problems(cls, values: Mapping[str, Any]) -> list[str]:
        """The data format must be one this task type can read."""
        task_type = values.get("type")
        allowed = FORMATS_FOR_TASK.get(str(task_type))
        problems: list[str] = []
        if allowed is None:
            return problems
        for field_name in ("data", "eval_data"):
            spec = values.get(field_name)
            fmt = spec.get("format") if isinstance(spec, Mapping) else getattr(spec, "format", None)
            if fmt is not None and fmt not in allowed:
                problems.append(
                    f"{field_name}.format ({fmt!r}) cannot feed a task of type {task_type!r}; "
                    f"use one of: {', '.join(sorted(allowed))}"
                )
        return problems


class _VisualMixin(Section):
    image_size: PositiveInt | None = Field(
        None,
        description="Input side in pixels; default: the model's image size (224 for base/large).",
    )


class ImageClassificationTask(_TaskBase, _VisualMixin):
    """Image classification scored against encoded class names (SPEC §1.10.1)."""

    type: Literal["image_classification"] = Field(description="Task type tag.")
    class_names_file: str | None = Field(
        None,
        description="Target set: one class name per line (`a|b` lists synonyms); default: the data's class names.",
    )
    mixup: MixupSpec | None = Field(None, description="Mixup/CutMix with soft targets; null = off.")


class VideoClassificationTask(_TaskBase, _VisualMixin):
    """Video classification scored against encoded class names."""

    type: Literal["video_classification"] = Field(description="Task type tag.")
    num_frames: int = Field(
        8, ge=1, le=64, description="Frames per clip (T); at most the model's max_frames."
    )
    frame_stride: PositiveInt = Field(32, description="Frame stride at 30 fps (SPEC §3.3).")
    class_names_file: str | None = Field(
        None, description="Target set of class names; default: the data's."
    )


class _CaptionBase(_TaskBase, _VisualMixin):
    max_text_len: PositiveInt = Field(50, le=512, description="Caption tokens kept (incl. EOT).")
    vocabulary_file: str | None = Field(
        None,
        description="Restrict the candidate vocabulary to the words listed (one per line); "
        "default: the full 49,411-entry vocabulary.",
    )
    vocab_negatives: NonNegativeInt | None = Field(
        1024,
        description="Vocabulary candidates per step: the ids in the batch plus this many ids sampled uniformly "
        "(from `vocabulary_file` when given); null = the whole vocabulary, encoded with gradients at every step "
        "as the reference does (exact, much slower).",
    )


class ImageCaptionTask(_CaptionBase):
    """Image captioning with the two-stream formulation (SPEC §1.10.4)."""

    type: Literal["image_caption"] = Field(description="Task type tag.")


class VideoCaptionTask(_CaptionBase):
    """Video captioning with the two-stream formulation."""

    type: Literal["video_caption"] = Field(description="Task type tag.")
    num_frames: int = Field(4, ge=1, le=64, description="Frames per clip (T).")
    frame_stride: PositiveInt = Field(32, description="Frame stride at 30 fps.")


class _RetrievalBase(_TaskBase, _VisualMixin):
    max_text_len: PositiveInt = Field(30, le=512, description="Caption tokens kept (incl. EOT).")
    gather_features: bool = Field(
        True,
        description="In single-task runs, score against the features of all ranks (global negatives).",
    )


class ImageRetrievalTask(_RetrievalBase):
    """Image-text retrieval: image→text and text→image cross-entropies (SPEC §1.10.2)."""

    type: Literal["image_retrieval"] = Field(description="Task type tag.")


class VideoRetrievalTask(_RetrievalBase):
    """Video-text retrieval."""

    type: Literal["video_retrieval"] = Field(description="Task type tag.")
    num_frames: int = Field(4, ge=1, le=64, description="Frames per clip (T).")
    frame_stride: PositiveInt = Field(32, description="Frame stride at 30 fps.")


class MLMTask(_TaskBase):
    """Masked language modelling against the encoded vocabulary (SPEC §1.10.3)."""

    type: Literal["mlm"] = Field(description="Task type tag.")
    max_text_len: PositiveInt = Field(128, le=512, description="Tokens per sample.")
    label_smoothing: float = Field(
        0.0, ge=0, lt=1, description="Label smoothing ε (MLM uses plain CE)."
    )
    vocab_negatives: NonNegativeInt | None = Field(
        1024,
        description="Vocabulary candidates per step: the ids in the batch plus this many ids sampled uniformly "
        "(from `vocabulary_file` when given); null = the whole vocabulary, encoded with gradients at every step "
        "as the reference does (exact, much slower).",
    )
    vocabulary_file: str | None = Field(
        None,
        description="Restrict the candidate vocabulary to the words listed (one per line); "
        "default: the full 49,411-entry vocabulary.",
    )


class TextClassificationTask(_TaskBase):
    """GLUE-style classification as a cloze over label words (SPEC §1.10.5)."""

    type: Literal["text_classification"] = Field(description="Task type tag.")
    max_text_len: PositiveInt = Field(256, le=512, description="Tokens per sample.")
    label_words: list[str] | None = Field(
        None,
        min_length=2,
        description="Label words in class order; default: the GLUE task's (SPEC §3.2.9).",
    )


class VQATask(_TaskBase):
    """Visual question answering scored against encoded answers (SPEC §1.10.6)."""

    type: Literal["vqa"] = Field(description="Task type tag.")
    answers_file: str | None = Field(None, description="Candidate answers, one per line.")
    max_text_len: PositiveInt = Field(40, le=512, description="Question tokens kept.")


TaskSpec = Annotated[
    ImageClassificationTask
    | VideoClassificationTask
    | ImageCaptionTask
    | VideoCaptionTask
    | ImageRetrievalTask
    | VideoRetrievalTask
    | MLMTask
    | TextClassificationTask
    | VQATask,
    Field(discriminator="type"),
]

#: Default temperature (logit scale) per task type (SPEC §1.9).
DEFAULT_TEMPERATURE: dict[str, str] = {
    "image_classification": "img_cls",
    "video_classification": "video_cls",
    "image_caption": "caption",
    "video_caption": "caption",
    "image_retrieval": "retrieve",
    "video_retrieval": "retrieve",
    "mlm": "text_mlm",
    "text_classification": "text_mlm",
    "vqa": "downstream",
}
