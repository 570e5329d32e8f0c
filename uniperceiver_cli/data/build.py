"""Open a reader by format name, build its default transform, and wrap it in a DataLoader.

`build_dataset` is the one place that maps a recipe data format onto a reader class; the readers
take typed options (`uniperceiver_cli.data.options`) plus the task-level settings passed here.
`build_loader` picks the sampler (endless, seeded, rank-strided stream for training; one sharded
pass for evaluation), the collate function of the reader's task family, a seeded generator and a
worker seeding function.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from uniperceiver_cli.data.formats.captions import CaptionMode
from uniperceiver_cli.data.health import DEFAULT_MAX_BAD_FRACTION, BadDataMonitor
from uniperceiver_cli.data.options import (
    CocoCaptionsOptions,
    DataOptions,
    GlueTsvOptions,
    ImageFolderOptions,
    ImagenetListOptions,
    JsonlPairsOptions,
    KarpathyOptions,
    TextCorpusOptions,
    ToyOptions,
    VideoCaptionsOptions,
    VideoClassificationOptions,
    WebDatasetOptions,
    format_name,
)
from uniperceiver_cli.data.sampler import (
    InfiniteSampler,
    SampleKey,
    ShardedSampler,
    TaskSampler,
    mix_seed,
)
from uniperceiver_cli.data.text import TextTokenizer
from uniperceiver_cli.data.transforms import (
    caption_transform,
    classification_transform,
    video_transform,
)
from uniperceiver_cli.data.video import ClipSpec

logger = logging.getLogger(__name__)

VIDEO_TASKS = frozenset({"video_classification", "video_caption", "video_retrieval"})
IMAGE_TASKS = frozenset({"image_classification", "image_caption", "image_retrieval", "vqa"})

#: Reader formats each task type can read (mirrors the recipe's FORMATS_FOR_TASK).
FORMATS_FOR_TASK: dict[str, frozenset[str]] = {
    "image_classification": frozenset({"image_folder", "imagenet_list", "toy"}),
    "video_classification": frozenset({"video_classification", "toy"}),
    "image_caption": frozenset({"coco_captions", "karpathy", "jsonl_pairs", "webdataset", "toy"}),
    "image_retrieval": frozenset({"coco_captions", "karpathy", "jsonl_pairs", "webdataset", "toy"}),
    "video_caption": frozenset({"video_captions", "toy"}),
    "video_retrieval": frozenset({"video_captions", "toy"}),
    "mlm": frozenset({"text_corpus", "toy"}),
    "text_classification": frozenset({"glue_tsv", "toy"}),
    "vqa": frozenset({"jsonl_pairs", "toy"}),
}


def default_transform(
    task_type: str, image_size: int, *, train: bool, clip: ClipSpec | None = None
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The SPEC §3.3 pipeline of a task type (None for text-only tasks)."""
    if task_type in VIDEO_TASKS:
        crops = clip.spatial_crops if clip is not None and not train else 1
        return video_transform(image_size, train=train, num_spatial_crops=crops)
    if task_type == "image_classification":
        return classification_transform(image_size, train=train)
    if task_type in IMAGE_TASKS:
        return caption_transform(image_size, train=train, flip=task_type != "vqa")
    return None


