"""Import of the reference's released MoE checkpoints (SPEC §2.2, §2.6, §8.2-§8.4).

Two layouts are accepted (the reading itself is `checkpoint.load_reference_checkpoint`'s job):

* `{'model': sd}` with new-code MoE names (`self_attn.qkv_proj` / `self_attn.dense` in every layer, and in MoE
  layers `<P>.gate.{tag_transform.0,tag_transform.1,wg}.*` + `<P>.experts.deepspeed_experts.<e>.*`);
* the DeepSpeed release (`mp_rank_00_model_states.pt`, `{'module': sd, ...}`, fp16, DeepSpeed-era names
  `encoder.layers.i.attention.self.qkv_proj.deepspeed_moe.{gate,experts}...`), renamed here with the MoE column
  of the reference converter's mapping (SPEC §8.3).

The architecture is inferred from the tensors: E from the expert count, MoE layers from the layers that hold
experts, routed sublayers from which linears hold experts, the attribute width from the tag transform; routing is
`attribute` with top-2 (the only gate that works in the reference). Gates of linears that reuse another linear's
decision (`self_attn.dense` after `qkv_proj`, `linear2` after `linear1`) never influence outputs and are dropped
and listed in `ImportReport.dead_gates`.

The visual type embedding is NOT folded into the patch-conv bias for MoE files, whatever their naming: the
reference MoE converter leaves that line commented out, so the released MoE model runs without it (the golden
fixtures confirm this); folding would shift every visual output.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from uniperceiver_cli.model.checkpoint import (
    CheckpointError,
    ImportReport,
    build_and_load,
    convert_reference_state_dict,
    infer_reference_config,
    rename_old_keys,
)
from uniperceiver_cli.model.config import ModelConfig, MoEConfig, Sublayer
from uniperceiver_cli.model.moe.keys import MoEKeyError, convert_reference_linear
from uniperceiver_cli.model.moe.layer import SHARED_PAIRS
from uniperceiver_cli.model.uniperceiver import UniPerceiver

logger = logging.getLogger(__name__)

#: Reference MoE linear name (new-code naming) -> our sublayer name.
REFERENCE_LINEARS: dict[str, Sublayer] = {
    "self_attn.qkv_proj": "qkv",
    "self_attn.dense": "attn_out",
    "linear1": "ffn_in",
    "linear2": "ffn_out",
}

#: DeepSpeed-era -> new-code substrings of the reference MoE converter (SPEC §8.3, MoE column).
_OLD_TO_MOE: tuple[tuple[str, str], ...] = (
    ("attention.self.qkv_proj", "self_attn.qkv_proj"),
    ("attention.output.dense", "self_attn.dense"),
    ("attention_output.residual_scale", "gamma_1"),
    ("ffn.dense2.", "linear2."),
    ("ffn.dense.", "linear1."),
    ("ffn_output.residual_scale", "gamma_2"),
    ("LayerNormModules.0.", "norm1."),
    ("LayerNormModules.1.", "norm2."),
    ("deepspeed_moe.gate", "gate"),
    ("deepspeed_moe.experts", "experts"),
)

_EXPERT_RE = re.compile(
    r"^fused_encoder\.layers\.(?P<layer>\d+)\.(?P<linear>self_attn\.qkv_proj|self_attn\.dense|linear1|linear2)"
    r"\.experts\.deepspeed_experts\.(?P<e>\d+)\.(?P<kind>weight|bias)$"
)


def is_old_naming(keys: list[str]) -> bool:
    """Whether reference keys use the DeepSpeed-era names (`encoder.`, `predictor.`, `attention.self`)."""
    return any(k.startswith(("encoder.", "predictor.")) or "attention.self" in k for k in keys)


def convert_old_moe_names(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename DeepSpeed-era MoE keys to the new-code MoE names (SPEC §8.3).

    Drops `visual_embed.*`, squeezes the `[1, 1, D]` residual scales to `[D]`; tensors keep their dtype.

    Args:
        state: reference tensors with old names.

    Returns:
        The same tensors under new-code MoE names.
    """
    return rename_old_keys(state, _OLD_TO_MOE)


