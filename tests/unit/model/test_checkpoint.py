"""Checkpoints: reference import (dense and old names), CheckpointError cases, our safetensors format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from uniperceiver_cli.model.checkpoint import (
    CheckpointError,
    config_from_dict,
    config_to_dict,
    infer_reference_config,
    load_pretrained,
    load_reference_checkpoint,
    save_pretrained,
)
from uniperceiver_cli.model.config import MoEConfig, PromptConfig
from uniperceiver_cli.model.presets import get_preset
from uniperceiver_cli.model.uniperceiver import UniPerceiver


def dense_state(official_tiny: Path) -> dict[str, torch.Tensor]:
    path = official_tiny / "dense" / "checkpoint_torch.pth"
    sd: dict[str, torch.Tensor] = torch.load(path, map_location="cpu", weights_only=True)["model"]
    return sd


def to_old_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of the reference converter (SPEC §8.3): DeepSpeed-era names, unfolded conv bias, fp16."""
    renames = [
        ("fused_encoder.", "encoder."),
        ("self_attn.in_proj_weight", "attention.self.qkv_proj.weight"),
        ("self_attn.in_proj_bias", "attention.self.qkv_proj.bias"),
        ("self_attn.out_proj", "attention.output.dense"),
        ("gamma_1", "attention_output.residual_scale"),
        ("gamma_2", "ffn_output.residual_scale"),
        ("linear1.", "ffn.dense."),
        ("linear2.", "ffn.dense2."),
        ("norm1.", "LayerNormModules.0."),
        ("norm2.", "LayerNormModules.1."),
        ("loss_prepare.", "predictor."),
    ]
    out = {}
    for key, value in sd.items():
        new = key
        for a, b in renames:
            new = new.replace(a, b)
        if "residual_scale" in new:
            value = value.reshape(1, 1, -1)
        out[new] = value.half()
    # unfold the visual type embedding (kept in fp32 so that folding it back is exact up to 1 ulp)
    out["video_embed.embeddings.bias"] = (
        sd["video_embed.embeddings.bias"] - sd["video_embed.embeddings_type.weight"][0]
    )
    out["visual_embed.patch_embed.weight"] = torch.zeros(3)  # dropped by the converter
    return out


def test_old_deepspeed_names_import_like_the_dense_file(
    official_tiny: Path, tmp_path: Path
) -> None:
    sd = dense_state(official_tiny)
    ds = {"module": {f"module.{k}": v for k, v in to_old_names(sd).items()}, "iteration": 5}
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save(ds, path)
    old, report = load_reference_checkpoint(path)
    assert report.layout == "deepspeed" and report.naming == "old"
    assert report.folded_type_embedding
    assert report.missing == []
    assert "visual_embed.patch_embed.weight" not in report.mapped
    ref, _ = load_reference_checkpoint(official_tiny / "dense" / "checkpoint_torch.pth")
    ref_sd, old_sd = ref.state_dict(), old.state_dict()
    assert set(ref_sd) == set(old_sd)
    for k in ref_sd:
        torch.testing.assert_close(old_sd[k], ref_sd[k], rtol=0, atol=1e-6, msg=k)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(old.encode_images(x), ref.encode_images(x), rtol=0, atol=1e-5)


def test_bare_state_dict_and_qkv_proj_naming(official_tiny: Path, tmp_path: Path) -> None:
    sd = dense_state(official_tiny)
    moe_named = {
        k.replace("self_attn.in_proj_", "self_attn.qkv_proj.").replace(
            "self_attn.out_proj", "self_attn.dense"
        ): v
        for k, v in sd.items()
    }
    path = tmp_path / "bare.pt"
    torch.save(moe_named, path)
    model, report = load_reference_checkpoint(path)
    assert report.layout == "bare" and report.naming == "dense"
    assert not report.folded_type_embedding
    ref, _ = load_reference_checkpoint(official_tiny / "dense" / "checkpoint_torch.pth")
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_infer_config(official_tiny: Path) -> None:
    cfg = infer_reference_config(dense_state(official_tiny))
    assert cfg == get_preset("tiny")


