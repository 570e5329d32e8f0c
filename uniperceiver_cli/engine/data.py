"""Recipe task → dataset and candidate names, through the data engine (`uniperceiver_cli.data`).

`open_task_data` resolves a task's data section (paths, VQA answer file) and opens it with
`uniperceiver_cli.data.build.build_dataset`: the on-disk readers with the SPEC §3.3 transforms, or the
in-memory toy world with a plain resize + normalise (`data.transforms.plain_transform`). It returns the
dataset with what the task is scored against (class names, label words, VQA answers). Training streams,
few-shot subsets and bad-data accounting are the data engine's too (`build_loader`, `MultiTaskStream`,
`data_fraction_subset`, `bad_data_monitor`); `eval_batches` is one evaluation pass.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from uniperceiver_cli.data.build import FORMATS_FOR_TASK, build_dataset, build_loader
from uniperceiver_cli.data.formats.base import read_class_names
from uniperceiver_cli.data.options import DataOptions, JsonlPairsOptions, options_for
from uniperceiver_cli.data.transforms import plain_transform
from uniperceiver_cli.data.video import ClipSpec
from uniperceiver_cli.recipe.data import PATH_FIELDS
from uniperceiver_cli.recipe.paths import resolve_path

logger = logging.getLogger(__name__)

VISUAL_TEXT_TYPES = frozenset(
    {"image_caption", "image_retrieval", "video_caption", "video_retrieval"}
)
CLASSIFICATION_TYPES = frozenset({"image_classification", "video_classification"})
VIDEO_TYPES = frozenset({"video_classification", "video_caption", "video_retrieval"})


class TaskDataError(ValueError):
    """A task's data cannot be opened the way the recipe asks."""


@dataclass
class TaskData:
    """A task's dataset and what its predictions are scored against.

    Attributes:
        dataset: map-style dataset of typed samples (accepts `SampleKey`s) or a stream.
        collate: collate function producing the task family's batch.
        class_names: classification: synonyms of every class, in index order.
        label_words: text classification: label words in class order.
        answers: VQA: the answer vocabulary (row k = answer index k of the samples).
    """

    dataset: Dataset[Any]
    collate: Callable[[Sequence[Any]], Any]
    class_names: tuple[tuple[str, ...], ...] | None = None
    label_words: tuple[str, ...] | None = None
    answers: tuple[str, ...] | None = None

    def replace_dataset(self, dataset: Dataset[Any]) -> TaskData:
        """The same task data over another dataset (a few-shot subset)."""
        return dataclasses.replace(self, dataset=dataset)


@dataclass(frozen=True)
class PathContext:
    """How relative recipe paths resolve (`recipe.paths` rules)."""

    data_root: Path | None
    recipe_dir: Path

    def resolve(self, value: str) -> str:
        """Resolve one path field."""
        return str(resolve_path(value, root=self.data_root, recipe_dir=self.recipe_dir))


def _resolved_options(data_spec: Any, paths: PathContext) -> DataOptions:
    values = data_spec.model_dump()
    for key in PATH_FIELDS:
        if isinstance(values.get(key), str):
            values[key] = paths.resolve(values[key])
    return options_for(values)


def _task_image_size(task: Any, model_image_size: int) -> int:
    size = getattr(task, "image_size", None)
    return int(size) if size is not None else model_image_size


def _vqa_options(task: Any, options: DataOptions, paths: PathContext) -> DataOptions:
    """Give the reader the task's `answers_file` (the candidate set) when the data section has none."""
    answers_file = getattr(task, "answers_file", None)
    if not answers_file or not isinstance(options, JsonlPairsOptions):
        return options
    resolved = paths.resolve(answers_file)
    if options.answers_file and Path(options.answers_file) != Path(resolved):
        raise TaskDataError(
            f"task {task.name!r}: answers_file {resolved} differs from the data section's "
            f"answers_file {options.answers_file}; keep one of them"
        )
    return dataclasses.replace(options, answers_file=resolved)


