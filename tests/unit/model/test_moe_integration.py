"""The dense model with the MoE package's routed linears plugged in (the MoE-readiness contract end to end)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from uniperceiver_cli.model.build import build_model
from uniperceiver_cli.model.checkpoint import load_pretrained, save_pretrained
from uniperceiver_cli.model.config import MoEConfig
from uniperceiver_cli.model.decode import caption_search
from uniperceiver_cli.model.presets import get_preset

pytest.importorskip("uniperceiver_cli.model.moe")


@pytest.mark.parametrize("routing", ["attribute", "token"])
@torch.no_grad()
def test_moe_cached_decoding_equals_recomputation(routing: str) -> None:
    torch.manual_seed(0)
    cfg = get_preset("tiny", moe=MoEConfig(routing=routing, num_experts=4, layers=(0,)))  # type: ignore[arg-type]
    model = build_model(cfg).eval()
    images = torch.randn(2, 3, 32, 32)
    vocab = torch.randn(49411, 64)
    kw = {"beam_size": 2, "max_len": 4, "vocab_features": vocab}
    a = caption_search(model, images, **kw)  # type: ignore[arg-type]
    b = caption_search(model, images, use_cache=False, **kw)  # type: ignore[arg-type]
    assert torch.equal(a.all_ids, b.all_ids)
    torch.testing.assert_close(a.all_logp, b.all_logp, rtol=0, atol=1e-5)
    out = model.visual_features(images)
    assert len(out.aux) >= 1  # routed linears report through ModelOutput.aux


def test_moe_save_load_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    cfg = get_preset("tiny", moe=MoEConfig(num_experts=4, layers=(0,)))
    model = build_model(cfg).eval()
    loaded = load_pretrained(save_pretrained(model, tmp_path / "moe"))
    assert loaded.config == cfg
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.encode_images(x), loaded.encode_images(x))
