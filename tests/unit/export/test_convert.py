"""`convert`: released dense / MoE torch / MoE DeepSpeed files -> bundles that reproduce the fixture outputs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import uniperceiver_cli
from uniperceiver_cli.export.bundle import CONVERSION_FILE, check_manifest
from uniperceiver_cli.export.convert import convert_released
from uniperceiver_cli.model.checkpoint import CheckpointError, UntrustedCheckpointError
from uniperceiver_cli.model.heads import l2_normalize

TOL = 1e-5
RELEASED = {
    "dense": ("dense", Path("dense") / "checkpoint_torch.pth"),
    "moe_torch": ("moe", Path("moe") / "checkpoint_torch.pth"),
    "moe_deepspeed": ("moe", Path("moe") / "checkpoint_ds" / "mp_rank_00_model_states.pt"),
}


@pytest.mark.parametrize("name", sorted(RELEASED))
@torch.no_grad()
def test_converted_bundle_reproduces_fixture(
    name: str, official_tiny: Path, tmp_path: Path
) -> None:
    kind, rel = RELEASED[name]
    result = convert_released(official_tiny / rel, tmp_path / name)
    assert check_manifest(result.bundle.path) == []
    conversion = json.loads((result.bundle.path / CONVERSION_FILE).read_text())
    assert conversion["mapped_count"] == len(result.report.mapped) > 0
    assert conversion["moe"] == (kind == "moe")
    if kind == "moe":
        assert len(conversion["dead_gates"]) == 10
    model = uniperceiver_cli.load(result.bundle.path)
    inp = load_file(str(official_tiny / "inputs.safetensors"))
    out = load_file(str(official_tiny / kind / "outputs.safetensors"))
    checks = {
        "image.feat_norm": model.encode_images(inp["images"]),
        "video.feat_norm": model.encode_videos(inp["videos"]),
        "caption.feat_norm": l2_normalize(
            model.target_features(
                inp["image_captions_tokens"], inp["image_captions_invalid_mask"], kind="captions"
            ).features
        ),
        "imagenet_classes.feat_norm": l2_normalize(
            model.target_features(
                inp["imagenet_target_tokens"], inp["imagenet_target_invalid_mask"]
            ).features
        ),
    }
    for key, got in checks.items():
        err = (got - out[key]).abs().max().item()
        assert err <= TOL, f"{name} {key}: {err:.3g}"


def _deepspeed_file_with_namespace(official_tiny: Path, path: Path) -> None:
    blob = torch.load(
        official_tiny / RELEASED["moe_deepspeed"][1], map_location="cpu", weights_only=True
    )
    blob["args"] = argparse.Namespace(lr=1e-4, deepspeed=True)  # what real DeepSpeed files carry
    torch.save(blob, path)


def test_pickled_objects_need_trust(official_tiny: Path, tmp_path: Path) -> None:
    path = tmp_path / "mp_rank_00_model_states.pt"
    _deepspeed_file_with_namespace(official_tiny, path)
    with pytest.raises(UntrustedCheckpointError, match="--trust") as info:
        convert_released(path, tmp_path / "refused")
    assert info.value.global_name == "argparse.Namespace"
    assert not (tmp_path / "refused").exists()
    result = convert_released(path, tmp_path / "trusted", trust=True)
    assert result.report.layout == "deepspeed" and result.report.moe
    ref = uniperceiver_cli.load(official_tiny / RELEASED["moe_torch"][1])
    got = uniperceiver_cli.load(result.bundle.path)
    for key, value in ref.state_dict().items():
        assert torch.equal(got.state_dict()[key], value), key


def test_garbage_bytes_are_corrupt_not_untrusted(tmp_path: Path) -> None:
    """torch's safe unpickler rejects garbage with "Weights only load failed" too; without a named
    Python object that is a corrupt file, and --trust must not be suggested."""
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"garbage")
    with pytest.raises(
        CheckpointError, match="truncated, corrupt or not a PyTorch checkpoint"
    ) as info:
        convert_released(path, tmp_path / "out")
    assert not isinstance(info.value, UntrustedCheckpointError)
    assert "--trust" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_truncated_and_foreign_files(official_tiny: Path, tmp_path: Path) -> None:
    data = (official_tiny / RELEASED["dense"][1]).read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated, corrupt or not a PyTorch checkpoint"):
        convert_released(truncated, tmp_path / "a")
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        convert_released(text, tmp_path / "b")
    odd = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], odd)
    with pytest.raises(CheckpointError, match="unknown checkpoint layout"):
        convert_released(odd, tmp_path / "c")
