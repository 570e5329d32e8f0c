"""Recipe task → dataset, candidate names and a resumable batch stream.

`open_task_data` turns one task's data section into a map-style dataset of typed samples (the on-disk readers of
`uniperceiver_cli.data.formats`, or the in-memory toy world), plus what the task is scored against (class names,
label words). `BatchStream` draws training batches from an `InfiniteSampler` whose position is part of the
checkpoint, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from uniperceiver_cli.data.formats.base import MapDataset, read_class_names
from uniperceiver_cli.data.formats.captions import CaptionedItem, CaptionMode, VisualTextDataset
from uniperceiver_cli.data.options import options_for
from uniperceiver_cli.data.sampler import InfiniteSampler, SampleKey, ShardedSampler, mix_seed
from uniperceiver_cli.data.samples import (
    ClassificationSample,
    MLMSample,
    TextClassificationSample,
    collate_classification,
    collate_mlm,
    collate_text_classification,
    collate_visual_text,
)
from uniperceiver_cli.data.text import EOT_ID, encode_words, split_words, whole_word_mask
from uniperceiver_cli.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    VIDEO_MEAN,
    VIDEO_STD,
    image_transform,
    video_transform,
)
from uniperceiver_cli.recipe.data import PATH_FIELDS
from uniperceiver_cli.recipe.paths import resolve_path

logger = logging.getLogger(__name__)

VISUAL_TEXT_TYPES = frozenset(
    {"image_caption", "image_retrieval", "video_caption", "video_retrieval"}
)
CLASSIFICATION_TYPES = frozenset({"image_classification", "video_classification"})


class TaskDataError(ValueError):
    """A task's data cannot be opened the way the recipe asks."""


@dataclass
class TaskData:
    """A task's dataset and what its predictions are scored against.

    Attributes:
        dataset: map-style dataset of typed samples (accepts `SampleKey`s).
        collate: collate function producing the task family's batch.
        class_names: classification: synonyms of every class, in index order.
        label_words: text classification: label words in class order.
    """

    dataset: Dataset[Any]
    collate: Callable[[Sequence[Any]], Any]
    class_names: tuple[tuple[str, ...], ...] | None = None
    label_words: tuple[str, ...] | None = None


@dataclass(frozen=True)
class PathContext:
    """How relative recipe paths resolve (SPEC-free: `recipe.paths` rules)."""

    data_root: Path | None
    recipe_dir: Path

    def resolve(self, value: str) -> str:
        """Resolve one path field."""
        return str(resolve_path(value, root=self.data_root, recipe_dir=self.recipe_dir))


# ---------------------------------------------------------------------------------------------- toy world


