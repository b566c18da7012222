"""The timing method shared by every ``lthfast bench`` measurement.

- Warm-up first (compilation, autotuning, allocator and caches settle), then timed runs.
- GPU: ``triton.testing.do_bench`` (CUDA events, L2 flushed before each run); median, p20, p80 of the runs.
- CPU: ``torch.utils.benchmark.Timer.blocked_autorange`` on all of torch's threads (the Timer defaults to one
  thread); median from the Measurement, p20/p80 from its raw per-block times.
- Inputs rotate over pre-drawn random buffers (``Rotation``), so that repeated runs do not just re-read the
  cache: each call takes the next buffer.
- A measurement is "noisy" (``Timing.noisy``) when its repeats disagree: the slowest round's median over the
  fastest's above ``NOISY_ROUND_RATIO``, or the p20-p80 range above ``NOISY_RANGE`` of the median. Such a row says
  more about the machine's load than about the code; the table marks it and the JSON records it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

# Rotated inputs total at least this many bytes: larger than the L2 of an H100 (50 MB) and the per-CCD L3 of
# the EPYC CPUs we ran on (32 MB), so a buffer is never re-read warm from the previous call.
ROTATION_BYTES = 64 * 2**20
MIN_BUFFERS, MAX_BUFFERS = 4, 64
# Spread beyond which a measurement is flagged noisy: on an idle machine rounds agree within a few per cent.
NOISY_ROUND_RATIO = 1.5  # max / min of the per-round medians
NOISY_RANGE = 0.2  # (p80 - p20) / median of the pooled samples


@dataclass(frozen=True)
class Timing:
    """One measurement, in milliseconds per call. ``runs``: timed calls (None where the timer does not say).

    ``samples``: the raw times the percentiles were taken over (per run on GPU, per block of runs on CPU);
    kept for ``merge``, left out of the JSON. ``round_medians``: each round's median (``merge``), in the JSON.
    """

    median_ms: float
    p20_ms: float
    p80_ms: float
    runs: int | None
    timer: str
    rounds: int = 1
    samples: tuple[float, ...] = field(default=(), repr=False)
    round_medians: tuple[float, ...] = ()

    @property
    def round_ratio(self) -> float:
        """Slowest round's median over the fastest's (1.0 for a single round)."""
        if len(self.round_medians) < 2 or min(self.round_medians) <= 0:
            return 1.0
        return max(self.round_medians) / min(self.round_medians)

    @property
    def noisy(self) -> bool:
        """The repeats spread too far to trust the median (``NOISY_ROUND_RATIO``, ``NOISY_RANGE``)."""
        spread = (self.p80_ms - self.p20_ms) / self.median_ms if self.median_ms > 0 else 0.0
        return self.round_ratio > NOISY_ROUND_RATIO or spread > NOISY_RANGE

    def as_dict(self) -> dict:
        out = {k: getattr(self, k) for k in ("median_ms", "p20_ms", "p80_ms", "runs", "timer", "rounds")}
        return out | {"round_median_ms": list(self.round_medians or [self.median_ms]), "noisy": self.noisy}

    @classmethod
    def from_samples(cls, samples: Sequence[float], runs: int | None, timer: str, rounds: int = 1) -> Timing:
        q = lambda p: _percentile(samples, p)
        return cls(q(0.5), q(0.2), q(0.8), runs, timer, rounds, tuple(samples))


def merge(timings: Sequence[Timing]) -> Timing:
    """Pool the samples of several rounds of one measurement (interleaved with other providers' rounds, so that
    a burst of load on a shared machine hits every provider alike rather than one)."""
    if len(timings) == 1:
        return timings[0]
    medians = tuple(t.median_ms for t in timings)
    if any(not t.samples for t in timings):  # a timer without raw samples: the median of the medians
        return Timing(_percentile(medians, 0.5), min(medians), max(medians), None, timings[0].timer, len(timings),
                      round_medians=medians)  # fmt: skip
    samples = [s for t in timings for s in t.samples]
    runs = None if any(t.runs is None for t in timings) else sum(t.runs for t in timings)
    pooled = Timing.from_samples(samples, runs, timings[0].timer, len(timings))
    return replace(pooled, round_medians=medians)


def buffer_count(bytes_per_set: int) -> int:
    """How many input sets to pre-draw so that they total ``ROTATION_BYTES`` (between 4 and 64)."""
    wanted = math.ceil(ROTATION_BYTES / max(1, bytes_per_set))
    return max(MIN_BUFFERS, min(MAX_BUFFERS, wanted))


class Rotation:
    """Cycles through pre-drawn input sets: ``next(rotation)`` returns the next one (a tuple of tensors)."""

    def __init__(self, sets: Sequence[tuple]) -> None:
        if not sets:
            raise ValueError("Rotation needs at least one input set")
        self.sets = list(sets)
        self.calls = 0

    def __next__(self) -> tuple:
        item = self.sets[self.calls % len(self.sets)]
        self.calls += 1
        return item

    def __iter__(self):
        return self

    def __len__(self) -> int:
        return len(self.sets)


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _time_cuda(fn: Callable[[], object], warmup_ms: float, rep_ms: float) -> Timing:
    from triton.testing import do_bench

    try:
        times = do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")
        if not isinstance(times, (list, tuple)) or not times:
            raise TypeError("do_bench(return_mode='all') did not return the per-run times")
    except (AssertionError, TypeError, ValueError):  # a triton without return_mode="all"
        median, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return Timing(median, p20, p80, None, "triton.testing.do_bench")
    times = [float(t) for t in times]
    return Timing.from_samples(times, len(times), "triton.testing.do_bench")


def _time_cpu(fn: Callable[[], object], warmup: int, min_run_time: float) -> Timing:
    from torch.utils import benchmark

    for _ in range(warmup):
        fn()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    # m.times holds one mean per block of m.number_per_run calls; percentiles are taken over those blocks.
    times_ms = [t * 1e3 for t in m.times]
    runs = len(times_ms) * int(m.number_per_run)
    return Timing.from_samples(times_ms, runs, "torch.utils.benchmark.blocked_autorange")


# CUDA-graph timing captures one graph per input set, for at most this many sets (each graph holds its own
# outputs and intermediates in its memory pool).
GRAPH_SETS = 4


def graphed(call: Callable[..., object], sets: Sequence[tuple], warmup: int = 3) -> Callable[[], None]:
    """``call(*s)`` for each input set ``s`` (the first ``GRAPH_SETS``) captured as a CUDA graph; returns a function
    that replays the next graph in turn. The step then costs no host time beyond one launch per replay: what a
    training loop captured whole (``torch.cuda.graph``, ``torch.compile(mode="reduce-overhead")``) pays.

    ``warmup`` eager calls per set run first on a side stream, as torch's capture recipe asks: they compile and
    tune the kernels and build lthfast's tile indices, none of which may happen inside a capture. A graph keeps
    the tile index of the mask it was captured with (exact while masks only shrink, but skipping only the tiles
    empty at capture): capture again after the mask changes.
    """
    sets = list(sets)[:GRAPH_SETS]
    if not sets:
        raise ValueError("graphed: no input sets")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            for s in sets:
                call(*s)
    torch.cuda.current_stream().wait_stream(side)
    graphs = []
    for s in sets:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            call(*s)
        graphs.append(graph)
    rotation = Rotation([(g,) for g in graphs])
    return lambda: next(rotation)[0].replay()


def measure(
    fn: Callable[[], object],
    device: torch.device,
    *,
    warmup: int = 3,
    min_run_time: float = 0.5,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
) -> Timing:
    """Time ``fn()`` (no arguments; it draws its own inputs, e.g. from a ``Rotation``) on ``device``.

    CPU: ``warmup`` calls, then ``blocked_autorange(min_run_time)`` seconds. CUDA: ``do_bench`` with
    ``warmup_ms`` / ``rep_ms`` milliseconds of warm-up and timed runs.
    """
    if device.type == "cuda":
        return _time_cuda(fn, warmup_ms, rep_ms)
    return _time_cpu(fn, warmup, min_run_time)