def build_dataset(
    options: DataOptions,
    *,
    task_type: str,
    split: str | None = None,
    image_size: int | None = None,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    clip: ClipSpec | None = None,
    tokenizer: TextTokenizer | None = None,
    max_text_len: int | None = None,
    caption_mode: CaptionMode | None = None,
    train: bool | None = None,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> Dataset[Any]:
    """Open the reader of `options` for a task.

    Args:
        options: data options (see `options_for` to convert a recipe section).
        task_type: recipe task type; decides the sample family and the default transform.
        split: overrides `options.split`.
        image_size: side S of the default transform (ignored when `transform` is given; None and
            no transform = decode only, scaled to [0, 1]).
        transform: explicit image/clip transform.
        clip: frames, stride and evaluation views (video tasks).
        tokenizer: default: the packaged CLIP tokenizer.
        max_text_len: text tokens kept.
        caption_mode: caption tasks: `random`, `pairs` or `all` (default by split).
        train: training behaviour; default: split == "train".
        seed: stream seed (streamed formats only; map-style readers are seeded by the sampler).
        rank: this process's rank (streamed formats).
        world_size: number of ranks (streamed formats).

    Returns:
        A map-style dataset (a `MapDataset`) or a `WebDatasetStream`, each with `collate_fn`.

    Raises:
        ValueError: the format cannot feed the task type.
    """
    fmt = format_name(options)
    if task_type not in FORMATS_FOR_TASK:
        raise ValueError(
            f"expected a task type among {', '.join(sorted(FORMATS_FOR_TASK))}, found {task_type!r}"
        )
    if fmt not in FORMATS_FOR_TASK[task_type]:
        allowed = ", ".join(sorted(FORMATS_FOR_TASK[task_type]))
        raise ValueError(
            f"data format {fmt!r} cannot feed a {task_type} task; use one of: {allowed}"
        )
    split = split or options.split
    is_train = split == "train" if train is None else train
    if transform is None and image_size is not None:
        transform = default_transform(task_type, image_size, train=is_train, clip=clip)
    text_len: dict[str, Any] = {} if max_text_len is None else {"max_text_len": max_text_len}
    # the settings every caption reader takes (image and video alike)
    caption_args: dict[str, Any] = {
        "split": split,
        "transform": transform,
        "tokenizer": tokenizer,
        "max_text_len": max_text_len,
        "caption_mode": caption_mode,
    }

    if isinstance(options, ImageFolderOptions):
        from uniperceiver_cli.data.formats.image_folder import ImageFolderDataset

        return ImageFolderDataset(options, split=split, transform=transform)
    if isinstance(options, ImagenetListOptions):
        from uniperceiver_cli.data.formats.image_folder import ImagenetListDataset

        return ImagenetListDataset(options, split=split, transform=transform)
    if isinstance(options, CocoCaptionsOptions):
        from uniperceiver_cli.data.formats.coco_captions import CocoCaptionsDataset

        return CocoCaptionsDataset(options, **caption_args)
    if isinstance(options, KarpathyOptions):
        from uniperceiver_cli.data.formats.karpathy import KarpathyDataset

        return KarpathyDataset(options, **caption_args)
    if isinstance(options, JsonlPairsOptions) and task_type == "vqa":
        from uniperceiver_cli.data.formats.vqa import VQADataset

        return VQADataset(
            options,
            split=split,
            transform=transform,
            tokenizer=tokenizer,
            train=is_train,
            **text_len,
        )
    if isinstance(options, JsonlPairsOptions):
        from uniperceiver_cli.data.formats.jsonl_pairs import JsonlPairsDataset

        return JsonlPairsDataset(options, **caption_args)
    if isinstance(options, WebDatasetOptions):
        from uniperceiver_cli.data.formats.webdataset import WebDatasetStream

        return WebDatasetStream(
            options,
            split=split,
            transform=transform,
            tokenizer=tokenizer,
            max_text_len=max_text_len,
            seed=seed,
            rank=rank,
            world_size=world_size,
            train=is_train,
        )
    if isinstance(options, VideoClassificationOptions):
        from uniperceiver_cli.data.formats.video_classification import VideoClassificationDataset

        return VideoClassificationDataset(
            options, split=split, transform=transform, clip=clip, train=is_train
        )
    if isinstance(options, VideoCaptionsOptions):
        from uniperceiver_cli.data.formats.video_captions import VideoCaptionsDataset

        return VideoCaptionsDataset(options, clip=clip, train=is_train, **caption_args)
    if isinstance(options, TextCorpusOptions):
        from uniperceiver_cli.data.formats.text_corpus import TextCorpusDataset

        return TextCorpusDataset(options, split=split, tokenizer=tokenizer, **text_len)
    if isinstance(options, GlueTsvOptions):
        from uniperceiver_cli.data.formats.glue_tsv import GlueTsvDataset

        return GlueTsvDataset(options, split=split, tokenizer=tokenizer, **text_len)
    if isinstance(options, ToyOptions):
        from uniperceiver_cli.data.formats.toy import ToyDataset

        return ToyDataset(
            options,
            task_type=task_type,
            split=split,
            transform=transform,
            clip=clip,
            tokenizer=tokenizer,
            caption_mode=caption_mode,
            train=is_train,
            **text_len,
        )
    raise TypeError(f"expected data options, found {type(options).__name__}")


def bad_data_monitor(dataset: Dataset[Any], name: str | None = None) -> BadDataMonitor:
    """A main-process `BadDataMonitor` for a reader, with its `max_bad_fraction` and size.

    Map-style readers are judged on distinct broken items against their length; streams on the
    broken fraction of the records read.
    """
    fraction = float(getattr(dataset, "max_bad_fraction", DEFAULT_MAX_BAD_FRACTION))
    if isinstance(dataset, IterableDataset):
        options = getattr(dataset, "options", None)
        fraction = float(getattr(options, "max_bad_fraction", fraction))
        size = None
    else:
        size = len(dataset)  # type: ignore[arg-type]
    label = name or str(getattr(dataset, "source", type(dataset).__name__))
    return BadDataMonitor(label, max_bad_fraction=fraction, dataset_size=size)


def seed_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: seed `random` and numpy from the worker's torch seed."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def build_loader(
    dataset: Dataset[Any],
    *,
    batch_size: int,
    train: bool,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    pin_memory: bool = False,
    position: int = 0,
    collate_fn: Callable[[Sequence[Any]], Any] | None = None,
) -> DataLoader[Any]:
    """Wrap a reader in a DataLoader.

    Training on a map-style reader streams an `InfiniteSampler` (shuffled, rank-strided,
    per-sample seeds; resume with `position` = samples this rank already consumed). Evaluation
    walks a `ShardedSampler` once (each sample on exactly one rank, last batch may be short).
    Streamed readers (`WebDatasetStream`) shard themselves.

    Args:
        dataset: the reader.
        batch_size: samples per batch on this rank.
        train: endless shuffled stream, else one pass.
        seed: run seed (the same on every rank: ranks differ by stride, not by seed).
        rank: this process's rank.
        world_size: number of ranks.
        num_workers: DataLoader worker processes.
        pin_memory: pin batches (CUDA hosts).
        position: training stream position to resume from.
        collate_fn: override of the reader's `collate_fn`.

    Returns:
        The DataLoader; its batches are the typed batch dataclasses of `samples.py`.
    """
    collate = collate_fn or getattr(dataset, "collate_fn", None)
    if collate is None:
        raise ValueError(f"expected a reader with a collate_fn, found {type(dataset).__name__}")
    generator = torch.Generator().manual_seed(mix_seed(seed, rank))
    common: dict[str, Any] = {
        "batch_size": batch_size,
        "num_workers": num_workers,
        "collate_fn": collate,
        "pin_memory": pin_memory,
        "generator": generator,
        "worker_init_fn": seed_worker if num_workers > 0 else None,
        "persistent_workers": num_workers > 0 and train,
    }
    if isinstance(dataset, IterableDataset):
        return DataLoader(dataset, drop_last=train, **common)
    n = len(dataset)  # type: ignore[arg-type]
    sampler: InfiniteSampler | ShardedSampler
    if train:
        sampler = InfiniteSampler(n, seed=seed, rank=rank, world_size=world_size, position=position)
    else:
        sampler = ShardedSampler(n, rank=rank, world_size=world_size)
    return DataLoader(dataset, sampler=sampler, drop_last=False, **common)


