"""Progress display: on a terminal, a tqdm bar over units (levels and controls), one over iterations, and one line
per finished unit; elsewhere (a log file, a pipe) the lines alone, without escape codes. A resumed run says where
it resumes, and a CPU run on a machine other processes keep busy says so when training starts."""

from __future__ import annotations

import re
import sys


def describe_unit(label: str) -> str:
    """``"r0 L2 ticket"`` -> ``"replicate 0, level 2 (ticket)"`` (other labels unchanged)."""
    match = re.fullmatch(r"r(\d+) L(\d+) (\S+)", label.strip())
    if not match:
        return label
    r, level, branch = match.groups()
    return f"replicate {r}, level {level} ({branch.replace('_', ' ')})"


class _UnitIterations:
    """What the training loop advances (``reset``, ``update``, ``set_description``, tqdm's names), forwarded to the
    iteration bar when there is one. The first unit trained says where a resumed run picks up."""

    def __init__(self, progress: Progress, bar=None) -> None:
        self.progress, self.bar = progress, bar
        self.total, self.count, self.first = 0, 0, True

    def reset(self, total: int) -> None:
        self.total, self.count = total, 0
        if self.bar is not None:
            self.bar.reset(total=total)

    def update(self, n: int = 1) -> None:
        self.count += n
        if self.bar is not None:
            self.bar.update(n)

    def set_description(self, label: str) -> None:
        if self.first:
            self.first = False
            finished = self.progress.finished
            if finished or self.count:
                where = f"{self.count} of its {self.total} iterations done" if self.count else "from its start"
                self.progress.line(
                    f"resuming at {describe_unit(label)}, {where} ({finished} of {self.progress.total} units finished)"
                )
        if self.bar is not None:
            self.bar.set_description(label)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Progress:
    """``with Progress(total_units, quiet) as p``: ``p.iterations`` is what the training loop advances (None when
    quiet). ``interactive``: draw tqdm bars (default: when stderr is a terminal); otherwise ``line`` prints plain
    lines, numbered by finished units. ``device``: where training runs (default: CUDA when present), for the load
    warning of ``lthfast._threads`` printed on entering (CPU only; the driver has set torch's threads by then)."""

    def __init__(
        self, total_units: int, quiet: bool = False, interactive: bool | None = None, stream=None, device=None
    ) -> None:
        self.quiet = quiet
        self.device = device
        self.total = total_units
        self.stream = stream
        self.interactive = interactive
        self.finished = 0
        self.units = None
        self.iterations = None

    def _stream(self):
        return self.stream if self.stream is not None else sys.stderr

    def __enter__(self) -> Progress:
        if self.quiet:
            return self
        if self.interactive is None:
            isatty = getattr(self._stream(), "isatty", None)
            self.interactive = bool(isatty and isatty())
        bar = None
        if self.interactive:
            from tqdm.auto import tqdm  # the imp extra; `lthfast info` and --help must start without it

            self.units = tqdm(total=self.total, desc="units", unit="unit", position=0, file=self._stream())
            bar = tqdm(total=1, desc="iterations", unit="it", position=1, leave=False, file=self._stream())
        self.iterations = _UnitIterations(self, bar)
        self._warn_if_loaded()
        return self

    def _warn_if_loaded(self) -> None:
        import torch

        from lthfast._threads import load_warning

        device = self.device if self.device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        warning = load_warning(torch.get_num_threads()) if torch.device(device).type == "cpu" else None
        if warning:
            self._write(warning)

    def _write(self, text: str) -> None:
        if self.interactive:
            from tqdm.auto import tqdm

            tqdm.write(text, file=self._stream())
        else:
            print(text, file=self._stream(), flush=True)

    def __exit__(self, *exc) -> None:
        for bar in (self.iterations, self.units):
            if bar is not None:
                bar.close()

    def done(self, count: int = 1) -> None:
        self.finished += count
        if self.units is not None:
            self.units.update(count)

    def line(self, text: str) -> None:
        """A line above the bars, or a plain line ``[finished/total] text`` (nothing when quiet)."""
        if not self.quiet:
            self._write(text if self.interactive else f"[{self.finished}/{self.total}] {text}")
