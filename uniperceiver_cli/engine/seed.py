"""Seeding and RNG state capture: one source of seeds (`run.seed`), per-rank offsets, resumable states.

Every random choice of a training step draws from generators seeded here, or from torch's global RNG whose state
is saved with each checkpoint, so a resumed run continues the exact same random sequence.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class SeedReport:
    """What `seed_everything` did.

    Attributes:
        seed: the run seed.
        rank_seed: the seed of this rank's generators (seed + rank).
        deterministic: deterministic algorithms were requested.
    """

    seed: int
    rank_seed: int
    deterministic: bool


def seed_everything(seed: int, rank: int = 0, *, deterministic: bool = False) -> SeedReport:
    """Seed torch, numpy and `random` with `seed + rank`; optionally force deterministic kernels.

    Args:
        seed: the run seed (>= 0).
        rank: this process's rank.
        deterministic: `torch.use_deterministic_algorithms(True)`, cuDNN benchmark off and the cuBLAS
            workspace setting (bitwise repeatability on the same hardware, versions and world size).

    Returns:
        A `SeedReport`.

    Raises:
        ValueError: for a seed out of range.
    """
    if not 0 <= seed <= MAX_SEED - rank:
        raise ValueError(f"seed must be in [0, 2^63 - 1 - rank], got {seed}")
    rank_seed = seed + rank
    random.seed(rank_seed)
    np.random.seed(rank_seed % 2**32)
    torch.manual_seed(rank_seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    return SeedReport(seed=seed, rank_seed=rank_seed, deterministic=deterministic)


def capture_rng_state() -> dict[str, Any]:
    """States of torch (CPU and CUDA), numpy and `random`, as tensors/lists (loadable with weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": {"version": int(version), "internal": list(internal), "gauss": gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore what `capture_rng_state` returned."""
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    keys = npst["keys"].numpy().astype(np.uint32)
    np.random.set_state((npst["kind"], keys, npst["pos"], npst["has_gauss"], npst["cached"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_generator(seed: int, *parts: int) -> torch.Generator:
    """A CPU generator seeded from `(seed, *parts)`, e.g. `(run seed, step, purpose)`.

    Pure function of its arguments, so nothing needs to be checkpointed to reproduce its draws.
    """
    from uniperceiver_cli.data.sampler import mix_seed

    return torch.Generator().manual_seed(mix_seed(seed, *parts))
