from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing

import pytest
import torch

from uniperceiver_cli.data.build import (
    MultiTaskStream,
    build_dataset,
    build_loader,
    data_fraction_subset,
)
from uniperceiver_cli.data.options import (
    OPTIONS_BY_FORMAT,
    ImageFolderOptions,
    ToyOptions,
    options_for,
)
from uniperceiver_cli.data.sampler import TaskSampler
from uniperceiver_cli.data.samples import ClassificationBatch


def test_options_match_the_recipe_data_sections() -> None:
    recipe = pytest.importorskip("uniperceiver_cli.recipe.data")
    spec_types = typing.get_args(typing.get_args(recipe.DataSpec)[0])
    assert len(spec_types) == len(OPTIONS_BY_FORMAT)
    for model in spec_types:
        fmt = typing.get_args(model.model_fields["format"].annotation)[0]
        recipe_fields = set(model.model_fields) - {"format"}
        option_fields = {f.name for f in dataclasses.fields(OPTIONS_BY_FORMAT[fmt])}
        assert recipe_fields <= option_fields, (fmt, recipe_fields - option_fields)
        for name in recipe_fields:
            default = model.model_fields[name].default
            option_default = next(
                f for f in dataclasses.fields(OPTIONS_BY_FORMAT[fmt]) if f.name == name
            ).default
            if option_default is not dataclasses.MISSING:
                assert option_default == default, (fmt, name)


def test_options_for_converts_recipe_sections_and_rejects_unknown_fields() -> None:
    recipe = pytest.importorskip("uniperceiver_cli.recipe.data")
    spec = recipe.ImageFolderData(format="image_folder", root="/data/x", split="val")
    opts = options_for(spec)
    assert opts == ImageFolderOptions(root="/data/x", split="val")
    assert options_for({"format": "toy", "num_samples": 3}) == ToyOptions(num_samples=3)
    with pytest.raises(ValueError, match="no option"):
        options_for({"format": "toy", "bogus": 1})
    with pytest.raises(ValueError, match="expected a data format"):
        options_for({"format": "nope"})


def test_build_dataset_rejects_format_task_mismatch() -> None:
    with pytest.raises(ValueError, match="cannot feed a mlm task"):
        build_dataset(ImageFolderOptions(root="/x"), task_type="mlm")


def _batches(num_workers: int, position: int = 0, n: int = 3) -> list[ClassificationBatch]:
    ds = build_dataset(
        ToyOptions(num_samples=10, image_size=16), task_type="image_classification", image_size=16
    )
    loader = build_loader(
        ds, batch_size=4, train=True, seed=11, num_workers=num_workers, position=position
    )
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_training_batches_are_seeded_and_worker_count_invariant() -> None:
    a, b = _batches(0), _batches(0)
    assert all(
        torch.equal(x.pixels, y.pixels) and torch.equal(x.labels, y.labels)
        for x, y in zip(a, b, strict=True)
    )
    assert not torch.equal(a[0].pixels, a[1].pixels)
    w = _batches(2)
    assert all(torch.equal(x.pixels, y.pixels) for x, y in zip(a, w, strict=True))
    resumed = _batches(0, position=4, n=2)
    assert all(torch.equal(x.pixels, y.pixels) for x, y in zip(a[1:], resumed, strict=True))


def test_eval_loader_single_pass_sharded() -> None:
    ds = build_dataset(
        ToyOptions(num_samples=10, split="val"), task_type="image_classification", image_size=16
    )
    seen = []
    for rank in range(2):
        loader = build_loader(ds, batch_size=4, train=False, rank=rank, world_size=2)
        seen += [i for b in loader for i in b.indices.tolist()]
    assert sorted(seen) == list(range(10))


def test_data_fraction_subset_is_stratified() -> None:
    ds = build_dataset(ToyOptions(num_samples=200), task_type="image_classification", image_size=16)
    labels = [ds.load(i).label for i in range(200)]  # type: ignore[attr-defined]
    assert ds.labels == labels  # type: ignore[attr-defined]
    sub = data_fraction_subset(ds, 0.05, seed=0)
    counts = torch.bincount(torch.tensor([labels[i] for i in sub.indices]), minlength=5)
    full = torch.bincount(torch.tensor(labels), minlength=5)
    assert counts.tolist() == [int(0.05 * int(n)) + 1 for n in full]
    assert sub.collate_fn is ds.collate_fn and len(sub[0].pixels.shape) == 3  # type: ignore[attr-defined]
    assert data_fraction_subset(ds, 0.05, seed=0).indices == sub.indices


def _stream(consumed: dict[str, int] | None = None) -> MultiTaskStream:
    loaders = {}
    for task, kind in (("cls", "image_classification"), ("mlm", "mlm")):
        ds = build_dataset(
            ToyOptions(num_samples=12, image_size=16),
            task_type=kind,
            image_size=16,
            max_text_len=16,
        )
        position = (consumed or {}).get(task, 0)
        loaders[task] = build_loader(ds, batch_size=3, train=True, seed=4, position=position)
    return MultiTaskStream(
        loaders, TaskSampler({"cls": 1.0, "mlm": 2.0}, seed=4), {"cls": 3, "mlm": 3}
    )


def test_multi_task_stream_resumes_exactly() -> None:
    reference = _stream()
    full = [next(reference) for _ in range(10)]
    first = _stream()
    head = [next(first) for _ in range(6)]
    state = first.state_dict()
    assert sum(state["consumed"].values()) == 18
    resumed = _stream(state["consumed"])
    resumed.load_state_dict(state)
    tail = [next(resumed) for _ in range(4)]
    for (task_a, batch_a), (task_b, batch_b) in zip(full, head + tail, strict=True):
        assert task_a == task_b
        assert torch.equal(batch_a.indices, batch_b.indices)
    assert {t for t, _ in full} == {"cls", "mlm"}


def test_options_module_is_torch_free() -> None:
    code = (
        "import sys, uniperceiver_cli.data, uniperceiver_cli.data.options, uniperceiver_cli.data.errors; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
