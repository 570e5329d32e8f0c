"""Located recipe problems: `Issue` and the `RecipeError` that carries all of them (torch-free)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Issue:
    """One problem found in a recipe.

    Attributes:
        file: the recipe file as given by the user.
        line: 1-based line the problem points at, or None when no line applies.
        source: where a value came from when not from the file (e.g. `--set model.moe.top_k=4`).
        field: dotted field path (`tasks[0].batch_size`), empty for whole-file problems.
        message: what is wrong, in plain words.
        got: the offending value, shortened, or None.
        hint: what to do, when known (e.g. a did-you-mean suggestion).
    """

    file: str
    line: int | None
    field: str
    message: str
    got: str | None = None
    hint: str | None = None
    source: str | None = None

    @property
    def where(self) -> str:
        """Human-readable location: `--set ...` or `file:line`."""
        if self.source is not None:
            return self.source
        if self.line is None:
            return self.file
        return f"{self.file}:{self.line}"

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return asdict(self)


class RecipeError(Exception):
    """A recipe could not be read or validated; carries every problem found.

    Args:
        file: the recipe file.
        issues: all problems, in file order.
    """

    def __init__(self, file: str, issues: list[Issue]) -> None:
        self.file = file
        self.issues = issues
        super().__init__(
            f"{file}: {len(issues)} problem(s): " + "; ".join(i.message for i in issues[:3])
        )


class PreflightError(Exception):
    """Checks before a run (paths, devices, checkpoints) failed; carries every problem found."""

    def __init__(self, file: str, issues: list[Issue]) -> None:
        self.file = file
        self.issues = issues
        super().__init__(f"{file}: {len(issues)} preflight problem(s)")


def shorten(value: Any, limit: int = 40) -> str | None:
    """Render a received value for a table cell, or None for containers (shown by their lines instead)."""
    if isinstance(value, dict | list):
        return None
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