class SubsetDataset(Dataset[Any]):
    """A subset of a map-style reader that keeps its `collate_fn` and class names.

    Args:
        dataset: the reader.
        indices: positions kept, in order.
    """

    def __init__(self, dataset: Dataset[Any], indices: Sequence[int]) -> None:
        self.dataset = dataset
        self.indices = list(indices)
        self.collate_fn = getattr(dataset, "collate_fn", None)

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "indices", "collate_fn"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | SampleKey) -> Any:
        if isinstance(key, SampleKey):
            return self.dataset[SampleKey(self.indices[key.item], key.seed)]
        return self.dataset[self.indices[int(key)]]


def data_fraction_subset(dataset: Dataset[Any], fraction: float, *, seed: int = 0) -> SubsetDataset:
    """The prompt-tuning data fraction (SPEC §5.2), drawn with one seed for all ranks.

    The draw depends only on `seed` and the dataset (its own generator; not the global RNG, not
    the rank), so every rank trains on the same subset (the reference draws one per GPU).

    * Readers with `labels` (classification, GLUE, VQA) keep `int(fraction·n_c) + 1` samples of
      every class c (stratified).
    * Caption readers serving flattened (item, caption) pairs keep `max(1, int(fraction·N_items))`
      images or videos with all their pairs (per image).
    * Others (captions in `random`/`all` mode: one sample per image; MLM) keep
      `max(1, int(fraction·N))` random samples.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"expected 0 < fraction <= 1, found {fraction}")
    g = torch.Generator().manual_seed(mix_seed(seed, 55))
    n = len(dataset)  # type: ignore[arg-type]
    labels: list[int] | None = getattr(dataset, "labels", None)
    item_of: Callable[[int], int] | None = getattr(dataset, "item_of", None)
    if labels is None and item_of is not None and getattr(dataset, "caption_mode", "") == "pairs":
        by_item: dict[int, list[int]] = {}
        for position in range(n):
            by_item.setdefault(item_of(position), []).append(position)
        items = sorted(by_item)
        take_items = max(1, math.floor(fraction * len(items)))
        chosen = torch.randperm(len(items), generator=g)[:take_items]
        return SubsetDataset(dataset, sorted(p for j in chosen for p in by_item[items[int(j)]]))
    if labels is not None:
        by_class: dict[int, list[int]] = {}
        for i, lab in enumerate(labels):
            by_class.setdefault(lab, []).append(i)
        keep: list[int] = []
        for lab in sorted(by_class):
            members = by_class[lab]
            take = min(len(members), int(fraction * len(members)) + 1)
            order = torch.randperm(len(members), generator=g)[:take]
            keep.extend(members[int(j)] for j in order)
        return SubsetDataset(dataset, sorted(keep))
    take = max(1, math.floor(fraction * n))
    return SubsetDataset(dataset, sorted(int(i) for i in torch.randperm(n, generator=g)[:take]))


class MultiTaskStream:
    """Interleave per-task training loaders by the `TaskSampler`'s choice (SPEC §3.5).

    Yields `(task_name, batch)`. `state_dict()` records the sampler state and the samples each
    task has consumed on this rank; on resume, rebuild every loader with
    `build_loader(..., position=state["consumed"][task])` and call `load_state_dict(state)`.

    Bad data: give `monitors` (task name → `BadDataMonitor`, see `bad_data_monitor`) and every
    batch is accounted in the main process, so broken files skipped by DataLoader workers are
    counted, named and held to `max_bad_fraction`.

    Args:
        loaders: task name → endless training loader (from `build_loader(train=True)`).
        sampler: the task sampler (same seed on every rank).
        batch_sizes: task name → samples per batch on this rank.
        monitors: task name → bad-data monitor (optional).
    """

    def __init__(
        self,
        loaders: Mapping[str, Iterable[Any]],
        sampler: TaskSampler,
        batch_sizes: Mapping[str, int],
        monitors: Mapping[str, BadDataMonitor] | None = None,
    ) -> None:
        missing = sorted(set(sampler.tasks) - set(loaders))
        if missing:
            raise ValueError(f"expected a loader for every sampled task, missing {missing}")
        self.loaders = dict(loaders)
        self.sampler = sampler
        self.batch_sizes = dict(batch_sizes)
        self.consumed: dict[str, int] = dict.fromkeys(sampler.tasks, 0)
        self.monitors: dict[str, BadDataMonitor] = dict(monitors or {})
        self._iters: dict[str, Iterator[Any]] = {}

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        return self

    def __next__(self) -> tuple[str, Any]:
        task = self.sampler.next_task()
        if task not in self._iters:
            self._iters[task] = iter(self.loaders[task])
        batch = next(self._iters[task])
        self.consumed[task] += self.batch_sizes[task]
        if task in self.monitors:
            self.monitors[task].update(batch)
        return task, batch

    def log_bad_data_summary(self) -> None:
        """Log each monitored task's bad-data summary (call at the end of training)."""
        for monitor in self.monitors.values():
            monitor.log_summary()

    def state_dict(self) -> dict[str, Any]:
        """Sampler state plus samples consumed per task (JSON-serialisable)."""
        return {"sampler": self.sampler.state_dict(), "consumed": dict(self.consumed)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the sampler and the consumed counters (loaders must be rebuilt at the positions)."""
        self.sampler.load_state_dict(state["sampler"])
        self.consumed = {t: int(state["consumed"].get(t, 0)) for t in self.sampler.tasks}
