"""Frozen, torch-free model configuration: the only input `model/` accepts.

Recipes (`uniperceiver_cli.recipe`) are converted into these dataclasses in one place
(`uniperceiver_cli.model.presets.model_config_from_spec`); nothing in `model/` reads a recipe.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

RoutingStrategy = Literal["token", "context", "modality", "task", "attribute"]
NoisePolicy = Literal["none", "vmoe", "jitter"]
Sublayer = Literal["qkv", "attn_out", "ffn_in", "ffn_out"]
UnseenTaskPolicy = Literal["error", "uniform", "fallback"]

#: Names of the per-task temperatures, in the reference checkpoint order (SPEC §1.9).
LOGIT_SCALE_NAMES: tuple[str, ...] = (
    "img_cls",
    "video_cls",
    "text_mlm",
    "text_caption",
    "caption",
    "mlm",
    "retrieve",
    "tqa_mlm",
    "tqa_caption",
    "tqa_retrieve",
    "downstream",
)


@dataclass(frozen=True)
class MoEConfig:
    """Conditional mixture-of-experts placement and routing (SPEC §2, §13.1).

    Attributes:
        routing: gate input: token hidden state, pooled context, modality, task or attribute row.
        num_experts: experts per routed linear (E).
        top_k: experts combined per routing decision (K), 1 or 2.
        layers: 0-based indices of encoder layers whose sublayers are routed.
        sublayers: which of the four linears of a routed layer become MoE linears.
        noise: router noise policy, applied in training only.
        noise_std: noise scale; the vmoe policy uses sigma = noise_std / E.
        capacity_factor: token-dispatch capacity factor in training (token/context routing).
        eval_capacity_factor: capacity factor at eval; None = dropless.
        batch_prioritized: give capacity to the highest-gate tokens first (V-MoE BPR).
        balance_loss_weight: GShard load-balance auxiliary loss weight.
        z_loss_weight: router z-loss weight.
        importance_loss_weight: importance auxiliary loss weight.
        attribute_length: width of the attribute vector (A), 8 in the reference.
        expert_parallel_size: ranks that share one set of experts (token/context routing).
        task_names: tasks known to the task router, in embedding-row order.
        unseen_task: what the task router does with a task not in `task_names`.
        fallback_task: the task whose routing an unseen task borrows when `unseen_task == "fallback"`.
        expert_ffn: token/context routing with `ffn_in` and `ffn_out` routed: expert e's two
            linears form one FFN (GELU inside the expert) and the K expert FFN outputs are mixed
            once (GShard, V-MoE, DeepSpeed); False mixes after each linear, as the reference
            (SPEC §2.5-§2.6).
    """

    routing: RoutingStrategy = "attribute"
    num_experts: int = 8
    top_k: int = 2
    layers: tuple[int, ...] = ()
    sublayers: tuple[Sublayer, ...] = ("qkv", "attn_out", "ffn_in", "ffn_out")
    noise: NoisePolicy = "vmoe"
    noise_std: float = 1.0
    capacity_factor: float = 3.0
    eval_capacity_factor: float | None = None
    batch_prioritized: bool = True
    balance_loss_weight: float = 0.01
    z_loss_weight: float = 0.001
    importance_loss_weight: float = 0.0
    attribute_length: int = 8
    expert_parallel_size: int = 1
    task_names: tuple[str, ...] = ()
    unseen_task: UnseenTaskPolicy = "error"
    fallback_task: str | None = None
    expert_ffn: bool = False


def expert_ffn_problems(routing: object, sublayers: Sequence[object]) -> list[str]:
    """What stops `expert_ffn: true` (the model build and the recipe check share these rules).

    Returns:
        One message per problem, each starting with the field it is about; empty when none.
    """
    problems: list[str] = []
    if routing not in ("token", "context"):
        problems.append(
            f"expert_ffn (true) needs routing token or context, not {routing!r} (segment-constant "
            "routing merges expert weights, which is exact only for linear experts)"
        )
    missing = [s for s in ("ffn_in", "ffn_out") if s not in sublayers]
    if missing:
        problems.append(
            f"expert_ffn (true) needs ffn_in and ffn_out in sublayers (missing {missing})"
        )
    return problems


@dataclass(frozen=True)
class PromptConfig:
    """Prompt-tuning additions (SPEC §5).

    Attributes:
        length: deep key/value prompt length per layer (Lp).
        target_prompts: separate prompts for target-side (candidate) sequences.
        spe_bias: learned bias added to the SPE word embedding.
        linear_head: a zero-initialised residual linear head after the projection.
    """

    length: int = 10
    target_prompts: bool = False
    spe_bias: bool = True
    linear_head: bool = False


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one Uni-Perceiver model (SPEC §1).

    Attributes:
        hidden_size: model width D.
        num_layers: encoder layers L.
        num_heads: attention heads; head dim = D / heads.
        ffn_size: FFN hidden width F.
        vocab_size: text vocabulary V (CLIP BPE + 5 specials).
        max_text_positions: rows of the learned text position table.
        type_vocab_size: rows of the text type table (only row 0 is used).
        patch_size: square patch side P in pixels.
        image_size: image side S the spatial table is built for.
        max_frames: rows of the learned temporal table.
        pos_embed_scale: sin-cos position-scale s (160/224 for 224 px models).
        layer_scale_init: initial value of the layer-scale gammas.
        drop_path: fixed drop-path rate of every layer (training only).
        ln_eps: LayerNorm epsilon.
        temperature_init: initial temperature; logit scales start at ln(1/temperature_init).
        logit_scale_max: cap of exp(logit scale).
        logit_scale_names: names of the per-task temperatures.
        moe: conditional MoE settings, or None for a dense model.
        prompt: prompt-tuning additions, or None.
    """

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    ffn_size: int = 3072
    vocab_size: int = 49411
    max_text_positions: int = 512
    type_vocab_size: int = 2
    patch_size: int = 16
    image_size: int = 224
    max_frames: int = 8
    pos_embed_scale: float = 160 / 224
    layer_scale_init: float = 1e-3
    drop_path: float = 0.0
    ln_eps: float = 1e-5
    temperature_init: float = 0.07
    logit_scale_max: float = 100.0
    logit_scale_names: tuple[str, ...] = field(default=LOGIT_SCALE_NAMES)
    moe: MoEConfig | None = None
    prompt: PromptConfig | None = None

    def __post_init__(self) -> None:
        """Check the few invariants the modules rely on."""
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.image_size % self.patch_size != 0:
            raise ValueError(
                f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})"
            )
        if self.moe is not None and not 1 <= self.moe.top_k <= self.moe.num_experts:
            raise ValueError(
                f"moe.top_k ({self.moe.top_k}) must be in 1..moe.num_experts ({self.moe.num_experts})"
            )

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_heads

    @property
    def grid_size(self) -> int:
        """Patches per image side (S / P)."""
        return self.image_size // self.patch_size

    @property
    def logit_scale_init(self) -> float:
        """Initial value of every logit scale, ln(1 / temperature_init)."""
        return math.log(1.0 / self.temperature_init)
