"""`lthfast bench` subcommand."""

from __future__ import annotations


def register(subparsers) -> None:
    """Add this package's subcommands to the top-level parser."""
