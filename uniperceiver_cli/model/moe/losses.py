"""Router auxiliary losses and routing statistics as pure functions of the gate outputs.

Balance (GShard/Switch), router z-loss (ST-MoE) and importance (V-MoE) losses over U routing units
(tokens or samples), plus the gate entropy used as telemetry. Weights are applied by the caller.
"""

from __future__ import annotations

import torch


def balance_loss(probs: torch.Tensor, top1: torch.Tensor) -> torch.Tensor:
    """GShard/Switch load-balance loss E · Σ_e f_e · P_e.

    f_e is the share of units whose first choice is expert e (before capacity), P_e the mean gate
    probability of expert e. It equals 1 for perfectly uniform routing.

    Args:
        probs: (U, E) gate probabilities.
        top1: (U,) int64 first-choice expert of each unit.

    Returns:
        0-dim loss (gradient flows through `probs` only).
    """
    num_units, num_experts = probs.shape
    if num_units == 0:
        return probs.sum() * 0.0
    counts = torch.bincount(top1, minlength=num_experts).to(probs.dtype)
    fraction = counts / num_units
    mean_prob = probs.mean(dim=0)
    return num_experts * (fraction * mean_prob).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss mean_u (logsumexp_e logits_{u,e})^2 on the noise-free logits.

    Args:
        logits: (U, E) logits.

    Returns:
        0-dim loss.
    """
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def importance_loss(probs: torch.Tensor) -> torch.Tensor:
    """V-MoE importance loss: squared coefficient of variation of Σ_u p_{u,e} over experts.

    Uses the population standard deviation; 0 when every expert has the same importance.

    Args:
        probs: (U, E) gate probabilities.

    Returns:
        0-dim loss.
    """
    if probs.shape[0] == 0:
        return probs.sum() * 0.0
    importance = probs.sum(dim=0)
    return (importance.std(unbiased=False) / importance.mean()).pow(2)


def gate_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the per-unit gate distributions.

    Args:
        probs: (U, E) probabilities.

    Returns:
        0-dim mean of -Σ_e p log p.
    """
    if probs.shape[0] == 0:
        return probs.new_zeros(())
    logp = torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))
    return -(probs * logp).sum(dim=-1).mean()
