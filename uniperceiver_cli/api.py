"""Python API: `load` a model from a run folder, a checkpoint folder / bundle, or a released reference file.

`import uniperceiver_cli` stays torch-free; `uniperceiver_cli.load` resolves to this module on first use.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from uniperceiver_cli.model.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    load_pretrained,
    load_reference_checkpoint,
)

if TYPE_CHECKING:
    import torch

    from uniperceiver_cli.model.uniperceiver import UniPerceiver

__all__ = ["CheckpointError", "load", "resolve_checkpoint"]

REFERENCE_SUFFIXES = (".pth", ".pt")
#: Marker of a prompt-tuning checkpoint folder (see `uniperceiver_cli.engine.freeze`).
PROMPT_DELTA_META = "prompt_delta.json"


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """Resolve what `load` would read: a checkpoint folder or a reference file.

    Args:
        path: a run folder (`<dir>/checkpoints/LATEST` names the checkpoint sub-folder), a checkpoint
            folder or exported bundle (`config.json` + `model.safetensors`), or a `.pth`/`.pt` file.

    Returns:
        The checkpoint folder or file.

    Raises:
        CheckpointError: if `path` is none of those, saying what was looked for.
    """
    p = Path(path)
    if p.is_file():
        if p.suffix in REFERENCE_SUFFIXES:
            return p
        raise CheckpointError(
            f"{p}: expected a reference checkpoint file ending in {REFERENCE_SUFFIXES} or a folder"
        )
    if not p.is_dir():
        raise CheckpointError(f"{p}: no such file or folder")
    latest = p / "checkpoints" / "LATEST"
    if latest.is_file():
        name = latest.read_text(encoding="utf-8").strip()
        target = p / "checkpoints" / name
        if not name or not target.is_dir():
            raise CheckpointError(
                f"{latest} names {name!r}, but {target} is not a folder; the run folder is incomplete"
            )
        return target
    if (p / CONFIG_FILE).is_file() and (
        (p / WEIGHTS_FILE).is_file() or (p / PROMPT_DELTA_META).is_file()
    ):
        return p
    raise CheckpointError(
        f"{p}: not a run folder (no checkpoints/LATEST) and not a checkpoint folder "
        f"(needs {CONFIG_FILE} and {WEIGHTS_FILE})"
    )


def load(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> UniPerceiver:
    """Load a Uni-Perceiver model for inference.

    Args:
        path: a run folder, a checkpoint folder / exported bundle, or a released reference `.pth`/`.pt` file
            (dense or MoE, torch or DeepSpeed layout; see `resolve_checkpoint` and docs/export.md).
        device: where to put the model.

    Returns:
        The model in eval mode, with `encode_images`, `encode_videos`, `encode_texts`, `similarity`,
        `caption` and `tokenizer`.

    Raises:
        CheckpointError: if nothing loadable is found or the checkpoint does not fit.
    """
    target = resolve_checkpoint(path)
    if target.is_file():
        model, _ = load_reference_checkpoint(target, device=device)
        return model
    if (target / PROMPT_DELTA_META).is_file():
        # A prompt-tuning checkpoint stores only the tuned tensors plus its base checkpoint's path.
        from uniperceiver_cli.engine.freeze import load_prompt_tuned

        return load_prompt_tuned(target, device=device)
    return load_pretrained(target, device=device)
