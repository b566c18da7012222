"""``triton.autotune`` as the kernels use it: short timing per config, and a switch to turn tuning off.

Each new autotune key (shape class, tile shape, density bucket) times every config; at Triton's default
25 ms warm-up + 100 ms per config that is ~0.5 s per kernel and key before the first step runs. Configs
differ by tens of percent, so 5 + 25 ms of timing tells them apart.

``LTHFAST_AUTOTUNE=0`` keeps the first config only (no timing at all): correctness runs on a GPU, where
compiling and timing every config for every odd test shape costs minutes and checks nothing more.
"""

from __future__ import annotations

import inspect
import os

import triton

WARMUP_MS = 5
REP_MS = 25


def enabled() -> bool:
    return os.environ.get("LTHFAST_AUTOTUNE", "1").strip().lower() not in ("0", "false", "off", "no")


def _bench(kernel_call, quantiles):
    return triton.testing.do_bench(kernel_call, warmup=WARMUP_MS, rep=REP_MS, quantiles=quantiles)


def autotune(configs: list[triton.Config], key: list[str], **kwargs):
    """``triton.autotune(configs, key, **kwargs)`` with the short timing above; one config when disabled."""
    if not enabled():
        configs = configs[:1]
        kwargs.pop("prune_configs_by", None)
    if "do_bench" in inspect.signature(triton.autotune).parameters:
        kwargs["do_bench"] = _bench
    else:  # older Triton: the (later deprecated) timing arguments
        kwargs.update(warmup=WARMUP_MS, rep=REP_MS)
    return triton.autotune(configs=configs, key=key, **kwargs)
