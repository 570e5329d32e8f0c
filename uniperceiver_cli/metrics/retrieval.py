"""Image/video <-> text retrieval recall (R@1/5/10), chunked over queries (SPEC §7).

No model code here: the inputs are a similarity matrix and the caption -> image map. Memory beyond the
(Q, N) matrix itself is O(chunk · N) booleans, so a 5k × 25k COCO matrix is fine.

Tie rule (deterministic): an item's rank is the number of candidates with a *strictly* higher
similarity, plus the number of candidates with an *equal* similarity and a smaller index. So equal
scores are broken by index, as a stable descending sort would order them.
"""

from __future__ import annotations

import torch

__all__ = ["RetrievalError", "retrieval_metrics"]

KS = (1, 5, 10)


class RetrievalError(ValueError):
    """Retrieval inputs have inconsistent shapes or ids."""


def _ranks(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Rank (0 = best) of column `target[q]` within row q of `scores`.

    Args:
        scores: (C, M) similarities of C queries against M candidates.
        target: (C,) index of the positive candidate per query.

    Returns:
        (C,) int64 ranks, ties broken by candidate index.
    """
    positive = scores.gather(1, target[:, None])  # (C, 1)
    higher = (scores > positive).sum(dim=1)
    index = torch.arange(scores.shape[1], device=scores.device)[None, :]
    equal_before = ((scores == positive) & (index < target[:, None])).sum(dim=1)
    return higher + equal_before


def retrieval_metrics(
    sim: torch.Tensor, text_to_image: torch.Tensor, chunk_size: int = 256
) -> dict[str, float]:
    """Recall@K in percent for both directions, their mean and RSUM.

    Image -> text: an image is a hit at K if ANY of its captions ranks within the top K of its row.
    Text -> image: a caption is a hit at K if its own image ranks within the top K of its column.

    Args:
        sim: (Q, N) similarities, Q images (or videos) × N texts.
        text_to_image: (N,) index in [0, Q) of each text's image.
        chunk_size: queries processed at once (memory is O(chunk_size · max(Q, N))).

    Returns:
        ``i2t_r1, i2t_r5, i2t_r10, t2i_r1, t2i_r5, t2i_r10`` (percent), ``i2t_mean``, ``t2i_mean``,
        ``r_mean`` (mean of the six) and ``rsum`` (sum of the six).

    Raises:
        RetrievalError: shapes disagree, an index is out of range, or an image has no caption.
    """
    if sim.ndim != 2:
        raise RetrievalError(f"sim must be (Q_images, N_texts), got shape {tuple(sim.shape)}")
    q, n = sim.shape
    if text_to_image.shape != (n,):
        raise RetrievalError(
            f"text_to_image must have shape ({n},) to match sim's {n} text columns, "
            f"got {tuple(text_to_image.shape)}"
        )
    target = text_to_image.to(device=sim.device, dtype=torch.long)
    if n == 0 or q == 0:
        raise RetrievalError(f"sim is empty (shape {tuple(sim.shape)}); nothing to rank")
    if int(target.min()) < 0 or int(target.max()) >= q:
        raise RetrievalError(
            f"text_to_image values must lie in [0, {q}), found [{int(target.min())}, {int(target.max())}]"
        )
    captions_per_image = torch.bincount(target, minlength=q)
    if bool((captions_per_image == 0).any()):
        missing = torch.nonzero(captions_per_image == 0).flatten()[:5].tolist()
        raise RetrievalError(
            f"images {missing} have no caption in text_to_image; every image needs >= 1 caption"
        )
    sim = sim.float()
    # Text -> image: one column per caption.
    t2i_rank = torch.empty(n, dtype=torch.long, device=sim.device)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        t2i_rank[start:stop] = _ranks(sim[:, start:stop].T, target[start:stop])
    # Image -> text: the best rank among an image's captions is the rank of its highest-scoring caption
    # (lowest index among equal scores), so one pass over each row suffices.
    best = torch.empty(q, dtype=torch.long, device=sim.device)
    for start in range(0, q, chunk_size):
        stop = min(start + chunk_size, q)
        rows = sim[start:stop]  # (C, N)
        own = target[None, :] == torch.arange(start, stop, device=sim.device)[:, None]  # (C, N)
        masked = rows.masked_fill(~own, float("-inf"))
        best_caption = masked.argmax(dim=1)  # first index of the maximum (torch.argmax contract)
        best[start:stop] = _ranks(rows, best_caption)
    out: dict[str, float] = {}
    for k in KS:
        out[f"i2t_r{k}"] = 100.0 * float((best < k).double().mean())
    for k in KS:
        out[f"t2i_r{k}"] = 100.0 * float((t2i_rank < k).double().mean())
    six = [out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in KS]
    out["i2t_mean"] = sum(six[:3]) / 3
    out["t2i_mean"] = sum(six[3:]) / 3
    out["r_mean"] = sum(six) / 6
    out["rsum"] = sum(six)
    return out