def _expert_layout(state: Mapping[str, Tensor], where: str) -> dict[int, dict[str, set[int]]]:
    """Layer -> reference linear -> expert indices present."""
    layout: dict[int, dict[str, set[int]]] = {}
    for key in state:
        m = _EXPERT_RE.match(key)
        if m is None:
            continue
        per_layer = layout.setdefault(int(m.group("layer")), {})
        per_layer.setdefault(m.group("linear"), set()).add(int(m.group("e")))
    if not layout:
        raise CheckpointError(
            f"{where}: no 'fused_encoder.layers.<i>.<linear>.experts.deepspeed_experts.<e>' tensors; "
            "not a Uni-Perceiver-MoE checkpoint"
        )
    return layout


def _followers(sublayers: tuple[Sublayer, ...]) -> set[Sublayer]:
    """Routed sublayers that reuse the decision of the first member of their pair (SPEC §2.6)."""
    out: set[Sublayer] = set()
    for lead, follow in SHARED_PAIRS:
        if lead in sublayers and follow in sublayers:
            out.add(follow)
    return out


def infer_moe_config(state: Mapping[str, Tensor], where: str = "state dict") -> ModelConfig:
    """Infer the `ModelConfig` of a reference MoE state dict (new-code MoE names).

    The dense part comes from `checkpoint.infer_reference_config` (expert 0 stands in for a routed linear's
    weight); E, the MoE layers, the routed sublayers and the attribute width from the MoE tensors.

    Raises:
        CheckpointError: when the layout is incomplete or inconsistent across layers.
    """
    layout = _expert_layout(state, where)
    counts = {len(ids) for per_layer in layout.values() for ids in per_layer.values()}
    if len(counts) != 1:
        raise CheckpointError(
            f"{where}: MoE linears hold different numbers of experts {sorted(counts)}; expected one E"
        )
    num_experts = counts.pop()
    for layer, per_layer in layout.items():
        for linear, ids in per_layer.items():
            if ids != set(range(num_experts)):
                raise CheckpointError(
                    f"{where}: layer {layer} {linear} has experts {sorted(ids)}, expected 0..{num_experts - 1}"
                )
    linear_sets = {frozenset(per_layer) for per_layer in layout.values()}
    if len(linear_sets) != 1:
        raise CheckpointError(
            f"{where}: MoE layers route different linears {sorted(sorted(s) for s in linear_sets)}; "
            "expected the same set in every MoE layer"
        )
    routed = linear_sets.pop()
    sublayers = tuple(ours for ref, ours in REFERENCE_LINEARS.items() if ref in routed)
    layers = tuple(sorted(layout))
    first = f"fused_encoder.layers.{layers[0]}.{next(r for r in REFERENCE_LINEARS if r in routed)}"
    tag = state.get(f"{first}.gate.tag_transform.0.weight")
    if tag is None:
        raise CheckpointError(
            f"{where}: {first} has experts but no 'gate.tag_transform.0.weight'; only the reference's "
            "attribute gate (tag transform + wg) can be imported"
        )
    dense_view: dict[str, Tensor] = dict(state)
    for layer in layers:
        for ref in routed:
            prefix = f"fused_encoder.layers.{layer}.{ref}."
            dense_view[prefix + "weight"] = state[prefix + "experts.deepspeed_experts.0.weight"]
    base = infer_reference_config(dense_view, where)
    moe = MoEConfig(
        routing="attribute",
        num_experts=num_experts,
        top_k=2,
        layers=layers,
        sublayers=sublayers,
        noise="vmoe",
        noise_std=1.0,
        attribute_length=int(tag.shape[1]),
    )
    try:
        return dataclasses.replace(base, moe=moe)
    except ValueError as e:
        raise CheckpointError(f"{where}: inconsistent MoE architecture ({e})") from e


