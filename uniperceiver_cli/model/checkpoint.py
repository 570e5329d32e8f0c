"""Checkpoints: import of the reference's released dense formats and our own safetensors format (SPEC §8).

Reference formats (`.pth`/`.pt`): `{'model': sd}` (torch), `{'module': sd}` (DeepSpeed) or a bare state dict, with the
dense key names of SPEC §8.4 or the old DeepSpeed-era names of §8.3. MoE checkpoints are converted by
`model/moe/released.py` (called from `load_reference_checkpoint`). Our format is a folder holding
`model.safetensors` and `config.json` (`format_version` + `ModelConfig`), written to a temporary sibling and
renamed into place. Every `torch.load` is `weights_only=True` unless the caller
explicitly trusts the file (`trust=True`, for DeepSpeed files that pickle e.g. an `argparse.Namespace`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from uniperceiver_cli.atomic import atomic_directory
from uniperceiver_cli.model.build import build_model
from uniperceiver_cli.model.config import LOGIT_SCALE_NAMES, ModelConfig, MoEConfig, PromptConfig
from uniperceiver_cli.model.embed import sincos_table
from uniperceiver_cli.model.uniperceiver import UniPerceiver

logger = logging.getLogger(__name__)

#: Version of our folder format (`config.json` + `model.safetensors`).
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class CheckpointError(Exception):
    """A checkpoint file or folder cannot be read or does not fit the model."""


class UntrustedCheckpointError(CheckpointError):
    """The file pickles arbitrary Python objects, which `weights_only=True` refuses to load.

    Attributes:
        global_name: the first refused global (e.g. `argparse.Namespace`), when torch names it.
    """

    def __init__(self, message: str, global_name: str | None = None) -> None:
        super().__init__(message)
        self.global_name = global_name


@dataclass
class ImportReport:
    """What importing a reference checkpoint did.

    Attributes:
        path: the file read.
        layout: `torch` ({'model': sd}), `deepspeed` ({'module': sd}) or `bare` (a state dict).
        naming: `dense` (SPEC §8.4 names), `moe` (new-code MoE names) or `old` (DeepSpeed-era names of
            §8.3, converted).
        mapped: source key -> our key, for every tensor loaded into the model.
        ignored: source key -> reason, for tensors deliberately not loaded.
        missing: our keys that the file did not provide (empty for a strict import).
        folded_type_embedding: the visual type embedding was added to the patch-conv bias here
            (old-named dense files); released dense torch files are already folded, and MoE files are
            never folded (the reference MoE converter does not fold, SPEC §8.3).
        dead_gates: source keys of the gates of linears that reuse another linear's decision
            (`self_attn.dense`, `linear2`; SPEC §2.6), dropped by the MoE import.
        moe: the file is an MoE checkpoint.
    """

    path: str
    layout: str
    naming: str
    mapped: dict[str, str] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    folded_type_embedding: bool = False
    dead_gates: list[str] = field(default_factory=list)
    moe: bool = False


# ---------------------------------------------------------------------------------------------- config <-> JSON


def config_to_dict(config: ModelConfig) -> dict[str, Any]:
    """`ModelConfig` as a JSON-ready dict (nested MoE/prompt configs as dicts or None)."""
    return dataclasses.asdict(config)


def _from_dict(cls: type[Any], data: Mapping[str, Any], where: str) -> Any:
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise CheckpointError(
            f"{where}: unknown {cls.__name__} fields {unknown}; the file was written by a newer "
            "uniperceiver-cli, upgrade to read it"
        )
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        type_str = str(names[key].type)
        if value is not None and "MoEConfig" in type_str:
            value = _from_dict(MoEConfig, value, where)
        elif value is not None and "PromptConfig" in type_str:
            value = _from_dict(PromptConfig, value, where)
        elif isinstance(value, list) and type_str.startswith("tuple"):
            value = tuple(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: invalid {cls.__name__}: {e}") from e


def config_from_dict(data: Mapping[str, Any], where: str = "config") -> ModelConfig:
    """Rebuild a `ModelConfig` from `config_to_dict` output.

    Raises:
        CheckpointError: on unknown fields or invalid values (naming `where`).
    """
    cfg: ModelConfig = _from_dict(ModelConfig, data, where)
    return cfg


# ---------------------------------------------------------------------------------------------- our format


def save_pretrained(model: UniPerceiver, directory: str | os.PathLike[str]) -> Path:
    """Write `model` as `<directory>/{model.safetensors, config.json}` atomically.

    The folder is written under a temporary sibling name and renamed into place, so a crash never leaves a
    half-written checkpoint; an existing folder of the same name is replaced.

    Args:
        model: the model to save (any device; tensors are saved contiguous, on CPU).
        directory: target folder.

    Returns:
        The folder path.
    """
    from safetensors.torch import save_file

    target = Path(directory)
    with atomic_directory(target) as tmp:
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        meta = {"format_version": FORMAT_VERSION, "model_config": config_to_dict(model.config)}
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return target


def read_config(directory: str | os.PathLike[str]) -> ModelConfig:
    """Read the `ModelConfig` of a checkpoint folder.

    Raises:
        CheckpointError: if `config.json` is missing, unreadable or of an unsupported version.
    """
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{directory}: no {CONFIG_FILE}; expected a folder written by save_pretrained"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the JSON ({e})") from e
    if not isinstance(meta, dict) or "model_config" not in meta:
        raise CheckpointError(
            f"{path}: expected an object with 'format_version' and 'model_config'"
        )
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {version!r} is not supported (this version reads {FORMAT_VERSION}); "
            "use the uniperceiver-cli release that wrote it"
        )
    return config_from_dict(meta["model_config"], where=str(path))


def load_pretrained(
    directory: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    strict: bool = True,
) -> UniPerceiver:
    """Load a folder written by `save_pretrained`.

    Args:
        directory: the checkpoint folder.
        device: where to put the model.
        strict: every model tensor must be in the file and nothing else.

    Returns:
        The model, in eval mode.

    Raises:
        CheckpointError: on a missing/corrupt file or mismatching keys/shapes.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = read_config(directory)
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{directory}: no {WEIGHTS_FILE}; the checkpoint folder is incomplete"
        )
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path}: cannot read the safetensors file ({e}); it may be truncated"
        ) from e
    model = build_model(config, init=not strict)
    _load_into(model, state, str(path), strict=strict)
    return model.to(device).eval()


