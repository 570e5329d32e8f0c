"""Presets, initialisation (SPEC §1.12) and parameter counts against the released models."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from uniperceiver_cli.model.build import build_model, count_parameters
from uniperceiver_cli.model.config import MoEConfig
from uniperceiver_cli.model.embed import sincos_table
from uniperceiver_cli.model.presets import get_preset, list_presets, model_config_from_spec
from uniperceiver_cli.model.uniperceiver import UniPerceiver

RELEASED = {"base": 124_757_003, "large": 355_532_811}


def test_list_and_get() -> None:
    assert list_presets() == ["tiny", "small", "base", "large"]
    small = get_preset("small")
    assert (small.hidden_size, small.num_layers, small.num_heads, small.ffn_size) == (
        192,
        12,
        3,
        768,
    )
    base = get_preset("base", image_size=384)
    assert base.image_size == 384 and base.hidden_size == 768 and base.head_dim == 64
    large = get_preset("large")
    assert (large.hidden_size, large.num_layers, large.num_heads, large.ffn_size) == (
        1024,
        24,
        16,
        4096,
    )
    with pytest.raises(KeyError, match="choose one of"):
        get_preset("huge")
    with pytest.raises(TypeError, match="unknown ModelConfig fields"):
        get_preset("tiny", widht=3)


def test_recipe_schema_layers_agree_with_presets() -> None:
    from uniperceiver_cli.recipe.schema import PRESET_LAYERS

    assert {n: get_preset(n).num_layers for n in list_presets()} == PRESET_LAYERS


@pytest.mark.parametrize("name", ["base", "large"])
def test_parameter_counts_vs_released(name: str) -> None:
    cfg = get_preset(name)
    with torch.device("meta"):
        model = UniPerceiver(cfg)
    ours = count_parameters(model)
    with_table = count_parameters(model, include_buffers=True)
    d, grid = cfg.hidden_size, cfg.grid_size
    print(
        f"{name}: ours {ours:,} (+ frozen sin-cos buffer {with_table:,}) vs released {RELEASED[name]:,}"
    )
    # docs/model.md: the released count also holds the unused visual type embedding (D) and the
    # spatial table, which is a buffer here (g*g*D)
    assert RELEASED[name] - ours == d + grid * grid * d
    assert RELEASED[name] - with_table == d


def test_init_follows_spec() -> None:
    torch.manual_seed(0)
    model = build_model(get_preset("tiny", num_heads=2))
    d, f = 64, 256
    block = model.encoder.blocks()[0]
    assert isinstance(block.qkv, nn.Linear)
    # Xavier-uniform with the fused-qkv fan rule: bound sqrt(6 / (D + D)), not sqrt(6 / (3D + D))
    qkv_bound = math.sqrt(6 / (d + d))
    assert block.qkv.weight.abs().max().item() <= qkv_bound
    assert block.qkv.weight.abs().max().item() > math.sqrt(6 / (4 * d))
    assert block.ffn_in.weight.abs().max().item() <= math.sqrt(6 / (d + f))
    assert torch.count_nonzero(block.qkv.bias) == 0
    assert torch.all(block.gamma_1 == 1e-3) and torch.all(block.gamma_2 == 1e-3)
    assert torch.all(block.norm1.weight == 1) and torch.count_nonzero(block.norm1.bias) == 0
    assert abs(model.embed.word.weight.std().item() - 0.02) < 1e-3
    conv = model.embed.patch.weight
    assert conv.abs().max().item() <= math.sqrt(6 / (3 * 16 * 16 + d))
    assert torch.count_nonzero(model.embed.patch.bias) == 0
    assert torch.equal(model.embed.spatial, sincos_table(2, d, 160 / 224))
    assert not any(b is p for b in model.buffers() for p in model.parameters())
    for scale in model.head.logit_scales.values():
        assert scale.item() == pytest.approx(math.log(1 / 0.07))
    assert "embed.spatial" in model.state_dict()
    assert "embed.spatial" not in dict(model.named_parameters())


def test_model_config_from_spec_duck_typed() -> None:
    moe = SimpleNamespace(
        routing="attribute",
        num_experts=4,
        top_k=2,
        layers="every_other",
        sublayers=["qkv", "ffn_in"],
        noise="vmoe",
        noise_std=1.0,
        capacity_factor=3.0,
        eval_capacity_factor=None,
        batch_prioritized=True,
        balance_loss_weight=0.01,
        z_loss_weight=0.001,
        importance_loss_weight=0.0,
        expert_parallel_size=1,
        unseen_task="error",
        fallback_task=None,
        expert_ffn=False,
    )
    spec = SimpleNamespace(
        preset="small",
        hidden_size=None,
        num_layers=6,
        num_heads=None,
        ffn_size=None,
        image_size=160,
        patch_size=None,
        max_frames=None,
        pos_embed_scale=None,
        drop_path=0.1,
        layer_scale_init=None,
        moe=moe,
    )
    prompt = SimpleNamespace(length=4, target_prompts=True, train=["deep_prompts", "spe_bias"])
    cfg = model_config_from_spec(spec, prompt=prompt, task_names=("coco", "in1k"))
    assert cfg.num_layers == 6 and cfg.image_size == 160 and cfg.drop_path == 0.1
    assert cfg.hidden_size == 192
    assert cfg.moe == MoEConfig(
        num_experts=4, layers=(0, 2, 4), sublayers=("qkv", "ffn_in"), task_names=("coco", "in1k")
    )
    assert cfg.prompt is not None and cfg.prompt.length == 4 and cfg.prompt.spe_bias
    assert not cfg.prompt.linear_head
    spec.moe.layers = "every_fourth"
    assert model_config_from_spec(spec).moe.layers == (0, 4)  # type: ignore[union-attr]
    spec.moe.layers = [1, 3]
    assert model_config_from_spec(spec).moe.layers == (1, 3)  # type: ignore[union-attr]
    spec.moe = None
    assert model_config_from_spec(spec).moe is None
