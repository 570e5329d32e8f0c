"""glibc malloc tunables for the heavy commands, set by re-executing once before any work.

With glibc's defaults every tensor above the mmap threshold is mapped, zero-filled by the kernel
and unmapped on every call; `TUNED` keeps freed memory in the heap instead (training steps 1.2-2.3x
faster and far less noisy on CPU, `docs/benchmarks.md`). glibc reads `GLIBC_TUNABLES` only when a
process starts, so `main()` re-executes the same command line once with it set. The process keeps
its PID (torchrun and signal handling are unaffected), its arguments and the rest of its environment.
Nothing happens when `GLIBC_TUNABLES` is already set (the user's choice wins), when
`UNIPERCEIVER_NO_MALLOC_TUNING` is set to anything but 0, off Linux/glibc, or for light commands and
help.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping, Sequence

__all__ = ["OPT_OUT", "TUNED", "reexec_with_tuned_malloc", "tuned_environment"]

#: The tunables: no mmap for large blocks, never give heap memory back to the kernel.
TUNED = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"

#: Environment variable that turns the re-execution off ("1", "true", ...; "0" or empty keeps it on).
OPT_OUT = "UNIPERCEIVER_NO_MALLOC_TUNING"

#: Commands that allocate model-sized tensors (training, evaluation, export).
HEAVY_COMMANDS = frozenset({"pretrain", "finetune", "prompt-tune", "eval", "zero-shot", "export"})


def tuned_environment(
    args: Sequence[str], environ: Mapping[str, str], system: str, libc: str
) -> dict[str, str] | None:
    """The environment to re-execute with, or None to run as is.

    Args:
        args: command-line arguments after the program (`sys.argv[1:]`).
        environ: the current environment.
        system: `sys.platform`.
        libc: the C library's name (`platform.libc_ver()[0]`).

    Returns:
        A copy of `environ` with `GLIBC_TUNABLES` set, or None.
    """
    if system != "linux" or libc != "glibc" or "GLIBC_TUNABLES" in environ:
        return None
    if environ.get(OPT_OUT, "0") not in ("", "0"):
        return None
    command = next((arg for arg in args if not arg.startswith("-")), None)
    if command not in HEAVY_COMMANDS or "--help" in args or "-h" in args:
        return None
    return {**environ, "GLIBC_TUNABLES": TUNED}


def reexec_with_tuned_malloc() -> None:
    """Re-execute this process with `TUNED` when `tuned_environment` asks for it (else return)."""
    env = tuned_environment(sys.argv[1:], os.environ, sys.platform, platform.libc_ver()[0])
    if env is None or not sys.executable:
        return
    try:
        os.execve(sys.executable, sys.orig_argv, env)
    except OSError:
        return  # cannot re-execute (unusual launcher): run untuned rather than fail
