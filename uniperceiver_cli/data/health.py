"""Bad-data accounting: what a reader skipped, and the run-level limit on broken data (torch-free).

A reader with `on_error: skip` replaces a broken item (corrupt, truncated, missing or undecodable
file) by the next good one, logs a warning naming the file, and attaches a `SkippedItem` to the
sample it serves instead. Collation gathers them into the batch's `skipped` field, so the counts
reach the main process even when DataLoader workers did the reading.

Two places enforce `max_bad_fraction`:

* each reader, in its own process, stops with a `DataError` once the distinct broken items it has
  met exceed `max_bad_fraction × len(dataset)` (a lower bound of the global count, so it never
  stops too early);
* a `BadDataMonitor` in the main process sees every batch, keeps the exact counts over all
  workers, names the broken files in its summary and stops the run the same way.

For streams of unknown length (WebDataset shards) the limit applies to the fraction of broken
records among those read, once at least `min_seen` records have been read.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from uniperceiver_cli.data.errors import DataError

logger = logging.getLogger(__name__)

#: Default largest tolerated fraction of broken items (1%).
DEFAULT_MAX_BAD_FRACTION = 0.01

#: Records a stream must have read before its broken fraction is judged.
STREAM_MIN_SEEN = 100

#: Broken items named in a summary line (the rest are counted only).
NAMED_IN_SUMMARY = 20

T = TypeVar("T")


@dataclass(frozen=True)
class SkippedItem:
    """One broken item that a reader skipped.

    Attributes:
        source: the reader (annotation file, image root or shard pattern).
        key: position of the item in its reader, or its key in a stream (shard member key).
        name: the broken file (or archive member).
        reason: the `DataError` message (what is wrong and what to do).
    """

    source: str
    key: int | str
    name: str
    reason: str

    def describe(self) -> str:
        """The reason (reader errors start with the file they are about)."""
        return self.reason

    @property
    def identity(self) -> tuple[str, int | str]:
        """What makes two reports the same broken item (the same item met in two epochs)."""
        return self.source, self.key


def check_max_bad_fraction(value: float) -> float:
    """Validate a `max_bad_fraction` (0 <= value <= 1) and return it as a float.

    Raises:
        ValueError: outside [0, 1].
    """
    fraction = float(value)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(
            f"expected max_bad_fraction between 0 and 1 (e.g. 0.01 for 1%), found {value}"
        )
    return fraction


def too_many_bad_error(
    source: str, bad: int, total: int, fraction: float, examples: Iterable[SkippedItem]
) -> DataError:
    """The `DataError` that stops a run with too much broken data.

    Args:
        source: the reader or task.
        bad: distinct broken items met.
        total: items the fraction is taken of (dataset length, or records read).
        fraction: the limit.
        examples: some broken items to name.

    Returns:
        The error, ready to raise.
    """
    named = "; ".join(s.describe() for s in list(examples)[:3])
    return DataError(
        f"{source}: {bad} of {total} items are broken ({100.0 * bad / max(total, 1):.2f}%), "
        f"above max_bad_fraction {fraction:g} ({100.0 * fraction:g}%); first: {named}. "
        "Fix or remove the broken files, or raise max_bad_fraction in the data section"
    )


class BadItemLedger:
    """Per-reader record of distinct broken items and the limit check (one per process).

    Args:
        source: reader name for messages.
        max_bad_fraction: the limit (0..1).
    """

    def __init__(self, source: str, max_bad_fraction: float) -> None:
        self.source = source
        self.max_bad_fraction = check_max_bad_fraction(max_bad_fraction)
        self.events = 0
        self.items: dict[tuple[str, int | str], SkippedItem] = {}

    def add(self, item: SkippedItem) -> None:
        """Count one skip (repeats of the same item count as events, not as new items)."""
        self.events += 1
        self.items.setdefault(item.identity, item)

    def check_sized(self, size: int) -> None:
        """Raise once the distinct broken items exceed `max_bad_fraction × size`.

        Raises:
            DataError: naming the count, the limit and the first broken files.
        """
        bad = len(self.items)
        if bad > self.max_bad_fraction * size:
            raise too_many_bad_error(
                self.source, bad, size, self.max_bad_fraction, self.items.values()
            )

    def check_stream(self, seen: int, *, final: bool = False) -> None:
        """Raise once the broken fraction of `seen` records exceeds the limit.

        Judged only after `STREAM_MIN_SEEN` records unless `final` (end of a finite pass).

        Raises:
            DataError: naming the count, the limit and the first broken files.
        """
        if seen <= 0 or (seen < STREAM_MIN_SEEN and not final):
            return
        if self.events > self.max_bad_fraction * seen:
            raise too_many_bad_error(
                self.source, self.events, seen, self.max_bad_fraction, self.items.values()
            )


class BadDataMonitor:
    """Main-process account of the broken items skipped for one task's loader.

    Feed it every batch (`update`, or iterate `watch(loader)`); it counts served samples and the
    `SkippedItem`s the batches carry (from every DataLoader worker), logs one warning per newly
    seen broken item, stops the run past `max_bad_fraction`, and logs a summary naming the files.

    Args:
        name: task or dataset name for messages.
        max_bad_fraction: the limit (0..1).
        dataset_size: length of a map-style dataset (limit = distinct broken items >
            fraction × size); None for streams (limit = broken / read > fraction, judged after
            `min_seen` records).
        min_seen: records a stream must have read before its fraction is judged.
    """

    def __init__(
        self,
        name: str,
        *,
        max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
        dataset_size: int | None = None,
        min_seen: int = STREAM_MIN_SEEN,
    ) -> None:
        self.name = name
        self.max_bad_fraction = check_max_bad_fraction(max_bad_fraction)
        self.dataset_size = dataset_size
        self.min_seen = min_seen
        self.served = 0
        self.events = 0
        self.items: dict[tuple[str, int | str], SkippedItem] = {}

    @property
    def distinct_bad(self) -> int:
        """Distinct broken items seen so far."""
        return len(self.items)

    @property
    def bad_names(self) -> tuple[str, ...]:
        """The broken files, in the order they were first met."""
        return tuple(s.name for s in self.items.values())

    def update(self, batch: Any) -> None:
        """Account one batch (anything with `batch_size` and an optional `skipped` tuple).

        Raises:
            DataError: the broken items exceed `max_bad_fraction`.
        """
        skipped: tuple[SkippedItem, ...] = tuple(getattr(batch, "skipped", ()) or ())
        self.served += int(getattr(batch, "batch_size", 0))
        for item in skipped:
            self.events += 1
            if item.identity not in self.items:
                self.items[item.identity] = item
                logger.warning("%s: skipped broken item: %s", self.name, item.describe())
        if skipped:
            self.check()

    def check(self, *, final: bool = False) -> None:
        """Raise if the counts so far are past the limit.

        Raises:
            DataError: naming the count, the limit and the first broken files.
        """
        if self.dataset_size is not None:
            if self.distinct_bad > self.max_bad_fraction * self.dataset_size:
                raise too_many_bad_error(
                    self.name,
                    self.distinct_bad,
                    self.dataset_size,
                    self.max_bad_fraction,
                    self.items.values(),
                )
            return
        seen = self.served + self.events
        judged = seen > 0 and (seen >= self.min_seen or final)
        if judged and self.events > self.max_bad_fraction * seen:
            raise too_many_bad_error(
                self.name, self.events, seen, self.max_bad_fraction, self.items.values()
            )

    def state_dict(self) -> dict[str, Any]:
        """The counts and broken items, JSON-serialisable (saved in checkpoints for resume)."""
        return {
            "served": self.served,
            "events": self.events,
            "items": [[s.source, s.key, s.name, s.reason] for s in self.items.values()],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Add the counts and broken items of `state_dict()` output to this monitor's own."""
        self.served += int(state.get("served", 0))
        self.events += int(state.get("events", 0))
        for source, key, name, reason in state.get("items", ()):
            item = SkippedItem(str(source), key, str(name), str(reason))
            self.items.setdefault(item.identity, item)

    def summary(self) -> dict[str, Any]:
        """Counts and names (JSON-serialisable): served, skip events, distinct broken, files."""
        return {
            "name": self.name,
            "served": self.served,
            "skip_events": self.events,
            "distinct_bad": self.distinct_bad,
            "max_bad_fraction": self.max_bad_fraction,
            "bad_files": [{"name": s.name, "reason": s.reason} for s in self.items.values()],
        }

    def summary_line(self) -> str:
        """One line: how many were served and skipped, and the broken files (first 20 named)."""
        names = self.bad_names
        shown = ", ".join(names[:NAMED_IN_SUMMARY])
        more = f" and {len(names) - NAMED_IN_SUMMARY} more" if len(names) > NAMED_IN_SUMMARY else ""
        files = f": {shown}{more}" if names else ""
        return (
            f"{self.name}: {self.served} samples served, {self.events} skips of "
            f"{self.distinct_bad} distinct broken items{files}"
        )

    def log_summary(self) -> None:
        """Log `summary_line()` (a warning when anything was skipped, else info)."""
        level = logging.WARNING if self.events else logging.INFO
        logger.log(level, "bad-data summary: %s", self.summary_line())

    def watch(self, batches: Iterable[T]) -> Iterator[T]:
        """Yield `batches` unchanged while accounting each; log the summary when they end.

        Raises:
            DataError: the broken items exceed `max_bad_fraction`.
        """
        for batch in batches:
            self.update(batch)
            yield batch
        self.check(final=True)
        self.log_summary()


def merge_monitor_states(states: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """One `BadDataMonitor.state_dict()` from several (e.g. one per rank): counts summed, items united.

    Args:
        states: `state_dict()` outputs.

    Returns:
        The merged state.
    """
    merged = BadDataMonitor("merged")
    for state in states:
        merged.load_state_dict(state)
    return merged.state_dict()
