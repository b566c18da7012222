"""Progress display: a tqdm bar over units (levels and controls), one over iterations, and one line per unit."""

from __future__ import annotations

import sys


class Progress:
    """``with Progress(total_units, quiet) as p``: ``p.iterations`` is the inner bar (None when quiet)."""

    def __init__(self, total_units: int, quiet: bool = False) -> None:
        self.quiet = quiet
        self.total = total_units
        self.units = None
        self.iterations = None

    def __enter__(self) -> Progress:
        if not self.quiet:
            from tqdm.auto import tqdm  # the imp extra; `lthfast info` and --help must start without it

            self.units = tqdm(total=self.total, desc="units", unit="unit", position=0, file=sys.stderr)
            self.iterations = tqdm(total=1, desc="iterations", unit="it", position=1, leave=False, file=sys.stderr)
        return self

    def __exit__(self, *exc) -> None:
        for bar in (self.iterations, self.units):
            if bar is not None:
                bar.close()

    def done(self, count: int = 1) -> None:
        if self.units is not None:
            self.units.update(count)

    def line(self, text: str) -> None:
        """A line above the bars (nothing when quiet)."""
        if not self.quiet:
            from tqdm.auto import tqdm

            tqdm.write(text, file=sys.stderr)
