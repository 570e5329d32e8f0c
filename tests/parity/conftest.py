"""Fixtures of the parity suites: the encoded vocabulary of the module's `fx` checkpoint."""

from __future__ import annotations

import pytest
import torch
from parity_helpers import Golden


@pytest.fixture(scope="module")
def vocab(fx: Golden) -> torch.Tensor:
    """The whole vocabulary encoded by the module's model (V, D)."""
    with torch.no_grad():
        feats: torch.Tensor = fx.model.vocabulary_features()
    return feats