def _load_into(
    model: UniPerceiver, state: Mapping[str, Tensor], where: str, *, strict: bool
) -> list[str]:
    """Copy `state` into `model`, checking shapes; return the missing keys."""
    own = model.state_dict()
    bad = [
        f"{k}: expected {tuple(own[k].shape)}, found {tuple(v.shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    if bad:
        raise CheckpointError(
            f"{where}: shape mismatch for {len(bad)} tensors: " + "; ".join(bad[:8])
        )
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{where}: keys do not match the model (missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}); the file is for a "
            "different architecture, pass strict=False to load what fits"
        )
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return missing


# ---------------------------------------------------------------------------------------------- reference import

#: Old (DeepSpeed-era) -> dense substrings, applied in order (SPEC §8.3).
_OLD_TO_DENSE: tuple[tuple[str, str], ...] = (
    ("attention.self.qkv_proj.weight", "self_attn.in_proj_weight"),
    ("attention.self.qkv_proj.bias", "self_attn.in_proj_bias"),
    ("attention.output.dense", "self_attn.out_proj"),
    ("attention_output.residual_scale", "gamma_1"),
    ("ffn.dense2.", "linear2."),
    ("ffn.dense.", "linear1."),
    ("ffn_output.residual_scale", "gamma_2"),
    ("LayerNormModules.0.", "norm1."),
    ("LayerNormModules.1.", "norm2."),
)

_LAYER_RE = re.compile(r"^fused_encoder\.layers\.(\d+)\.(.+)$")

