"""Errors of the export package (torch-free, so the CLI can name them without importing torch)."""

from __future__ import annotations


class ExportError(Exception):
    """An export, conversion or verification step failed at run time."""


class ExportInputError(ExportError):
    """The export was asked for something the input cannot provide (bad task, path or option)."""


class VerificationError(ExportError):
    """A reloaded artefact does not reproduce the eager model within the tolerance."""
