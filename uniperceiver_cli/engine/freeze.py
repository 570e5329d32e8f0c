"""Prompt tuning (SPEC §5): which parameters train, the trainable/frozen table, and small delta checkpoints.

Selection goes by module type and attribute, not by substrings of parameter names: deep prompts are the
blocks' `prompt`/`target_prompt`, LayerNorms are `nn.LayerNorm` modules of the embeddings and blocks (the MoE
gate's LayerNorm stays frozen, as in the reference), `ln_post` is the head's, the SPE bias is the embeddings'.
A prompt-tuned checkpoint stores only those tensors plus the path of the base checkpoint; `load_prompt_tuned`
(used by `uniperceiver_cli.load`) rebuilds base + delta.

The optional zero-initialised linear classification heads (`linear_head`, SPEC §5.1 `fc_prompt`) live outside
the model, in `heads.safetensors` next to the delta. The run's own validation applies them; `load()` and
`uniperceiver eval` return / score the model with its cosine similarity head only and warn that the heads are
not applied. `load_prompt_heads` reads them for use with `LinearHead.forward(cos_logits, features)`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from uniperceiver_cli.engine.checkpoint import HEADS_FILE
from uniperceiver_cli.model.uniperceiver import UniPerceiver

logger = logging.getLogger(__name__)

DELTA_FILE = "prompt_delta.safetensors"
DELTA_META = "prompt_delta.json"
DELTA_FORMAT = 1

Family = str  # one of: deep_prompts, layer_norms, ln_post, spe_bias, linear_head


def prompt_parameter_names(model: UniPerceiver, families: Iterable[Family]) -> list[str]:
    """Qualified names (in `model`) of the parameters the prompt families make trainable.

    Args:
        model: a model built with a `PromptConfig`.
        families: subset of `deep_prompts`, `layer_norms`, `ln_post`, `spe_bias` (`linear_head` lives outside
            the model and is ignored here).

    Returns:
        Sorted parameter names.
    """
    wanted = set(families)
    ids: set[int] = set()
    if "deep_prompts" in wanted:
        for block in model.encoder.blocks():
            for p in (block.prompt, block.target_prompt):
                if p is not None:
                    ids.add(id(p))
    if "layer_norms" in wanted:
        norms: list[nn.Module] = [model.embed.norm]
        for block in model.encoder.blocks():
            norms += [block.norm1, block.norm2]
        for norm in norms:
            ids.update(id(p) for p in norm.parameters())
    if "ln_post" in wanted:
        ids.update(id(p) for p in model.head.ln_post.parameters())
    if "spe_bias" in wanted and model.embed.spe_bias is not None:
        ids.add(id(model.embed.spe_bias))
    return sorted(n for n, p in model.named_parameters() if id(p) in ids)


def freeze_for_prompt_tuning(model: UniPerceiver, families: Iterable[Family]) -> list[str]:
    """Set `requires_grad` so that only the prompt families train; return the trainable names."""
    names = set(prompt_parameter_names(model, families))
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    return sorted(names)


@dataclass(frozen=True)
class ParamRow:
    """One row of the trainable/frozen table.

    Attributes:
        module: module path (e.g. `encoder.layers.0`, `head`).
        trainable: trainable scalars.
        frozen: frozen scalars.
    """

    module: str
    trainable: int
    frozen: int


def _module_of(name: str) -> str:
    """Row of a parameter: `model.embed`, `model.head`, `model.encoder.layers.<i>`, `heads.<task>`."""
    parts = name.split(".")
    lead = parts[:1] if parts[0] in ("model", "heads") and len(parts) > 1 else []
    rest = parts[len(lead) :]
    if lead == ["heads"]:
        return f"heads.{rest[0]}"
    depth = 3 if rest[0] == "encoder" and len(rest) > 3 else 1
    return ".".join(lead + rest[:depth])


def parameter_table(modules: Sequence[tuple[str, nn.Module]]) -> list[ParamRow]:
    """Trainable vs frozen scalars per module (prefix = given name), in first-seen order."""
    rows: dict[str, list[int]] = {}
    seen: set[int] = set()
    for prefix, module in modules:
        for n, p in module.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            key = _module_of(f"{prefix}.{n}" if prefix else n)
            counts = rows.setdefault(key, [0, 0])
            counts[0 if p.requires_grad else 1] += p.numel()
    return [ParamRow(k, v[0], v[1]) for k, v in rows.items()]


def delta_state(model: UniPerceiver) -> dict[str, Tensor]:
    """The trainable tensors of a prompt-tuned model (what its checkpoint stores)."""
    return {n: p.detach().to("cpu") for n, p in model.named_parameters() if p.requires_grad}


def delta_metadata(base: Path, keys: Sequence[str], families: Sequence[str]) -> dict[str, Any]:
    """Metadata written next to the delta: the base checkpoint and what was tuned."""
    return {
        "format_version": DELTA_FORMAT,
        "base": str(base.resolve()),
        "keys": list(keys),
        "families": list(families),
    }


class PromptDeltaError(Exception):
    """A prompt-tuning delta folder cannot be loaded."""


def load_prompt_tuned(
    directory: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> UniPerceiver:
    """Load a prompt-tuned checkpoint: its base checkpoint plus the stored delta.

    Args:
        directory: a step folder with `prompt_delta.safetensors`, `prompt_delta.json` and `config.json`.
        device: where to put the model.

    Returns:
        The model in eval mode.

    Raises:
        PromptDeltaError: when the metadata, the base checkpoint or the delta do not fit.
    """
    from uniperceiver_cli.engine.build import (
        PROMPT_KEYS,
        build_for_config,
        load_state_into,
        read_init_weights,
    )
    from uniperceiver_cli.engine.checkpoint import load_tensors, read_model_config

    folder = Path(directory)
    meta_path = folder / DELTA_META
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PromptDeltaError(f"{meta_path}: cannot read the prompt-delta metadata ({e})") from e
    if meta.get("format_version") != DELTA_FORMAT:
        raise PromptDeltaError(
            f"{meta_path}: format_version {meta.get('format_version')!r} is not {DELTA_FORMAT}"
        )
    base_path = Path(meta["base"])
    if not base_path.exists():
        raise PromptDeltaError(
            f"{folder}: the base checkpoint {base_path} is gone; a prompt-tuned checkpoint stores only the tuned "
            "tensors, so keep its base (or export a full bundle)"
        )
    config = read_model_config(folder)
    base = read_init_weights(base_path)
    model = build_for_config(
        dataclasses.replace(
            config, image_size=base.config.image_size, pos_embed_scale=base.config.pos_embed_scale
        ),
        init=True,
    )
    load_state_into(model, base.state, allow_missing=PROMPT_KEYS)
    if (config.image_size, config.pos_embed_scale) != (
        base.config.image_size,
        base.config.pos_embed_scale,
    ):
        model.set_image_size(config.image_size, config.pos_embed_scale)
    delta = load_tensors(folder / DELTA_FILE)
    own = dict(model.named_parameters())
    unknown = sorted(set(delta) - set(own))
    if unknown:
        raise PromptDeltaError(
            f"{folder}: delta tensors {unknown[:6]} are not parameters of the model"
        )
    with torch.no_grad():
        for k, v in delta.items():
            if own[k].shape != v.shape:
                raise PromptDeltaError(
                    f"{folder}: {k} has shape {tuple(v.shape)}, model expects {tuple(own[k].shape)}"
                )
            own[k].copy_(v)
    heads = load_prompt_heads(folder, device)
    if heads:
        # Plain attribute (not a submodule): the heads stay out of the model's state dict and exports; the
        # evaluation engine applies the head of a classification task with the same name.
        object.__setattr__(model, "prompt_heads", heads)
        logger.info(
            "%s: prompt-tuning linear head(s) for task(s) %s are applied by `uniperceiver eval` to the tasks "
            "of the same name",
            folder,
            ", ".join(sorted(heads)),
        )
    return model.to(device).eval()


def load_prompt_heads(
    directory: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> dict[str, nn.Module]:
    """The prompt-tuning linear heads of a checkpoint folder (`heads.safetensors`), by task name.

    Each head maps `(cos_logits (B, C), features (B, D))` to `w_sim · cos_logits + fc(features)`
    (`engine.tasks.LinearHead`), with `features` the model's post-projected input features.

    Args:
        directory: a step folder (or a run folder's latest step folder) written by `prompt-tune`.
        device: where to put the heads.

    Returns:
        Task name → head in eval mode (empty when the run trained no linear head).

    Raises:
        PromptDeltaError: unreadable or malformed head tensors.
    """
    from uniperceiver_cli.engine.checkpoint import TrainingCheckpointError, load_tensors
    from uniperceiver_cli.engine.tasks import LinearHead

    path = Path(directory) / HEADS_FILE
    if not path.is_file():
        return {}
    try:
        tensors = load_tensors(path)
    except TrainingCheckpointError as e:
        raise PromptDeltaError(str(e)) from e
    by_task: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        task, _, rest = key.partition(".")
        by_task.setdefault(task, {})[rest] = value
    heads: dict[str, nn.Module] = {}
    for task, state in by_task.items():
        weight = state.get("fc.weight")
        if weight is None or weight.dim() != 2:
            raise PromptDeltaError(
                f"{path}: head {task!r} has no 2-D fc.weight (found {sorted(state)}); the file is not a "
                "prompt-tuning head file"
            )
        head = LinearHead(int(weight.shape[1]), int(weight.shape[0]))
        head.load_state_dict(state)
        heads[task] = head.to(device).eval()
    return heads
