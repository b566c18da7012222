"""The kernels' tuner (lthfast.kernels.autotune.Tuned): configs timed once per key, the fastest launched from then on,
short timing per config, LTHFAST_AUTOTUNE=0 keeping the first config only. The kernel runs in Triton's interpreter
on CPU (a GPU machine compiles it); the timing is a fake where a test needs to choose the winner."""

import math

import pytest
import torch
import triton
import triton.language as tl

from lthfast.kernels import autotune
from lthfast.kernels.autotune import Tuned

pytestmark = pytest.mark.usefixtures("triton_backend")


@triton.jit
def _scaled_copy(x_ptr, y_ptr, n, scale, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * scale, mask=offs < n)


CONFIGS = [{"BLOCK": b, "num_warps": 4} for b in (16, 32, 64)]


def _grid(n):
    return lambda meta: (triton.cdiv(n, meta["BLOCK"]),)


class Spy:
    """The kernel, recording the BLOCK of every launch."""

    def __init__(self):
        self.blocks = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.blocks.append(kwargs["BLOCK"])
            return _scaled_copy[grid](*args, **kwargs)

        return launch


class FakeBench:
    """Runs the launch once (as do_bench would) and times it by a table keyed on the BLOCK it launched."""

    def __init__(self, spy, ms_by_block, fail=()):
        self.spy, self.ms_by_block, self.fail, self.calls = spy, ms_by_block, fail, []

    def __call__(self, launch):
        launch()
        block = self.spy.blocks[-1]
        self.calls.append(block)
        if block in self.fail:
            raise RuntimeError(f"out of resources at BLOCK={block}")
        return self.ms_by_block[block]


def _tuned(ms_by_block, fail=(), prune=None):
    spy = Spy()
    bench = FakeBench(spy, ms_by_block, fail)
    return Tuned(spy, CONFIGS, prune=prune, bench=bench), bench


def _data(n=100):
    x = torch.randn(n, dtype=torch.float32) + 2.0  # never zeros: a copy that does nothing would pass otherwise
    return x, torch.full_like(x, float("nan"))


def test_fastest_config_is_kept_per_key_and_timed_once(monkeypatch):
    monkeypatch.delenv("LTHFAST_AUTOTUNE", raising=False)
    tuned, bench = _tuned({16: 3.0, 32: 1.0, 64: 2.0})
    x, y = _data()
    tuned.launch(("a",), _grid(x.numel()), x, y, x.numel(), 3.0)
    torch.testing.assert_close(y, x * 3.0, rtol=0, atol=0)
    assert sorted(bench.calls) == [16, 32, 64]
    assert tuned.best[("a",)]["BLOCK"] == 32
    assert [ms for _, ms in tuned.timings[("a",)]] == [3.0, 1.0, 2.0]

    y.fill_(float("nan"))
    tuned.launch(("a",), _grid(x.numel()), x, y, x.numel(), -1.5)  # same key: no timing, the kept config
    torch.testing.assert_close(y, x * -1.5, rtol=0, atol=0)
    assert len(bench.calls) == 3

    bench.ms_by_block = {16: 0.5, 32: 1.0, 64: 2.0}
    tuned.launch(("b",), _grid(x.numel()), x, y, x.numel(), 1.0)  # a new key is timed on its own
    assert tuned.best[("b",)]["BLOCK"] == 16 and tuned.best[("a",)]["BLOCK"] == 32
    assert len(bench.calls) == 6


@pytest.mark.parametrize("value,tuned_on", [(None, True), ("1", True), ("0", False), ("off", False)])
def test_switch_keeps_first_config_only_when_off(monkeypatch, value, tuned_on):
    """Off, the first config that ``prune`` keeps runs untimed (one that does not fit the key is never launched)."""
    if value is None:
        monkeypatch.delenv("LTHFAST_AUTOTUNE", raising=False)
    else:
        monkeypatch.setenv("LTHFAST_AUTOTUNE", value)
    tuned, bench = _tuned({16: 3.0, 32: 2.0, 64: 1.0}, prune=lambda configs, key: configs[1:])
    assert [c["BLOCK"] for c in tuned.candidates(("k",))] == ([32, 64] if tuned_on else [32])
    x, y = _data(70)
    tuned.launch(("k",), _grid(x.numel()), x, y, x.numel(), 2.0)
    torch.testing.assert_close(y, x * 2.0, rtol=0, atol=0)
    assert tuned.best[("k",)]["BLOCK"] == (64 if tuned_on else 32)
    assert bench.calls == ([32, 64] if tuned_on else [])  # one candidate: nothing is timed


