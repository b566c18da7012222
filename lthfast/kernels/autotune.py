"""The kernels' launch configurations: timed once per key, then launched directly.

``Tuned(kernel, configs)`` replaces ``triton.autotune`` for the masked kernels. Triton's ``Autotuner.run``
rebuilds a dict of every argument, recomputes its key from them and stringifies every tensor's dtype on each
launch: 15-18 us of host time per launch on the 2-core dev box (``benchmarks/host_overhead.py --what tuner``),
against ~2 us for the dictionary lookup here, where the launcher hands over the key it already knows. A training
step launches three or four kernels, and on an H200 the step was bound by host time (h200-notes.md).

Each new key (shape class, tile shape, density bucket, dtype) times every config once with
``triton.testing.do_bench`` for ``WARMUP_MS`` + ``REP_MS`` (Triton's defaults, 25 + 100 ms per config, cost
~0.5 s per kernel and key before the first step; configs differ by tens of percent, which 5 + 25 ms tells
apart), keeps the fastest (the median), and from then on launches ``kernel[grid](*args, **kwargs, **config)``.
A config that fails to compile or launch (e.g. too much shared memory) is timed as infinite; if all fail, the
first error is raised. The kernels here only write their outputs, so timing a config repeatedly changes nothing.

``LTHFAST_AUTOTUNE=0`` keeps the first config only (no timing at all): correctness runs on a GPU, where compiling
and timing every config for every odd test shape costs minutes and checks nothing more. Tuning synchronizes the
GPU: run one step of every shape before capturing a CUDA graph.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import torch

WARMUP_MS = 5
REP_MS = 25


def enabled() -> bool:
    return os.environ.get("LTHFAST_AUTOTUNE", "1").strip().lower() not in ("0", "false", "off", "no")


def _bench(launch: Callable[[], object]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(launch, warmup=WARMUP_MS, rep=REP_MS, return_mode="median"))


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for launch grids on the host: ``triton.cdiv`` is a constexpr function since Triton 3.5 and costs
    ~2.6 us per host call (2-core dev box), ~40x this."""
    return -(-a // b)


def offset_type(*tensors: torch.Tensor):
    """The integer type of a kernel's element offsets into ``tensors``: ``tl.int32`` when every element of every one
    lies within 2**31 - 1 elements of its start (all but huge tensors), else ``tl.int64``. 64-bit offsets cost wide
    multiplies and extra registers on every row of every step (compiled offline for sm_90, bf16: the conv dW 486 ->
    395 SASS instructions per loop step with int32, the linear dW over 2 tiles 286 -> 227). Called per launch: a
    contiguous tensor is checked by its size alone (2.4 us for four tensors on the dev box, 5.7 us summing strides)."""
    import triton.language as tl

    for t in tensors:
        if t.is_contiguous():
            if t.numel() > _INT32_REACH:
                return tl.int64
        elif sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) >= _INT32_REACH:
            return tl.int64
    return tl.int32


_INT32_REACH = 2**31 - 1  # offsets below this fit int32


def size_class(n: int) -> int:
    """``n`` rounded up to a power of two: a key tunes once per size class, not once per batch size."""
    return 1 << max(0, int(n) - 1).bit_length()


def density_class(tile_density: float) -> int:
    """Tile density in 1/16 steps: a tile pattern of similar density reuses the tuned config."""
    return round(16 * tile_density)


Config = dict  # meta-parameters plus num_warps / num_stages, as kernel[grid](...) takes them
Grid = Callable[[Config], tuple[int, ...]]


