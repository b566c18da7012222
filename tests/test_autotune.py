"""The kernels' autotune wrapper: short timing per config, and LTHFAST_AUTOTUNE=0 keeping the first config only."""

import pytest
import triton
import triton.language as tl

from lthfast.kernels import autotune


@triton.jit
def _copy(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


CONFIGS = [triton.Config({"BLOCK": b}) for b in (64, 128, 256)]


@pytest.mark.parametrize("value,tuned", [(None, True), ("1", True), ("0", False), ("off", False)])
def test_switch_keeps_first_config_only_when_off(monkeypatch, value, tuned):
    if value is None:
        monkeypatch.delenv("LTHFAST_AUTOTUNE", raising=False)
    else:
        monkeypatch.setenv("LTHFAST_AUTOTUNE", value)
    prune = {"early_config_prune": lambda configs, named_args, **kw: configs[1:]}
    tuner = autotune.autotune(CONFIGS, key=["n"], prune_configs_by=prune)(_copy)
    assert [c.kwargs["BLOCK"] for c in tuner.configs] == ([64, 128, 256] if tuned else [64])
    assert (tuner.early_config_prune is not None) == tuned


def test_configs_are_timed_briefly(monkeypatch):
    seen = {}

    def fake(fn, warmup, rep, quantiles):
        seen.update(warmup=warmup, rep=rep, quantiles=quantiles)
        return [1.0, 1.0, 1.0]

    monkeypatch.setattr(triton.testing, "do_bench", fake)
    tuner = autotune.autotune(CONFIGS, key=["n"])(_copy)
    tuner.do_bench(lambda: None, quantiles=(0.5, 0.2, 0.8))
    assert seen == {"warmup": autotune.WARMUP_MS, "rep": autotune.REP_MS, "quantiles": (0.5, 0.2, 0.8)}
