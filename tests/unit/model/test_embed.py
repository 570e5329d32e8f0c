"""Embeddings: sin-cos table, position-scale rule, SPE prefix, temporal offsets, shapes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from uniperceiver_cli.model.embed import (
    SPE_ID,
    rescaled_position_scale,
    sincos_table,
)
from uniperceiver_cli.model.uniperceiver import UniPerceiver


def test_sincos_cells_follow_the_formula() -> None:
    grid, dim, s = 3, 8, 0.5
    table = sincos_table(grid, dim, s)
    assert table.shape == (9, 8)
    d4 = dim // 4
    for i in range(grid):
        for j in range(grid):
            k = i * grid + j
            for m in range(d4):
                w = 1.0 / 10000 ** (m / d4)
                u, v = s * i * w, s * j * w
                expect = [math.sin(u), math.cos(u), math.sin(v), math.cos(v)]
                got = [table[k, m + q * d4].item() for q in range(4)]
                assert got == pytest.approx(expect, abs=1e-6)


def test_sincos_matches_the_reference_table(official_tiny: Path) -> None:
    sd = torch.load(
        official_tiny / "dense" / "checkpoint_torch.pth", map_location="cpu", weights_only=True
    )["model"]
    stored = sd["video_embed.embeddings_st_pos.spatial_pos_embed.weight"]
    # the stored table is rounded to the fp16 grid (MANIFEST §1: max error 0.000244)
    err = (sincos_table(2, 64, 160 / 224) - stored).abs().max().item()
    assert err < 2.5e-4


def test_sincos_rejects_bad_width() -> None:
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_table(2, 6, 1.0)


def test_position_scale_rule_reproduces_160_over_s() -> None:
    # stage 1: 160 px, scale 1 -> stage 2: 224 px (grid 10 -> 14) gives 160/224
    assert rescaled_position_scale(1.0, 10, 14) == pytest.approx(160 / 224)
    # 224 -> 384 px keeps the span: 160/384
    assert rescaled_position_scale(160 / 224, 14, 24) == pytest.approx(160 / 384)


def test_set_image_size_rebuilds_the_table(tiny: UniPerceiver) -> None:
    model = UniPerceiver(tiny.config)
    model.load_state_dict(tiny.state_dict())
    model.set_image_size(64)
    assert model.config.image_size == 64
    assert model.config.pos_embed_scale == pytest.approx(tiny.config.pos_embed_scale / 2)
    expected = sincos_table(4, 64, tiny.config.pos_embed_scale / 2)
    assert torch.equal(model.embed.spatial, expected)
    with torch.no_grad():
        out = model.encode_images(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 64)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        model.set_image_size(70)


def test_spe_has_no_position_or_type(tiny: UniPerceiver) -> None:
    e = tiny.embed
    with torch.no_grad():
        spe = e.spe(3)
        expect = e.norm(e.word.weight[SPE_ID])
        assert spe.shape == (3, 1, 64)
        torch.testing.assert_close(spe[1, 0], expect, rtol=0, atol=0)
        # an in-text SPE does get position and type
        in_text = e.text(torch.tensor([[SPE_ID]]))
        manual = e.norm(e.word.weight[SPE_ID] + e.position.weight[0] + e.token_type.weight[0])
        torch.testing.assert_close(in_text[0, 0], manual, rtol=0, atol=0)


def test_text_positions_and_limit(tiny: UniPerceiver) -> None:
    e = tiny.embed
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        a = e.text(ids, torch.tensor([0, 0, 0]))
        manual = e.norm(e.word.weight[7] + e.position.weight[0] + e.token_type.weight[0])
        torch.testing.assert_close(a[0, 2], manual, rtol=0, atol=0)
        with pytest.raises(ValueError, match="position table"):
            e.text(torch.zeros(1, 513, dtype=torch.long))


def test_visual_token_order_and_temporal_rows(tiny: UniPerceiver) -> None:
    e = tiny.embed
    x = torch.randn(2, 3, 3, 32, 32)
    with torch.no_grad():
        out = e.visual(x)
        assert out.shape == (2, 3 * 4, 64)
        # token (t=2, row 1, col 0) = frame 2, patch k = 2
        patch = x[1, 2, :, 16:32, 0:16]
        conv = (e.patch.weight * patch).sum(dim=(1, 2, 3)) + e.patch.bias
        manual = e.norm(conv + e.temporal.weight[2] + e.spatial[2])
        torch.testing.assert_close(out[1, 2 * 4 + 2], manual, rtol=1e-5, atol=1e-5)


def test_training_temporal_offset_is_seeded_and_in_range(tiny: UniPerceiver) -> None:
    e = tiny.embed
    x = torch.randn(1, 6, 3, 32, 32)
    with torch.no_grad():
        feats = e.patch(x.reshape(6, 3, 32, 32)).flatten(2).transpose(1, 2)  # (T, 4, D)

        def with_offset(o: int) -> torch.Tensor:
            pos = e.temporal.weight[o : o + 6][:, None, :] + e.spatial[None]
            return e.norm((feats + pos).reshape(1, -1, 64))

        assert torch.allclose(e.visual(x), with_offset(0), atol=1e-6)  # eval: offset 0
        e.train()
        try:
            a = e.visual(x, torch.Generator().manual_seed(7))
            b = e.visual(x, torch.Generator().manual_seed(7))
            assert torch.equal(a, b)
            seen = set()
            for seed in range(40):
                y = e.visual(x, torch.Generator().manual_seed(seed))
                hits = [o for o in range(3) if torch.allclose(y, with_offset(o), atol=1e-6)]
                assert len(hits) == 1  # exactly one of the 8 - 6 + 1 offsets
                seen.update(hits)
            assert seen == {0, 1, 2}
        finally:
            e.eval()
        assert e.visual(torch.randn(1, 8, 3, 32, 32)).shape == (1, 32, 64)


def test_visual_shape_errors(tiny: UniPerceiver) -> None:
    with pytest.raises(ValueError, match=r"\(B, T, 3, 32, 32\)"):
        tiny.embed.visual(torch.randn(1, 1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"1\.\.8 frames"):
        tiny.embed.visual(torch.randn(1, 9, 3, 32, 32))
