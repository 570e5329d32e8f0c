"""`--fold-for`: folded models equal the routed model for the folded task; parameter counts (SPEC §2.8)."""

from __future__ import annotations

import pytest
import torch

from uniperceiver_cli.export.errors import ExportInputError
from uniperceiver_cli.export.fold import (
    TASKS,
    FoldedLinear,
    fold_for_task,
    folded_parameter_counts,
    routing_keys_for_tasks,
)
from uniperceiver_cli.model.build import build_model
from uniperceiver_cli.model.config import MoEConfig
from uniperceiver_cli.model.moe import FoldError, SegmentRoutedLinear
from uniperceiver_cli.model.moe.router import RoutingError
from uniperceiver_cli.model.presets import get_preset
from uniperceiver_cli.model.uniperceiver import UniPerceiver

from .conftest import tiny_moe

VISUAL_IN = (1, 0, 0, 1, 1, 0, 0, 0)
TEXT_TARGET = (1, 0, 0, 1, 0, 1, 1, 0)


def _meta_moe(preset: str) -> UniPerceiver:
    layers = get_preset(preset).num_layers
    cfg = get_preset(preset, moe=MoEConfig(layers=tuple(range(0, layers, 2))))
    with torch.device("meta"):
        return build_model(cfg, init=False)


def test_released_base_counts_on_meta_device() -> None:
    model = _meta_moe("base")
    summary = folded_parameter_counts(model, "image_retrieval")
    assert summary.keys == [VISUAL_IN, TEXT_TARGET]
    assert summary.routed_linears == 24  # 6 MoE layers x 4 linears
    assert summary.experts_dropped == 24 * 8
    # data/checkpoints.md: 422.67M stored (with the 12 dead gates), 167.27M deployed for image-text
    assert round(summary.released_params / 1e6, 2) == 422.67
    assert round(summary.params_after / 1e6, 2) == 167.27
    assert summary.dead_gate_params == 12 * (8 * 768 + 768 + 2 * 768 + 8 * 768)
    assert summary.params_before == summary.released_params - summary.dead_gate_params


def test_released_large_deployed_count_on_meta_device() -> None:
    summary = folded_parameter_counts(_meta_moe("large"), "image_retrieval")
    assert round(summary.params_after / 1e6, 1) == 506.6  # SPEC §2.8


def test_keys_per_task(moe_model: UniPerceiver) -> None:
    assert routing_keys_for_tasks(moe_model, ["image_classification"]) == [VISUAL_IN, TEXT_TARGET]
    caption = routing_keys_for_tasks(moe_model, ["image_caption"])
    assert caption == [(1, 1, 0, 1, 1, 0, 0, 0), (1, 1, 0, 1, 0, 1, 0, 1), (1, 1, 0, 1, 0, 1, 1, 0)]
    assert routing_keys_for_tasks(moe_model, ["mlm"]) == [
        (0, 1, 0, 1, 0, 1, 0, 0),
        (1, 1, 0, 1, 0, 1, 1, 0),
    ]
    both = routing_keys_for_tasks(moe_model, ["image_retrieval", "video_retrieval"])
    assert both == [VISUAL_IN, TEXT_TARGET]  # video input uses the same attribute row


@torch.no_grad()
def test_folded_equals_routed_for_retrieval(moe_model: UniPerceiver) -> None:
    folded, summary = fold_for_task(moe_model, "image_retrieval")
    assert summary.routed_linears == 4 and summary.experts_dropped == 16
    assert summary.params_after < summary.params_before
    block = folded.encoder.blocks()[0]
    assert isinstance(block.qkv, FoldedLinear) and len(block.qkv.linears) == 2
    assert not any(isinstance(m, SegmentRoutedLinear) for m in folded.modules())
    # the input model is untouched
    assert isinstance(moe_model.encoder.blocks()[0].qkv, SegmentRoutedLinear)
    x = torch.randn(3, 3, 32, 32)
    ids = torch.randint(0, 49_000, (4, 6))
    pad = torch.zeros(4, 6, dtype=torch.bool)
    pad[0, 4:] = True
    a = moe_model.encode_images(x)
    b = folded.encode_images(x)
    assert (a - b).abs().max().item() <= 1e-6
    ta = moe_model.target_features(ids, pad, kind="captions").features
    tb = folded.target_features(ids, pad, kind="captions").features
    assert (ta - tb).abs().max().item() <= 1e-6


@torch.no_grad()
def test_folded_equals_routed_for_captioning(moe_model: UniPerceiver) -> None:
    folded, _ = fold_for_task(moe_model, "image_caption")
    vocab_ids = torch.arange(0, 300)
    va = moe_model.vocabulary_features(vocab_ids)
    vb = folded.vocabulary_features(vocab_ids)
    assert (va - vb).abs().max().item() <= 1e-6
    images = torch.randn(2, 3, 32, 32)
    words = torch.randint(0, 300, (2, 5))
    la = moe_model.caption_logits(images, words, None, va).logits
    lb = folded.caption_logits(images, words, None, vb).logits
    assert (la - lb).abs().max().item() <= 1e-4  # two segments (visual, text) + vocabulary row
    with pytest.raises(RoutingError, match="folded for 'image_caption'"):
        folded.encode_images(images)  # the retrieval input row was dropped


@torch.no_grad()
def test_folded_equals_routed_for_mlm() -> None:
    model = tiny_moe(seed=5)
    folded, _ = fold_for_task(model, "mlm")
    vocab = model.vocabulary_features(torch.arange(100))
    ids = torch.randint(0, 100, (2, 7))
    masked = torch.zeros(2, 7, dtype=torch.bool)
    masked[:, 2] = True
    a = model.mlm_logits(ids, None, masked, vocab).logits
    b = folded.mlm_logits(ids, None, masked, folded.vocabulary_features(torch.arange(100))).logits
    assert (a - b).abs().max().item() <= 1e-4


def test_unknown_and_unservable_tasks(moe_model: UniPerceiver) -> None:
    with pytest.raises(ExportInputError, match="unknown task 'foo'"):
        fold_for_task(moe_model, "foo")
    with pytest.raises(ExportInputError, match="no row in the reference attribute table"):
        fold_for_task(moe_model, "vqa")
    assert "vqa" not in TASKS


def test_task_routing_unseen_task_cannot_be_served() -> None:
    torch.manual_seed(0)
    cfg = get_preset(
        "tiny",
        moe=MoEConfig(routing="task", num_experts=4, layers=(0,), task_names=("image_retrieval",)),
    )
    model = build_model(cfg).eval()
    with pytest.raises(ExportInputError, match="cannot serve task 'mlm'"):
        fold_for_task(model, "mlm")


def test_token_routing_cannot_be_folded() -> None:
    model = tiny_moe(routing="token")
    with pytest.raises(FoldError, match="token- or context-routed"):
        fold_for_task(model, "image_retrieval")


def test_dense_model_folds_to_itself(dense_model: UniPerceiver) -> None:
    folded, summary = fold_for_task(dense_model, "image_retrieval")
    assert summary.params_before == summary.params_after and summary.routed_linears == 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(dense_model.encode_images(x), folded.encode_images(x))
