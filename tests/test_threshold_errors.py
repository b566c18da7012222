"""lthfast.threshold: every bad input raises a clear error naming the tensor, and leaves every mask untouched."""

import math

import pytest
import torch

from lthfast import _backend, threshold


@pytest.fixture(params=["cpp", "torch"])
def select(request):
    if request.param == "cpp" and _backend.ext() is None:
        pytest.skip("lthfast._C is not built")

    def run(tensors, masks, amount=None, k=None, scales=None, layerwise=False, write=True):
        return threshold._select(
            tensors, masks, amount, k, scales, layerwise=layerwise, write=write, impl=request.param, threads=2, grain=3
        )

    return run


def make(n=4):
    tensors = [torch.randn(5, 3), torch.randn(11), torch.randn(2, 2, 3).half(), torch.randn(7).bfloat16()][:n]
    masks = [torch.rand(t.shape) < 0.8 for t in tensors]
    return tensors, masks


def expect_error(select, exc, match, tensors, masks, **kw):
    before = [m.clone() for m in masks] if isinstance(masks, list) else None
    with pytest.raises(exc, match=match):
        select(tensors, masks, **kw)
    if before is not None:
        for i, (m, b) in enumerate(zip(masks, before)):
            if isinstance(m, torch.Tensor) and m.shape == b.shape and m.device.type != "meta":
                assert torch.equal(m, b), f"mask {i} changed although the call failed"


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", [1, 2, 3])
def test_nonfinite_alive_weight_names_the_tensor(select, bad, where):
    tensors, masks = make()
    tensors[where].view(-1)[-1] = bad
    masks[where].view(-1)[-1] = True
    expect_error(select, ValueError, f"tensor {where} holds NaN or Inf", tensors, masks, amount=0.5)
    expect_error(select, ValueError, f"tensor {where} holds NaN or Inf", tensors, masks, amount=0.5, layerwise=True)
    expect_error(select, ValueError, f"tensor {where} holds NaN or Inf", tensors, None, k=1, write=False)


def test_nonfinite_pruned_weight_is_ignored(select):
    tensors, masks = make()
    tensors[1][4] = math.nan  # not alive: it is not ranked
    masks[1][4] = False
    select(tensors, masks, amount=0.5)
    assert not masks[1][4]


@pytest.mark.parametrize("amount", [-0.1, 1.5, math.nan, [0.5, 2.0, 0.1, 0.1]])
def test_amount_outside_unit_interval(select, amount):
    tensors, masks = make()
    layerwise = isinstance(amount, list)
    match = "tensor 1" if layerwise else "outside"
    expect_error(select, ValueError, match, tensors, masks, amount=amount, layerwise=layerwise)


@pytest.mark.parametrize("kind", ["negative", "global", "layerwise"])
def test_k_negative_or_above_alive(select, kind):
    tensors, masks = make()
    alive = [int(m.sum()) for m in masks]
    if kind == "negative":
        expect_error(select, ValueError, "negative", tensors, masks, k=-1)
    elif kind == "global":
        expect_error(select, ValueError, f"exceeds the {sum(alive)} alive", tensors, masks, k=sum(alive) + 1)
    else:
        ks = [0, 0, alive[2] + 1, 0]
        expect_error(select, ValueError, f"tensor 2's {alive[2]} alive", tensors, masks, k=ks, layerwise=True)


@pytest.mark.parametrize(
    ("kw", "exc", "match"),
    [
        (dict(amount=0.5, k=3), ValueError, "exactly one"),
        (dict(), ValueError, "exactly one"),
        (dict(amount=True), TypeError, "real number"),
        (dict(k=2.0), TypeError, "integer"),
        (dict(amount=[0.5] * 4), TypeError, "layerwise"),
        (dict(amount=[0.5] * 3, layerwise=True), ValueError, "3 entries for 4 tensors"),
        (dict(amount=0.5, scales=[1.0, 1.0]), ValueError, "scales must be a list of 4"),
        (dict(amount=0.5, scales=[1.0, -1.0, 1.0, 1.0]), ValueError, r"scales\[1\].*tensor 1"),
        (dict(amount=0.5, scales=[1.0, 1.0, math.nan, 1.0]), ValueError, r"scales\[2\]"),
        (dict(amount=0.5, scales=[1.0, 1.0, 1.0, 1e39]), ValueError, r"scales\[3\]"),
    ],
)
def test_bad_arguments(select, kw, exc, match):
    tensors, masks = make()
    expect_error(select, exc, match, tensors, masks, **kw)


def test_bad_masks(select):
    tensors, masks = make()
    wrong_shape = masks[:1] + [torch.ones(12, dtype=torch.bool)] + masks[2:]
    expect_error(select, ValueError, "mask 1 has shape", tensors, wrong_shape, amount=0.5)
    wrong_dtype = masks[:2] + [masks[2].float()] + masks[3:]
    expect_error(select, TypeError, "mask 2 has dtype", tensors, wrong_dtype, amount=0.5)
    meta = masks[:3] + [torch.ones(7, dtype=torch.bool, device="meta")]
    expect_error(select, ValueError, "mask 3 is on meta", tensors, meta, amount=0.5)
    expect_error(select, ValueError, "got 3 masks for 4 tensors", tensors, masks[:3], amount=0.5)
    with pytest.raises(TypeError, match="masks are required"):
        threshold.prune_(tensors, None, amount=0.5)


def test_bad_tensors(select):
    tensors, masks = make()
    expect_error(
        select, TypeError, "tensor 1 has dtype torch.float64", [tensors[0], tensors[1].double()], masks[:2], amount=0.5
    )
    expect_error(select, TypeError, "tensor 0 has dtype torch.int64", [torch.arange(4)], None, amount=0.5, write=False)
    mixed = tensors[:2] + [torch.randn(12, device="meta").reshape(2, 2, 3)]
    expect_error(select, ValueError, "tensor 2 is on meta.*mixed devices", mixed, masks[:3], amount=0.5)
    expect_error(select, TypeError, "list or tuple", tensors[0], masks, amount=0.5)
    expect_error(select, TypeError, "tensor 1 is a list", [tensors[0], [1.0]], None, amount=0.5, write=False)


def test_public_api_dispatch_and_fallback(monkeypatch):
    tensors, masks = make()
    expected = [m.clone() for m in masks]
    t_expected, count = threshold._select(tensors, expected, 0.4, None, None, layerwise=False, write=True, impl="torch")
    got = [m.clone() for m in masks]
    assert threshold.prune_(tensors, got, amount=0.4) == (t_expected[0], count)  # C++ when built
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    monkeypatch.setattr(_backend, "ext", lambda: None)  # as when _C is not built: the torch radix path
    got = [m.clone() for m in masks]
    assert threshold.prune_(tensors, got, amount=0.4) == (t_expected[0], count)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    with pytest.raises(RuntimeError, match="needs lthfast._C"):
        threshold._select(tensors, got, 0.4, None, None, layerwise=False, write=True, impl="cpp")