def open_task_data(
    task: Any,
    data_spec: Any,
    *,
    train: bool,
    paths: PathContext,
    model_image_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
) -> TaskData:
    """Open one task's data as a dataset of typed samples (through `data.build.build_dataset`).

    Args:
        task: the recipe task section.
        data_spec: its `data` or `eval_data` section.
        train: training (augmentation, one random caption per item) or evaluation (all captions).
        paths: how relative paths resolve.
        model_image_size: the model's image side (default input size).
        rank: this process's rank (streamed formats shard by it).
        world_size: number of processes.
        seed: run seed (streamed formats shuffle with it).

    Returns:
        `TaskData`.

    Raises:
        TaskDataError: for a task type / format pair the data engine cannot read, or conflicting settings.
        DataError: the files cannot be read.
    """
    ttype = str(task.type)
    fmt = str(data_spec.format)
    if ttype not in FORMATS_FOR_TASK or fmt not in FORMATS_FOR_TASK[ttype]:
        allowed = ", ".join(sorted(FORMATS_FOR_TASK.get(ttype, ())))
        raise TaskDataError(
            f"task {task.name!r}: data format {fmt!r} cannot feed a {ttype} task; "
            f"use one of: {allowed or 'none (unknown task type)'}"
        )
    try:
        options = _resolved_options(data_spec, paths)
    except ValueError as e:
        raise TaskDataError(f"task {task.name!r}: {e}") from e
    if ttype == "vqa":
        options = _vqa_options(task, options, paths)
    size = _task_image_size(task, model_image_size)
    video = ttype in VIDEO_TYPES
    clip = None
    if video:
        clip = ClipSpec(
            num_frames=int(getattr(task, "num_frames", 8)),
            frame_stride=int(getattr(task, "frame_stride", 32)),
        )
    transform = plain_transform(size, video=video) if fmt == "toy" else None
    max_len = getattr(task, "max_text_len", None)
    try:
        ds = build_dataset(
            options,
            task_type=ttype,
            image_size=size,
            transform=transform,
            clip=clip,
            max_text_len=int(max_len) if max_len is not None else None,
            caption_mode=("random" if train else "all") if ttype in VISUAL_TEXT_TYPES else None,
            train=train,
            seed=seed,
            rank=rank,
            world_size=world_size,
        )
    except ValueError as e:
        raise TaskDataError(f"task {task.name!r}: {e}") from e
    collate = getattr(ds, "collate_fn", None)
    if collate is None:
        raise TaskDataError(f"task {task.name!r}: reader {type(ds).__name__} has no collate_fn")
    data = TaskData(ds, collate)
    if ttype in CLASSIFICATION_TYPES:
        names = tuple(getattr(ds, "class_synonyms", ()))
        names_file = getattr(task, "class_names_file", None)
        if names_file:
            names = tuple(read_class_names(paths.resolve(names_file), expected=len(names)))
        if not names:
            raise TaskDataError(f"task {task.name!r}: the data has no class names")
        data.class_names = names
    elif ttype == "text_classification":
        words = task.label_words or getattr(ds, "label_words", None)
        if not words:
            raise TaskDataError(
                f"task {task.name!r}: no label words; set label_words in the task section"
            )
        data.label_words = tuple(words)
    elif ttype == "vqa":
        answers = tuple(getattr(ds, "answers", ()))
        if not answers:
            raise TaskDataError(f"task {task.name!r}: the VQA data has no answer vocabulary")
        data.answers = answers
    return data


def eval_batches(
    data: TaskData, *, batch_size: int, rank: int = 0, world_size: int = 1
) -> Iterator[Any]:
    """One pass over an evaluation dataset, each item on exactly one rank."""
    loader = build_loader(
        data.dataset,
        batch_size=batch_size,
        train=False,
        seed=0,
        rank=rank,
        world_size=world_size,
        collate_fn=data.collate,
    )
    yield from loader


def steps_per_epoch(data: TaskData, batch_size: int, world_size: int) -> int | None:
    """Optimizer steps of one pass over the data (None for streams)."""
    ds = data.dataset
    if isinstance(ds, torch.utils.data.IterableDataset):
        return None
    return math.ceil(len(ds) / (batch_size * world_size))  # type: ignore[arg-type]
