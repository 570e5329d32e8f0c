"""Retrieval recall on tiny matrices with known ranks, several captions per image, ties."""

from __future__ import annotations

import pytest
import torch

from uniperceiver_cli.metrics.retrieval import RetrievalError, retrieval_metrics


def test_known_ranks_with_multiple_captions() -> None:
    # 3 images, 5 captions: image 0 -> captions 0,1; image 1 -> 2,3; image 2 -> 4.
    text_to_image = torch.tensor([0, 0, 1, 1, 2])
    sim = torch.tensor(
        [
            [0.1, 0.9, 0.8, 0.0, 0.2],  # image 0: caption 1 ranks first -> i2t rank 0
            [0.7, 0.1, 0.3, 0.2, 0.6],  # image 1: its best caption (2) ranks 2 -> rank 2
            [0.5, 0.4, 0.9, 0.1, 0.0],  # image 2: caption 4 ranks last (4)
        ]
    )
    out = retrieval_metrics(sim, text_to_image, chunk_size=2)
    assert out["i2t_r1"] == pytest.approx(100 / 3)
    assert out["i2t_r5"] == pytest.approx(100.0)
    # t2i ranks: cap0 col [.1,.7,.5] -> 2; cap1 [.9,.1,.4] -> 0; cap2 [.8,.3,.9] -> 2 (image 1 is
    # third); cap3 [0,.2,.1] -> 0; cap4 [.2,.6,0] -> 2.
    assert out["t2i_r1"] == pytest.approx(40.0)
    assert out["t2i_r5"] == pytest.approx(100.0)
    six = [out[k] for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")]
    assert out["rsum"] == pytest.approx(sum(six))
    assert out["r_mean"] == pytest.approx(sum(six) / 6)


def test_recall_at_5_and_10_boundaries() -> None:
    # One image, 12 captions; only caption 11 belongs to image 1 whose row ranks it 6th.
    q, n = 2, 12
    text_to_image = torch.tensor([0] * 11 + [1])
    sim = torch.zeros(q, n)
    sim[0] = torch.linspace(1, 0, n)
    sim[1] = torch.arange(n, 0, -1).float()
    sim[1, 11] = sim[1, 5] - 0.5  # rank 6 in row 1 (0-based), so hit at 10 not at 5
    out = retrieval_metrics(sim, text_to_image)
    assert out["i2t_r1"] == 50.0 and out["i2t_r5"] == 50.0 and out["i2t_r10"] == 100.0


def test_ties_are_broken_by_index() -> None:
    sim = torch.ones(2, 2)
    out = retrieval_metrics(sim, torch.tensor([0, 1]))
    # t2i: caption 0 -> image 0 is first among equals; caption 1 -> image 1 is second.
    assert out["t2i_r1"] == 50.0
    assert out["i2t_r1"] == 50.0


def test_chunking_does_not_change_results() -> None:
    gen = torch.Generator().manual_seed(0)
    sim = torch.randn(37, 185, generator=gen)
    t2i = torch.arange(185) % 37
    assert retrieval_metrics(sim, t2i, chunk_size=7) == retrieval_metrics(sim, t2i, chunk_size=1000)


def test_input_errors() -> None:
    with pytest.raises(RetrievalError, match="shape"):
        retrieval_metrics(torch.zeros(2, 3), torch.tensor([0, 1]))
    with pytest.raises(RetrievalError, match="no caption"):
        retrieval_metrics(torch.zeros(3, 2), torch.tensor([0, 1]))
    with pytest.raises(RetrievalError, match=r"\[0, 2\)"):
        retrieval_metrics(torch.zeros(2, 2), torch.tensor([0, 5]))


def _brute_force(sim: torch.Tensor, text_to_image: torch.Tensor) -> dict[str, float]:
    """Obviously-correct loops: full stable descending sorts of every row and column."""
    q, n = sim.shape
    i2t_best = []
    for i in range(q):
        order = sorted(range(n), key=lambda j: (-float(sim[i, j]), j))
        i2t_best.append(min(order.index(j) for j in range(n) if int(text_to_image[j]) == i))
    t2i = []
    for j in range(n):
        order = sorted(range(q), key=lambda i: (-float(sim[i, j]), i))
        t2i.append(order.index(int(text_to_image[j])))
    out = {}
    for k in (1, 5, 10):
        out[f"i2t_r{k}"] = 100.0 * sum(r < k for r in i2t_best) / q
        out[f"t2i_r{k}"] = 100.0 * sum(r < k for r in t2i) / n
    return out


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_brute_force_on_random_matrices(seed: int, ties: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    q, per = 23, 5
    text_to_image = torch.arange(q).repeat_interleave(per)[torch.randperm(q * per, generator=g)]
    sim = torch.randn(q, q * per, generator=g)
    if ties:
        sim = torch.round(sim * 2) / 2  # few distinct values: many ties
    ours = retrieval_metrics(sim, text_to_image, chunk_size=7)
    for key, value in _brute_force(sim, text_to_image).items():
        assert ours[key] == pytest.approx(value, abs=1e-9), key
