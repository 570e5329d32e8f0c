"""Recipe → `ModelConfig` → model, including `init_from` weights and the stage-2 resolution change.

This is the one place where a recipe's `model` section becomes the torch-free `ModelConfig` the model package
accepts (preset + explicit overrides + MoE placement + prompt additions). Starting weights come from a run
folder, a checkpoint folder/bundle, a prompt-tuning delta, or a released reference file; a new image size is
applied after loading by rebuilding the frozen sin-cos table with the position-scale rule (SPEC §4.3), so a
stage-1 checkpoint starts stage 2 without any key surgery.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from uniperceiver_cli.model.build import build_model
from uniperceiver_cli.model.config import ModelConfig, MoEConfig, PromptConfig
from uniperceiver_cli.model.presets import get_preset
from uniperceiver_cli.model.uniperceiver import UniPerceiver

logger = logging.getLogger(__name__)


class InitCheckpointError(Exception):
    """`model.init_from` cannot be read or does not fit the recipe's model."""


def moe_layers(placement: str | Sequence[int], num_layers: int) -> tuple[int, ...]:
    """0-based routed layer indices of a placement (SPEC §2.2).

    `every_other` = 0, 2, 4, ... (the reference's `'odd'`), `all`, `every_fourth` = 0, 4, 8, ...,
    or an explicit list.

    Raises:
        ValueError: for an index out of range or an unknown placement.
    """
    if isinstance(placement, str):
        step = {"every_other": 2, "all": 1, "every_fourth": 4}.get(placement)
        if step is None:
            raise ValueError(
                f"unknown MoE placement {placement!r}; use every_other, all, every_fourth or a list"
            )
        return tuple(range(0, num_layers, step))
    bad = [i for i in placement if not 0 <= int(i) < num_layers]
    if bad:
        raise ValueError(f"MoE layers {bad} out of range for {num_layers} layers")
    return tuple(sorted(int(i) for i in placement))


def moe_config(spec: Any, num_layers: int, task_names: Sequence[str]) -> MoEConfig:
    """`MoEConfig` of a recipe `model.moe` section."""
    return MoEConfig(
        routing=spec.routing,
        num_experts=spec.num_experts,
        top_k=spec.top_k,
        layers=moe_layers(spec.layers, num_layers),
        sublayers=tuple(spec.sublayers),
        noise=spec.noise,
        noise_std=spec.noise_std,
        capacity_factor=spec.capacity_factor,
        eval_capacity_factor=spec.eval_capacity_factor,
        batch_prioritized=spec.batch_prioritized,
        balance_loss_weight=spec.balance_loss_weight,
        z_loss_weight=spec.z_loss_weight,
        importance_loss_weight=spec.importance_loss_weight,
        expert_parallel_size=spec.expert_parallel_size,
        task_names=tuple(task_names),
        unseen_task=spec.unseen_task,
        fallback_task=spec.fallback_task,
        expert_ffn=spec.expert_ffn,
    )


def prompt_config(spec: Any) -> PromptConfig:
    """`PromptConfig` of a recipe `prompt` section."""
    return PromptConfig(
        length=spec.length,
        target_prompts=spec.target_prompts,
        spe_bias="spe_bias" in spec.train,
        linear_head="linear_head" in spec.train,
    )


_ARCH_FIELDS = ("hidden_size", "num_layers", "num_heads", "ffn_size", "patch_size", "max_frames")


def model_config_from_recipe(
    model_spec: Any,
    *,
    task_names: Sequence[str],
    prompt: Any | None = None,
    base: ModelConfig | None = None,
) -> ModelConfig:
    """Build the run's `ModelConfig`.

    Args:
        model_spec: the recipe `model` section.
        task_names: recipe task names (task routing).
        prompt: the recipe `prompt` section (prompt tuning) or None.
        base: the `init_from` checkpoint's config; the architecture comes from it, the recipe may only
            change training-time fields (drop path, image size, position scale).

    Returns:
        The configuration (at the recipe's image size).

    Raises:
        InitCheckpointError: when the recipe asks for an architecture the base checkpoint does not have.
    """
    overrides: dict[str, Any] = {}
    for name in (*_ARCH_FIELDS, "image_size", "pos_embed_scale", "drop_path", "layer_scale_init"):
        value = getattr(model_spec, name, None)
        if value is not None:
            overrides[name] = value
    if base is None:
        cfg = get_preset(model_spec.preset)
        cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if k != "image_size"})
        if "image_size" in overrides:
            cfg = dataclasses.replace(cfg, image_size=overrides["image_size"])
        if model_spec.moe is not None:
            cfg = dataclasses.replace(
                cfg, moe=moe_config(model_spec.moe, cfg.num_layers, task_names)
            )
    else:
        clash = [
            f"{k} ({overrides[k]} vs {getattr(base, k)})"
            for k in _ARCH_FIELDS
            if k in overrides and overrides[k] != getattr(base, k)
        ]
        if clash:
            raise InitCheckpointError(
                f"model.init_from has a different architecture: {', '.join(clash)}; remove these model "
                "fields or start from a matching checkpoint"
            )
        cfg = dataclasses.replace(base, prompt=None)
        for k in ("drop_path", "layer_scale_init"):
            if k in overrides:
                cfg = dataclasses.replace(cfg, **{k: overrides[k]})
        if model_spec.moe is not None and cfg.moe is None:
            raise InitCheckpointError(
                "model.moe is set but model.init_from is a dense checkpoint; drop model.moe or start from an "
                "MoE checkpoint"
            )
        if cfg.moe is not None and model_spec.moe is not None:
            cfg = dataclasses.replace(
                cfg, moe=moe_config(model_spec.moe, cfg.num_layers, task_names)
            )
    if prompt is not None:
        cfg = dataclasses.replace(cfg, prompt=prompt_config(prompt))
    return cfg


