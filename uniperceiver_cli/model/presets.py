"""Named model sizes: one explicit dict from preset name to `ModelConfig` (SPEC §1.2).

`tiny` matches the golden fixtures' architecture (D 64, 2 layers, 1 head of 64, FFN 256, 32 px images with 16 px
patches, the real 49,411-token vocabulary), so tests and checkpoints can move between the two. `base` and `large`
are the released sizes; `small` is the reference's `BERT_L12_H192` width used by PERF.md.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from uniperceiver_cli.model.config import ModelConfig, MoEConfig, PromptConfig

PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        hidden_size=64,
        num_layers=2,
        num_heads=1,
        ffn_size=256,
        patch_size=16,
        image_size=32,
    ),
    "small": ModelConfig(hidden_size=192, num_layers=12, num_heads=3, ffn_size=768),
    "base": ModelConfig(hidden_size=768, num_layers=12, num_heads=12, ffn_size=3072),
    "large": ModelConfig(hidden_size=1024, num_layers=24, num_heads=16, ffn_size=4096),
}


def list_presets() -> list[str]:
    """Names of the available presets, smallest first."""
    return list(PRESETS)


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """Return the preset `name`, with fields replaced by `overrides`.

    Args:
        name: one of `list_presets()`.
        **overrides: `ModelConfig` field values to change (e.g. `image_size=384`, `moe=MoEConfig(...)`).

    Returns:
        A new frozen `ModelConfig`.

    Raises:
        KeyError: for an unknown preset, naming the known ones.
        TypeError: for an override that is not a `ModelConfig` field.
    """
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; choose one of {list_presets()}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"unknown ModelConfig fields {unknown}; valid fields are {sorted(fields)}")
    return dataclasses.replace(PRESETS[name], **overrides)


def _moe_layers(placement: Any, num_layers: int) -> tuple[int, ...]:
    """Resolve a recipe's MoE layer placement to 0-based layer indices."""
    if placement == "every_other":
        return tuple(range(0, num_layers, 2))  # 0-based even indices, as the reference's 'odd'
    if placement == "all":
        return tuple(range(num_layers))
    if placement == "every_fourth":
        return tuple(range(0, num_layers, 4))
    return tuple(int(i) for i in placement)


def model_config_from_spec(
    spec: Any, *, prompt: Any = None, task_names: tuple[str, ...] = ()
) -> ModelConfig:
    """Convert a recipe's model section into a `ModelConfig` (the one place this happens).

    Duck-typed so that `model/` never imports `recipe/`: `spec` needs the attributes of
    `recipe.schema.ModelSpec` (`preset`, optional size overrides, `moe`), `prompt` those of `PromptSpec`.

    Args:
        spec: the recipe's model section.
        prompt: the recipe's prompt-tuning section, or None.
        task_names: recipe task names, in order (task routing embeds one row per name).

    Returns:
        The frozen `ModelConfig`.
    """
    overrides: dict[str, Any] = {}
    for name in (
        "hidden_size",
        "num_layers",
        "num_heads",
        "ffn_size",
        "image_size",
        "patch_size",
        "max_frames",
        "pos_embed_scale",
        "drop_path",
        "layer_scale_init",
    ):
        value = getattr(spec, name, None)
        if value is not None:
            overrides[name] = value
    base = get_preset(spec.preset, **overrides)
    moe_spec = getattr(spec, "moe", None)
    moe = None
    if moe_spec is not None:
        moe = MoEConfig(
            routing=moe_spec.routing,
            num_experts=moe_spec.num_experts,
            top_k=moe_spec.top_k,
            layers=_moe_layers(moe_spec.layers, base.num_layers),
            sublayers=tuple(moe_spec.sublayers),
            noise=moe_spec.noise,
            noise_std=moe_spec.noise_std,
            capacity_factor=moe_spec.capacity_factor,
            eval_capacity_factor=moe_spec.eval_capacity_factor,
            batch_prioritized=moe_spec.batch_prioritized,
            balance_loss_weight=moe_spec.balance_loss_weight,
            z_loss_weight=moe_spec.z_loss_weight,
            importance_loss_weight=moe_spec.importance_loss_weight,
            expert_parallel_size=moe_spec.expert_parallel_size,
            task_names=tuple(task_names),
            unseen_task=moe_spec.unseen_task,
            fallback_task=moe_spec.fallback_task,
            expert_ffn=moe_spec.expert_ffn,
        )
    prompt_cfg = None
    if prompt is not None:
        train = set(getattr(prompt, "train", ()))
        prompt_cfg = PromptConfig(
            length=prompt.length,
            target_prompts=prompt.target_prompts,
            spe_bias="spe_bias" in train,
            linear_head="linear_head" in train,
        )
    return dataclasses.replace(base, moe=moe, prompt=prompt_cfg)
