"""Atomic folder writes: fill a temporary sibling folder, then rename it into place (torch-free).

Checkpoint folders (`model.checkpoint.save_pretrained`) and export artefacts
(`export.bundle.atomic_folder`) are written this way, so an interrupted write never leaves a
half-written folder under the final name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_directory"]


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary sibling of `target`; when the block succeeds, rename it to `target`.

    The parent folder is created if needed. An existing `target` is moved aside, replaced, then
    deleted. When the block raises, the temporary folder is deleted and `target` is left as it was.
    The result gets the usual folder mode (0777 minus the process umask), not `mkdtemp`'s private
    0700.

    Args:
        target: the final folder path.

    Yields:
        The temporary folder to fill (`.<name>.tmp-*` next to `target`).
    """
    final = Path(target)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        old: Path | None = None
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            final.rename(old)
        tmp.rename(final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