def build_for_config(config: ModelConfig, *, init: bool = True) -> UniPerceiver:
    """Build a model, injecting the MoE linears when `config.moe` is set."""
    if config.moe is None:
        return build_model(config, init=init)
    from uniperceiver_cli.model.moe import build_routed_linears

    return build_model(config, lambda i: build_routed_linears(config, i), init=init)


@dataclass
class InitWeights:
    """Starting weights read from `model.init_from`.

    Attributes:
        config: the checkpoint's model configuration (at its own image size).
        state: its full state dict.
        source: the folder or file read.
    """

    config: ModelConfig
    state: dict[str, Tensor]
    source: Path


def read_init_weights(path: str | Path) -> InitWeights:
    """Read `model.init_from`: run folder, checkpoint folder, bundle, prompt delta, or reference file.

    Raises:
        InitCheckpointError: when nothing loadable is found.
    """
    from uniperceiver_cli.api import resolve_checkpoint
    from uniperceiver_cli.engine.checkpoint import load_tensors, read_model_config
    from uniperceiver_cli.engine.freeze import DELTA_FILE, load_prompt_tuned
    from uniperceiver_cli.model.checkpoint import (
        WEIGHTS_FILE,
        CheckpointError,
        load_reference_checkpoint,
    )

    try:
        target = resolve_checkpoint(path)
    except CheckpointError as e:
        raise InitCheckpointError(f"model.init_from: {e}") from e
    try:
        if target.is_file():
            model, _ = load_reference_checkpoint(target)
            return InitWeights(model.config, dict(model.state_dict()), target)
        if (target / DELTA_FILE).is_file():
            model = load_prompt_tuned(target)
            return InitWeights(model.config, dict(model.state_dict()), target)
        config = read_model_config(target)
        return InitWeights(config, load_tensors(target / WEIGHTS_FILE), target)
    except CheckpointError as e:
        raise InitCheckpointError(f"model.init_from {path}: {e}") from e


def load_state_into(
    model: UniPerceiver, state: dict[str, Tensor], *, allow_missing: Sequence[str] = ()
) -> None:
    """Copy `state` into `model`: every key must match, except missing keys under `allow_missing` prefixes.

    Raises:
        InitCheckpointError: listing mismatching shapes, missing or unexpected keys.
    """
    own = model.state_dict()
    bad = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    missing = [
        k
        for k in own
        if k not in state and not any(k.startswith(p) or k.endswith(p) for p in allow_missing)
    ]
    unexpected = [k for k in state if k not in own]
    if bad or missing or unexpected:
        raise InitCheckpointError(
            "starting weights do not fit the model: "
            f"shape mismatches {bad[:6]}, missing {missing[:6]}, unexpected {unexpected[:6]}; check model.init_from"
        )
    model.load_state_dict(dict(state), strict=False)


#: Parameters a prompt-tuning model has that its base checkpoint lacks.
PROMPT_KEYS = ("prompt", "target_prompt", "spe_bias")


def build_run_model(
    model_spec: Any, *, task_names: Sequence[str], prompt: Any | None = None
) -> UniPerceiver:
    """Build the run's model: fresh from the preset, or from `model.init_from` at the recipe's image size.

    Args:
        model_spec: the recipe `model` section.
        task_names: recipe task names.
        prompt: the recipe `prompt` section for prompt tuning.

    Returns:
        The model on CPU in training mode.
    """
    if model_spec.init_from is None:
        config = model_config_from_recipe(model_spec, task_names=task_names, prompt=prompt)
        return build_for_config(config)
    init = read_init_weights(model_spec.init_from)
    config = model_config_from_recipe(
        model_spec, task_names=task_names, prompt=prompt, base=init.config
    )
    # Build at the checkpoint's resolution, load, then move to the recipe's (SPEC §4.3: rebuild, not interpolate).
    model = build_for_config(
        dataclasses.replace(
            config, image_size=init.config.image_size, pos_embed_scale=init.config.pos_embed_scale
        )
    )
    load_state_into(model, init.state, allow_missing=PROMPT_KEYS if prompt is not None else ())
    size = model_spec.image_size or init.config.image_size
    if size != init.config.image_size or model_spec.pos_embed_scale is not None:
        old = model.config.image_size
        model.set_image_size(size, model_spec.pos_embed_scale)
        logger.info(
            "image size %d -> %d: spatial table rebuilt with position scale %.4f",
            old,
            size,
            model.config.pos_embed_scale,
        )
    logger.info("initialised from %s", init.source)
    model.train()
    return model


def model_state_dict(model: torch.nn.Module) -> dict[str, Tensor]:
    """State dict with detached CPU tensors."""
    return {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
