"""Process exit codes of the `uniperceiver` command (documented in README.md)."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Stable exit codes for shell pipelines and CI."""

    OK = 0
    #: Runtime failure: the run started and failed (corrupt data, NaN losses, a metric below `--fail-under`).
    FAILURE = 1
    #: Bad invocation, recipe or preflight (wrong flag, invalid recipe, missing file); nothing was run.
    USAGE = 2
    #: The command exists but its engine has not been built yet in this version.
    NOT_AVAILABLE = 3
    #: Interrupted by the user (Ctrl-C); a checkpoint was saved when a training run was in progress.
    INTERRUPTED = 130
