"""lthfast.indexing.alive: the CSR / CSC of a mask's alive entries equal numpy's nonzero, are cached on the mask,
and are rebuilt whenever the mask changes; through MaskedLinear / MaskedConv2d on the sparse CPU route, a mask
changed between steps (in place, ``.data =``, ``load_state_dict``) gives the float64 oracle's outputs and gradients.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lthfast import reference
from lthfast.indexing import AliveIndex, alive_index
from lthfast.indexing.alive import build_alive_index
from lthfast.nn import MaskedConv2d, MaskedLinear
from lthfast.ops import crossover, sparse_cpu


def _random_mask(shape, density):
    return torch.rand(shape) < density


def _edges(n, k):
    """A mask with an empty and a full row, an empty and a full column where the shape allows."""
    m = _random_mask((n, k), 0.3)
    m[:, 0] = False
    m[0] = False
    if n > 2:
        m[-1] = True
    if k > 2:
        m[1:, -1] = True
    return m


def _assert_matches_numpy(index: AliveIndex, mask2d: torch.Tensor) -> None:
    m = mask2d.numpy()
    n, k = m.shape
    rows, cols = np.nonzero(m)
    ccols, crows = np.nonzero(m.T)
    assert index.shape == (n, k)
    assert index.row_ptr.dtype == torch.int64 and index.col_ptr.dtype == torch.int64
    assert index.cols.dtype == torch.int32 and index.col_rows.dtype == torch.int32
    assert all(t.is_contiguous() for t in (index.row_ptr, index.cols, index.col_ptr, index.col_rows))
    np.testing.assert_array_equal(index.row_ptr.numpy(), np.r_[0, np.cumsum(np.bincount(rows, minlength=n))])
    np.testing.assert_array_equal(index.cols.numpy(), cols)
    np.testing.assert_array_equal(index.col_ptr.numpy(), np.r_[0, np.cumsum(np.bincount(ccols, minlength=k))])
    np.testing.assert_array_equal(index.col_rows.numpy(), crows)
    assert index.nnz == int(m.sum())
    assert index.density == pytest.approx(m.sum() / m.size if m.size else 0.0)


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 1), (7, 33), (65, 300), (300, 17)], ids=str)
@pytest.mark.parametrize("kind", ["sparse", "edges", "single", "pruned", "full"])
def test_csr_and_csc_equal_numpy_nonzero(shape, kind):
    n, k = shape
    if kind == "sparse":
        m = _random_mask(shape, 0.05)
    elif kind == "edges":
        m = _edges(n, k)
    elif kind == "single":
        m = torch.zeros(n * k, dtype=torch.bool)
        m[torch.randint(n * k, ())] = True
        m = m.view(n, k)
    else:
        m = torch.full(shape, kind == "full")
    _assert_matches_numpy(alive_index(m), m)


@pytest.mark.parametrize("view", ["transposed", "strided", "sliced"])
def test_non_contiguous_masks_are_indexed_as_they_read(view):
    base = _random_mask((40, 66), 0.2)
    m = {"transposed": base.t(), "strided": base[:, ::3], "sliced": base[5:30, 7:60]}[view]
    _assert_matches_numpy(alive_index(m), m.contiguous())


def test_conv_masks_are_indexed_as_cout_by_the_rest():
    m = _random_mask((6, 4, 3, 2), 0.3)
    index = alive_index(m)
    _assert_matches_numpy(index, m.reshape(6, -1))
    assert alive_index(m) is index, "cached on the conv mask"
    m[0, 0, 0, 0] = not bool(m[0, 0, 0, 0])
    rebuilt = alive_index(m)
    assert rebuilt is not index
    _assert_matches_numpy(rebuilt, m.reshape(6, -1))


def test_a_channels_last_conv_mask_is_cached():
    m = _random_mask((16, 8, 3, 3), 0.1).contiguous(memory_format=torch.channels_last)
    index = alive_index(m)
    _assert_matches_numpy(index, m.reshape(16, -1))
    assert alive_index(m) is index


def test_cached_until_the_mask_changes():
    m = _random_mask((30, 40), 0.1)
    index = alive_index(m)
    assert alive_index(m) is index, "a second call returns the cached index"
    changes = {
        "setitem": lambda: m.__setitem__((slice(None), 3), True),
        "copy_": lambda: m.copy_(_random_mask((30, 40), 0.1)),
        "data": lambda: setattr(m, "data", _random_mask((30, 40), 0.1)),
        "increment_version": lambda: (m.data.__setitem__((0, 0), not bool(m[0, 0])),
                                      torch.autograd.graph.increment_version(m)),
    }  # fmt: skip
    for name, change in changes.items():
        change()
        rebuilt = alive_index(m)
        assert rebuilt is not index, f"{name}: the index must be rebuilt"
        _assert_matches_numpy(rebuilt, m)
        assert alive_index(m) is rebuilt, f"{name}: and cached again"
        index = rebuilt


def test_inference_masks_are_indexed_every_time():
    with torch.inference_mode():
        m = _random_mask((9, 13), 0.3)
    _assert_matches_numpy(alive_index(m), m)
    m2 = m.clone()  # the same contents, fine outside inference mode
    _assert_matches_numpy(alive_index(m2), m)


@pytest.mark.parametrize(
    "mask", [torch.ones(3, 4, 5, dtype=torch.bool), torch.ones(3, 4, dtype=torch.uint8), torch.ones(4)], ids=str
)
def test_build_refuses_what_it_cannot_index(mask):
    with pytest.raises(ValueError, match="alive index needs a 2-D bool CPU mask"):
        build_alive_index(mask)


# ------------------------------------------------------------------------------------------------ the layers

needs_kernels = pytest.mark.skipif(not sparse_cpu.available(), reason="lthfast._C has no sparse kernels")


@pytest.fixture
def sparse_route(monkeypatch):
    """Every float32 call at a density up to 0.1 takes the sparse route (the measured crossover set aside); the
    route's calls counted."""
    monkeypatch.setattr(crossover, "linear_limit", lambda *args: 0.1)
    monkeypatch.setattr(crossover, "conv_limit", lambda *args: 0.1)
    counts = {"linear": 0, "conv": 0}
    for name, kind in (("linear_forward", "linear"), ("conv_forward", "conv")):
        real = getattr(sparse_cpu, name)

        def counted(*args, _real=real, _kind=kind, **kwargs):
            counts[_kind] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(sparse_cpu, name, counted)
    return counts


