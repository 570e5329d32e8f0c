"""Helpers of the MoE unit tests: tiny configs and the official fixture location."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from uniperceiver_cli.model.config import ModelConfig, MoEConfig


def fixture_root() -> Path:
    """`<repo>/../shared/fixtures/official_tiny`, or `$UNIPERCEIVER_FIXTURES`."""
    override = os.environ.get("UNIPERCEIVER_FIXTURES")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[3] / ".." / "shared" / "fixtures" / "official_tiny"


def official_moe_dir() -> Path:
    """Directory of the official MoE fixtures (skips the test when absent)."""
    path = fixture_root() / "moe"
    if not (path / "checkpoint_torch.pth").is_file():
        pytest.skip(f"official fixtures not found at {path} (set UNIPERCEIVER_FIXTURES)")
    return path


def tiny_config(hidden: int = 16, ffn: int = 24, **moe_fields: object) -> ModelConfig:
    """A small model config with a routed layer 0 and 4 experts, top-2 by default."""
    fields: dict[str, object] = {"num_experts": 4, "top_k": 2, "layers": (0,)}
    fields.update(moe_fields)
    moe = MoEConfig(**fields)  # type: ignore[arg-type]
    return ModelConfig(hidden_size=hidden, num_heads=2, ffn_size=ffn, num_layers=2, moe=moe)