def _normalise(
    pixels: Tensor, mean: tuple[float, ...], std: tuple[float, ...], size: int
) -> Tensor:
    """uint8 (..., 3, S0, S0) -> float32 (..., 3, S, S), resized (bilinear) if S0 != S, normalised."""
    x = pixels.to(torch.float32) / 255.0
    if x.shape[-1] != size:
        lead = x.shape[:-3]
        flat = x.reshape(-1, *x.shape[-3:])
        flat = torch.nn.functional.interpolate(
            flat, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        x = flat.reshape(*lead, 3, size, size)
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    return (x - m) / s


class ToyClassificationDataset(MapDataset[ClassificationSample]):
    """Toy images (class = shape) or videos (class = motion), rendered on demand and cached."""

    collate_fn = staticmethod(collate_classification)

    def __init__(self, options: Any, *, video: bool, size: int, num_frames: int) -> None:
        from uniperceiver_cli.data.toy import ToyWorld

        super().__init__(source="toy", on_error=options.on_error, max_samples=options.max_samples)
        self.world = ToyWorld(
            options.seed, image_size=options.image_size, num_frames=max(2, options.num_frames)
        )
        self.options = options
        self.video = video
        self.size = size
        self.num_frames = num_frames
        self._cache: dict[int, ClassificationSample] = {}

    def _num_items(self) -> int:
        return int(self.options.num_samples)

    @property
    def class_synonyms(self) -> tuple[tuple[str, ...], ...]:
        """Class names, one synonym each."""
        names = self.world.video_classes if self.video else self.world.image_classes
        return tuple((n,) for n in names)

    @property
    def labels(self) -> list[int]:
        """Class of every item (stratified subsets)."""
        split = self.options.split
        if self.video:
            return [self.world.video_scene(i, split).label for i in range(len(self))]
        return [self.world.image_scene(i, split).label for i in range(len(self))]

    def load(self, index: int) -> ClassificationSample:
        hit = self._cache.get(index)
        if hit is not None:
            return hit
        split = self.options.split
        if self.video:
            frames, vscene = self.world.video(index, split, num_frames=self.num_frames)
            pixels, label = _normalise(frames, VIDEO_MEAN, VIDEO_STD, self.size), vscene.label
        else:
            image, scene = self.world.image(index, split)
            pixels, label = _normalise(image, IMAGENET_MEAN, IMAGENET_STD, self.size), scene.label
        sample = ClassificationSample(pixels=pixels, label=label, index=index)
        self._cache[index] = sample
        return sample


class ToyVisualTextDataset(VisualTextDataset):
    """Toy images or videos with their template captions (one random caption in training, all in eval)."""

    def __init__(
        self,
        options: Any,
        *,
        video: bool,
        size: int,
        num_frames: int,
        max_text_len: int,
        train: bool,
    ) -> None:
        from uniperceiver_cli.data.toy import ToyWorld

        world = ToyWorld(
            options.seed, image_size=options.image_size, num_frames=max(2, options.num_frames)
        )
        split = options.split
        items: list[CaptionedItem] = []
        for i in range(int(options.num_samples)):
            scene = world.video_scene(i, split) if video else world.image_scene(i, split)
            items.append(
                CaptionedItem(path=Path(f"toy/{split}/{i}"), item_id=i, captions=scene.captions)
            )
        cache: dict[int, Tensor] = {}

        def load_pixels(item: CaptionedItem) -> Tensor:
            key = int(item.item_id)
            if key not in cache:
                if video:
                    frames, _ = world.video(key, split, num_frames=num_frames)
                    cache[key] = _normalise(frames, VIDEO_MEAN, VIDEO_STD, size)
                else:
                    image, _ = world.image(key, split)
                    cache[key] = _normalise(image, IMAGENET_MEAN, IMAGENET_STD, size)
            return cache[key]

        super().__init__(
            source="toy",
            items=items,
            load_pixels=load_pixels,
            caption_mode="random" if train else "all",
            tokenizer=None,
            max_text_len=max_text_len,
            on_error=options.on_error,
            max_samples=options.max_samples,
        )


class ToyMLMDataset(MapDataset[MLMSample]):
    """Toy corpus lines with whole-word masking (SPEC §3.2.3): each line + EOT, joined up to the length."""

    collate_fn = staticmethod(collate_mlm)

    def __init__(self, options: Any, *, max_text_len: int, mask_prob: float = 0.15) -> None:
        from uniperceiver_cli.data.toy import ToyWorld

        super().__init__(source="toy", on_error=options.on_error, max_samples=options.max_samples)
        self.world = ToyWorld(options.seed, image_size=max(8, options.image_size))
        self.options = options
        self.max_text_len = max_text_len
        self.mask_prob = mask_prob
        self._words: dict[int, list[list[int]]] = {}

    def _num_items(self) -> int:
        return int(self.options.num_samples)

    def _word_ids(self, index: int) -> list[list[int]]:
        if index not in self._words:
            from uniperceiver_cli.data.tokenizer import get_tokenizer

            tok = get_tokenizer()
            text = self.world.sentence(index, self.options.split)
            ids = encode_words(tok, split_words(text))
            ids.append([EOT_ID])
            self._words[index] = ids
        return self._words[index]

    def load(self, index: int) -> MLMSample:
        words = self._word_ids(index)
        kept: list[list[int]] = []
        total = 0
        for w in words:
            if total + len(w) > self.max_text_len:
                break
            kept.append(w)
            total += len(w)
        ids, labels = whole_word_mask(kept, mask_prob=self.mask_prob)
        return MLMSample(ids=ids, labels=labels, index=index)


class ToyPairDataset(MapDataset[TextClassificationSample]):
    """Toy sentence pairs as cloze samples (RTE's template; label words `no`, `yes`)."""

    collate_fn = staticmethod(collate_text_classification)

    def __init__(self, options: Any, *, max_text_len: int) -> None:
        from uniperceiver_cli.data.toy import ToyWorld

        super().__init__(source="toy", on_error=options.on_error, max_samples=options.max_samples)
        self.world = ToyWorld(options.seed, image_size=max(8, options.image_size))
        self.options = options
        self.max_text_len = max(8, max_text_len)
        self._cache: dict[int, TextClassificationSample] = {}

    def _num_items(self) -> int:
        return int(self.options.num_samples)

    @property
    def labels(self) -> list[int]:
        """Label of every pair."""
        return [self.world.pair(i, self.options.split).label for i in range(len(self))]

    def load(self, index: int) -> TextClassificationSample:
        if index not in self._cache:
            from uniperceiver_cli.data.formats.glue_tsv import ClozeTemplate
            from uniperceiver_cli.data.tokenizer import get_tokenizer

            pair = self.world.pair(index, self.options.split)
            template = ClozeTemplate("TOY", get_tokenizer(), self.max_text_len)
            ids, slot = template.build([pair.first, pair.second])
            self._cache[index] = TextClassificationSample(
                ids=torch.tensor(ids, dtype=torch.int64), slot=slot, label=pair.label, index=index
            )
        return self._cache[index]


# ---------------------------------------------------------------------------------------------- opening


def _resolved_options(data_spec: Any, paths: PathContext) -> Any:
    values = data_spec.model_dump()
    for key in PATH_FIELDS:
        if isinstance(values.get(key), str):
            values[key] = paths.resolve(values[key])
    return options_for(values)


def _task_image_size(task: Any, model_image_size: int) -> int:
    size = getattr(task, "image_size", None)
    return int(size) if size is not None else model_image_size


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
    """Open one task's data as a dataset of typed samples.

    Args:
        task: the recipe task section.
        data_spec: its `data` or `eval_data` section.
        train: training (augmentation, one caption per item) or evaluation.
        paths: how relative paths resolve.
        model_image_size: the model's image side (default input size).
        rank: this process's rank (streamed formats shard by it).
        world_size: number of processes.
        seed: run seed (streamed formats shuffle with it).

    Returns:
        `TaskData`.

    Raises:
        TaskDataError: for a task type / format pair the engine cannot train on.
    """
    options = _resolved_options(data_spec, paths)
    fmt = data_spec.format
    ttype = task.type
    size = _task_image_size(task, model_image_size)
    frames = int(getattr(task, "num_frames", 1))
    max_len = int(getattr(task, "max_text_len", 128))
    video = ttype.startswith("video")
    if ttype == "vqa":
        raise TaskDataError(
            f"task {task.name!r}: vqa training is not supported by this engine yet; remove the task"
        )
    if fmt == "toy":
        return _open_toy(task, options, train=train, size=size, frames=frames, max_len=max_len)
    from uniperceiver_cli.data.video import ClipSpec

    clip = ClipSpec(num_frames=frames, frame_stride=int(getattr(task, "frame_stride", 32)))
    if ttype in CLASSIFICATION_TYPES:
        if video:
            from uniperceiver_cli.data.formats.video_classification import (
                VideoClassificationDataset,
            )

            ds: Any = VideoClassificationDataset(
                options, transform=video_transform(size, train=train), clip=clip, train=train
            )
        elif fmt == "image_folder":
            from uniperceiver_cli.data.formats.image_folder import ImageFolderDataset

            ds = ImageFolderDataset(
                options, transform=image_transform("classification", size, train=train)
            )
        else:
            from uniperceiver_cli.data.formats.image_folder import ImagenetListDataset

            ds = ImagenetListDataset(
                options, transform=image_transform("classification", size, train=train)
            )
        names = tuple(ds.class_synonyms)
        if getattr(task, "class_names_file", None):
            names = tuple(
                read_class_names(paths.resolve(task.class_names_file), expected=len(names))
            )
        return TaskData(ds, ds.collate_fn, class_names=names)
    if ttype in VISUAL_TEXT_TYPES:
        mode: CaptionMode = "random" if train else "all"
        kwargs: dict[str, Any] = {"max_text_len": max_len}
        if fmt == "video_captions":
            from uniperceiver_cli.data.formats.video_captions import VideoCaptionsDataset

            ds = VideoCaptionsDataset(
                options,
                transform=video_transform(size, train=train),
                clip=clip,
                caption_mode=mode,
                train=train,
                **kwargs,
            )
        elif fmt == "webdataset":
            from uniperceiver_cli.data.formats.webdataset import WebDatasetDataset

            ds = WebDatasetDataset(
                options,
                transform=image_transform("caption", size, train=train),
                seed=seed,
                rank=rank,
                world_size=world_size,
                train=train,
                **kwargs,
            )
        else:
            module, cls = {
                "coco_captions": ("coco_captions", "CocoCaptionsDataset"),
                "karpathy": ("karpathy", "KarpathyDataset"),
                "jsonl_pairs": ("jsonl_pairs", "JsonlPairsDataset"),
            }[fmt]
            import importlib

            reader = getattr(
                importlib.import_module(f"uniperceiver_cli.data.formats.{module}"), cls
            )
            ds = reader(
                options,
                transform=image_transform("caption", size, train=train),
                caption_mode=mode,
                **kwargs,
            )
        return TaskData(ds, collate_visual_text)
    if ttype == "mlm":
        from uniperceiver_cli.data.formats.text_corpus import TextCorpusDataset

        ds = TextCorpusDataset(options, max_text_len=max_len)
        return TaskData(ds, collate_mlm)
    if ttype == "text_classification":
        from uniperceiver_cli.data.formats.glue_tsv import GlueTsvDataset

        ds = GlueTsvDataset(options, max_text_len=max_len)
        words = tuple(task.label_words) if task.label_words else tuple(ds.label_words)
        return TaskData(ds, collate_text_classification, label_words=words)
    raise TaskDataError(f"task {task.name!r}: unsupported task type {ttype!r} with format {fmt!r}")


def _open_toy(
    task: Any, options: Any, *, train: bool, size: int, frames: int, max_len: int
) -> TaskData:
    ttype = task.type
    video = ttype.startswith("video")
    if ttype in CLASSIFICATION_TYPES:
        ds: Any = ToyClassificationDataset(options, video=video, size=size, num_frames=frames)
        return TaskData(ds, collate_classification, class_names=ds.class_synonyms)
    if ttype in VISUAL_TEXT_TYPES:
        ds = ToyVisualTextDataset(
            options, video=video, size=size, num_frames=frames, max_text_len=max_len, train=train
        )
        return TaskData(ds, collate_visual_text)
    if ttype == "mlm":
        return TaskData(ToyMLMDataset(options, max_text_len=max_len), collate_mlm)
    if ttype == "text_classification":
        ds = ToyPairDataset(options, max_text_len=max_len)
        words = tuple(task.label_words) if task.label_words else ds.world.pair_label_words
        return TaskData(ds, collate_text_classification, label_words=words)
    raise TaskDataError(f"task {task.name!r}: the toy world has no data for task type {ttype!r}")


# ---------------------------------------------------------------------------------------------- subsets


class SubsetView(Dataset[Any]):
    """A fixed subset of a map-style dataset that passes `SampleKey` seeds through.

    Args:
        dataset: the full dataset.
        indices: positions kept, in order.
    """

    def __init__(self, dataset: Dataset[Any], indices: Sequence[int]) -> None:
        self.dataset = dataset
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | SampleKey) -> Any:
        if isinstance(key, SampleKey):
            position, seed = key
            return self.dataset[SampleKey(self.indices[int(position)], seed)]
        return self.dataset[self.indices[int(key)]]


