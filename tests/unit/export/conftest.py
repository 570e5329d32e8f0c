"""Small models shared by the export unit tests."""

from __future__ import annotations

import pytest
import torch

from uniperceiver_cli.model.build import build_model
from uniperceiver_cli.model.config import MoEConfig
from uniperceiver_cli.model.presets import get_preset
from uniperceiver_cli.model.uniperceiver import UniPerceiver


def tiny_moe(seed: int = 0, routing: str = "attribute") -> UniPerceiver:
    """Tiny attribute-MoE model (E=4, MoE in layer 0) with non-trivial biases and layer scales, eval mode."""
    torch.manual_seed(seed)
    cfg = get_preset("tiny", moe=MoEConfig(routing=routing, num_experts=4, layers=(0,)))  # type: ignore[arg-type]
    model = build_model(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.05)
            if "gamma" in name:
                p.fill_(0.5)
    return model.eval()


@pytest.fixture
def moe_model() -> UniPerceiver:
    return tiny_moe()


@pytest.fixture
def dense_model() -> UniPerceiver:
    torch.manual_seed(3)
    model = build_model(get_preset("tiny"))
    with torch.no_grad():
        for layer in model.encoder.blocks():
            layer.gamma_1.fill_(0.5)
            layer.gamma_2.fill_(0.5)
    return model.eval()
