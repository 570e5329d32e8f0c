"""Unit tests of the training engine's parts: schedule, parameter groups, losses, candidates, checkpoints,
prompt-tuning selection, MoE placement, data fractions."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from uniperceiver_cli.engine.build import build_for_config, model_config_from_recipe, moe_layers
from uniperceiver_cli.engine.candidates import VocabCandidates, encode_bucketed, vocab_candidates
from uniperceiver_cli.engine.checkpoint import (
    CheckpointPayload,
    TrainingState,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from uniperceiver_cli.engine.freeze import (
    freeze_for_prompt_tuning,
    parameter_table,
    prompt_parameter_names,
)
from uniperceiver_cli.engine.losses import (
    retrieval_loss,
    smoothed_cross_entropy,
    soft_target_cross_entropy,
)
from uniperceiver_cli.engine.optim import build_optimizer, classify_parameter, lr_at, param_groups
from uniperceiver_cli.engine.runtime import Runtime
from uniperceiver_cli.engine.seed import capture_rng_state, restore_rng_state
from uniperceiver_cli.model.config import MoEConfig, PromptConfig
from uniperceiver_cli.model.presets import get_preset
from uniperceiver_cli.recipe.schema import ModelSpec, MoESpec, PromptSpec

CPU = Runtime(device=torch.device("cpu"))


# ---------------------------------------------------------------------------------------------- schedule


def test_warmup_cosine_matches_formula() -> None:
    kw = {"base_lr": 1e-3, "min_lr": 1e-6, "warmup_steps": 10, "max_steps": 110}
    assert lr_at(0, **kw) == 0.0
    assert lr_at(5, **kw) == pytest.approx(5e-4)
    assert lr_at(10, **kw) == pytest.approx(1e-3)
    assert lr_at(60, **kw) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, **kw) == pytest.approx(1e-6)  # floored at min_lr
    assert lr_at(50, decay="constant", **kw) == 1e-3


# ---------------------------------------------------------------------------------------------- param groups


def _tiny_moe(prompt: PromptConfig | None = None) -> torch.nn.Module:
    cfg = get_preset("tiny", moe=MoEConfig(num_experts=2, top_k=2, layers=(0,)), prompt=prompt)
    return build_for_config(cfg)


def test_param_groups_follow_reference_rules() -> None:
    model = _tiny_moe()
    _, report = param_groups(model, 0.05)
    groups = {name: g for g, names in report.names.items() for name in names}
    assert groups["encoder.layers.0.qkv.experts.weight"] == "decay"
    assert groups["encoder.layers.0.qkv.experts.bias"] == "no_decay"
    assert groups["encoder.layers.0.qkv.gate.wg.weight"] == "gate"
    assert groups["encoder.layers.0.qkv.gate.tag_transform.0.weight"] == "gate"
    assert (
        groups["encoder.layers.0.qkv.gate.tag_transform.1.weight"] == "no_decay"
    )  # gate LayerNorm
    assert groups["encoder.layers.1.ffn_in.weight"] == "decay"
    assert groups["embed.patch.weight"] == "decay"
    assert groups["embed.word.weight"] == "no_decay"
    assert groups["encoder.layers.1.gamma_1"] == "no_decay"
    assert groups["head.logit_scales.img_cls"] == "no_decay"
    assert groups["head.ln_post.weight"] == "no_decay"
    assert "embed.spatial" not in groups  # a frozen buffer, never optimised
    assert report.weight_decay == {"decay": 0.05, "no_decay": 0.0, "gate": 0.0}


def test_optimizer_skips_frozen_parameters() -> None:
    model = _tiny_moe(PromptConfig(length=3))
    freeze_for_prompt_tuning(model, ["deep_prompts", "ln_post"])  # type: ignore[arg-type]
    opt, report = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    trained = {n for names in report.names.values() for n in names}
    assert trained == {
        "encoder.layers.0.prompt",
        "encoder.layers.1.prompt",
        "head.ln_post.weight",
        "head.ln_post.bias",
    }
    assert sum(len(g["params"]) for g in opt.param_groups) == 4
    assert (
        classify_parameter("encoder.layers.0.prompt", model.encoder.layers[0].prompt, None)
        == "no_decay"
    )


# ---------------------------------------------------------------------------------------------- losses


def test_label_smoothing_cross_entropy_by_hand() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    target = torch.tensor([0, -1])
    logp = F.log_softmax(logits[0], dim=0)
    eps = 0.1
    expected = (1 - eps) * -logp[0] + eps * -logp.mean()
    assert smoothed_cross_entropy(logits, target, eps).item() == pytest.approx(
        expected.item(), rel=1e-6
    )
    assert smoothed_cross_entropy(logits, torch.tensor([-1, -1])).item() == 0.0


def test_soft_target_cross_entropy_by_hand() -> None:
    logits = torch.tensor([[1.0, 2.0]])
    soft = torch.tensor([[0.25, 0.75]])
    logp = F.log_softmax(logits, dim=1)[0]
    expected = -(0.25 * logp[0] + 0.75 * logp[1])
    assert soft_target_cross_entropy(logits, soft).item() == pytest.approx(
        expected.item(), rel=1e-6
    )


def test_retrieval_loss_global_rows_equal_full_batch() -> None:
    torch.manual_seed(0)
    v, t = torch.randn(6, 8), torch.randn(6, 8)
    scale = torch.tensor(10.0)
    full_i2t, full_t2i = retrieval_loss(v, t, scale, smoothing=0.1)
    # Two "ranks" of 3 rows each, scoring against the gathered features: the mean of their local losses
    # equals the full-batch loss (what DDP's averaging computes).
    parts = [
        retrieval_loss(
            v[r * 3 : r * 3 + 3],
            t[r * 3 : r * 3 + 3],
            scale,
            all_visual=v,
            all_text=t,
            offset=3 * r,
        )
        for r in range(2)
    ]
    assert (parts[0][0] + parts[1][0]).item() / 2 == pytest.approx(full_i2t.item(), rel=1e-6)
    assert (parts[0][1] + parts[1][1]).item() / 2 == pytest.approx(full_t2i.item(), rel=1e-6)
    manual = F.cross_entropy(
        scale * F.normalize(v, dim=1) @ F.normalize(t, dim=1).t(),
        torch.arange(6),
        label_smoothing=0.1,
    )
    assert full_i2t.item() == pytest.approx(manual.item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------- candidates


def test_length_bucketed_encoding_equals_padded_encoding() -> None:
    torch.manual_seed(0)
    model = build_for_config(get_preset("tiny")).eval()
    ids = torch.tensor([[5, 6, 49407, 0], [7, 49407, 0, 0], [8, 9, 10, 49407], [11, 49407, 0, 0]])
    pad = ids == 0
    with torch.no_grad():
        padded = model.target_features(ids, pad, kind="classes", task="c").features
        bucketed, _ = encode_bucketed(model, ids, pad, kind="classes", task="c")
    torch.testing.assert_close(bucketed, padded, rtol=1e-5, atol=1e-5)


def test_vocab_candidates_cover_targets_and_map_columns() -> None:
    g = torch.Generator().manual_seed(0)
    targets = torch.tensor([[17, 3, -1], [3, 49407, -1]])
    cands = vocab_candidates(targets, vocab_size=49411, negatives=10, generator=g, runtime=CPU)
    assert not cands.full
    assert {3, 17, 49407} <= set(cands.ids.tolist())
    assert torch.equal(cands.ids, torch.unique(cands.ids))
    cols = cands.columns(targets)
    assert cols[0, 2] == -1 and cands.ids[cols[0, 0]] == 17 and cands.ids[cols[1, 1]] == 49407
    full = vocab_candidates(targets, vocab_size=49411, negatives=None, generator=g, runtime=CPU)
    assert full.full and full.ids.numel() == 49411
    assert torch.equal(VocabCandidates(full.ids, True).columns(targets), targets)


# ---------------------------------------------------------------------------------------------- MoE placement, config


def test_moe_layer_placement() -> None:
    assert moe_layers("every_other", 12) == (0, 2, 4, 6, 8, 10)
    assert moe_layers("every_fourth", 12) == (0, 4, 8)
    assert moe_layers("all", 3) == (0, 1, 2)
    assert moe_layers([3, 1], 4) == (1, 3)
    with pytest.raises(ValueError, match="out of range"):
        moe_layers([4], 4)


def test_model_config_from_recipe_sections() -> None:
    spec = ModelSpec(preset="tiny", drop_path=0.1, moe=MoESpec(num_experts=4, layers="all"))
    cfg = model_config_from_recipe(spec, task_names=["a", "b"], prompt=PromptSpec(length=5))
    assert cfg.moe is not None and cfg.moe.layers == (0, 1) and cfg.moe.task_names == ("a", "b")
    assert cfg.drop_path == 0.1 and cfg.hidden_size == 64
    assert cfg.prompt == PromptConfig(
        length=5, target_prompts=False, spe_bias=True, linear_head=False
    )


# ---------------------------------------------------------------------------------------------- prompt tuning


def test_prompt_selection_by_family_and_table() -> None:
    model = _tiny_moe(PromptConfig(length=2, target_prompts=True))
    names = prompt_parameter_names(model, ["deep_prompts", "layer_norms", "ln_post", "spe_bias"])  # type: ignore[arg-type]
    assert "encoder.layers.0.target_prompt" in names and "embed.spe_bias" in names
    assert "embed.norm.weight" in names and "encoder.layers.1.norm2.bias" in names
    assert not any(".gate." in n for n in names)  # the MoE gate's LayerNorm stays frozen
    assert "head.proj.weight" not in names and "head.logit_scales.img_cls" not in names
    freeze_for_prompt_tuning(model, ["deep_prompts"])  # type: ignore[arg-type]
    rows = {r.module: r for r in parameter_table([("model", model)])}
    assert rows["model.encoder.layers.0"].trainable == 2 * 2 * 64
    assert rows["model.embed"].trainable == 0 and rows["model.embed"].frozen > 49411 * 64


# ---------------------------------------------------------------------------------------------- checkpoints


def _payload(step: int) -> CheckpointPayload:
    model = build_for_config(get_preset("tiny"))
    return CheckpointPayload(
        model_state=dict(model.state_dict()),
        model_config=model.config,
        optimizer_state={"optimizer": {"state": {}, "param_groups": []}},
        state=TrainingState(
            step=step,
            sampler={"seed": 0, "step": step, "tasks": ["a"]},
            streams={"a": {"seed": 1, "position": 8 * step}},
        ),
        recipe_text="command: pretrain\n",
    )


def test_checkpoints_are_atomic_pruned_and_pointed_to(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, _payload(step), capture_rng_state(), CPU, keep_last=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["LATEST", "step-000002", "step-000003"]
    assert (root / "LATEST").read_text().strip() == "step-000003"
    # An interrupted write (no trainer.json) and a dangling pointer are ignored.
    (root / "step-000009").mkdir()
    (root / "LATEST").write_text("step-000009\n")
    found = latest_checkpoint(tmp_path)
    assert found is not None and found.name == "step-000003"
    loaded = load_checkpoint(found)
    assert loaded.state.step == 3 and loaded.state.streams["a"]["position"] == 24
    assert loaded.model_state is not None and "embed.spatial" in loaded.model_state
    assert json.loads((found / "config.json").read_text())["format_version"] == 1


def test_rng_state_round_trip() -> None:
    import random

    import numpy as np

    state = capture_rng_state()
    a = (torch.rand(3), np.random.rand(), random.random())
    restore_rng_state(state)
    b = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


# ---------------------------------------------------------------------------------------------- data


def _toy_task(task_type: str, **data: object) -> tuple[object, object]:
    from types import SimpleNamespace

    from uniperceiver_cli.recipe.data import ToyData

    spec = SimpleNamespace(
        name="t", type=task_type, image_size=None, class_names_file=None, max_text_len=16
    )
    return spec, ToyData.model_validate({"format": "toy", **data})


def test_task_data_and_few_shot_subsets_come_from_the_data_engine() -> None:
    from uniperceiver_cli.data.build import SubsetDataset
    from uniperceiver_cli.data.formats.toy import ToyDataset
    from uniperceiver_cli.data.sampler import SampleKey
    from uniperceiver_cli.engine.data import PathContext, open_task_data
    from uniperceiver_cli.engine.train import _few_shot

    spec, data_spec = _toy_task("image_classification", num_samples=200, image_size=16)
    paths = PathContext(None, Path.cwd())
    data = open_task_data(spec, data_spec, train=True, paths=paths, model_image_size=32)
    assert isinstance(data.dataset, ToyDataset)
    assert data.class_names is not None and len(data.class_names) == 5
    sample = data.dataset[0]
    assert sample.pixels.shape == (3, 32, 32)  # toy images resized to the model's side
    few = _few_shot("t", data, 0.1, seed=3)
    assert isinstance(few.dataset, SubsetDataset) and few.class_names == data.class_names
    labels = data.dataset.labels
    kept = few.dataset.indices
    per_class = {c: labels.count(c) for c in set(labels)}
    assert len(kept) == sum(int(0.1 * n) + 1 for n in per_class.values())
    assert kept == _few_shot("t", data, 0.1, seed=3).dataset.indices  # same on every rank
    # SampleKeys pass through the subset (the old engine-side SubsetView read a missing `.index`).
    via_key = few.dataset[SampleKey(1, 99)]
    assert via_key.index == kept[1]
    assert torch.equal(via_key.pixels, data.dataset[kept[1]].pixels)


def test_vqa_task_data_carries_the_answer_vocabulary() -> None:
    from uniperceiver_cli.engine.data import PathContext, open_task_data

    spec, data_spec = _toy_task("vqa", num_samples=8)
    data = open_task_data(
        spec, data_spec, train=True, paths=PathContext(None, Path.cwd()), model_image_size=32
    )
    assert data.answers is not None and len(data.answers) > 5
    batch = data.collate([data.dataset[i] for i in range(4)])
    assert batch.targets.shape == (4,)
    assert int(batch.targets.max()) < len(data.answers)


def test_unsupported_format_for_task_is_a_task_data_error() -> None:
    from uniperceiver_cli.engine.data import PathContext, TaskDataError, open_task_data
    from uniperceiver_cli.recipe.data import TextCorpusData

    spec, _ = _toy_task("image_classification")
    bad = TextCorpusData.model_validate({"format": "text_corpus", "file": "x.txt"})
    with pytest.raises(TaskDataError, match="cannot feed a image_classification task"):
        open_task_data(
            spec, bad, train=True, paths=PathContext(None, Path.cwd()), model_image_size=32
        )