def test_prune_sees_the_key_and_never_empties_the_list(monkeypatch):
    monkeypatch.delenv("LTHFAST_AUTOTUNE", raising=False)
    seen = []

    def prune(configs, key):
        seen.append(key)
        return []

    tuned, _ = _tuned({}, prune=prune)
    assert [c["BLOCK"] for c in tuned.candidates(("m", 8))] == [16]
    assert seen == [("m", 8)]


def test_failing_configs_are_skipped_and_all_failing_raises(monkeypatch):
    monkeypatch.delenv("LTHFAST_AUTOTUNE", raising=False)
    tuned, _ = _tuned({16: 1.0, 32: 2.0, 64: 3.0}, fail=(16,))
    x, y = _data()
    tuned.launch(("k",), _grid(x.numel()), x, y, x.numel(), 1.0)
    assert tuned.best[("k",)]["BLOCK"] == 32
    assert math.isinf(dict((c["BLOCK"], ms) for c, ms in tuned.timings[("k",)])[16])

    everything_fails, _ = _tuned({}, fail=(16, 32, 64))
    with pytest.raises(RuntimeError, match="BLOCK=16"):
        everything_fails.launch(("k",), _grid(x.numel()), x, y, x.numel(), 1.0)
    assert ("k",) not in everything_fails.best


def test_fixed_config_neither_times_nor_caches():
    tuned, bench = _tuned({})
    x, y = _data(33)
    tuned.launch(None, _grid(x.numel()), x, y, x.numel(), 4.0, fixed={"BLOCK": 16})
    torch.testing.assert_close(y, x * 4.0, rtol=0, atol=0)
    assert bench.calls == [] and tuned.best == {}


def test_configs_are_timed_briefly_by_their_median(monkeypatch):
    seen = {}

    def fake(fn, warmup, rep, return_mode):
        seen.update(warmup=warmup, rep=rep, return_mode=return_mode)
        return 1.0

    monkeypatch.setattr(triton.testing, "do_bench", fake)
    assert autotune._bench(lambda: None) == 1.0
    assert seen == {"warmup": autotune.WARMUP_MS, "rep": autotune.REP_MS, "return_mode": "median"}


def test_classes():
    assert [autotune.size_class(n) for n in (0, 1, 2, 3, 100, 128, 129)] == [1, 1, 2, 4, 128, 128, 256]
    assert [autotune.density_class(d) for d in (0.0, 0.02, 0.05, 0.5, 1.0)] == [0, 0, 1, 8, 16]


def test_no_config_is_an_error():
    with pytest.raises(ValueError, match="at least one config"):
        Tuned(_scaled_copy, [])


def test_an_untuned_key_inside_a_cuda_graph_capture_is_a_clear_error(monkeypatch):
    """Timing synchronizes the GPU, which a capture forbids: say to warm up first; a tuned key still launches."""
    monkeypatch.delenv("LTHFAST_AUTOTUNE", raising=False)
    tuned, bench = _tuned({16: 1.0, 32: 2.0, 64: 3.0})
    x, y = _data(40)
    tuned.launch(("warm",), _grid(x.numel()), x, y, x.numel(), 1.0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="run one eager step"):
        tuned.launch(("cold",), _grid(x.numel()), x, y, x.numel(), 1.0)
    assert ("cold",) not in tuned.best and len(bench.calls) == 3
    y.fill_(float("nan"))
    tuned.launch(("warm",), _grid(x.numel()), x, y, x.numel(), 5.0)
    torch.testing.assert_close(y, x * 5.0, rtol=0, atol=0)


def test_offset_type_turns_int64_once_a_tensor_reaches_2_31():
    small = torch.empty(4, 8, 16, 16, device="meta")
    offset_type = autotune.offset_type
    assert offset_type(small, small) is tl.int32
    big = torch.empty(128, 256, 256, 256, device="meta")  # 2**31 elements
    assert offset_type(small, big) is tl.int64
    wide = torch.empty(2, 2, 2, 2**30, device="meta")[..., :1]  # 8 elements, strides reaching past 2**31
    assert offset_type(wide) is tl.int64
