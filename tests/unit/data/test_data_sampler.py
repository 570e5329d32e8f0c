from __future__ import annotations

import itertools
from collections import Counter

import pytest

from uniperceiver_cli.data.sampler import InfiniteSampler, ShardedSampler, TaskSampler


def test_task_sampler_frequencies_follow_weights() -> None:
    weights = {"cls": 2.486, "mlm": 2.75, "cap": 0.5, "ret": 0.25}
    sampler = TaskSampler(weights, seed=7)
    n = 40_000
    counts = Counter(itertools.islice(iter(sampler), n))
    total = sum(weights.values())
    for task, w in weights.items():
        p = w / total
        sigma = (p * (1 - p) / n) ** 0.5
        assert abs(counts[task] / n - p) < 5 * sigma, (task, counts[task] / n, p)


def test_task_sampler_resume_continues_the_sequence() -> None:
    a = TaskSampler({"x": 1.0, "y": 3.0, "z": 0.5}, seed=1)
    full = [a.next_task() for _ in range(200)]
    b = TaskSampler({"x": 1.0, "y": 3.0, "z": 0.5}, seed=1)
    first = [b.next_task() for _ in range(120)]
    state = b.state_dict()
    c = TaskSampler({"x": 1.0, "y": 3.0, "z": 0.5}, seed=999)
    c.load_state_dict(state)
    assert first + [c.next_task() for _ in range(80)] == full
    other = TaskSampler({"x": 1.0, "y": 3.0, "z": 0.5}, seed=2)
    assert [other.next_task() for _ in range(200)] != full


def test_task_sampler_same_on_every_rank_and_validates() -> None:
    ranks = [TaskSampler({"a": 1, "b": 1}, seed=5) for _ in range(4)]
    seqs = [[r.next_task() for _ in range(50)] for r in ranks]
    assert all(s == seqs[0] for s in seqs)
    with pytest.raises(ValueError, match="> 0"):
        TaskSampler({"a": 1.0, "b": 0.0})
    with pytest.raises(ValueError, match="tasks"):
        TaskSampler({"a": 1.0}).load_state_dict({"seed": 0, "step": 3, "tasks": ["b"]})


def test_infinite_sampler_epochs_ranks_and_resume() -> None:
    n = 10
    s = InfiniteSampler(n, seed=3)
    keys = list(itertools.islice(iter(s), 30))
    for epoch in range(3):
        assert sorted(k.item for k in keys[epoch * n : (epoch + 1) * n]) == list(range(n))
    assert [k.item for k in keys[:n]] != [k.item for k in keys[n : 2 * n]]
    assert len({k.seed for k in keys}) == 30
    r0 = list(itertools.islice(iter(InfiniteSampler(n, seed=3, rank=0, world_size=2)), 5))
    r1 = list(itertools.islice(iter(InfiniteSampler(n, seed=3, rank=1, world_size=2)), 5))
    assert sorted(k.item for k in r0 + r1) == list(range(n))
    assert r0 == keys[0:10:2] and r1 == keys[1:10:2]
    resumed = InfiniteSampler(n, seed=0)
    resumed.load_state_dict(s.state_dict(consumed=17))
    assert list(itertools.islice(iter(resumed), 13)) == keys[17:30]


def test_sharded_sampler_covers_each_item_once() -> None:
    parts = [list(ShardedSampler(11, rank=r, world_size=3)) for r in range(3)]
    assert sorted(i for p in parts for i in p) == list(range(11))
    assert [len(ShardedSampler(11, rank=r, world_size=3)) for r in range(3)] == [4, 4, 3]


#: Chi-square critical value for 3 degrees of freedom at p = 0.001 (scipy.stats.chi2.isf).
CHI2_CRITICAL_DF3_P001 = 16.266


def _chi_square(counts: Counter[str], probabilities: dict[str, float], n: int) -> float:
    return sum((counts[t] - n * p) ** 2 / (n * p) for t, p in probabilities.items())


def test_task_sampler_frequencies_pass_a_chi_square_test() -> None:
    # Pretraining-like weights (SPEC §4.3 scale); seed fixed, p threshold 0.001, df = 4 - 1.
    weights = {"cls": 2.486, "mlm": 2.75, "cap": 0.5, "ret": 0.25}
    total = sum(weights.values())
    probs = {t: w / total for t, w in weights.items()}
    n = 20_000
    sampler = TaskSampler(weights, seed=2024)
    counts = Counter(sampler.next_task() for _ in range(n))
    stat = _chi_square(counts, probs, n)
    assert stat < CHI2_CRITICAL_DF3_P001, (stat, counts)
    # The test has power: the same counts are rejected against slightly different weights.
    shifted = {"cls": 0.42, "mlm": 0.44, "cap": 0.09, "ret": 0.05}
    assert _chi_square(counts, shifted, n) > CHI2_CRITICAL_DF3_P001
    stats = pytest.importorskip("scipy.stats")
    assert stats.chi2.isf(0.001, 3) == pytest.approx(CHI2_CRITICAL_DF3_P001, abs=1e-3)
    assert stats.chi2.sf(stat, 3) > 0.001


def test_task_sampler_resume_through_a_json_checkpoint() -> None:
    import json

    weights = {"a": 1.0, "b": 2.0, "c": 0.25}
    reference = TaskSampler(weights, seed=9)
    full = [reference.next_task() for _ in range(500)]
    first = TaskSampler(weights, seed=9)
    head = [first.next_task() for _ in range(321)]
    saved = json.dumps(first.state_dict())
    resumed = TaskSampler(weights, seed=0)
    resumed.load_state_dict(json.loads(saved))
    assert head + [resumed.next_task() for _ in range(179)] == full
    assert [resumed.task_at(s) for s in range(500)] == full  # task_at is pure
