"""`lthfast imp`, `lthfast report` and `lthfast demo` subcommands."""

from __future__ import annotations


def register(subparsers) -> None:
    """Add this package's subcommands to the top-level parser."""