def convert_moe_state_dict(
    state: Mapping[str, Tensor], config: ModelConfig, report: ImportReport
) -> dict[str, Tensor]:
    """Map a reference MoE state dict (new-code MoE names) onto our keys, filling `report`.

    Routed linears: the per-expert tensors are stacked into `experts.weight` (E, out, in) / `experts.bias`
    (E, out); live gates keep their names; dead gates are dropped (`report.dead_gates`). Everything else goes
    through the dense mapping without folding the visual type embedding.

    Args:
        state: reference tensors.
        config: the MoE architecture (`config.moe` set).
        report: filled in place.

    Returns:
        Our state dict (float32).

    Raises:
        CheckpointError: when expert tensors are incomplete.
    """
    moe = config.moe
    if moe is None:
        raise CheckpointError("convert_moe_state_dict needs a config with moe set")
    followers = _followers(moe.sublayers)
    ours_of = {v: k for k, v in REFERENCE_LINEARS.items()}
    out: dict[str, Tensor] = {}
    consumed: set[str] = set()
    for layer in moe.layers:
        for sub in moe.sublayers:
            ref_prefix = f"fused_encoder.layers.{layer}.{ours_of[sub]}."
            our_prefix = f"encoder.layers.{layer}.{sub}."
            live = sub not in followers
            try:
                converted = convert_reference_linear(state, ref_prefix, moe.num_experts, live)
            except MoEKeyError as e:
                raise CheckpointError(f"{report.path}: {e}") from e
            for key, value in converted.items():
                out[our_prefix + key[len(ref_prefix) :]] = value.to(torch.float32)
            for key in state:
                if not key.startswith(ref_prefix):
                    continue
                rest = key[len(ref_prefix) :]
                m = _EXPERT_RE.match(key)
                if m is not None:
                    consumed.add(key)
                    report.mapped[key] = f"{our_prefix}experts.{m.group('kind')}[{m.group('e')}]"
                elif rest.startswith("gate."):
                    consumed.add(key)
                    if live:
                        report.mapped[key] = our_prefix + rest
                    else:
                        report.dead_gates.append(key)
                        report.ignored[key] = (
                            f"dead gate: {ours_of[sub]} reuses the decision of its pair's first linear "
                            "(SPEC §2.6)"
                        )
    rest_state = {k: v for k, v in state.items() if k not in consumed}
    out.update(convert_reference_state_dict(rest_state, config, report, fold_type_embedding=False))
    return out


def load_reference_moe_state(
    state: Mapping[str, Tensor],
    layout: str,
    path: str | os.PathLike[str],
    *,
    config: ModelConfig | None = None,
    strict: bool = True,
    device: str | torch.device = "cpu",
) -> tuple[UniPerceiver, ImportReport]:
    """Build our MoE model from the tensors of a released reference MoE file.

    Args:
        state: the file's tensors (`module.` prefix already stripped).
        layout: `torch`, `deepspeed` or `bare` (for the report).
        path: the file (for messages and the report).
        config: architecture to load into; default inferred.
        strict: fail on unknown keys or model tensors the file lacks.
        device: where to put the model.

    Returns:
        The model (eval mode) and the `ImportReport` (with `dead_gates`).

    Raises:
        CheckpointError: inconsistent layout, unknown keys (strict), shape or key mismatch.
    """
    p = Path(path)
    keys = list(state)
    naming = "moe"
    if is_old_naming(keys):
        naming = "old"
        state = convert_old_moe_names(state)
    report = ImportReport(path=str(p), layout=layout, naming=naming, moe=True)
    cfg = config if config is not None else infer_moe_config(state, str(p))
    if cfg.moe is None:
        raise CheckpointError(
            f"{p}: the file is an MoE checkpoint but the given config has no moe section; "
            "pass config=None to infer it"
        )
    ours = convert_moe_state_dict(state, cfg, report)
    model = build_and_load(cfg, ours, report, str(p), strict=strict, kind="Uni-Perceiver-MoE model")
    logger.info(
        "imported MoE %s (%s layout, %s names): E=%d, MoE layers %s, %d tensors, %d dead gates dropped",
        p,
        layout,
        naming,
        cfg.moe.num_experts,
        list(cfg.moe.layers),
        len(report.mapped),
        len(report.dead_gates),
    )
    return model.to(device).eval(), report
