"""The per-task losses of SPEC §1.10: cross-entropies over similarity logits.

Pure functions of logits and targets (no model, no device logic). Label smoothing follows the reference's
`LabelSmoothingCrossEntropy`: `(1 − ε)·NLL(target) + ε·mean_c(−log p_c)`, which is what
`torch.nn.functional.cross_entropy(..., label_smoothing=ε)` computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -1


def smoothed_cross_entropy(
    logits: Tensor, target: Tensor, smoothing: float = 0.0, *, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """Mean label-smoothed cross-entropy over rows whose target is not `ignore_index`.

    Args:
        logits: (N, C).
        target: (N,) int64 class indices (or `ignore_index`).
        smoothing: ε in [0, 1).
        ignore_index: target value of rows to skip.

    Returns:
        0-dim loss; 0 (with a graph) when every row is ignored.
    """
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(
            f"expected logits (N, C) and targets (N,), got {tuple(logits.shape)} and {tuple(target.shape)}"
        )
    valid = target != ignore_index
    if not bool(valid.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(
        logits[valid].float(), target[valid], label_smoothing=smoothing, reduction="mean"
    )


def summed_cross_entropy(
    logits: Tensor, target: Tensor, smoothing: float = 0.0, *, ignore_index: int = IGNORE_INDEX
) -> tuple[Tensor, Tensor]:
    """Sum of the label-smoothed cross-entropies of the rows whose target is not `ignore_index`.

    The building block of token-level losses averaged over a global (multi-rank) batch: each rank sums
    its tokens and the sum is divided by the token count of all ranks (`tasks.global_token_mean`).

    Args:
        logits: (N, C).
        target: (N,) int64 class indices (or `ignore_index`).
        smoothing: ε in [0, 1).
        ignore_index: target value of rows to skip.

    Returns:
        `(sum, count)`: 0-dim loss sum (with a graph; 0 when every row is ignored) and the 0-dim int64
        number of valid rows.
    """
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(
            f"expected logits (N, C) and targets (N,), got {tuple(logits.shape)} and {tuple(target.shape)}"
        )
    valid = target != ignore_index
    count = valid.sum()
    if not bool(valid.any()):
        return logits.sum() * 0.0, count
    total = F.cross_entropy(
        logits[valid].float(), target[valid], label_smoothing=smoothing, reduction="sum"
    )
    return total, count


def soft_target_cross_entropy(logits: Tensor, soft_targets: Tensor) -> Tensor:
    """Cross-entropy with soft targets (Mixup/CutMix), `mean_i Σ_c −q_ic log p_ic`.

    Args:
        logits: (N, C).
        soft_targets: (N, C), rows summing to 1 (label smoothing already folded in).

    Returns:
        0-dim loss.
    """
    if soft_targets.shape != logits.shape:
        raise ValueError(
            f"soft targets {tuple(soft_targets.shape)} must match logits {tuple(logits.shape)}"
        )
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(soft_targets.to(logp.dtype) * logp).sum(dim=-1).mean()


def retrieval_loss(
    visual: Tensor,
    text: Tensor,
    scale: Tensor,
    *,
    all_visual: Tensor | None = None,
    all_text: Tensor | None = None,
    offset: int = 0,
    smoothing: float = 0.1,
) -> tuple[Tensor, Tensor]:
    """Image→text and text→image LS-CE of SPEC §1.10.2 for the local rows of a (possibly global) batch.

    With `all_visual`/`all_text` (features of every rank, this rank's block starting at `offset`), the local
    queries are scored against the global candidates; the positive of local row `i` is global column
    `offset + i`. Averaging over local rows and gathering with gradients makes DDP equal to one process with
    the global batch (see `runtime.gather_with_grad`).

    Args:
        visual: local visual features (B, D), post-projected.
        text: local text features (B, D), the i-th caption belongs to the i-th item.
        scale: temperature (0-dim).
        all_visual: (N, D) every rank's visual features, or None (local negatives).
        all_text: (N, D) every rank's text features, or None.
        offset: index of this rank's first row in the global batch.
        smoothing: label smoothing ε.

    Returns:
        `(i2t, t2i)` 0-dim losses.
    """
    v = F.normalize(visual, dim=-1)
    t = F.normalize(text, dim=-1)
    cand_t = t if all_text is None else F.normalize(all_text, dim=-1)
    cand_v = v if all_visual is None else F.normalize(all_visual, dim=-1)
    target = torch.arange(v.shape[0], device=v.device) + offset
    i2t = scale * (v @ cand_t.t())  # (B, N)
    t2i = scale * (t @ cand_v.t())  # (B, N)
    return (
        smoothed_cross_entropy(i2t, target, smoothing),
        smoothed_cross_entropy(t2i, target, smoothing),
    )
