"""uniperceiver-cli: Uni-Perceiver-MoE generalist models from the command line.

Importing the package does not import torch; `load` is resolved lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from uniperceiver_cli.api import load

__all__ = ["__version__", "load"]


def __getattr__(name: str) -> Any:
    """Resolve heavy public names on first use so `import uniperceiver_cli` stays torch-free."""
    if name == "load":
        from uniperceiver_cli.api import load

        return load
    raise AttributeError(f"module 'uniperceiver_cli' has no attribute {name!r}")