_LAYER_MAP: dict[str, str] = {
    "self_attn.in_proj_weight": "qkv.weight",
    "self_attn.in_proj_bias": "qkv.bias",
    "self_attn.qkv_proj.weight": "qkv.weight",
    "self_attn.qkv_proj.bias": "qkv.bias",
    "self_attn.out_proj.weight": "attn_out.weight",
    "self_attn.out_proj.bias": "attn_out.bias",
    "self_attn.dense.weight": "attn_out.weight",
    "self_attn.dense.bias": "attn_out.bias",
    "linear1.weight": "ffn_in.weight",
    "linear1.bias": "ffn_in.bias",
    "linear2.weight": "ffn_out.weight",
    "linear2.bias": "ffn_out.bias",
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "gamma_1": "gamma_1",
    "gamma_2": "gamma_2",
    "deep_prompt_embedding.embedding.weight": "prompt",
    "deep_prompt_embedding.target_embedding.weight": "target_prompt",
}

_TOP_MAP: dict[str, str] = {
    "token_embed.embeddings.weight": "embed.word.weight",
    "token_embed.embeddings_norm.weight": "embed.norm.weight",
    "token_embed.embeddings_norm.bias": "embed.norm.bias",
    "token_embed.embeddings_pos.position_embeddings.weight": "embed.position.weight",
    "token_embed.embeddings_token_type.weight": "embed.token_type.weight",
    "video_embed.embeddings.weight": "embed.patch.weight",
    "video_embed.embeddings.bias": "embed.patch.bias",
    "video_embed.embeddings_st_pos.spatial_pos_embed.weight": "embed.spatial",
    "video_embed.embeddings_st_pos.temporal_pos_embed.weight": "embed.temporal.weight",
    "loss_prepare.ln_post.weight": "head.ln_post.weight",
    "loss_prepare.ln_post.bias": "head.ln_post.bias",
    "loss_prepare.proj.weight": "head.proj.weight",
    "loss_prepare.proj.bias": "head.proj.bias",
    "s_token_bias": "embed.spe_bias",
}

_DEAD_KEYS: dict[str, str] = {
    "video_embed.embeddings_norm.weight": "alias of token_embed.embeddings_norm (one shared LayerNorm)",
    "video_embed.embeddings_norm.bias": "alias of token_embed.embeddings_norm (one shared LayerNorm)",
}

_TASK_LEVEL_PREFIXES = ("fc_prompt.", "similarity_weight", "prompt_embed.")


