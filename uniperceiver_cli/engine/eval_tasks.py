"""Evaluation tasks: task-type sets, metric names, the protocol, `EvalTask` and task resolution from a recipe."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from uniperceiver_cli.data.samples import (
    ClassificationSample,
)
from uniperceiver_cli.engine.data import PathContext, TaskData, TaskDataError
from uniperceiver_cli.model.uniperceiver import UniPerceiver

Precision = Literal["fp32", "bf16", "fp16"]

CLASSIFICATION_TYPES = frozenset({"image_classification", "video_classification"})
RETRIEVAL_TYPES = frozenset({"image_retrieval", "video_retrieval"})
CAPTION_TYPES = frozenset({"image_caption", "video_caption"})
TEXT_TYPES = frozenset({"text_classification"})

#: Metrics each task type can report (`--fail-under` names are checked against these before a run).
METRICS_BY_TYPE: dict[str, tuple[str, ...]] = {
    "image_classification": ("acc1", "acc5"),
    "video_classification": ("acc1", "acc5"),
    "image_retrieval": (
        "r1_i2t", "r5_i2t", "r10_i2t", "r1_t2i", "r5_t2i", "r10_t2i", "r_mean", "rsum",
    ),
    "video_retrieval": (
        "r1_i2t", "r5_i2t", "r10_i2t", "r1_t2i", "r5_t2i", "r10_t2i", "r_mean", "rsum",
    ),
    "image_caption": ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider"),
    "video_caption": ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider"),
    "text_classification": ("accuracy", "f1", "mcc"),
}  # fmt: skip

#: Top-k rows written to the retrieval predictions (the reference caps ranks at 10).
RANKS_KEPT = 10

VOCAB_CACHE_ENV = "UNIPERCEIVER_CACHE"


class EvalError(Exception):
    """An evaluation cannot run as asked (unsupported task type, bad threshold, unusable model)."""


# ---------------------------------------------------------------------------------------------- protocol


@dataclass(frozen=True)
class Protocol:
    """How a task is evaluated (the recipe's `evaluation` section, SPEC §6-§7).

    Attributes:
        batch_size: samples per evaluation batch.
        beam_size: caption beam size (1 = greedy).
        max_len: caption decoding length in tokens.
        length_penalty: beam ranking divides by (#tokens + 1)^length_penalty.
        temporal_views: temporal clips per video (video classification).
        spatial_crops: spatial crops per clip (video classification).
        view_mode: `uniform` or `interleaved` temporal views.
        caption_metrics: `builtin` (no Java) or `coco` (pycocoevalcap).
        metrics: report only these metrics (None = all of the task type).
    """

    batch_size: int = 64
    beam_size: int = 2
    max_len: int = 21
    length_penalty: float = 0.0
    temporal_views: int = 1
    spatial_crops: int = 1
    view_mode: Literal["uniform", "interleaved"] = "uniform"
    caption_metrics: Literal["builtin", "coco"] = "builtin"
    metrics: tuple[str, ...] | None = None

    @classmethod
    def from_spec(cls, evaluation: Any, *, batch_size: int | None = None) -> Protocol:
        """Build from a recipe `evaluation` section (any object with its attributes)."""
        metrics = getattr(evaluation, "metrics", None)
        return cls(
            batch_size=int(batch_size or getattr(evaluation, "batch_size", None) or 64),
            beam_size=int(getattr(evaluation, "beam_size", 2)),
            max_len=int(getattr(evaluation, "max_len", 21)),
            length_penalty=float(getattr(evaluation, "length_penalty", 0.0)),
            temporal_views=int(getattr(evaluation, "temporal_views", 1)),
            spatial_crops=int(getattr(evaluation, "spatial_crops", 1)),
            view_mode=getattr(evaluation, "view_mode", "uniform"),
            caption_metrics=getattr(evaluation, "caption_metrics", "builtin"),
            metrics=tuple(metrics) if metrics else None,
        )

    def describe(self, task_type: str) -> dict[str, Any]:
        """The protocol fields that matter for a task type (written to `metrics.json`)."""
        out: dict[str, Any] = {"batch_size": self.batch_size}
        if task_type in CAPTION_TYPES:
            out.update(
                beam_size=self.beam_size,
                max_len=self.max_len,
                length_penalty=self.length_penalty,
                caption_metrics=self.caption_metrics,
            )
        if task_type == "video_classification":
            out.update(
                temporal_views=self.temporal_views,
                spatial_crops=self.spatial_crops,
                view_mode=self.view_mode,
                views=self.temporal_views * self.spatial_crops,
            )
        return out


@dataclass
class EvalTask:
    """One task ready to evaluate.

    Attributes:
        spec: the recipe task section (name, type, temperature, frames, ...).
        data: its evaluation dataset (typed samples) and candidates.
        protocol: how it is evaluated.
        split: the data split, for the report.
        data_format: the data format, for the report.
    """

    spec: Any
    data: TaskData
    protocol: Protocol
    split: str = ""
    data_format: str = ""

    @property
    def name(self) -> str:
        """Task name."""
        return str(self.spec.name)

    @property
    def type(self) -> str:
        """Task type."""
        return str(self.spec.type)


# ---------------------------------------------------------------------------------------------- data


class _RepeatViews(torch.utils.data.Dataset[Any]):
    """Serve every clip of a classification dataset as V identical views `(V, T, 3, S, S)`.

    Used for in-memory toy videos, whose uniform motion makes every temporal view the same clip.
    """

    def __init__(self, dataset: torch.utils.data.Dataset[Any], views: int) -> None:
        self.dataset = dataset
        self.views = views

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> ClassificationSample:
        sample: ClassificationSample = self.dataset[index]
        pixels = sample.pixels.unsqueeze(0).expand(self.views, *sample.pixels.shape)
        return ClassificationSample(
            pixels=pixels.contiguous(), label=sample.label, index=sample.index
        )


def open_eval_data(
    spec: Any, data_spec: Any, *, paths: PathContext, model_image_size: int, protocol: Protocol
) -> TaskData:
    """Open a task's evaluation data (the training engine's readers in evaluation mode, plus multi-view video).

    Args:
        spec: the recipe task section.
        data_spec: its data section.
        paths: how relative paths resolve.
        model_image_size: default input side.
        protocol: views for video classification.

    Returns:
        `TaskData` whose samples are evaluation samples (all captions per item, centre crops, views).

    Raises:
        TaskDataError: a task type the engine cannot evaluate (VQA, MLM).
    """
    from uniperceiver_cli.engine.data import open_task_data

    if spec.type == "vqa":
        raise TaskDataError(
            f"task {spec.name!r}: VQA evaluation needs a VQA reader, which the data engine does not "
            "provide yet; remove the task from the recipe"
        )
    if spec.type not in METRICS_BY_TYPE:
        raise TaskDataError(
            f"task {spec.name!r}: task type {spec.type!r} has no evaluation protocol; evaluable types: "
            f"{', '.join(METRICS_BY_TYPE)}"
        )
    views = protocol.temporal_views * protocol.spatial_crops
    if spec.type != "video_classification" or views == 1:
        return open_task_data(
            spec, data_spec, train=False, paths=paths, model_image_size=model_image_size
        )
    if data_spec.format == "toy":
        data = open_task_data(
            spec, data_spec, train=False, paths=paths, model_image_size=model_image_size
        )
        return TaskData(
            _RepeatViews(data.dataset, views), data.collate, class_names=data.class_names
        )
    return _open_multiview_videos(spec, data_spec, paths, model_image_size, protocol)


def _open_multiview_videos(
    spec: Any, data_spec: Any, paths: PathContext, model_image_size: int, protocol: Protocol
) -> TaskData:
    from uniperceiver_cli.data.formats.base import read_class_names
    from uniperceiver_cli.data.formats.video_classification import VideoClassificationDataset
    from uniperceiver_cli.data.options import options_for
    from uniperceiver_cli.data.transforms import video_transform
    from uniperceiver_cli.data.video import ClipSpec
    from uniperceiver_cli.recipe.data import PATH_FIELDS

    values = data_spec.model_dump()
    for key in PATH_FIELDS:
        if isinstance(values.get(key), str):
            values[key] = paths.resolve(values[key])
    options = options_for(values)
    size = int(getattr(spec, "image_size", None) or model_image_size)
    clip = ClipSpec(
        num_frames=int(spec.num_frames),
        frame_stride=int(spec.frame_stride),
        temporal_views=protocol.temporal_views,
        spatial_crops=protocol.spatial_crops,
        view_mode=protocol.view_mode,
    )
    transform = video_transform(size, train=False, num_spatial_crops=protocol.spatial_crops)
    ds = VideoClassificationDataset(options, transform=transform, clip=clip, train=False)  # type: ignore[arg-type]
    names = tuple(ds.class_synonyms)
    if getattr(spec, "class_names_file", None):
        names = tuple(read_class_names(paths.resolve(spec.class_names_file), expected=len(names)))
    return TaskData(ds, ds.collate_fn, class_names=names)


def tasks_from_recipe(
    recipe: Any,
    *,
    model_image_size: int,
    recipe_dir: str | Path | None = None,
    data_root: str | Path | None = None,
    batch_size: int | None = None,
) -> list[EvalTask]:
    """The evaluation tasks of a recipe.

    Eval and zero-shot recipes evaluate every task on its `data`; training recipes evaluate the tasks that
    have `eval_data` (others are skipped).

    Args:
        recipe: a validated recipe root model.
        model_image_size: the model's image side (default input size).
        recipe_dir: folder relative paths fall back to (default: the current folder).
        data_root: overrides the recipe's data root.
        batch_size: overrides `evaluation.batch_size`.

    Returns:
        The tasks, in recipe order.
    """
    from uniperceiver_cli.recipe.paths import data_root as resolve_data_root

    root = Path(data_root) if data_root is not None else resolve_data_root(recipe.run.data_root)
    paths = PathContext(root, Path(recipe_dir) if recipe_dir is not None else Path.cwd())
    protocol = Protocol.from_spec(recipe.evaluation, batch_size=batch_size)
    evaluating = getattr(recipe, "command", "eval") in ("eval", "zero_shot")
    tasks: list[EvalTask] = []
    for spec in recipe.tasks:
        data_spec = spec.data if evaluating else spec.eval_data
        if data_spec is None:
            continue
        if not evaluating and spec.type not in METRICS_BY_TYPE:
            continue
        data = open_eval_data(
            spec, data_spec, paths=paths, model_image_size=model_image_size, protocol=protocol
        )
        tasks.append(
            EvalTask(spec, data, protocol, split=str(data_spec.split), data_format=data_spec.format)
        )
    return tasks


def resolve_tasks(
    recipe_or_tasks: Any,
    model: UniPerceiver,
    *,
    recipe_dir: str | Path | None = None,
    data_root: str | Path | None = None,
    batch_size: int | None = None,
) -> tuple[list[EvalTask], Any]:
    """The evaluation tasks of a recipe for `model` (its image size), as `evaluate_tasks` runs them.

    Args:
        recipe_or_tasks: a recipe root model, a `LoadedRecipe` or a sequence of `EvalTask`.
        model: the model to evaluate.
        recipe_dir: folder relative data paths fall back to (default: the recipe file's folder,
            else cwd).
        data_root: overrides the recipe's data root.
        batch_size: overrides the evaluation batch size.

    Returns:
        The tasks in recipe order, and the recipe (None when tasks were given).

    Raises:
        TaskDataError, DataError: the data cannot be opened.
        EvalError: the argument is neither a recipe nor tasks.
    """
    recipe = recipe_or_tasks
    if hasattr(recipe, "recipe") and hasattr(recipe, "path"):  # a LoadedRecipe
        recipe_dir = recipe_dir if recipe_dir is not None else Path(recipe.path).parent
        recipe = recipe.recipe
    if hasattr(recipe, "tasks") and hasattr(recipe, "evaluation"):
        tasks = tasks_from_recipe(
            recipe,
            model_image_size=model.config.image_size,
            recipe_dir=recipe_dir,
            data_root=data_root,
            batch_size=batch_size,
        )
        return tasks, recipe
    items = list(recipe_or_tasks)
    if not all(isinstance(t, EvalTask) for t in items):
        raise EvalError(
            "evaluate_tasks expects a recipe, a LoadedRecipe or a sequence of EvalTask, found "
            f"{type(recipe_or_tasks).__name__}"
        )
    return items, None
