"""Which forward / dX kernels a masked linear runs: the one-program-per-tile ones or the persistent TMA-fed ones
(lthfast.kernels.persistent), chosen per key by timing both once on CUDA (``autotune.Faster``), forced by
``LTHFAST_PERSISTENT``, the first without timing elsewhere."""

from __future__ import annotations

import pytest
import torch

from lthfast import functional, reference
from lthfast.bench.masks import block_mask
from lthfast.kernels import autotune


def _runs(calls: list):
    return [lambda: calls.append(0), lambda: calls.append(1)]


def test_faster_keeps_the_faster_launcher_per_key(monkeypatch):
    monkeypatch.delenv("LTHFAST_PERSISTENT", raising=False)
    monkeypatch.setenv("LTHFAST_AUTOTUNE", "1")
    times = {0: 2.0, 1: 1.0}
    calls: list = []
    seen: list = []

    def bench(run):
        run()
        seen.append(calls[-1])
        return times[calls[-1]]

    faster = autotune.Faster("LTHFAST_PERSISTENT", bench=bench)
    assert faster.pick(("a",), _runs(calls)) == 1
    assert calls[:2] == [0, 1], "each launcher runs once (tuning its configs) before it is timed"
    assert faster.timings[("a",)] == [2.0, 1.0]
    calls.clear()
    assert faster.pick(("a",), _runs(calls)) == 1 and calls == [], "a key is timed once"
    times.update({0: 0.5})
    assert faster.pick(("b",), _runs(calls)) == 0


def test_faster_forced_and_untimed(monkeypatch):
    faster = autotune.Faster("LTHFAST_PERSISTENT", bench=lambda run: pytest.fail("must not time"))
    monkeypatch.setenv("LTHFAST_PERSISTENT", "1")
    assert faster.pick(("a",), _runs([])) == 1
    monkeypatch.setenv("LTHFAST_PERSISTENT", "2")
    with pytest.raises(ValueError, match="LTHFAST_PERSISTENT=2"):
        faster.pick(("a",), _runs([]))
    monkeypatch.delenv("LTHFAST_PERSISTENT")
    monkeypatch.setenv("LTHFAST_AUTOTUNE", "0")
    assert faster.pick(("a",), _runs([])) == 0
    monkeypatch.setenv("LTHFAST_AUTOTUNE", "1")
    assert faster.pick(("b",), _runs([]), timed=False) == 0


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize("forced", ["0", "1"])
def test_the_op_runs_the_forced_kernels_and_matches_float64(monkeypatch, forced):
    from lthfast.kernels import masked_matmul, persistent

    monkeypatch.setenv("LTHFAST_PERSISTENT", forced)
    used = []
    for module, name in ((persistent, "persistent_linear_forward"), (persistent, "persistent_linear_grad_input"),
                         (masked_matmul, "_classic_forward"), (masked_matmul, "_classic_grad_input")):  # fmt: skip
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original, _n=name, **k: used.append(_n) or _f(*a, **k))
    gen = torch.Generator().manual_seed(3)
    mask = block_mask(50, 70, 0.5, 16, gen) & (torch.rand(50, 70, generator=gen) > 0.2)
    w = torch.randn(50, 70, generator=gen).requires_grad_()
    b = torch.randn(50, generator=gen).requires_grad_()
    x = torch.randn(37, 70, generator=gen).requires_grad_()
    g = torch.randn(37, 50, generator=gen)
    y = functional.masked_linear(x, w, mask, b)
    dx, dw, db = torch.autograd.grad(y, (x, w, b), g)
    want = "persistent" if forced == "1" else "_classic"
    assert used and all(name.startswith(want) for name in used), used
    assert len(used) == 2, "one forward, one dX"
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
    yd = reference.masked_linear(xd, wd, mask, bd)
    expected = (yd, *torch.autograd.grad(yd, (xd, wd, bd), g.double()))
    for name, got, exp in zip(("y", "dx", "dw", "db"), (y, dx, dw, db), expected):
        torch.testing.assert_close(got.double(), exp, atol=1e-4, rtol=1e-4, msg=name)
