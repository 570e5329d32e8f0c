"""The one exception type of the data engine (torch-free)."""

from __future__ import annotations


class DataError(Exception):
    """A data file, record or media item is missing, malformed or undecodable.

    Messages name the file first and then the record, e.g.
    ``"annotations.json: record 17: missing 'image_id'"``, and say what to do about it.
    """


def record_error(source: object, record: int | str | None, problem: str) -> DataError:
    """Build a `DataError` with the ``"<file>: record <n>: <problem>"`` message layout.

    Args:
        source: the file (path or name) the record comes from.
        record: record index (0-based) or key; None when the problem is about the whole file.
        problem: what is wrong and what to do about it.

    Returns:
        The error, ready to raise.
    """
    where = f"{source}" if record is None else f"{source}: record {record}"
    return DataError(f"{where}: {problem}")
