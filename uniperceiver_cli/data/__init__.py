"""Data engine: readers of on-disk formats, video sources, transforms, the toy world, target sets,
the multi-task sampler and typed batches.

Importing this package does not import torch; the torch-free parts are `errors` (`DataError`),
`options` (one frozen options dataclass per recipe data format) and `health` (the bad-data
accounting). Everything else lives in submodules
that import torch on use.
"""

from uniperceiver_cli.data.errors import DataError

__all__ = ["DataError"]