def data_fraction_indices(dataset: Dataset[Any], fraction: float, seed: int) -> list[int]:
    """Positions of a `fraction` subset (SPEC §5.2), the same on every rank (our fix of the reference quirk).

    Datasets with per-item `labels` are subsampled per class (`int(fraction·n_c) + 1` each); others keep
    `max(1, int(fraction·N))` uniformly drawn items.

    Args:
        dataset: a sized map-style dataset.
        fraction: in (0, 1].
        seed: run seed.

    Returns:
        Sorted positions.
    """
    n = len(dataset)  # type: ignore[arg-type]
    if fraction >= 1.0:
        return list(range(n))
    g = torch.Generator().manual_seed(mix_seed(seed, 5150))
    labels = getattr(dataset, "labels", None)
    if labels is not None:
        by_class: dict[int, list[int]] = {}
        for i, lab in enumerate(list(labels)[:n]):
            by_class.setdefault(int(lab), []).append(i)
        keep: list[int] = []
        for lab in sorted(by_class):
            members = by_class[lab]
            k = min(len(members), int(fraction * len(members)) + 1)
            perm = torch.randperm(len(members), generator=g)[:k]
            keep.extend(members[int(j)] for j in perm)
        return sorted(keep)
    k = max(1, int(fraction * n))
    return sorted(int(i) for i in torch.randperm(n, generator=g)[:k])


