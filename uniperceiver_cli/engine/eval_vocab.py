"""Checkpoint fingerprints and the encoded-vocabulary cache used by caption evaluation."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from torch import Tensor

from uniperceiver_cli.engine.eval_tasks import VOCAB_CACHE_ENV, EvalError
from uniperceiver_cli.model.uniperceiver import UniPerceiver

logger = logging.getLogger(__name__)


def checkpoint_sha256(path: str | Path) -> str:
    """SHA-256 identifying a checkpoint: of the file, or of a folder's weight and config files.

    For a folder, the digest runs over the sorted `*.safetensors` and `*.json` files (name and content), so it
    changes whenever the weights or the architecture do.

    Raises:
        EvalError: the path is neither a file nor a folder holding such files.
    """
    p = Path(path)
    digest = hashlib.sha256()
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(
            f for f in p.iterdir() if f.is_file() and f.suffix in (".safetensors", ".json")
        )
    else:
        files = []
    if not files:
        raise EvalError(
            f"{p}: expected a checkpoint file or a folder with .safetensors/.json files"
        )
    for f in files:
        if p.is_dir():
            digest.update(f.name.encode("utf-8") + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """Where encoded vocabularies are cached: `$UNIPERCEIVER_CACHE`, else `$XDG_CACHE_HOME/uniperceiver-cli`,
    else `~/.cache/uniperceiver-cli`."""
    if os.environ.get(VOCAB_CACHE_ENV):
        return Path(os.environ[VOCAB_CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "uniperceiver-cli"


def vocabulary_features_cached(
    model: UniPerceiver,
    *,
    fingerprint: str | None = None,
    cache_dir: str | Path | None = None,
) -> tuple[Tensor, str]:
    """Post-projected features of the whole vocabulary (V, D), encoded once per checkpoint.

    In memory the model keeps the last encoding while its weights are unchanged; with a checkpoint
    `fingerprint` and a `cache_dir` the features are also stored on disk as
    `<cache_dir>/vocab/<fingerprint[:32]>-<device type>-<dtype>.safetensors` and read back by later runs.

    Args:
        model: the model, in eval mode, under `torch.no_grad()`.
        fingerprint: checkpoint SHA-256 (`checkpoint_sha256`), or None for no disk cache.
        cache_dir: cache root, or None for no disk cache.

    Returns:
        The features and where they came from: `disk`, `encoded` (and cached in memory).
    """
    weight = model.embed.word.weight
    path: Path | None = None
    if fingerprint and cache_dir is not None:
        dtype = str(weight.dtype).removeprefix("torch.")
        name = f"{fingerprint[:32]}-{weight.device.type}-{dtype}.safetensors"
        path = Path(cache_dir) / "vocab" / name
        if path.is_file():
            from safetensors.torch import load_file

            try:
                feats = load_file(str(path))["features"]
            except (OSError, KeyError, ValueError, RuntimeError) as exc:
                logger.warning("ignoring unreadable vocabulary cache %s (%s)", path, exc)
            else:
                expected = (model.config.vocab_size, model.config.hidden_size)
                if tuple(feats.shape) == expected:
                    return feats.to(device=weight.device, dtype=weight.dtype), "disk"
                logger.warning("ignoring vocabulary cache %s of shape %s", path, tuple(feats.shape))
    feats = model.vocabulary_features()
    if path is not None:
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file({"features": feats.detach().cpu().contiguous()}, str(tmp))
        tmp.replace(path)
    return feats, "encoded"
