"""Shared machinery of the map-style readers: sample keys, error policy and length capping."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

from torch.utils.data import Dataset

from uniperceiver_cli.data.errors import DataError
from uniperceiver_cli.data.health import DEFAULT_MAX_BAD_FRACTION, BadItemLedger, SkippedItem
from uniperceiver_cli.data.options import OnError
from uniperceiver_cli.data.sampler import SampleKey, seeded_scope

logger = logging.getLogger(__name__)

S = TypeVar("S")

#: How many consecutive broken items a skipping reader tolerates before giving up.
MAX_CONSECUTIVE_SKIPS = 100


class MapDataset(Dataset[S], Generic[S]):
    """Base of every map-style reader.

    `__getitem__` accepts a plain position or a `SampleKey`; with a key, the random choices of the
    sample (augmentations, caption choice, frame offsets, masking) run under the key's seed. With
    `on_error="skip"` a broken item is logged (naming its file), counted in `skipped` (skip events
    in this process) and `bad_items` (distinct broken items), and replaced by the next one; the
    served sample carries the `SkippedItem`s in its `skipped` field. Once the distinct broken items
    exceed `max_bad_fraction × len(self)` the reader raises a `DataError`.

    Subclasses implement `_num_items()` and `load(index)`, set `collate_fn`, and may override
    `item_name(index)` to name an item's file.

    Args:
        source: name used in log lines (usually the annotation file).
        on_error: `raise` or `skip`.
        max_samples: cap on the number of items served; None = all.
        max_bad_fraction: largest tolerated fraction of broken items (0..1) with `skip`.
    """

    collate_fn: Callable[[Sequence[Any]], Any]

    def __init__(
        self,
        *,
        source: str,
        on_error: OnError,
        max_samples: int | None,
        max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
    ) -> None:
        self.source = source
        self.on_error = on_error
        self.max_samples = max_samples
        self.skipped = 0
        self.ledger = BadItemLedger(source, max_bad_fraction)

    @property
    def max_bad_fraction(self) -> float:
        """Largest tolerated fraction of broken items."""
        return self.ledger.max_bad_fraction

    @property
    def bad_items(self) -> tuple[SkippedItem, ...]:
        """Distinct broken items met in this process, in the order they were met."""
        return tuple(self.ledger.items.values())

    def item_name(self, index: int) -> str:
        """The file behind item `index` (for bad-data reports); default `<source>[<index>]`."""
        return f"{self.source}[{index}]"

    def _num_items(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> S:
        """Load item `index` (0 <= index < len(self)) using torch's current RNG."""
        raise NotImplementedError

    def __len__(self) -> int:
        n = self._num_items()
        return n if self.max_samples is None else min(n, self.max_samples)

    def __getitem__(self, key: int | SampleKey) -> S:
        if isinstance(key, SampleKey):
            with seeded_scope(key.seed):
                return self._load_with_policy(key.item)
        return self._load_with_policy(int(key))

    def _load_with_policy(self, index: int) -> S:
        n = len(self)
        if not 0 <= index < n:
            raise IndexError(f"{self.source}: index {index} out of range for {n} items")
        first_error: DataError | None = None
        skipped: list[SkippedItem] = []
        for attempt in range(min(MAX_CONSECUTIVE_SKIPS, n)):
            position = (index + attempt) % n
            try:
                sample = self.load(position)
            except DataError as exc:
                if self.on_error == "raise":
                    raise
                first_error = first_error or exc
                self._note_bad(position, exc, skipped)
                continue
            return _with_skipped(sample, skipped) if skipped else sample
        raise DataError(
            f"{self.source}: {min(MAX_CONSECUTIVE_SKIPS, n)} consecutive items are broken "
            f"(first: {first_error}); fix the data"
        )

    def _note_bad(self, position: int, exc: DataError, skipped: list[SkippedItem]) -> None:
        item = SkippedItem(
            source=self.source, key=position, name=self.item_name(position), reason=str(exc)
        )
        skipped.append(item)
        self.skipped += 1
        self.ledger.add(item)
        logger.warning(
            "skipping broken item (%d skip(s) so far in this process): %s",
            self.skipped,
            item.describe(),
        )
        self.ledger.check_sized(len(self))


def _with_skipped(sample: S, skipped: list[SkippedItem]) -> S:
    """Attach skipped items to a sample dataclass that has a `skipped` field (else leave it)."""
    if dataclasses.is_dataclass(sample) and not isinstance(sample, type):
        names = {f.name for f in dataclasses.fields(sample)}
        if "skipped" in names:
            earlier: tuple[SkippedItem, ...] = getattr(sample, "skipped", ())
            return dataclasses.replace(sample, skipped=(*earlier, *skipped))
    return sample


def read_class_names(path: str | Path, *, expected: int | None = None) -> list[tuple[str, ...]]:
    """Read a class-names file: one class per line, synonyms separated by `|`.

    Blank lines are ignored. Each class becomes a tuple of its names (the first is the display
    name).

    Args:
        path: the file.
        expected: number of classes the caller knows of; a different count is an error.

    Returns:
        One tuple of names per class, in file order.

    Raises:
        DataError: missing file, empty name, or wrong count.
    """
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as exc:
        raise DataError(f"{p}: class names file not found; check class_names_file") from exc
    classes: list[tuple[str, ...]] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        names = tuple(n.strip() for n in line.split("|"))
        if any(not n for n in names):
            raise DataError(f"{p}: line {lineno}: empty class name in {line!r}")
        classes.append(names)
    if expected is not None and len(classes) != expected:
        raise DataError(
            f"{p}: expected {expected} class names (one per class), found {len(classes)}; "
            "list one line per class in index order"
        )
    return classes


def read_json(path: str | Path, what: str) -> Any:
    """Load a JSON file, turning missing files and syntax errors into `DataError`s."""
    import json

    p = Path(path)
    try:
        with p.open("r", encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError as exc:
        raise DataError(f"{p}: {what} not found; check the path in the recipe") from exc
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{p}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from exc
