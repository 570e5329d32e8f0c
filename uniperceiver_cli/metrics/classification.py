"""Classification accuracy: top-k over logits and multi-view video averaging (SPEC §7). Torch only."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["multiview_probabilities", "topk_accuracy"]


def topk_accuracy(
    logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Top-k accuracy in percent.

    A sample is correct at k if its label is among the k highest scores; ties at the k-th score are
    resolved by `torch.topk` (lowest index first on CPU), so equal logits do not all count as hits.

    Args:
        logits: (B, C) scores (logits or probabilities).
        labels: (B,) class indices.
        ks: the k values; each must be <= C.

    Returns:
        ``{"top1": ..., "top5": ...}`` for the requested ks.

    Raises:
        ValueError: shapes disagree, B is 0 or a k exceeds C.
    """
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(
            f"expected logits (B, C) and labels (B,), got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if logits.shape[0] == 0:
        raise ValueError("no samples: logits has batch size 0")
    num_classes = logits.shape[1]
    if max(ks) > num_classes:
        raise ValueError(f"k={max(ks)} exceeds the {num_classes} classes; pass smaller ks")
    top = logits.topk(max(ks), dim=1).indices  # (B, max k)
    hits = top == labels[:, None].to(top.device)
    return {f"top{k}": 100.0 * float(hits[:, :k].any(dim=1).float().mean()) for k in ks}


def multiview_probabilities(view_logits: torch.Tensor) -> torch.Tensor:
    """Video prediction from several views: softmax per view, then the mean over views.

    Args:
        view_logits: (B, V, C) logits of V views (spatial crops × temporal clips) per video.

    Returns:
        (B, C) averaged class probabilities.
    """
    if view_logits.ndim != 3:
        raise ValueError(f"expected view logits (B, V, C), got shape {tuple(view_logits.shape)}")
    return view_logits.float().softmax(dim=-1).mean(dim=1)