class Tuned:
    """A ``@triton.jit`` kernel with a list of launch configs, the best one kept per key.

    ``launch(key, grid, *args, **kwargs)`` runs ``kernel[grid(config)](*args, **kwargs, **config)``. ``key`` must
    determine everything the best config depends on (shape class, dtypes, constexprs); ``grid`` maps a config to
    the launch grid. ``prune(configs, key)`` may drop configs for a key before timing (never all of them).
    ``fixed=config`` launches with that config and neither times nor caches (the interpreter's small tiles).
    """

    def __init__(
        self,
        kernel,
        configs: Sequence[Config],
        prune: Callable[[list[Config], tuple], list[Config]] | None = None,
        bench: Callable[[Callable[[], object]], float] | None = None,
    ) -> None:
        if not configs:
            raise ValueError("Tuned: at least one config is needed")
        self.kernel = kernel
        self.configs = [dict(c) for c in configs]
        self.prune = prune
        self.bench = bench or _bench
        self.best: dict[tuple, Config] = {}  # key -> the config it launches with
        self.timings: dict[tuple, list[tuple[Config, float]]] = {}  # key -> (config, ms) of its tuning run

    def candidates(self, key: tuple) -> list[Config]:
        """The configs timed for ``key``: those ``prune`` keeps, only the first of them when tuning is off."""
        kept = list(self.prune(self.configs, key)) if self.prune is not None else list(self.configs)
        kept = kept or self.configs[:1]
        return kept if enabled() else kept[:1]

    def _tune(self, key: tuple, grid: Grid, args: tuple, kwargs: dict) -> Config:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            name = getattr(self.kernel, "__name__", type(self.kernel).__name__)
            raise RuntimeError(
                f"lthfast: {name} has no tuned config for {key} and cannot be timed inside a CUDA graph capture: "
                "run one eager step of the same shapes and masks before capturing"
            )
        configs = self.candidates(key)
        if len(configs) == 1:
            self.best[key] = configs[0]
            return configs[0]
        timings, errors = [], []
        for config in configs:

            def run(config=config):
                return self.kernel[grid(config)](*args, **kwargs, **config)

            try:
                ms = self.bench(run)
            except Exception as exc:  # noqa: BLE001 - a config that cannot run on this device is skipped
                errors.append(exc)
                ms = math.inf
            timings.append((config, ms))
        if all(math.isinf(ms) for _, ms in timings):
            raise errors[0]
        best = min(timings, key=lambda item: item[1])[0]
        self.timings[key] = timings
        self.best[key] = best
        return best

    def launch(self, key: tuple, grid: Grid, *args, fixed: Config | None = None, **kwargs):
        config = fixed if fixed is not None else self.best.get(key)
        if config is None:
            config = self._tune(key, grid, args, kwargs)
        return self.kernel[grid(config)](*args, **kwargs, **config)


class Faster:
    """Of several launchers computing the same result, the one that ran fastest for a key: each is run once (so it
    tunes its own configs), then timed like a config, and the winner is called directly from then on.

    ``pick(key, runs)`` returns the index into ``runs`` to call. The environment variable ``env`` forces one
    ("0", "1", ...); with tuning off (``LTHFAST_AUTOTUNE=0``) or off CUDA the first is kept without timing.
    """

    def __init__(self, env: str, bench: Callable[[Callable[[], object]], float] | None = None) -> None:
        self.env = env
        self.bench = bench or _bench
        self.best: dict[tuple, int] = {}
        self.timings: dict[tuple, list[float]] = {}

    def forced(self) -> int | None:
        value = os.environ.get(self.env, "").strip()
        return int(value) if value.isdigit() else None

    def pick(self, key: tuple, runs: Sequence[Callable[[], object]], timed: bool = True) -> int:
        forced = self.forced()
        if forced is not None:
            if forced >= len(runs):
                raise ValueError(f"lthfast: {self.env}={forced} names no launcher (0 to {len(runs) - 1})")
            return forced
        choice = self.best.get(key)
        if choice is not None:
            return choice
        if not timed or not enabled():
            self.best[key] = 0
            return 0
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"lthfast: no launcher chosen yet for {key}, and none can be timed inside a CUDA graph capture: "
                "run one eager step of the same shapes and masks before capturing"
            )
        for run in runs:  # each tunes its configs on its first call, outside the timing
            run()
        self.timings[key] = [self.bench(run) for run in runs]
        self.best[key] = min(range(len(runs)), key=lambda i: self.timings[key][i])
        return self.best[key]
