"""Errors the IMP driver raises for bad input; the CLI prints them as one line (``lthfast: error: ...``)."""

from __future__ import annotations


class ImpError(Exception):
    """Base class: a problem with the user's input or files, explained by the message (no traceback needed)."""


class ConfigError(ImpError, ValueError):
    """An invalid option (unknown model or dataset, bad fraction, rewind past the end of training, ...)."""


class RunDirError(ImpError):
    """The run directory cannot be used (unwritable, or without --force: not a run directory, or another config)."""


class CheckpointError(ImpError):
    """A file of the run directory cannot be read; the message names it and says how to recover."""
