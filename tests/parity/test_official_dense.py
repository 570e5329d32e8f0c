"""Parity with the official dense Uni-Perceiver on the golden `official_tiny` fixtures (fp32, CPU).

Every dense output of `dense/outputs.safetensors` is recomputed from `dense/checkpoint_torch.pth` and the inputs of
`inputs.safetensors` / `inputs.json` (MANIFEST.md §5 explains each tensor). The checks shared with the MoE
suite are in `parity_helpers.ParitySuite`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from parity_helpers import Golden, ParitySuite, load_golden

pytestmark = pytest.mark.parity


@pytest.fixture(scope="module")
def fx(official_tiny: Path) -> Golden:
    return load_golden(official_tiny, Path("dense") / "checkpoint_torch.pth", "dense")


def test_import_report(fx: Golden) -> None:
    report = fx.report
    assert report.layout == "torch" and report.naming == "dense"
    assert report.missing == []
    assert not report.folded_type_embedding  # the released dense file is already folded
    assert set(report.ignored) == {
        "video_embed.embeddings_type.weight",
        "video_embed.embeddings_norm.weight",
        "video_embed.embeddings_norm.bias",
    }
    assert len(report.mapped) == 52
    cfg = fx.model.config
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.ffn_size) == (64, 2, 1, 256)
    assert (cfg.image_size, cfg.patch_size, cfg.max_frames) == (32, 16, 8)
    assert abs(cfg.pos_embed_scale - 160 / 224) < 1e-12


class TestDense(ParitySuite):
    """Every shared output check on the dense checkpoint."""