def test_truncated_file(official_tiny: Path, tmp_path: Path) -> None:
    data = (official_tiny / "dense" / "checkpoint_torch.pth").read_bytes()
    path = tmp_path / "cut.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pth: cannot read the checkpoint.*truncated"):
        load_reference_checkpoint(path)


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "noise.pth"
    path.write_bytes(
        torch.randint(
            0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
        )
        .numpy()
        .tobytes()
    )
    with pytest.raises(CheckpointError, match=r"noise\.pth"):
        load_reference_checkpoint(path)


def test_wrong_keys(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"model": {"backbone.weight": torch.zeros(3)}}, path)
    with pytest.raises(CheckpointError, match=r"token_embed\.embeddings\.weight"):
        load_reference_checkpoint(path)


def test_unknown_layout(tmp_path: Path) -> None:
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match="unknown checkpoint layout"):
        load_reference_checkpoint(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        load_reference_checkpoint(tmp_path / "nope.pth")


def test_moe_like_file_without_experts_is_rejected(tmp_path: Path, official_tiny: Path) -> None:
    sd = dense_state(official_tiny)
    sd["fused_encoder.layers.0.linear1.gate.wg.weight"] = torch.zeros(4, 64)
    path = tmp_path / "moe.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError, match="MoE checkpoint"):
        load_reference_checkpoint(path)


def test_strict_unknown_and_missing_keys(tmp_path: Path, official_tiny: Path) -> None:
    sd = dense_state(official_tiny)
    sd["extra.weight"] = torch.zeros(1)
    path = tmp_path / "extra.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError, match=r"extra\.weight"):
        load_reference_checkpoint(path)
    model, report = load_reference_checkpoint(path, strict=False)
    assert report.ignored["extra.weight"] == "unknown key"
    del sd["extra.weight"], sd["loss_prepare.proj.bias"]
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError, match=r"missing \['head\.proj\.bias'\]"):
        load_reference_checkpoint(path)
    model, report = load_reference_checkpoint(path, strict=False)
    assert report.missing == ["head.proj.bias"]
    assert torch.count_nonzero(model.head.proj.bias) == 0  # initialised, not garbage


def test_shape_mismatch(official_tiny: Path) -> None:
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_reference_checkpoint(
            official_tiny / "dense" / "checkpoint_torch.pth",
            config=get_preset("tiny", ffn_size=128),
        )


def test_other_grid_rebuilds_the_spatial_table(official_tiny: Path) -> None:
    cfg = get_preset("tiny", image_size=64)
    model, report = load_reference_checkpoint(
        official_tiny / "dense" / "checkpoint_torch.pth", config=cfg
    )
    assert model.embed.spatial.shape == (16, 64)
    assert "rebuilt" in report.ignored["video_embed.embeddings_st_pos.spatial_pos_embed.weight"]


@pytest.mark.parametrize("prompted", [False, True])
def test_save_load_round_trip_is_bitwise(
    tiny: UniPerceiver, tiny_prompted: UniPerceiver, prompted: bool, tmp_path: Path
) -> None:
    model = tiny_prompted if prompted else tiny
    target = save_pretrained(model, tmp_path / "ckpt")
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((target / "config.json").read_text())
    assert meta["format_version"] == 1
    loaded = load_pretrained(target)
    assert loaded.config == model.config
    a, b = model.state_dict(), loaded.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    # overwriting an existing folder replaces it and leaves no temporary folders behind
    save_pretrained(loaded, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_config_json_round_trip_with_moe() -> None:
    cfg = get_preset(
        "small",
        moe=MoEConfig(layers=(0, 2), sublayers=("ffn_in",), task_names=("a",)),
        prompt=PromptConfig(length=5),
    )
    back = config_from_dict(json.loads(json.dumps(config_to_dict(cfg))))
    assert back == cfg


def test_our_format_errors(tiny: UniPerceiver, tmp_path: Path) -> None:
    target = save_pretrained(tiny, tmp_path / "c")
    meta = json.loads((target / "config.json").read_text())
    meta["format_version"] = 99
    (target / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format_version 99"):
        load_pretrained(target)
    meta["format_version"] = 1
    meta["model_config"]["widht"] = 3
    (target / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="unknown ModelConfig fields"):
        load_pretrained(target)
    del meta["model_config"]["widht"]
    (target / "config.json").write_text(json.dumps(meta))
    weights = target / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="safetensors"):
        load_pretrained(target)
    weights.unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        load_pretrained(target)
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_pretrained(tmp_path)
