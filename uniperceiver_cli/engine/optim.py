"""AdamW with the reference's parameter-group rules (SPEC §4.1) and the warm-up + cosine schedule (§4.2).

`param_groups` classifies every trainable parameter by name and module type; `lr_at` is a pure function of the
step, so resuming needs no scheduler object (the step is saved). Frozen parameters are left out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

GroupName = Literal["decay", "no_decay", "gate"]

#: Parameters never decayed whatever their shape (SPEC §4.1 rule 1).
NO_DECAY_NAMES = ("logit_scales", "similarity_weight", "gamma_1", "gamma_2")
#: Deep prompts are embeddings in the reference, hence not decayed (rule 3).
PROMPT_NAMES = ("prompt", "target_prompt")


@dataclass
class ParamGroupReport:
    """How the trainable parameters were grouped.

    Attributes:
        names: group name -> parameter names in that group.
        weight_decay: group name -> its weight decay.
    """

    names: dict[str, list[str]] = field(default_factory=dict)
    weight_decay: dict[str, float] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        """Number of tensors per group."""
        return {k: len(v) for k, v in self.names.items()}


def classify_parameter(name: str, param: nn.Parameter, owner: nn.Module | None) -> GroupName:
    """Group of one parameter under the rules of SPEC §4.1, in precedence order.

    1. logit scales, `similarity_weight`, layer-scale gammas: no decay;
    2. MoE gate linears (`gate.` / router weights): the gate group (no decay, lr factor 1);
    3. embedding tables and deep prompts: no decay;
    4. LayerNorm parameters: no decay;
    5. biases and any other tensor of rank <= 1: no decay;
    6. everything else (linear/conv/expert weights, the SPE bias): decayed.

    Args:
        name: qualified parameter name.
        param: the parameter.
        owner: the module that owns it directly (None if unknown).
    """
    leaf = name.rsplit(".", 1)[-1]
    if any(part in name.split(".") for part in NO_DECAY_NAMES) or leaf in NO_DECAY_NAMES:
        return "no_decay"
    if ".gate." in f".{name}" and isinstance(owner, nn.Linear) and leaf == "weight":
        return "gate"
    if isinstance(owner, nn.Embedding) or leaf in PROMPT_NAMES:
        return "no_decay"
    if isinstance(owner, nn.LayerNorm | nn.GroupNorm):
        return "no_decay"
    if leaf == "bias" or param.ndim <= 1:
        return "no_decay"
    return "decay"


def param_groups(
    model: nn.Module, weight_decay: float, *, gate_weight_decay: float = 0.0
) -> tuple[list[dict[str, object]], ParamGroupReport]:
    """Split the trainable parameters of `model` into AdamW groups.

    Args:
        model: the model (frozen parameters are skipped).
        weight_decay: decay of the `decay` group.
        gate_weight_decay: decay of MoE gate linears (0 in the reference).

    Returns:
        `(groups, report)`: groups in a fixed order (decay, no_decay, gate; empty ones dropped),
        each with `params`, `weight_decay` and `name`.
    """
    modules = dict(model.named_modules())
    buckets: dict[str, list[nn.Parameter]] = {"decay": [], "no_decay": [], "gate": []}
    report = ParamGroupReport(
        names={"decay": [], "no_decay": [], "gate": []},
        weight_decay={"decay": weight_decay, "no_decay": 0.0, "gate": gate_weight_decay},
    )
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        owner = modules.get(name.rsplit(".", 1)[0]) if "." in name else model
        group = classify_parameter(name, p, owner)
        buckets[group].append(p)
        report.names[group].append(name)
    groups: list[dict[str, object]] = []
    for key in ("decay", "no_decay", "gate"):
        if buckets[key]:
            groups.append(
                {"params": buckets[key], "weight_decay": report.weight_decay[key], "name": key}
            )
    report.names = {k: v for k, v in report.names.items() if v}
    return groups, report


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-6,
    extra: Iterable[nn.Module] = (),
) -> tuple[torch.optim.AdamW, ParamGroupReport]:
    """AdamW over the trainable parameters of `model` (and of `extra` modules, e.g. prompt heads).

    Args:
        model: the model.
        lr: peak learning rate (the schedule scales it every step).
        weight_decay: decay of matrices.
        betas: AdamW betas.
        eps: AdamW epsilon.
        extra: more modules whose trainable parameters join the same groups.

    Returns:
        The optimizer and the grouping report.

    Raises:
        ValueError: if nothing is trainable.
    """
    extras = list(extra)
    holder = nn.ModuleList([model, *extras]) if extras else model
    groups, report = param_groups(holder, weight_decay)
    if not groups:
        raise ValueError(
            "no trainable parameters: every parameter has requires_grad=False; check prompt.train"
        )
    # foreach=False keeps the update kernel identical whatever the group sizes (bitwise resume tests).
    opt = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=False)
    for group in opt.param_groups:
        group["initial_lr"] = lr
    return opt, report


def lr_at(
    step: int,
    *,
    base_lr: float,
    min_lr: float,
    warmup_steps: int,
    max_steps: int,
    decay: Literal["cosine", "constant"] = "cosine",
) -> float:
    """Learning rate of optimizer step `step` (0-based), SPEC §4.2.

    `lr = base · t/W` during warm-up; then `base · max(min/base, 0.5·(1 + cos(π·(t−W)/(T−W))))` for cosine
    decay, or `base` for constant.

    Args:
        step: the step about to be taken (0-based).
        base_lr: peak learning rate.
        min_lr: floor after warm-up.
        warmup_steps: W.
        max_steps: T.
        decay: `cosine` or `constant` after the warm-up.

    Returns:
        The learning rate.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * step / warmup_steps
    if decay == "constant":
        return base_lr
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    floor = min_lr / base_lr if base_lr > 0 else 0.0
    return base_lr * max(floor, factor)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Write `lr` into every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
