"""`export --format bundle`: a self-describing folder that `uniperceiver_cli.load(DIR)` reads back bitwise.

Layout::

    DIR/
      config.json            format_version + ModelConfig (as written by `save_pretrained`)
      model.safetensors      every tensor of the model's state dict
      tokenizer/             bpe_simple_vocab_16e6.txt.gz, its MIT notice, tokenizer.json (specials, rules)
      recipe.resolved.yaml   the recipe of the run, when the checkpoint folder or its run folder has one
      conversion.json        (convert only) the key mapping report of the released file
      manifest.json          format, format_version, versions (package, torch, python, safetensors), source,
                             and sha256 + size of every other file

Every artefact folder of this package (bundle, torch-export, ONNX) is written into a temporary sibling folder and
renamed into place, so an interrupted export never leaves a half-written folder. An existing `--out` folder is
replaced only when it holds a `manifest.json` of ours; any other existing path is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.resources
import json
import logging
import os
import platform
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uniperceiver_cli import __version__
from uniperceiver_cli.atomic import atomic_directory
from uniperceiver_cli.export.errors import ExportError, ExportInputError

logger = logging.getLogger(__name__)

BUNDLE_FORMAT = "uniperceiver-bundle"
#: Version of the bundle layout described in the module docstring.
BUNDLE_FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TOKENIZER_DIR = "tokenizer"
RECIPE_FILE = "recipe.resolved.yaml"
CONVERSION_FILE = "conversion.json"
_ASSETS = "uniperceiver_cli.assets"
_VOCAB = "bpe_simple_vocab_16e6.txt.gz"
_VOCAB_LICENSE = "LICENSE-CLIP-BPE.txt"


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    """Versions recorded in manifests: this package, torch, python, safetensors (and onnx tools if present)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"uniperceiver_cli": __version__, "python": platform.python_version()}
    for dist in ("torch", "safetensors", "onnx", "onnxscript", "onnxruntime"):
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = version(dist)
    return out


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary sibling of `target`; on success rename it to `target`.

    Raises:
        ExportInputError: when `target` exists and is not an artefact folder of ours (no `manifest.json`).
    """
    final = Path(target)
    if final.exists() and not (final.is_dir() and (final / MANIFEST_FILE).is_file()):
        raise ExportInputError(
            f"{final} already exists and is not an export of uniperceiver-cli (no {MANIFEST_FILE}); "
            "choose another --out or remove it"
        )
    with atomic_directory(final) as tmp:
        yield tmp
        _readable(tmp)


def _readable(folder: Path) -> None:
    """Give the artefact the usual permissions (mkdtemp makes 0700 folders) under the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def copy_tokenizer_assets(folder: Path) -> list[Path]:
    """Copy the CLIP BPE vocabulary and its licence into `folder/tokenizer/` and describe the tokenizer.

    Returns:
        The files written.
    """
    from uniperceiver_cli.data.tokenizer import SOT_ID, SPECIAL_TOKENS, VOCAB_SHA256, VOCAB_SIZE

    dest = folder / TOKENIZER_DIR
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    assets = importlib.resources.files(_ASSETS)
    for name in (_VOCAB, _VOCAB_LICENSE):
        target = dest / name
        target.write_bytes(assets.joinpath(name).read_bytes())
        written.append(target)
    if sha256_file(dest / _VOCAB) != VOCAB_SHA256:
        raise ExportError(
            f"the packaged {_VOCAB} does not have the expected sha256 {VOCAB_SHA256}; reinstall uniperceiver-cli"
        )
    spec = {
        "type": "clip-bpe",
        "vocab_file": _VOCAB,
        "vocab_sha256": VOCAB_SHA256,
        "vocab_size": VOCAB_SIZE,
        "special_tokens": {tok: SOT_ID + i for i, tok in enumerate(SPECIAL_TOKENS)},
        "normalisation": "ftfy.fix_text, html.unescape twice, whitespace collapsed, lower-cased",
        "text_sequence": "[<|spe|>, tokens..., <|endoftext|>]; the <|spe|> prefix is added by the model",
    }
    config = dest / "tokenizer.json"
    config.write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
    written.append(config)
    return written


def write_model_config(config: Any, folder: Path) -> Path:
    """Write `config.json` (format_version + the `ModelConfig`) as `save_pretrained` does."""
    from uniperceiver_cli.model.checkpoint import CONFIG_FILE, FORMAT_VERSION, config_to_dict

    meta = {"format_version": FORMAT_VERSION, "model_config": config_to_dict(config)}
    path = folder / CONFIG_FILE
    path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return path


