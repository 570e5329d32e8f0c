"""The run folder's own files: where it is (`resolve_run_dir`), `recipe.resolved.yaml` and `env.json`."""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from uniperceiver_cli.engine.runtime import Runtime
from uniperceiver_cli.model.gemm import resolve_backend


def resolve_run_dir(recipe: Any, output_dir: Path | None) -> Path:
    """`--output-dir`, else `run.output_dir`, else `runs/<run.name>`."""
    if output_dir is not None:
        return Path(output_dir)
    if recipe.run.output_dir:
        return Path(recipe.run.output_dir)
    return Path("runs") / str(recipe.run.name)


def recipe_text(loaded: Any) -> str:
    """The resolved recipe as YAML text (what `recipe.resolved.yaml` and checkpoints hold)."""
    from uniperceiver_cli.recipe.load import dump_resolved

    return dump_resolved(loaded)


def write_run_files(run_dir: Path, loaded: Any, runtime: Runtime, seed: int) -> None:
    """Write `recipe.resolved.yaml` and `env.json` (versions, device, seed, recipe hash) into `run_dir`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    text = recipe_text(loaded)
    (run_dir / "recipe.resolved.yaml").write_text(text, encoding="utf-8")
    import torchvision

    from uniperceiver_cli import __version__

    env = {
        "uniperceiver_cli": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "device": str(runtime.device),
        "device_name": torch.cuda.get_device_name(runtime.device)
        if runtime.device.type == "cuda"
        else platform.processor(),
        "world_size": runtime.world_size,
        "precision": runtime.precision,
        "seed": seed,
        "recipe_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "overrides": list(loaded.overrides),
        "malloc_tunables": os.environ.get("GLIBC_TUNABLES"),
        "cpu_gemm": resolve_backend(loaded.recipe.runtime.cpu_gemm)
        if runtime.device.type == "cpu"
        else None,
    }
    (run_dir / "env.json").write_text(json.dumps(env, indent=2) + "\n", encoding="utf-8")
