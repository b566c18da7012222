"""Where the CPU unstructured sparse kernels (``lthfast.ops.sparse_cpu``) beat the dense route: the largest mask
density at which "auto" takes them, by layer shape, rows (batch) and threads.

The limits are measured by ``benchmarks/bench_crossover.py``, which times the public op's training step (forward,
dX, dW) on both routes over a grid of layer shapes, rows and densities, and writes ``crossover_cpu.json`` beside
this module (the CPU it ran on and the command inside). A limit is the largest measured density at which the
sparse step was at least ``margin`` times faster than dense there, so the route errs towards dense on a CPU whose
dense GEMM is faster than the measured one's. A call takes the limit of the nearest grid point (in log rows and
log size) for the nearest measured thread count; with no table, nothing runs sparse.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from pathlib import Path

TABLE = Path(__file__).with_name("crossover_cpu.json")
_forced: list[str | None] = [None]


@functools.cache
def _table() -> dict:
    try:
        return json.loads(TABLE.read_text())
    except (OSError, ValueError):
        return {}


def reload() -> None:
    """Read ``TABLE`` again (after a benchmark wrote it)."""
    _table.cache_clear()


@contextlib.contextmanager
def force(route: str | None):
    """Within the block every eligible call runs ``"sparse"`` or ``"dense"`` (None: the table decides)."""
    if route not in (None, "sparse", "dense"):
        raise ValueError(f"route must be 'sparse', 'dense' or None, got {route!r}")
    previous = _forced[0]
    _forced[0] = route
    try:
        yield
    finally:
        _forced[0] = previous


def state() -> tuple:
    """What a decision cached on a mask depends on here: the forced route and the table read."""
    return (_forced[0], id(_table()))


def _nearest(points: list[dict], threads: int, coords: dict[str, float]) -> float:
    if not points:
        return 0.0
    measured = sorted({p["threads"] for p in points})
    t = min(measured, key=lambda m: (abs(math.log(m) - math.log(max(threads, 1))), -m))
    best, best_distance = 0.0, math.inf
    for p in points:
        if p["threads"] != t:
            continue
        distance = sum((math.log(max(p[key], 1)) - math.log(max(value, 1))) ** 2 for key, value in coords.items())
        if distance < best_distance:
            best, best_distance = p["limit"], distance
    return best


def _limit(kind: str, threads: int, coords: dict[str, float]) -> float:
    forced = _forced[0]
    if forced is not None:
        return 1.0 if forced == "sparse" else -1.0
    return _nearest(_table().get(kind, []), threads, coords)


def linear_limit(rows: int, n: int, k: int, threads: int) -> float:
    """The largest density of an [n, k] mask at which a linear with ``rows`` input rows runs sparse."""
    return _limit("linear", threads, {"rows": rows, "weights": n * k})


def conv_limit(x_shape, mask_shape, groups: int, threads: int) -> float:
    """The largest density at which a conv of input ``x_shape`` and weight ``mask_shape`` runs sparse."""
    b, _, h, w = x_shape
    return _limit("conv", threads, {"batch": b, "weights": math.prod(mask_shape), "pixels": h * w})
