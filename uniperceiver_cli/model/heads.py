"""The unified similarity head: post-projection and per-task temperatures (SPEC §1.9).

`z = proj(ln_post(h))` is applied to input- and target-side representations alike; logits are the cosine of
L2-normalised features times `exp(logit_scale_<name>)`, replaced by the constant cap when above it. Which
position is the representation (SPE, masked tokens, caption queries, cloze slot) is decided in `uniperceiver.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from uniperceiver_cli.model.config import ModelConfig
from uniperceiver_cli.model.gemm import GemmLinear

#: Which temperature each task type uses (SPEC §1.9, `MODEL.TEMP_NAME` of the released configs).
TASK_LOGIT_SCALE: dict[str, str] = {
    "image_classification": "img_cls",
    "video_classification": "video_cls",
    "mlm": "text_mlm",
    "text_classification": "text_mlm",
    "image_caption": "caption",
    "video_caption": "caption",
    "image_retrieval": "retrieve",
    "video_retrieval": "retrieve",
    "vqa": "downstream",
}


def l2_normalize(x: Tensor) -> Tensor:
    """Divide the last dimension by its L2 norm (..., D) -> (..., D)."""
    return F.normalize(x, dim=-1)


class SimilarityHead(nn.Module):
    """`ln_post` + `proj` and the learnable per-task logit scales.

    Attributes:
        ln_post: LayerNorm(D) before the projection.
        proj: Linear(D, D).
        logit_scales: one scalar per name of `config.logit_scale_names`, initialised to ln(1/0.07).
        logit_scale_max: cap of the temperature.
    """

    def __init__(self, config: ModelConfig) -> None:
        """Create the head for `config`."""
        super().__init__()
        d = config.hidden_size
        self.ln_post = nn.LayerNorm(d, eps=config.ln_eps)
        self.proj = GemmLinear(d, d)
        self.logit_scales = nn.ParameterDict(
            {
                name: nn.Parameter(torch.tensor(config.logit_scale_init))
                for name in config.logit_scale_names
            }
        )
        self.logit_scale_max = config.logit_scale_max

    def project(self, h: Tensor) -> Tensor:
        """Post-projection z = proj(ln_post(h)), (..., D) -> (..., D), before normalisation."""
        return self.proj(self.ln_post(h))  # type: ignore[no-any-return]

    def scale_name(self, task: str) -> str:
        """Resolve a task type (e.g. `image_caption`) or a logit-scale name to a scale name.

        Task types win: `mlm` is our task type for masked language modelling and resolves to the
        `text_mlm` scale the reference trains it with (the reference's own `mlm` scale is unused).

        Raises:
            KeyError: naming the known scales and task types when `task` is neither.
        """
        name = TASK_LOGIT_SCALE.get(task)
        if name is not None and name in self.logit_scales:
            return name
        if task in self.logit_scales:
            return task
        if name is None or name not in self.logit_scales:
            raise KeyError(
                f"unknown temperature {task!r}; use one of the logit scales "
                f"{sorted(self.logit_scales)} or a task type of {sorted(TASK_LOGIT_SCALE)}"
            )
        return name

    def temperature(self, task: str) -> Tensor:
        """Temperature `exp(logit_scale)` for a scale name or task type, capped (no gradient above the cap)."""
        scale: Tensor = self.logit_scales[self.scale_name(task)]
        # clamp passes no gradient where it clips, matching the reference's constant replacement.
        return scale.exp().clamp(max=self.logit_scale_max)

    def logits(self, a: Tensor, b: Tensor, task: str, *, normalized: bool = False) -> Tensor:
        """Temperature-scaled cosine logits.

        Args:
            a: features (N, D).
            b: candidate features (M, D).
            task: logit-scale name or task type.
            normalized: both inputs are already L2-normalised.

        Returns:
            (N, M) logits `tau * <a/|a|, b/|b|>`.
        """
        if not normalized:
            a, b = l2_normalize(a), l2_normalize(b)
        return self.temperature(task) * (a @ b.t())
