"""Expert parallelism on 2 gloo processes equals the single-process layer holding all experts.

Two launchers: torch.multiprocessing workers, and `torchrun --nproc-per-node 2` as a subprocess
(the way a user starts expert-parallel training).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ep_check import check_expert_parallel

WORLD = 2
HERE = Path(__file__).resolve().parent


def _needs_gloo() -> None:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")


def _worker(rank: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        for routing in ("token", "context"):
            for capacity in (None, 0.5):
                check_expert_parallel(routing, capacity)
                check_expert_parallel(routing, capacity, expert_ffn=True)
    finally:
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.distributed
def test_expert_parallel_matches_single_process(tmp_path: Path) -> None:
    _needs_gloo()
    mp.spawn(_worker, args=(str(tmp_path / "init"),), nprocs=WORLD, join=True)


@pytest.mark.distributed
def test_torchrun_expert_parallel_matches_single_process(tmp_path: Path) -> None:
    """`python -m torch.distributed.run --nproc-per-node 2` on CPU (gloo), outputs and gradients."""
    _needs_gloo()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={WORLD}",
        str(HERE / "ep_torchrun_worker.py"),
        str(tmp_path),
    ]
    try:
        done = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=120, check=False
        )
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"torchrun did not finish within 120 s: {err}")
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    expected = [
        name
        for routing in ("token", "context")
        for name in (
            *(f"{routing}/k{k}/{capacity}" for k in (1, 2) for capacity in ("dropless", 0.5)),
            f"{routing}/expert_ffn/k2/0.5",
        )
    ]
    for rank in range(WORLD):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report == {"rank": rank, "world": WORLD, "backend": "gloo", "passed": expected}