# ---------------------------------------------------------------------------------------------- streams


class BatchStream:
    """Endless training batches of one task, resumable from a sample position.

    Args:
        data: the task's data.
        batch_size: samples per batch on this rank.
        seed: stream seed (the same on every rank).
        rank: this process's rank.
        world_size: number of processes.
        num_workers: DataLoader worker processes.
        position: samples of this rank already consumed (resume).
    """

    def __init__(
        self,
        data: TaskData,
        *,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        position: int = 0,
    ) -> None:
        self.data = data
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.position = position
        self._iter: Iterator[Any] | None = None

    def _loader(self) -> Iterator[Any]:
        ds = self.data.dataset
        if isinstance(ds, torch.utils.data.IterableDataset):
            loader: DataLoader[Any] = DataLoader(
                ds,
                batch_size=self.batch_size,
                collate_fn=self.data.collate,
                num_workers=self.num_workers,
                generator=self._generator(),
            )
            return iter(loader)
        sampler = InfiniteSampler(
            len(ds),  # type: ignore[arg-type]
            seed=self.seed,
            rank=self.rank,
            world_size=self.world_size,
            position=self.position,
        )
        loader = DataLoader(
            ds,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=self.data.collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=self._generator(),
        )
        return iter(loader)

    def _generator(self) -> torch.Generator:
        # A DataLoader draws its workers' base seed from this generator; without one it would draw from
        # torch's global RNG whenever an iterator starts, which would make a resumed run diverge.
        return torch.Generator().manual_seed(mix_seed(self.seed, self.rank, self.position))

    def next(self) -> Any:
        """The next batch (advances the position by one batch)."""
        if self._iter is None:
            self._iter = self._loader()
        batch = next(self._iter)
        self.position += self.batch_size
        return batch

    def state_dict(self) -> dict[str, int]:
        """Consumed samples of this rank (enough to resume the exact stream)."""
        return {"seed": self.seed, "position": self.position}


def eval_batches(
    data: TaskData, *, batch_size: int, rank: int = 0, world_size: int = 1
) -> Iterator[Any]:
    """One pass over an evaluation dataset, each item on exactly one rank."""
    ds = data.dataset
    if isinstance(ds, torch.utils.data.IterableDataset):
        yield from DataLoader(
            ds,
            batch_size=batch_size,
            collate_fn=data.collate,
            generator=torch.Generator().manual_seed(rank),
        )
        return
    n = len(ds)  # type: ignore[arg-type]
    sampler = ShardedSampler(n, rank=rank, world_size=world_size)
    yield from DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=data.collate,
        generator=torch.Generator().manual_seed(rank),
    )


def steps_per_epoch(data: TaskData, batch_size: int, world_size: int) -> int | None:
    """Optimizer steps of one pass over the data (None for streams)."""
    ds = data.dataset
    if isinstance(ds, torch.utils.data.IterableDataset):
        return None
    return math.ceil(len(ds) / (batch_size * world_size))  # type: ignore[arg-type]
