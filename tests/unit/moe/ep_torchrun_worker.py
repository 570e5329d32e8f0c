"""Worker launched by `torchrun --nproc-per-node 2` in `test_moe_parallel.py`.

Runs `check_expert_parallel` for token and context routing, top-1 and top-2, with and without
capacity drops (and whole-FFN experts, top-2 with drops), on the gloo backend, and writes `rank<r>.json` into the folder given as the only
argument; any mismatch raises and fails the launch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from ep_check import check_expert_parallel


def main() -> None:
    """Initialise from the torchrun environment, run the checks and record them."""
    out_dir = Path(sys.argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    passed: list[str] = []
    try:
        for routing in ("token", "context"):
            for top_k in (1, 2):
                for capacity in (None, 0.5):
                    check_expert_parallel(routing, capacity, top_k)
                    passed.append(f"{routing}/k{top_k}/{capacity or 'dropless'}")
            check_expert_parallel(routing, 0.5, 2, expert_ffn=True)
            passed.append(f"{routing}/expert_ffn/k2/0.5")
        rank, world = dist.get_rank(), dist.get_world_size()
        backend = str(dist.get_backend())
        dist.barrier()
    finally:
        dist.destroy_process_group()
    report = {"rank": rank, "world": world, "backend": backend, "passed": passed}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
