"""Rich renderers used by the commands: consoles, issue tables, key/value summaries, JSON on stdout.

Everything meant for people goes to stderr; stdout carries only requested data (`--json`, `recipes show`).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from rich.console import Console
from rich.table import Table

from uniperceiver_cli.recipe.errors import Issue


def stderr_console() -> Console:
    """Return a console on stderr that honours NO_COLOR and plain (non-TTY, CI) output."""
    return Console(
        stderr=True, no_color="NO_COLOR" in os.environ, highlight=False, width=_width(sys.stderr)
    )


def _width(stream: Any) -> int | None:
    """Terminal width for a TTY; a wide fixed width for logs and pipes so tables do not fold needlessly."""
    if os.environ.get("COLUMNS", "").isdigit():
        return int(os.environ["COLUMNS"])
    isatty = getattr(stream, "isatty", None)
    return None if isatty is not None and isatty() else 160


def stdout_console() -> Console:
    """Return a console on stdout for requested data."""
    return Console(no_color="NO_COLOR" in os.environ, highlight=False, soft_wrap=True)


def issues_table(title: str, issues: Iterable[Issue]) -> Table:
    """Build the table of located problems (where, field, problem, got)."""
    items = list(issues)
    table = Table(
        title=f"{title}: {len(items)} problem{'s' if len(items) != 1 else ''}", title_justify="left"
    )
    table.add_column("where", overflow="fold")
    table.add_column("field", overflow="fold")
    table.add_column("problem", overflow="fold")
    table.add_column("got", overflow="fold")
    for issue in items:
        problem = issue.message if issue.hint is None else f"{issue.message} ({issue.hint})"
        table.add_row(issue.where, issue.field or "-", problem, issue.got or "")
    return table


def print_issues(title: str, issues: Iterable[Issue]) -> None:
    """Print the problems table on stderr."""
    stderr_console().print(issues_table(title, issues))


def print_json(payload: Any) -> None:
    """Write one JSON document on stdout (for `--json`)."""
    sys.stdout.write(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    sys.stdout.flush()


def print_mapping(title: str, values: Mapping[str, Any]) -> None:
    """Print a two-column key/value table on stderr."""
    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column("key")
    table.add_column("value", overflow="fold")
    for key, value in values.items():
        table.add_row(str(key), str(value))
    stderr_console().print(table)


def print_training_result(result: Any, *, as_json: bool = False) -> None:
    """Render a `TrainResult`: a summary (and the prompt-tuning parameter table) on stderr, JSON on stdout.

    Only rank 0 renders; other ranks of a torchrun job stay silent.
    """
    if getattr(result, "rank", 0) != 0:
        return
    console = stderr_console()
    if result.parameter_table:
        table = Table(title="trainable vs frozen parameters", title_justify="left")
        table.add_column("module")
        table.add_column("trainable", justify="right")
        table.add_column("frozen", justify="right")
        for row in result.parameter_table:
            table.add_row(row.module, f"{row.trainable:,}", f"{row.frozen:,}")
        table.add_row(
            "total",
            f"{result.trainable_parameters:,}",
            f"{result.total_parameters - result.trainable_parameters:,}",
        )
        console.print(table)
    summary: dict[str, Any] = {
        "status": "interrupted" if result.interrupted else "done",
        "steps": f"{result.step} / {result.max_steps}",
        "run folder": str(result.run_dir),
        "checkpoint": str(result.checkpoint) if result.checkpoint else "-",
        "time": f"{result.seconds:.1f} s",
        "parameters (trainable / total)": f"{result.trainable_parameters:,} / {result.total_parameters:,}",
    }
    if result.resumed_from:
        summary["resumed from"] = str(result.resumed_from)
    for task, loss in sorted(result.losses.items()):
        summary[f"loss {task}"] = f"{loss:.4f}"
    for key, value in result.metrics.items():
        if not key.endswith("/count"):
            summary[key] = f"{value:.2f}"
    print_mapping(
        f"{result.command.replace('_', '-')} {'interrupted' if result.interrupted else 'finished'}",
        summary,
    )
    if as_json:
        payload = result.to_json()
        payload["ok"] = not result.interrupted
        payload["parameter_table"] = [
            {"module": r.module, "trainable": r.trainable, "frozen": r.frozen}
            for r in (result.parameter_table or [])
        ]
        print_json(payload)
    del console