def write_manifest(
    folder: Path, kind: str, *, source: str | None = None, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Write `manifest.json` with the sha256 and size of every other file of `folder`.

    Args:
        folder: the artefact folder (already filled).
        kind: `bundle`, `torch-export` or `onnx`.
        source: what the artefact was made from.
        extra: more top-level fields (fold summary, verification, entry points).

    Returns:
        The manifest as written.
    """
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == MANIFEST_FILE:
            continue
        files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest: dict[str, Any] = {
        "format": BUNDLE_FORMAT if kind == "bundle" else f"uniperceiver-{kind}",
        "format_version": BUNDLE_FORMAT_VERSION,
        "kind": kind,
        "versions": package_versions(),
        "source": source,
        **dict(extra or {}),
        "files": files,
    }
    (folder / MANIFEST_FILE).write_text(
        json.dumps(manifest, indent=2, default=str) + "\n", encoding="utf-8"
    )
    return manifest


def check_manifest(folder: str | os.PathLike[str]) -> list[str]:
    """Compare the files of an artefact folder with its manifest.

    Returns:
        Problems found (missing, changed or unlisted files); empty when the folder is intact.

    Raises:
        ExportInputError: when there is no readable manifest.
    """
    root = Path(folder)
    try:
        manifest = json.loads((root / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ExportInputError(f"{root}: no readable {MANIFEST_FILE} ({e})") from e
    problems = []
    listed = manifest.get("files", {})
    for rel, meta in listed.items():
        path = root / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif sha256_file(path) != meta.get("sha256"):
            problems.append(f"{rel}: sha256 differs from the manifest")
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and rel != MANIFEST_FILE and rel not in listed:
            problems.append(f"{rel}: not in the manifest")
    return problems


def find_recipe(checkpoint: str | os.PathLike[str]) -> Path | None:
    """The resolved recipe next to a checkpoint: in its folder, or in the run folder two levels up."""
    p = Path(checkpoint)
    folder = p if p.is_dir() else p.parent
    for candidate in (folder / RECIPE_FILE, folder.parent.parent / RECIPE_FILE):
        if candidate.is_file():
            return candidate
    if p.is_dir() and (p / "checkpoints").is_dir() and (p / RECIPE_FILE).is_file():
        return p / RECIPE_FILE
    return None


@dataclass
class BundleResult:
    """What `write_bundle` produced.

    Attributes:
        path: the bundle folder.
        manifest: the manifest written.
    """

    path: Path
    manifest: dict[str, Any]


def write_bundle(
    model: Any,
    out: str | os.PathLike[str],
    *,
    source: str | None = None,
    recipe: str | os.PathLike[str] | None = None,
    conversion: Mapping[str, Any] | None = None,
) -> BundleResult:
    """Write `model` (a `UniPerceiver`) as a bundle folder.

    Args:
        model: the model; its full state dict is saved (float tensors as they are).
        out: the bundle folder.
        source: what the model came from (recorded in the manifest).
        recipe: a `recipe.resolved.yaml` to include.
        conversion: a key-mapping report to store as `conversion.json` (convert).

    Returns:
        The `BundleResult`.

    Raises:
        ExportInputError: `out` exists and is not ours.
    """
    from uniperceiver_cli.model.build import count_parameters
    from uniperceiver_cli.model.checkpoint import CONFIG_FILE, WEIGHTS_FILE, save_pretrained

    final = Path(out)
    with atomic_folder(final) as tmp:
        weights = save_pretrained(model, tmp / "weights")
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            (weights / name).rename(tmp / name)
        weights.rmdir()
        copy_tokenizer_assets(tmp)
        if recipe is not None:
            shutil.copyfile(recipe, tmp / RECIPE_FILE)
        if conversion is not None:
            (tmp / CONVERSION_FILE).write_text(
                json.dumps(conversion, indent=2, default=str) + "\n", encoding="utf-8"
            )
        extra = {
            "model": {
                "parameters": count_parameters(model),
                "moe": model.config.moe is not None,
                "hidden_size": model.config.hidden_size,
                "num_layers": model.config.num_layers,
            }
        }
        manifest = write_manifest(tmp, "bundle", source=source, extra=extra)
    logger.info("wrote bundle %s (%d files)", final, len(manifest["files"]))
    return BundleResult(final, manifest)
