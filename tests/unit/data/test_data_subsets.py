"""Few-shot subsets (`data_fraction`): stratified per class, per image for captions, seeded, and
identical on every rank (the reference draws a different subset per GPU, SPEC §5.2)."""

from __future__ import annotations

import multiprocessing
import random
from collections import Counter
from typing import Any

import numpy as np
import pytest
import torch

from uniperceiver_cli.data.build import build_dataset, build_loader, data_fraction_subset
from uniperceiver_cli.data.formats.coco_captions import CocoCaptionsDataset
from uniperceiver_cli.data.options import CocoCaptionsOptions, ToyOptions
from uniperceiver_cli.data.tokenizer import ClipTokenizer
from uniperceiver_cli.data.toy_files import ToyWorldSummary


def test_classification_subset_is_stratified_and_seeded() -> None:
    ds: Any = build_dataset(
        ToyOptions(num_samples=400, image_size=16), task_type="image_classification"
    )
    labels = ds.labels
    full = Counter(labels)
    sub = data_fraction_subset(ds, 0.05, seed=1)
    kept = Counter(labels[i] for i in sub.indices)
    assert kept == {c: int(0.05 * n) + 1 for c, n in full.items()}
    assert all(sub[k].label == labels[i] for k, i in enumerate(sub.indices[:10]))
    assert data_fraction_subset(ds, 0.05, seed=1).indices == sub.indices
    assert data_fraction_subset(ds, 0.05, seed=2).indices != sub.indices
    # Text classification (toy sentence pairs) is stratified the same way.
    pairs: Any = build_dataset(ToyOptions(num_samples=300), task_type="text_classification")
    pair_sub = data_fraction_subset(pairs, 0.1, seed=0)
    assert Counter(pairs.labels[i] for i in pair_sub.indices) == {
        c: int(0.1 * n) + 1 for c, n in Counter(pairs.labels).items()
    }


def test_caption_subsets_are_per_image(toy_dir: ToyWorldSummary, tok: ClipTokenizer) -> None:
    opts = CocoCaptionsOptions(
        annotation_file=str(toy_dir.paths["captions_train"]),
        images_dir=str(toy_dir.paths["images"]),
    )
    pairs = CocoCaptionsDataset(opts, tokenizer=tok, caption_mode="pairs")
    n_images = len(pairs.items)
    assert len(pairs) > n_images  # several captions per image, flattened
    sub = data_fraction_subset(pairs, 0.25, seed=4)
    images = {pairs.item_of(p) for p in sub.indices}
    assert len(images) == int(0.25 * n_images)
    # Every kept image keeps all its (image, caption) pairs, and nothing else is kept.
    expected = [p for p in range(len(pairs)) if pairs.item_of(p) in images]
    assert sub.indices == expected
    assert data_fraction_subset(pairs, 0.25, seed=4).indices == sub.indices
    # In `random` mode a position is an image: the subset is a set of images.
    per_image = CocoCaptionsDataset(opts, tokenizer=tok, caption_mode="random")
    sub_random = data_fraction_subset(per_image, 0.25, seed=4)
    assert len(sub_random) == int(0.25 * n_images) and len(set(sub_random.indices)) == len(
        sub_random
    )


def _rank_subset(rank: int, queue: Any) -> None:
    # Each rank has its own global RNG state, as a launcher seeding by rank would give it.
    torch.manual_seed(1000 + rank)
    random.seed(1000 + rank)
    np.random.seed(1000 + rank)
    torch.rand(17)  # and has used it differently
    ds: Any = build_dataset(
        ToyOptions(num_samples=300, image_size=16),
        task_type="image_classification",
        image_size=16,
    )
    sub = data_fraction_subset(ds, 0.1, seed=7)
    loader = build_loader(sub, batch_size=4, train=True, seed=7, rank=rank, world_size=2)
    it = iter(loader)
    served = [int(i) for _ in range(2) for i in next(it).indices]
    queue.put((rank, sub.indices, served))


def test_subset_is_identical_on_two_ranks_and_ranks_get_distinct_samples() -> None:
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_subset, args=(r, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = {r: (idx, served) for r, idx, served in (queue.get(timeout=120) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    (idx0, served0), (idx1, served1) = results[0], results[1]
    assert idx0 == idx1 and len(idx0) > 0
    # Within one epoch of the subset, the two ranks train on different samples.
    assert not set(served0) & set(served1)
    assert len(served0) == len(served1) == 8


def test_fraction_is_validated() -> None:
    ds: Any = build_dataset(ToyOptions(num_samples=10), task_type="image_classification")
    with pytest.raises(ValueError, match="0 < fraction <= 1"):
        data_fraction_subset(ds, 0.0)
    assert len(data_fraction_subset(ds, 1.0)) == 10