_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def _first_line(error: Exception) -> str:
    """The telling line of an unpickling error (torch's safe-load text is advice, not the cause)."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:200]


def _read_reference(path: Path, *, trust: bool = False) -> tuple[dict[str, Tensor], str]:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as e:
        # A safe load names the Python object it refuses (`GLOBAL module.Name`); any other unpickling
        # error (e.g. "Unsupported operand") means the bytes are not a valid checkpoint.
        m = _GLOBAL_RE.search(str(e))
        if trust or m is None or "Weights only load failed" not in str(e):
            raise CheckpointError(
                f"{path}: cannot read the checkpoint; the file is truncated, corrupt or not a "
                f"PyTorch checkpoint ({type(e).__name__}: {_first_line(e)})"
            ) from e
        name = m.group(1)
        raise UntrustedCheckpointError(
            f"{path}: the file pickles Python objects ({name}) besides tensors, which a safe load "
            "(weights_only=True) refuses; if you trust where the file comes from, pass --trust "
            "(trust=True) to load it unsafely",
            name,
        ) from e
    # Unpickling a corrupt file can raise almost any exception type; all mean "unreadable".
    except Exception as e:
        raise CheckpointError(
            f"{path}: cannot read the checkpoint ({type(e).__name__}: {str(e)[:200]}); the file is "
            "truncated, corrupt or not a PyTorch checkpoint"
        ) from e
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        state, layout = obj["model"], "torch"
    elif isinstance(obj, dict) and isinstance(obj.get("module"), dict):
        state, layout = obj["module"], "deepspeed"
    elif isinstance(obj, dict) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        state, layout = obj, "bare"
    else:
        kind = type(obj).__name__
        keys = list(obj)[:8] if isinstance(obj, dict) else []
        raise CheckpointError(
            f"{path}: unknown checkpoint layout ({kind} with keys {keys}); expected {{'model': state_dict}}, "
            "{'module': state_dict} (DeepSpeed) or a bare state dict"
        )
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, Tensor):
            continue
        out[key.removeprefix("module.")] = value
    if not out:
        raise CheckpointError(f"{path}: the state dict holds no tensors")
    return out, layout


def build_and_load(
    config: ModelConfig,
    state: Mapping[str, Tensor],
    report: ImportReport,
    where: str,
    *,
    strict: bool,
    kind: str,
) -> UniPerceiver:
    """Build the model of `config` and load converted reference tensors into it.

    Fills `report.missing`. With `strict`, reference keys the converter did not know (marked
    "unknown key" in `report.ignored`) are an error and the model is built without
    initialisation (every tensor must come from the file).

    Args:
        config: the architecture.
        state: tensors under our keys.
        report: the import report of the conversion.
        where: the checkpoint path, for messages.
        strict: refuse unknown keys and missing tensors.
        kind: what the model is, for messages (e.g. "dense Uni-Perceiver").

    Raises:
        CheckpointError: with `strict`, unknown keys or missing tensors.
    """
    unknown = [k for k, why in report.ignored.items() if why == "unknown key"]
    if strict and unknown:
        raise CheckpointError(
            f"{where}: {len(unknown)} keys are not part of a {kind} ({unknown[:8]}); "
            "pass strict=False to skip them"
        )
    model = build_model(config, init=not strict)
    report.missing = _load_into(model, state, where, strict=strict)
    return model


def _is_moe(keys: list[str]) -> bool:
    return any(".gate." in k or ".experts." in k or "deepspeed_moe" in k for k in keys)


def rename_old_keys(
    state: Mapping[str, Tensor], substitutions: tuple[tuple[str, str], ...]
) -> dict[str, Tensor]:
    """Rename DeepSpeed-era reference keys the way the reference converters do (SPEC §8.3).

    Drops `visual_embed.*`, maps the `encoder.` prefix to `fused_encoder.` and `predictor.` to
    `loss_prepare.`, applies `substitutions` in order (the dense or the MoE column of the
    converter's mapping) and squeezes the `[1, 1, D]` residual scales `gamma_1`/`gamma_2` to
    `[D]`; tensors keep their dtype.

    Args:
        state: reference tensors with old names.
        substitutions: `(old substring, new substring)` pairs, applied in order to every key.

    Returns:
        The same tensors under new names.
    """
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith("visual_embed"):
            continue
        new = key
        if new.startswith("encoder."):
            new = "fused_encoder." + new[len("encoder.") :]
        for old, rep in substitutions:
            new = new.replace(old, rep)
        if new.startswith("predictor."):
            new = "loss_prepare." + new[len("predictor.") :]
        if new.endswith(("gamma_1", "gamma_2")) and value.dim() == 3:
            value = value.reshape(-1)
        out[new] = value
    return out


def _convert_old_names(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Apply the reference converter's dense renames (SPEC §8.3) to DeepSpeed-era keys."""
    return rename_old_keys(state, _OLD_TO_DENSE)


def _infer_scale(table: Tensor, grid: int, image_size: int) -> float:
    """Recover the position scale from the sin-cos table (row (0, 1): sin/cos of s at omega_0 = 1)."""
    if grid < 2:
        return 160 / 224
    d4 = table.shape[1] // 4
    s = math.atan2(float(table[1, 2 * d4]), float(table[1, 3 * d4]))
    for candidate in (160 / 224, 160 / image_size, 1.0):
        if abs(s - candidate) < 5e-3:
            return candidate
    return round(s, 4)


def infer_reference_config(state: Mapping[str, Tensor], where: str = "state dict") -> ModelConfig:
    """Infer the `ModelConfig` of a dense reference state dict with SPEC §8.4 key names.

    D, V, text positions and type rows come from the token tables; L from the layer indices; F from
    `linear1`; P from the patch conv; the image size from the spatial table (grid = sqrt(rows)); frames from
    the temporal table; heads = D / 64; the position scale from the sin-cos table.

    Raises:
        CheckpointError: if a required tensor is missing or the spatial table is not square.
    """

    def need(key: str) -> Tensor:
        if key not in state:
            raise CheckpointError(f"{where}: missing {key!r}; not a dense Uni-Perceiver checkpoint")
        return state[key]

    word = need("token_embed.embeddings.weight")
    d = word.shape[1]
    layers = {int(m.group(1)) for k in state if (m := _LAYER_RE.match(k))}
    if not layers:
        raise CheckpointError(f"{where}: no 'fused_encoder.layers.*' tensors found")
    ffn = need("fused_encoder.layers.0.linear1.weight").shape[0]
    conv = need("video_embed.embeddings.weight")
    patch = conv.shape[-1]
    spatial = need("video_embed.embeddings_st_pos.spatial_pos_embed.weight")
    grid = math.isqrt(spatial.shape[0])
    if grid * grid != spatial.shape[0]:
        raise CheckpointError(
            f"{where}: spatial table has {spatial.shape[0]} rows, not a square grid"
        )
    image_size = grid * patch
    names = tuple(
        k.removeprefix("loss_prepare.logit_scale_")
        for k in state
        if k.startswith("loss_prepare.logit_scale_")
    )
    prompt_len = None
    has_target_prompt = False
    for k, v in state.items():
        if k.endswith("deep_prompt_embedding.embedding.weight"):
            prompt_len = v.shape[0]
        if k.endswith("deep_prompt_embedding.target_embedding.weight"):
            has_target_prompt = True
    prompt = None
    if prompt_len is not None:
        prompt = PromptConfig(
            length=prompt_len,
            target_prompts=has_target_prompt,
            spe_bias="s_token_bias" in state,
            linear_head=False,
        )
    heads = max(1, d // 64)
    try:
        return ModelConfig(
            hidden_size=d,
            num_layers=max(layers) + 1,
            num_heads=heads,
            ffn_size=ffn,
            vocab_size=word.shape[0],
            max_text_positions=need("token_embed.embeddings_pos.position_embeddings.weight").shape[
                0
            ],
            type_vocab_size=need("token_embed.embeddings_token_type.weight").shape[0],
            patch_size=patch,
            image_size=image_size,
            max_frames=need("video_embed.embeddings_st_pos.temporal_pos_embed.weight").shape[0],
            pos_embed_scale=_infer_scale(spatial, grid, image_size),
            logit_scale_names=names or LOGIT_SCALE_NAMES,
            prompt=prompt,
        )
    except ValueError as e:
        raise CheckpointError(f"{where}: inconsistent architecture ({e})") from e


def convert_reference_state_dict(
    state: Mapping[str, Tensor],
    config: ModelConfig,
    report: ImportReport,
    *,
    fold_type_embedding: bool | None = None,
) -> dict[str, Tensor]:
    """Map a dense reference state dict (SPEC §8.4 names) onto our keys, filling `report`.

    Handles the shared LayerNorm alias, the visual type embedding (folded into the conv bias for old-named
    files, ignored otherwise), the prompt-tuning extras, and rebuilds the sin-cos table when its grid
    differs from `config`.

    Args:
        state: reference tensors (new-code names).
        config: the target architecture.
        report: filled in place.
        fold_type_embedding: add `video_embed.embeddings_type.weight[0]` to the conv bias; default: only
            for old-named files (`report.naming == "old"`). The MoE import passes False.
    """
    fold = report.naming == "old" if fold_type_embedding is None else fold_type_embedding
    sd = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()}
    out: dict[str, Tensor] = {}
    if (
        "token_embed.embeddings_norm.weight" not in sd
        and "video_embed.embeddings_norm.weight" in sd
    ):
        sd["token_embed.embeddings_norm.weight"] = sd.pop("video_embed.embeddings_norm.weight")
        sd["token_embed.embeddings_norm.bias"] = sd.pop("video_embed.embeddings_norm.bias")
    for key, value in sd.items():
        m = _LAYER_RE.match(key)
        if m and m.group(2) in _LAYER_MAP:
            ours = f"encoder.layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}"
        elif key in _TOP_MAP:
            ours = _TOP_MAP[key]
        elif key.startswith("loss_prepare.logit_scale_"):
            ours = "head.logit_scales." + key.removeprefix("loss_prepare.logit_scale_")
        elif key in _DEAD_KEYS:
            tok = sd.get(key.replace("video_embed", "token_embed"))
            if tok is not None and not torch.equal(tok, value):
                logger.warning("%s differs from the token LayerNorm; using token_embed's", key)
            report.ignored[key] = _DEAD_KEYS[key]
            continue
        elif key == "video_embed.embeddings_type.weight":
            if fold:
                report.folded_type_embedding = True
                report.ignored[key] = "folded into the patch-conv bias (SPEC §8.3)"
            elif report.moe:
                report.ignored[key] = (
                    "not added at runtime; the reference MoE converter does not fold it (SPEC §8.3)"
                )
            else:
                report.ignored[key] = (
                    "already folded into the patch-conv bias by the reference converter"
                )
            continue
        elif key.startswith(_TASK_LEVEL_PREFIXES):
            report.ignored[key] = "task-level prompt-tuning head, not part of the model"
            continue
        else:
            ours = ""
        if not ours:
            report.ignored[key] = "unknown key"
            continue
        out[ours] = value
        report.mapped[key] = ours
    if report.folded_type_embedding and "embed.patch.bias" in out:
        out["embed.patch.bias"] = (
            out["embed.patch.bias"] + sd["video_embed.embeddings_type.weight"][0]
        )
    spatial = out.get("embed.spatial")
    want_rows = config.grid_size**2
    if spatial is not None and spatial.shape[0] != want_rows:
        out["embed.spatial"] = sincos_table(
            config.grid_size, config.hidden_size, config.pos_embed_scale
        )
        report.ignored["video_embed.embeddings_st_pos.spatial_pos_embed.weight"] = (
            f"grid {math.isqrt(spatial.shape[0])} != {config.grid_size}; rebuilt the sin-cos table"
        )
        report.mapped.pop("video_embed.embeddings_st_pos.spatial_pos_embed.weight", None)
    return out


def load_reference_checkpoint(
    path: str | os.PathLike[str],
    *,
    config: ModelConfig | None = None,
    strict: bool = True,
    device: str | torch.device = "cpu",
    trust: bool = False,
) -> tuple[UniPerceiver, ImportReport]:
    """Import a released reference checkpoint (`.pth`/`.pt`), dense or MoE.

    MoE files (`gate.*` / `experts.*` tensors, new or DeepSpeed-era names) are converted by
    `uniperceiver_cli.model.moe.released`.

    Args:
        path: the file.
        config: architecture to load into; default inferred from the file.
        strict: fail on unknown keys or on model tensors the file lacks.
        device: where to put the model.
        trust: allow arbitrary pickled objects (`weights_only=False`); only for files you trust.

    Returns:
        The model (eval mode) and the `ImportReport`.

    Raises:
        UntrustedCheckpointError: the file needs `trust=True`.
        CheckpointError: unreadable file, unknown layout, shape or key mismatch.
    """
    p = Path(path)
    state, layout = _read_reference(p, trust=trust)
    keys = list(state)
    if _is_moe(keys):
        from uniperceiver_cli.model.moe.released import load_reference_moe_state

        return load_reference_moe_state(
            state, layout, p, config=config, strict=strict, device=device
        )
    naming = "dense"
    if any(k.startswith(("encoder.", "predictor.")) or "attention.self" in k for k in keys):
        naming = "old"
        state = _convert_old_names(state)
    report = ImportReport(path=str(p), layout=layout, naming=naming)
    cfg = config if config is not None else infer_reference_config(state, str(p))
    ours = convert_reference_state_dict(state, cfg, report)
    model = build_and_load(cfg, ours, report, str(p), strict=strict, kind="dense Uni-Perceiver")
    logger.info(
        "imported %s (%s layout, %s names): %d tensors, %d ignored, %d missing",
        p,
        layout,
        naming,
        len(report.mapped),
        len(report.ignored),
        len(report.missing),
    )
    return model.to(device).eval(), report
