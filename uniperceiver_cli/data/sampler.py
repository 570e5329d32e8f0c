"""Samplers: the multi-task `TaskSampler` and the per-dataset index samplers.

Every random choice here is a pure function of `(seed, counter)` (a SplitMix64 hash), so the state
to checkpoint is two integers and a resume continues the exact sequence:

* `TaskSampler` picks the task of each training step (SPEC §3.5). All ranks construct it with the
  same seed and therefore draw the same task at every step (our decision; the reference lets each
  rank draw its own task).
* `InfiniteSampler` streams shuffled dataset positions for training, strided across ranks, and
  tags each with a per-draw seed (`SampleKey`); datasets run their random augmentations under that
  seed (`seeded_scope`), so samples do not depend on the number of DataLoader workers and a resume
  reproduces them.
* `ShardedSampler` walks a dataset once for evaluation, each position on exactly one rank.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch.utils.data import Sampler

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*parts: int) -> int:
    """Hash integers into one well-mixed 63-bit seed (order matters)."""
    h = 0x243F6A8885A308D3
    for p in parts:
        h = _splitmix64(h ^ (p & _MASK64))
    return h >> 1


def uniform_at(seed: int, counter: int) -> float:
    """The `counter`-th uniform float in [0, 1) of the stream `seed`."""
    return (mix_seed(seed, counter) >> 10) / float(1 << 53)


class SampleKey(NamedTuple):
    """A dataset position plus the seed of the random choices made while loading it."""

    item: int
    seed: int


@contextmanager
def seeded_scope(seed: int | None) -> Iterator[None]:
    """Run the body with torch's CPU RNG seeded by `seed`, restoring the outer RNG afterwards.

    With `seed=None` the body uses (and advances) the global RNG as usual.
    """
    if seed is None:
        yield
        return
    # The CPU generator directly: torch.manual_seed also reseeds accelerators and costs ~40x more.
    generator = torch.default_generator
    outer = generator.get_state()
    generator.manual_seed(seed)
    try:
        yield
    finally:
        generator.set_state(outer)


class TaskSampler:
    """Weighted per-step task choice with a checkpointable, rank-independent sequence (SPEC §3.5).

    Args:
        weights: task name -> sampling weight (> 0); probabilities are weight / sum of weights.
        seed: stream seed; use the run seed (not seed + rank) so every rank draws the same task.
    """

    def __init__(self, weights: Mapping[str, float], seed: int = 0) -> None:
        if not weights:
            raise ValueError("expected at least one task with a sampling weight, found none")
        bad = {k: v for k, v in weights.items() if not v > 0}
        if bad:
            raise ValueError(f"expected sampling weights > 0, found {bad}; remove or raise them")
        self.tasks: tuple[str, ...] = tuple(weights)
        total = float(sum(weights.values()))
        self.probabilities: dict[str, float] = {k: float(v) / total for k, v in weights.items()}
        self._cumulative = list(itertools.accumulate(self.probabilities[t] for t in self.tasks))
        self.seed = int(seed)
        self.step = 0

    def task_at(self, step: int) -> str:
        """The task of step `step` (pure; does not move the sampler)."""
        u = uniform_at(self.seed, step)
        i = bisect.bisect_right(self._cumulative, u)
        return self.tasks[min(i, len(self.tasks) - 1)]

    def next_task(self) -> str:
        """Draw the task of the current step and advance."""
        task = self.task_at(self.step)
        self.step += 1
        return task

    def __iter__(self) -> Iterator[str]:
        while True:
            yield self.next_task()

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: the seed, the next step and the task list."""
        return {"seed": self.seed, "step": self.step, "tasks": list(self.tasks)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a `state_dict()`; the task list must match."""
        tasks = tuple(state.get("tasks", self.tasks))
        if tasks != self.tasks:
            raise ValueError(
                f"expected a task sampler state for tasks {list(self.tasks)}, found {list(tasks)}; "
                "resume with the recipe that wrote the checkpoint"
            )
        self.seed = int(state["seed"])
        self.step = int(state["step"])


class InfiniteSampler(Sampler[SampleKey]):
    """Endless stream of shuffled positions of a dataset, split across ranks.

    The global stream is the concatenation of per-epoch permutations of `range(num_items)`; rank r
    takes global positions r, r + W, r + 2W, ... Each yielded `SampleKey` carries a seed derived
    from (seed, global position).

    Args:
        num_items: dataset length (> 0).
        seed: stream seed (the same on every rank).
        shuffle: permute each epoch; False streams 0, 1, 2, ... repeatedly.
        rank: this process's rank.
        world_size: number of ranks.
        position: draws of this rank already consumed (for resume).
    """

    def __init__(
        self,
        num_items: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        position: int = 0,
    ) -> None:
        if num_items <= 0:
            raise ValueError(f"expected a non-empty dataset, found {num_items} items")
        if not 0 <= rank < world_size:
            raise ValueError(
                f"expected 0 <= rank < world_size, found rank {rank}, world {world_size}"
            )
        self.num_items = num_items
        self.seed = int(seed)
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.position = int(position)

    def _permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_items))
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
        return [int(i) for i in torch.randperm(self.num_items, generator=g)]

    def __iter__(self) -> Iterator[SampleKey]:
        epoch = -1
        perm: list[int] = []
        p = self.position
        while True:
            g = self.rank + self.world_size * p
            e, offset = divmod(g, self.num_items)
            if e != epoch:
                epoch, perm = e, self._permutation(e)
            yield SampleKey(perm[offset], mix_seed(self.seed, 1, g))
            p += 1

    def __len__(self) -> int:
        # An infinite sampler has no length; DataLoader only asks for it in len(loader).
        raise TypeError("InfiniteSampler is endless; it has no length")

    def state_dict(self, consumed: int | None = None) -> dict[str, int]:
        """State for resume: pass `consumed` = samples this rank actually used (prefetching reads ahead)."""
        pos = self.position + consumed if consumed is not None else self.position
        return {"seed": self.seed, "position": pos}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Restart the stream at `state['position']`."""
        self.seed = int(state["seed"])
        self.position = int(state["position"])


class ShardedSampler(Sampler[int]):
    """One pass over a dataset for evaluation: rank r gets positions r, r + W, ... (no padding).

    Args:
        num_items: dataset length.
        rank: this process's rank.
        world_size: number of ranks.
    """

    def __init__(self, num_items: int, *, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(
                f"expected 0 <= rank < world_size, found rank {rank}, world {world_size}"
            )
        self.num_items = num_items
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.num_items, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.num_items, self.world_size))
