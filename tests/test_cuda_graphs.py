"""Masked steps captured as CUDA graphs (lthfast.bench.timing.graphed): a replay recomputes from the live inputs,
and a replay after the mask was pruned in place stays exact (the captured tile index is kept alive, and is a
superset of the alive tiles; the conv kernels' W ⊙ M is made inside the graph, from the live mask)."""

from __future__ import annotations

import pytest
import torch

from lthfast import functional, reference
from lthfast.bench import timing
from lthfast.bench.masks import block_mask

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("triton_backend")]
TOL = {"atol": 1e-4, "rtol": 1e-4}  # float32 with IEEE products (TF32 off below), against float64


@pytest.fixture(autouse=True)
def _no_tf32(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def _capture(op, x, w, mask, g, conv):
    out = {}

    def step(x, g):
        if op == "linear":
            y = functional.masked_linear(x, w, mask)
        else:
            y = functional.masked_conv2d(x, w, mask, None, **conv)
        out["y"], (out["dx"], out["dw"]) = y, torch.autograd.grad(y, (x, w), g)

    return timing.graphed(step, [(x, g)]), out


def _expected(op, x, w, mask, g, conv):
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    if op == "linear":
        y = reference.masked_linear(xd, wd, mask)
    else:
        y = reference.masked_conv2d(xd, wd, mask, None, conv["stride"], conv["padding"], 1, 1)
    return {"y": y, **dict(zip(("dx", "dw"), torch.autograd.grad(y, (xd, wd), g.double())))}


def _problem(op):
    torch.manual_seed(0)
    if op == "linear":
        w = torch.randn(96, 80, device="cuda", requires_grad=True)
        mask = block_mask(96, 80, 0.5, 16).cuda()
        x = torch.randn(33, 80, device="cuda", requires_grad=True)
        return x, w, mask, torch.randn(33, 96, device="cuda"), {}
    w = torch.randn(40, 24, 3, 3, device="cuda", requires_grad=True)  # NCHW: the kernels read a channels_last W ⊙ M
    mask = torch.rand(40, 24, 3, 3, device="cuda") > 0.3
    x = torch.randn(2, 24, 9, 7, device="cuda", requires_grad=True)
    conv = {"stride": 1, "padding": 1}
    return x, w, mask, torch.randn(2, 40, 9, 7, device="cuda"), conv


def _check(out, expected):
    for name, want in expected.items():
        torch.testing.assert_close(out[name].double(), want, **TOL, msg=name)


@pytest.mark.parametrize("op", ["linear", "conv"])
def test_replay_recomputes_from_new_input_values(op):
    x, w, mask, g, conv = _problem(op)
    replay, out = _capture(op, x, w, mask, g, conv)
    with torch.no_grad():
        x.copy_(torch.randn_like(x) + 1.0)
    replay()
    torch.cuda.synchronize()
    _check(out, _expected(op, x, w, mask, g, conv))


@pytest.mark.parametrize("op", ["linear", "conv"])
def test_replay_after_an_in_place_prune_is_exact(op):
    x, w, mask, g, conv = _problem(op)
    replay, out = _capture(op, x, w, mask, g, conv)
    with torch.no_grad():  # prune in place, as IMP does: whole tiles and scattered weights
        mask[:16] = False
        mask.logical_and_(torch.rand(mask.shape, device="cuda") > 0.3)
    torch.cuda.synchronize()
    # An eager step with the pruned mask drops the captured index from the cache and builds
    # new ones; the allocations after it would reuse memory that was freed.
    if op == "linear":
        functional.masked_linear(x.detach(), w.detach(), mask)
    else:
        functional.masked_conv2d(x.detach(), w.detach(), mask, None, **conv)
    scratch = [torch.full((1 << 16,), -7, dtype=torch.int32, device="cuda") for _ in range(8)]  # noqa: F841
    replay()
    torch.cuda.synchronize()
    _check(out, _expected(op, x, w, mask, g, conv))
    assert not out["dw"][~mask].any(), "a pruned weight got a gradient"


def test_capturing_before_any_eager_step_says_to_warm_up():
    x, w, mask, g, _ = _problem("linear")
    fresh = mask.clone()  # never indexed
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(Exception) as info:  # noqa: PT011 - the capture's own error may be raised on top of ours
        with torch.cuda.graph(graph):
            functional.masked_linear(x, w, fresh)
    chain, error = [], info.value
    while error is not None:
        chain.append(str(error))
        error = error.__context__ or error.__cause__
    assert any("run one eager step" in message for message in chain), chain


def test_the_dense_route_zero_made_inside_a_capture_is_not_kept(monkeypatch):
    """masking._zero keeps one 0-dim zero per dtype and device for torch.where; one first made inside a capture
    holds data only when the graph replays, so it must not be kept for the eager calls after it."""
    import lthfast
    from lthfast.ops import masking

    monkeypatch.setattr(masking, "_zeros", {})
    torch.manual_seed(0)
    w = torch.randn(64, 48, device="cuda", requires_grad=True)
    mask = torch.rand(64, 48, device="cuda") > 0.5  # every tile alive: "auto" takes the dense route
    x = torch.randn(8, 48, device="cuda")
    out = {}

    def step():
        out["y"] = functional.masked_linear(x, w, mask)
        (out["dw"],) = torch.autograd.grad(out["y"], (w,), torch.ones_like(out["y"]))

    with lthfast.backend("auto"):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()  # warm-up: indices built, the zero made and kept
        torch.cuda.current_stream().wait_stream(side)
        assert list(masking._zeros) == [(torch.float32, w.device)]
        masking._zeros.clear()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        assert not masking._zeros, "a zero made inside the capture was kept"
        graph.replay()
        torch.cuda.synchronize()
        _check(out, {"y": reference.masked_linear(x.double(), w.detach().double(), mask),
                     "dw": torch.ones(8, 64, dtype=torch.float64, device="cuda").t() @ x.double() * mask})  # fmt: skip
        step()  # eager again: made and kept
        assert list(masking._zeros) == [(torch.float32, w.device)]
