"""Data commands: `data toy` writes the built-in toy world."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Annotated

import typer

from uniperceiver_cli.cli.common import usage
from uniperceiver_cli.cli.options import JsonOption
from uniperceiver_cli.cli.render import print_json, stderr_console


def data_toy(
    out: Annotated[Path, typer.Option("--out", help="Folder to write the toy world into.")],
    seed: Annotated[int, typer.Option("--seed", help="World seed.")] = 0,
    num_images: Annotated[
        int, typer.Option("--num-images", min=10, help="Images in all splits.")
    ] = 600,
    num_videos: Annotated[
        int, typer.Option("--num-videos", min=10, help="Videos in all splits.")
    ] = 120,
    image_size: Annotated[
        int, typer.Option("--image-size", min=8, help="Image and frame side in pixels.")
    ] = 32,
    as_json: JsonOption = False,
) -> None:
    """Write the built-in toy world (images, captions, videos, text) in the real dataset formats."""
    if out.exists() and any(out.iterdir()):
        usage(f"{out} exists and is not empty; choose a new folder")
    from uniperceiver_cli.data.toy_files import write_toy_world

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        summary = write_toy_world(
            tmp, seed=seed, num_images=num_images, num_videos=num_videos, image_size=image_size
        )
        if out.exists():
            out.rmdir()
        tmp.replace(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    paths = {name: str(out / Path(p).relative_to(tmp)) for name, p in summary.paths.items()}
    if as_json:
        print_json({"ok": True, "out": str(out), "seed": seed, "paths": paths})
    else:
        stderr_console().print(f"wrote the toy world (seed {seed}) to {out}")
        for name, path in paths.items():
            stderr_console().print(f"  {name:24s} {path}")
