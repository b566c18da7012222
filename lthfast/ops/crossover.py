"""Where the CPU unstructured sparse kernels (``lthfast.ops.sparse_cpu``) beat the dense route: the largest mask
density at which "auto" takes them, by layer shape, rows and threads.

The limits come from ``benchmarks/bench_crossover.py``, which times both routes' training step (forward, dX, dW)
over a grid of shapes, rows and densities; its JSON (benchmarks/results/crossover-cpu-*.json) holds the CPU it
ran on and the command. A limit is the largest measured density at which sparse was faster than dense by
``MARGIN``, so that on a CPU unlike the measured one (a faster dense GEMM) the route errs towards dense.
"""

from __future__ import annotations

import math

# The speed-up over dense that a density must show before it is taken.
MARGIN = 1.15

# (rows at least, limit): the limit for a linear layer with at least that many input rows (batch x tokens).
LINEAR_LIMITS = ((1, 0.02), (16, 0.05), (64, 0.08), (256, 0.1))
# (batch at least, limit) for a conv layer, whose kernels vectorize over the batch.
CONV_LIMITS = ((1, 0.0), (8, 0.05), (32, 0.1))


def _lookup(table, value: int) -> float:
    limit = 0.0
    for at_least, density in table:
        if value >= at_least:
            limit = density
    return limit


def linear_limit(rows: int, n: int, k: int, threads: int) -> float:
    """The largest density of an [n, k] mask at which a linear with ``rows`` input rows runs sparse."""
    return _lookup(LINEAR_LIMITS, rows)


def conv_limit(x_shape, mask_shape, groups: int, threads: int) -> float:
    """The largest density at which a conv of input ``x_shape`` and weight ``mask_shape`` runs sparse."""
    return _lookup(CONV_LIMITS, x_shape[0]) if math.prod(x_shape[2:]) > 0 else 0.0
