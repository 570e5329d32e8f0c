"""Small random models shared by the model unit tests."""

from __future__ import annotations

import pytest
import torch

from uniperceiver_cli.model.build import build_model
from uniperceiver_cli.model.config import ModelConfig, PromptConfig
from uniperceiver_cli.model.presets import get_preset
from uniperceiver_cli.model.uniperceiver import UniPerceiver


def random_model(config: ModelConfig, seed: int = 0) -> UniPerceiver:
    """A tiny model with mixing layer scales (0.5) so that every layer matters, in eval mode."""
    torch.manual_seed(seed)
    model = build_model(config)
    with torch.no_grad():
        for layer in model.encoder.blocks():
            layer.gamma_1.fill_(0.5)
            layer.gamma_2.fill_(0.5)
            for linear in (layer.qkv, layer.attn_out, layer.ffn_in, layer.ffn_out):
                linear.bias.normal_(0.0, 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def tiny() -> UniPerceiver:
    return random_model(get_preset("tiny", num_heads=2))


@pytest.fixture(scope="module")
def tiny_prompted() -> UniPerceiver:
    cfg = get_preset("tiny", num_heads=2, prompt=PromptConfig(length=3, target_prompts=True))
    model = random_model(cfg, seed=1)
    with torch.no_grad():
        assert model.embed.spe_bias is not None
        model.embed.spe_bias.normal_(0.0, 0.1)
    return model