def _step_and_check(layer, x):
    """One forward + backward of ``layer`` against float64 with its current mask; dW exactly zero where pruned."""
    layer.zero_grad()
    x = x.detach().requires_grad_()
    y = layer(x)
    grad = torch.randn(y.shape)
    y.backward(grad)
    leaves = [t.detach().double().requires_grad_() for t in (x, layer.weight, layer.bias)]
    w = reference.masked_weight(leaves[1], layer.mask)
    if isinstance(layer, MaskedLinear):
        ref = F.linear(leaves[0], w, leaves[2])
    else:
        ref = F.conv2d(leaves[0], w, leaves[2], layer.stride, layer.padding, layer.dilation, layer.groups)
    ref.backward(grad.double())
    scale = max(1.0, ref.abs().max().item())
    for name, got, want in (("y", y, ref), ("dX", x.grad, leaves[0].grad), ("dW", layer.weight.grad, leaves[1].grad)):
        torch.testing.assert_close(got.double(), want, atol=1e-5 * scale, rtol=1e-5, msg=lambda s, n=name: f"{n}: {s}")
    assert bool((layer.weight.grad[~layer.mask] == 0).all()), "dW must be exactly zero where the mask is False"


def _layer(kind):
    if kind == "linear":
        return MaskedLinear(300, 40), torch.randn(17, 300)
    return MaskedConv2d(8, 16, 3, padding=1), torch.randn(9, 8, 6, 7)


def _change(layer, how, new):
    if how == "setitem":  # prune the alive entries the new mask drops, revive the ones it adds
        layer.mask[layer.mask & ~new] = False
        layer.mask[new] = True
    elif how == "copy_":
        layer.mask.copy_(new)
    elif how == "data":
        layer.mask.data = new.clone()
    else:
        state = layer.state_dict()
        state["mask"] = new
        layer.load_state_dict(state)


@needs_kernels
@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("how", ["setitem", "copy_", "data", "load_state_dict"])
def test_a_mask_changed_between_steps_is_followed(sparse_route, kind, how):
    layer, x = _layer(kind)
    layer.set_mask_(_random_mask(layer.weight.shape, 0.05))
    _step_and_check(layer, x)
    index = alive_index(layer.mask)
    new = _random_mask(layer.weight.shape, 0.05)
    assert bool((new & ~layer.mask).any()) and bool((layer.mask & ~new).any()), "the new mask prunes and revives"
    _change(layer, how, new)
    assert torch.equal(layer.mask, new)
    _step_and_check(layer, x)
    rebuilt = alive_index(layer.mask)
    assert rebuilt is not index, "the alive index must be rebuilt for the new mask"
    _assert_matches_numpy(rebuilt, new.reshape(new.shape[0], -1))
    assert sparse_route[kind] == 2, "both steps must run the sparse route"
    _change(layer, "copy_", torch.ones_like(new))  # a dense mask: the route follows the density too
    _step_and_check(layer, x)
    assert sparse_route[kind] == 2, "a full mask must not run the sparse route"


@needs_kernels
def test_two_data_swaps_between_steps_are_followed(sparse_route):
    for _ in range(20):  # whether a freed storage is handed out again depends on the heap: a few tries
        layer, x = _layer("linear")
        layer.set_mask_(_random_mask(layer.weight.shape, 0.05))
        _step_and_check(layer, x)
        first = layer.mask.data_ptr()
        layer.mask.data = _random_mask(layer.weight.shape, 0.05)  # the first storage is freed here
        held = [torch.empty(layer.weight.shape, dtype=torch.bool) for _ in range(8)]
        reused = [t for t in held if t.data_ptr() == first]
        if reused:
            break
    else:
        pytest.skip("the allocator did not hand out the freed mask storage again")
    new = reused[0].copy_(_random_mask(layer.weight.shape, 0.05))
    layer.mask.data = new
    _assert_matches_numpy(alive_index(layer.mask), new)
    _step_and_check(layer, x)
