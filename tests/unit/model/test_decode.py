"""Caption decoding: the vectorised beam search against a plain-Python one, and the cache against recomputation."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from uniperceiver_cli.model.decode import beam_search, caption_search
from uniperceiver_cli.model.uniperceiver import UniPerceiver

EOT = 3  # stop token of the toy vocabulary


class MarkovStepper:
    """Toy language model: log-probs depend only on the previous word (row V = start state)."""

    def __init__(self, table: Tensor) -> None:
        self.table = table  # (V + 1, V)

    def __call__(self, t: int, last_words: Tensor | None) -> Tensor:
        if last_words is None:
            return self.table[-1:].expand(self.batch, -1)
        return self.table[last_words]

    def expand(self, repeats: int) -> None:
        pass

    def reorder(self, index: Tensor) -> None:
        pass

    batch = 1


def python_beam_search(
    table: Tensor, beam: int, max_len: int, lp: float
) -> list[tuple[list[int], list[float], float]]:
    """Obviously-correct beam search over Python lists, with EOT freezing and length penalty."""
    v = table.shape[1]
    beams: list[tuple[list[int], list[float], float]] = [([], [], 0.0)]
    for _ in range(max_len):
        cands = []
        for seq, lps, score in beams:
            if seq and seq[-1] == EOT:
                cands.append(([*seq, EOT], [*lps, 0.0], score))
                continue
            row = table[seq[-1] if seq else -1]
            for w in range(v):
                cands.append(([*seq, w], [*lps, row[w].item()], score + row[w].item()))
        cands.sort(key=lambda c: -c[2])
        beams = cands[:beam]

    def final(c: tuple[list[int], list[float], float]) -> float:
        if lp <= 0:
            return c[2]
        return c[2] / (sum(1 for w in c[0] if w != EOT) + 1) ** lp

    return sorted(((s, lps, final((s, lps, sc))) for s, lps, sc in beams), key=lambda c: -c[2])


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize(("beam", "lp"), [(1, 0.0), (2, 0.0), (2, 2.0), (3, 1.0)])
def test_beam_search_matches_python_reference(seed: int, beam: int, lp: float) -> None:
    g = torch.Generator().manual_seed(seed)
    v = 6
    logits = torch.randn(v + 1, v, generator=g) * 2
    logits[:, EOT] += 1.0  # make stopping common so that frozen beams occur
    table = torch.log_softmax(logits.double(), dim=-1)
    stepper = MarkovStepper(table)
    result = beam_search(
        stepper,
        batch_size=1,
        vocab_size=v,
        beam_size=beam,
        max_len=6,
        length_penalty=lp,
        eot_id=EOT,
    )
    expected = python_beam_search(table, beam, 6, lp)
    assert result.all_ids[0].tolist() == [e[0] for e in expected]
    torch.testing.assert_close(
        result.all_logp[0], torch.tensor([e[1] for e in expected], dtype=torch.float64)
    )
    torch.testing.assert_close(
        result.all_scores[0], torch.tensor([e[2] for e in expected], dtype=torch.float64)
    )
    assert torch.equal(result.ids, result.all_ids[:, 0])
    # after the first EOT only EOT follows, at log-prob 0
    for ids, lps in zip(result.all_ids[0].tolist(), result.all_logp[0].tolist(), strict=True):
        if EOT in ids:
            first = ids.index(EOT)
            assert all(w == EOT for w in ids[first:])
            assert all(x == 0.0 for x in lps[first + 1 :])


def test_frozen_beam_keeps_its_score() -> None:
    # start: EOT is best (p=0.5). After EOT the model would love word 1, but a stopped beam only
    # continues with EOT at log-prob 0. After word 0 the best continuation is word 0 again.
    probs = torch.tensor(
        [
            [0.4, 0.3, 0.2, 0.1],  # after word 0
            [0.25, 0.25, 0.25, 0.25],
            [0.25, 0.25, 0.25, 0.25],
            [0.01, 0.97, 0.01, 0.01],  # after EOT: ignored (frozen)
            [0.3, 0.2, 0.0, 0.5],  # start
        ]
    ).double()
    stepper = MarkovStepper(torch.log(probs))
    r = beam_search(stepper, batch_size=1, vocab_size=4, beam_size=2, max_len=3, eot_id=EOT)
    assert r.all_ids[0].tolist() == [[3, 3, 3], [0, 0, 0]]
    expected = [
        torch.log(torch.tensor(0.5)).item(),
        torch.log(torch.tensor(0.3 * 0.4 * 0.4)).item(),
    ]
    assert r.all_scores[0].tolist() == pytest.approx(expected)
    assert r.all_logp[0, 0].tolist() == pytest.approx([expected[0], 0.0, 0.0])
    # with a length penalty the longer caption wins: -3.04 / 4^2 > -0.69 / 1^2
    r2 = beam_search(
        stepper, batch_size=1, vocab_size=4, beam_size=2, max_len=3, length_penalty=2.0, eot_id=EOT
    )
    assert r2.ids[0].tolist() == [0, 0, 0]
    assert r2.scores[0].item() == pytest.approx(expected[1] / 16)


@pytest.mark.parametrize("prompted", [False, True])
@pytest.mark.parametrize(("beam", "lp"), [(1, 0.0), (2, 2.0), (3, 0.0)])
@torch.no_grad()
def test_cached_decoding_equals_recomputation(
    tiny: UniPerceiver, tiny_prompted: UniPerceiver, prompted: bool, beam: int, lp: float
) -> None:
    model = tiny_prompted if prompted else tiny
    torch.manual_seed(11)
    images = torch.randn(2, 3, 32, 32)
    cand = torch.randn(49411, 64)  # any candidate features (rows = vocabulary ids) will do
    cached = caption_search(
        model, images, beam_size=beam, max_len=6, length_penalty=lp, vocab_features=cand
    )
    recomputed = caption_search(
        model,
        images,
        beam_size=beam,
        max_len=6,
        length_penalty=lp,
        vocab_features=cand,
        use_cache=False,
    )
    assert torch.equal(cached.all_ids, recomputed.all_ids)
    torch.testing.assert_close(cached.all_logp, recomputed.all_logp, rtol=0, atol=1e-5)
    assert cached.all_ids.shape == (2, beam, 6)


@torch.no_grad()
def test_cached_video_decoding_equals_recomputation(tiny: UniPerceiver) -> None:
    torch.manual_seed(12)
    videos = torch.randn(2, 3, 3, 32, 32)
    vocab = torch.randn(49411, 64)
    kw = {"beam_size": 2, "max_len": 5, "vocab_features": vocab, "task_type": "video_caption"}
    a = caption_search(tiny, videos, **kw)  # type: ignore[arg-type]
    b = caption_search(tiny, videos, use_cache=False, **kw)  # type: ignore[arg-type]
    assert torch.equal(a.all_ids, b.all_ids)
    torch.testing.assert_close(a.all_logp, b.all_logp, rtol=0, atol=1e-5)


def test_invalid_search_arguments(tiny: UniPerceiver) -> None:
    with pytest.raises(ValueError, match="beam_size"):
        caption_search(
            tiny, torch.randn(1, 3, 32, 32), beam_size=0, vocab_features=torch.randn(5, 64)
        )
