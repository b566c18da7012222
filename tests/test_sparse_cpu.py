"""The CPU unstructured sparse route (lthfast.ops.sparse_cpu over lthfast._C's sparse kernels) against the float64
oracle: the kernels called directly, then through masked_linear / masked_conv2d and the layers with a mask sparse
enough for "auto" to take the route (asserted by counting the route's calls), on 1 and 2 threads and every ISA.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from lthfast import _backend, functional, reference
from lthfast.nn import MaskedConv2d, MaskedLinear
from lthfast.ops import crossover, sparse_cpu

pytestmark = pytest.mark.skipif(not sparse_cpu.available(), reason="lthfast._C has no sparse kernels")

# fp32 against float64: (atol, rtol) as tests/test_masked_linear.py; conv error relative to the largest reference
# magnitude, as tests/test_masked_conv.py. fp16/bf16 (the dense route): test_masked_linear.py's table.
LINEAR_TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-4, 1e-5), torch.float16: (1e-3, 1e-3),
              torch.bfloat16: (1e-3, 8e-3)}  # fmt: skip
CONV_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _detected_isa() -> int:
    ext = _backend.ext()
    before = ext.sparse_force_isa(0)
    try:
        return ext.sparse_isa()
    finally:
        ext.sparse_force_isa(before)


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.fixture(params=[4, 8, 16, 0], ids=["baseline", "avx2", "avx512", "auto"])
def isa(request):
    ext, lanes = _backend.ext(), request.param
    if lanes > _detected_isa():
        pytest.skip(f"this CPU's widest sparse kernels have {_detected_isa()} lanes")
    before = ext.sparse_force_isa(lanes)
    try:
        assert ext.sparse_isa() == (lanes or _detected_isa())
        yield lanes
    finally:
        ext.sparse_force_isa(before)


@pytest.fixture
def calls(monkeypatch):
    """Counts the sparse route's entry points (what linear_torch and ops.conv call)."""
    counts = {}
    for name in ("linear_forward", "linear_backward", "conv_forward", "conv_backward"):
        real = getattr(sparse_cpu, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(sparse_cpu, name, counted)
    return counts


@pytest.fixture
def limit(monkeypatch):
    """The route's density limit, set by the test (default 0.1) in place of the measured crossover, so that which
    route a call takes does not depend on the table of the CPU that measured it."""
    value = [0.1]
    monkeypatch.setattr(crossover, "linear_limit", lambda *args: value[0])
    monkeypatch.setattr(crossover, "conv_limit", lambda *args: value[0])
    return value


@pytest.fixture
def no_sparse(monkeypatch):
    """Fails any call into the sparse route."""
    for name in ("linear_forward", "linear_backward", "conv_forward", "conv_backward"):
        monkeypatch.setattr(sparse_cpu, name, lambda *a, _n=name, **k: pytest.fail(f"sparse_cpu.{_n} was called"))


def _mask(shape, kind: str, density: float = 0.15) -> torch.Tensor:
    """A bool mask over ``shape`` (2-D, or a conv weight's [Cout, ...] indexed as [Cout, -1])."""
    n, k = shape[0], math.prod(shape[1:])
    if kind == "full":
        m = torch.ones(n, k, dtype=torch.bool)
    elif kind == "pruned":
        m = torch.zeros(n, k, dtype=torch.bool)
    elif kind == "single":
        m = torch.zeros(n * k, dtype=torch.bool)
        m[torch.randint(n * k, ())] = True
        m = m.view(n, k)
    else:  # exactly floor(density * size) alive, then the edge rows / columns
        m = torch.zeros(n * k, dtype=torch.bool)
        m[torch.randperm(n * k)[: int(density * n * k)]] = True
        m = m.view(n, k)
        if kind == "empty-lines":
            m[0], m[:, 0] = False, False
        elif kind == "full-lines":
            m[-1], m[:, -1] = True, True
    return m.reshape(shape)


def _poisoned(w: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """w with NaN and Inf stored under pruned entries: they must never reach a result."""
    w = w.clone()
    pruned = (~m).nonzero(as_tuple=True)
    w[pruned] = torch.tensor([float("nan"), float("inf"), -float("inf")]).repeat(len(pruned[0]) // 3 + 1)[
        : len(pruned[0])
    ]
    return w


def _close_linear(actual, expected, name, dtype=torch.float32):
    atol, rtol = LINEAR_TOL[dtype]
    assert actual.dtype == dtype and actual.shape == expected.shape, f"{name}: {actual.dtype} {tuple(actual.shape)}"
    torch.testing.assert_close(actual.double(), expected, atol=atol, rtol=rtol, msg=lambda s: f"{name}: {s}")


def _close_conv(actual, expected, name, dtype=torch.float32):
    tol = CONV_TOL[dtype]
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    assert actual.dtype == dtype and actual.shape == expected.shape, f"{name}: {actual.dtype} {tuple(actual.shape)}"
    torch.testing.assert_close(actual.double(), expected, atol=tol * scale, rtol=tol, msg=lambda s: f"{name}: {s}")


def _linear_oracle(x, w, m, b, grad):
    x64, w64, b64 = x.detach().double(), w.detach().double(), None if b is None else b.detach().double()
    y = reference.masked_linear(x64, w64, m, b64)
    return (y, *reference.masked_linear_backward(grad.double(), x64, w64, m, b is not None))


def _conv_oracle(x, w, m, b, grad, stride, padding, dilation, groups):
    """float64 F.conv2d on W*M with (top, bottom, left, right) padding: (y, dX, dW, db)."""
    top, bottom, left, right = padding
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in (x, w, b)]
    xp = F.pad(leaves[0], (left, right, top, bottom))
    y = F.conv2d(xp, torch.where(m, leaves[1], 0), leaves[2], stride, 0, dilation, groups)
    y.backward(grad.double())
    return y.detach(), leaves[0].grad, leaves[1].grad, None if b is None else leaves[2].grad


def _layout(t: torch.Tensor, how: str) -> torch.Tensor:
    """t's values in another memory layout: transposed storage, a strided slice, or (rows equal) an expansion."""
    if how == "transposed":
        return t.t().contiguous().t()
    if how == "strided":
        wide = torch.randn(t.shape[0], 2 * t.shape[1])
        wide[:, ::2] = t
        return wide[:, ::2]
    if how == "expanded":
        return t[:1].expand_as(t)
    return t


# ------------------------------------------------------------------------------------------------ linear kernels

LINEAR_SHAPES = [(1, 7, 33), (3, 65, 1), (17, 1, 300), (60, 33, 65), (5, 300, 7), (60, 300, 784)]


@pytest.mark.parametrize("m_rows,n,k", LINEAR_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("kind", ["sparse", "empty-lines", "full-lines", "single", "pruned", "full"])
def test_linear_kernels_match_float64(m_rows, n, k, kind):
    mask = _mask((n, k), kind, density=0.02 if n * k > 10**5 else 0.15)
    x, w, b, grad = torch.randn(m_rows, k), _poisoned(torch.randn(n, k), mask), torch.randn(n), torch.randn(m_rows, n)
    y = sparse_cpu.linear_forward(x, w, mask, b)
    dx, dw = sparse_cpu.linear_backward(grad, x, w, mask, True, True)
    ref_y, ref_dx, ref_dw, _ = _linear_oracle(x, w, mask, b, grad)
    _close_linear(y, ref_y, "y")
    _close_linear(dx, ref_dx, "dX")
    _close_linear(dw, ref_dw, "dW")
    assert bool((dw[~mask] == 0).all()), "dW must be exactly zero where the mask is False"
    assert sparse_cpu.linear_backward(grad, x, w, mask, False, False) == (None, None)


@pytest.mark.parametrize("x_layout", ["contiguous", "transposed", "strided", "expanded"])
@pytest.mark.parametrize("grad_layout", ["transposed", "strided", "expanded"])
def test_linear_kernels_take_any_strides(x_layout, grad_layout):
    mask = _mask((33, 65), "sparse", 0.1)
    x, grad = _layout(torch.randn(17, 65), x_layout), _layout(torch.randn(17, 33), grad_layout)
    w = torch.randn(65, 33).t()  # a non-contiguous weight
    y = sparse_cpu.linear_forward(x, w, mask, None)
    dx, dw = sparse_cpu.linear_backward(grad, x, w, mask, True, True)
    ref_y, ref_dx, ref_dw, _ = _linear_oracle(x, w, mask, None, grad)
    for name, got, ref in (("y", y, ref_y), ("dX", dx, ref_dx), ("dW", dw, ref_dw)):
        _close_linear(got, ref, name)


def test_every_isa_and_thread_count_agrees_with_float64(isa, threads):
    """LeNet-300-100's first layer at 2% (large enough to split over 2 threads) and a conv, on each ISA."""
    mask = _mask((300, 784), "sparse", 0.02)
    x, w, b, grad = torch.randn(60, 784), torch.randn(300, 784), torch.randn(300), torch.randn(60, 300)
    got = (sparse_cpu.linear_forward(x, w, mask, b), *sparse_cpu.linear_backward(grad, x, w, mask, True, True))
    for name, a, e in zip(("y", "dX", "dW"), got, _linear_oracle(x, w, mask, b, grad)):
        _close_linear(a, e, name)
    _conv_direct(*CONV_CASES["3x3-batch20"], "sparse", torch.contiguous_format)
    _conv_direct(*CONV_CASES["3x2-s12-asym-g2"], "empty-lines", torch.channels_last)


# ------------------------------------------------------------------------------------------------ conv kernels

CONV_CASES = {  # batch, Cin, Cout, (H, W), (kh, kw), stride, padding (top, bottom, left, right), dilation, groups
    "3x3-p1": (3, 5, 7, (9, 11), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
    "1x1-s2": (1, 4, 6, (8, 7), (1, 1), (2, 2), (0, 0, 0, 0), (1, 1), 1),
    "3x2-s12-asym-g2": (17, 6, 4, (7, 9), (3, 2), (1, 2), (2, 0, 1, 3), (1, 1), 2),
    "3x3-s21-d21-depthwise": (2, 6, 6, (10, 10), (3, 3), (2, 1), (1, 2, 0, 1), (2, 1), 6),
    "3x3-d12": (5, 3, 8, (5, 6), (3, 3), (1, 1), (0, 0, 0, 0), (1, 2), 1),
    "3x3-batch20": (20, 16, 16, (9, 9), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
}


def _conv_direct(b, cin, cout, hw, kernel, stride, padding, dilation, groups, kind, fmt, bias=True):
    x = torch.randn(b, cin, *hw).contiguous(memory_format=fmt)
    mask = _mask((cout, cin // groups, *kernel), kind)
    w = _poisoned(torch.randn(cout, cin // groups, *kernel), mask)
    bias_t = torch.randn(cout) if bias else None
    y = sparse_cpu.conv_forward(x, w, mask, bias_t, stride, padding, dilation, groups, fmt)
    grad = torch.randn(y.shape)
    dx, dw = sparse_cpu.conv_backward(grad, x, w, mask, stride, padding, dilation, groups, True, True)
    ref_y, ref_dx, ref_dw, _ = _conv_oracle(x, w, mask, bias_t, grad, stride, padding, dilation, groups)
    _close_conv(y, ref_y, "y")
    _close_conv(dx, ref_dx, "dX")
    _close_conv(dw, ref_dw, "dW")
    assert bool((dw[~mask] == 0).all()), "dW must be exactly zero where the mask is False"


@pytest.mark.parametrize("case", CONV_CASES, ids=list(CONV_CASES))
@pytest.mark.parametrize(
    "kind,fmt",
    [("sparse", "nchw"), ("sparse", "channels_last"), ("empty-lines", "channels_last"), ("full-lines", "nchw"),
     ("single", "channels_last"), ("pruned", "nchw"), ("full", "channels_last")],
)  # fmt: skip
def test_conv_kernels_match_float64(case, kind, fmt):
    fmt = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    _conv_direct(*CONV_CASES[case], kind, fmt, bias=kind != "single")


def test_linear_kernel_results_are_contiguous():
    mask, x, w = _mask((65, 33), "sparse"), torch.randn(17, 33), torch.randn(65, 33)
    y = sparse_cpu.linear_forward(x, w, mask, None)
    dx = sparse_cpu.linear_backward(torch.randn(17, 65), x, w, mask, True, False)[0]
    assert y.is_contiguous() and dx.is_contiguous(), (y.stride(), dx.stride())


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_conv_kernel_results_have_the_documented_layout(fmt):
    mask, w, conv = _mask((16, 16, 3, 3), "sparse"), torch.randn(16, 16, 3, 3), ((1, 1), (1, 1, 1, 1), (1, 1), 1)
    x = torch.randn(20, 16, 9, 9).contiguous(memory_format=fmt)
    y = sparse_cpu.conv_forward(x, w, mask, None, *conv, fmt)
    dx = sparse_cpu.conv_backward(torch.randn(y.shape), x, w, mask, *conv, True, False)[0]
    assert y.is_contiguous(memory_format=fmt) and dx.is_contiguous(memory_format=fmt), (y.stride(), dx.stride())


# ------------------------------------------------------------------------------------------------ public linear


@pytest.mark.parametrize("batch", [1, 3, 17, 60])
@pytest.mark.parametrize("bias", [True, False])
def test_masked_linear_takes_the_sparse_route(calls, limit, batch, bias):
    mask = _mask((65, 33), "sparse", 0.02)
    x = torch.randn(batch, 33, requires_grad=True)
    assert sparse_cpu.use_linear(x, mask), "the mask must be below the crossover for this test"
    w = _poisoned(torch.randn(65, 33), mask).requires_grad_()
    b = torch.randn(65, requires_grad=True) if bias else None
    y = functional.masked_linear(x, w, mask, b)
    grad = torch.randn_like(y)
    y.backward(grad)
    assert calls.get("linear_forward") == 1 and calls.get("linear_backward", 0) >= 1, calls
    ref_y, ref_dx, ref_dw, ref_db = _linear_oracle(x, w, mask, b, grad)
    for name, got, ref in (("y", y, ref_y), ("dX", x.grad, ref_dx), ("dW", w.grad, ref_dw)):
        _close_linear(got, ref, name)
    if bias:
        _close_linear(b.grad, ref_db, "db")
    assert bool((w.grad[~mask] == 0).all())


@pytest.mark.parametrize("x_layout", ["transposed", "strided", "expanded-leaf"])
def test_masked_linear_non_contiguous_inputs_and_gradients(calls, limit, x_layout):
    mask = _mask((7, 300), "sparse", 0.02)
    if x_layout == "expanded-leaf":  # one sample broadcast over the batch: its gradient sums the rows
        leaf = torch.randn(1, 300, requires_grad=True)
        x = leaf.expand(17, 300)
    else:
        leaf = _layout(torch.randn(17, 300), x_layout).requires_grad_()
        x = leaf
    w = torch.randn(300, 7).t().requires_grad_()  # a non-contiguous leaf weight
    y = functional.masked_linear(x, w, mask)
    grad = torch.randn(1, 7).expand(17, 7)  # an expanded output gradient
    y.backward(grad)
    assert calls.get("linear_forward") == 1 and calls.get("linear_backward", 0) >= 1, calls
    ref_y, ref_dx, ref_dw, _ = _linear_oracle(x, w, mask, None, grad)
    ref_dx = ref_dx.sum(0, keepdim=True) if x_layout == "expanded-leaf" else ref_dx
    for name, got, ref in (("y", y, ref_y), ("dX", leaf.grad, ref_dx), ("dW", w.grad, ref_dw)):
        _close_linear(got, ref, name)


def test_masked_linear_layer_steps_and_reads_new_weights(calls, limit):
    """MaskedLinear on a 3-D input: forward, backward, an SGD step, and a second forward with the stepped weights."""
    layer = MaskedLinear(300, 33)
    layer.set_mask_(_mask((33, 300), "sparse", 0.02))
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    for step in range(2):
        x = torch.randn(2, 3, 300, requires_grad=True)
        w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
        opt.zero_grad()
        y = layer(x)
        grad = torch.randn_like(y)
        y.backward(grad)
        ref_y, ref_dx, ref_dw, ref_db = _linear_oracle(x, w, layer.mask, b, grad)
        for name, got, ref in (("y", y, ref_y), ("dX", x.grad, ref_dx), ("dW", layer.weight.grad, ref_dw)):
            _close_linear(got, ref, f"step {step} {name}")
        _close_linear(layer.bias.grad, ref_db, "db")
        opt.step()
    assert calls.get("linear_forward") == 2 and calls.get("linear_backward", 0) >= 2, calls


def test_masked_linear_full_mask_forced_through_the_api(calls, limit):
    limit[0] = 1.0
    mask = _mask((33, 65), "full")
    x, w = torch.randn(3, 65, requires_grad=True), torch.randn(33, 65, requires_grad=True)
    y = functional.masked_linear(x, w, mask)
    grad = torch.randn_like(y)
    y.backward(grad)
    assert calls.get("linear_forward") == 1, calls
    ref_y, ref_dx, ref_dw, _ = _linear_oracle(x, w, mask, None, grad)
    for name, got, ref in (("y", y, ref_y), ("dX", x.grad, ref_dx), ("dW", w.grad, ref_dw)):
        _close_linear(got, ref, name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_dtypes_never_take_the_sparse_route(no_sparse, limit, dtype):
    limit[0] = 1.0
    mask = _mask((33, 65), "sparse", 0.02)
    x = torch.randn(60, 65).to(dtype).requires_grad_()
    assert not sparse_cpu.use_linear(x, mask)
    w, b = torch.randn(33, 65).to(dtype).requires_grad_(), torch.randn(33).to(dtype).requires_grad_()
    y = functional.masked_linear(x, w, mask, b)
    grad = torch.randn_like(y)
    y.backward(grad)
    ref = _linear_oracle(x, w, mask, b, grad)
    for name, got, r in zip(("y", "dX", "dW", "db"), (y, x.grad, w.grad, b.grad), ref):
        _close_linear(got, r, name, dtype)
    xc = torch.randn(17, 4, 6, 6).to(dtype)
    cmask = _mask((8, 4, 3, 3), "sparse", 0.02)
    assert not sparse_cpu.use_conv(xc, cmask, 1)
    wc = torch.randn(8, 4, 3, 3).to(dtype)
    ref_c = F.conv2d(xc.double(), torch.where(cmask, wc.double(), 0), padding=1)
    _close_conv(functional.masked_conv2d(xc, wc, cmask, padding=1), ref_c, "conv y", dtype)


def test_gradcheck_float64_public_ops_at_sparse_route_densities(no_sparse, limit):
    limit[0] = 1.0
    """float64 goes to the torch path even at a density the fp32 route takes: gradcheck the public ops there."""
    mask = _mask((7, 9), "sparse", 0.05)
    x, w, b = (torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((5, 9), (7, 9), (7,)))
    assert torch.autograd.gradcheck(lambda x, w, b: functional.masked_linear(x, w, mask, b), (x, w, b))
    cmask = _mask((4, 3, 3, 2), "sparse", 0.1)
    xc, wc, bc = (torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((8, 3, 5, 4), (4, 3, 3, 2), (4,)))

    def conv(x, w, b):
        return functional.masked_conv2d(x, w, cmask, b, stride=(1, 2), padding=1, dilation=(2, 1))

    assert torch.autograd.gradcheck(conv, (xc, wc, bc), fast_mode=True)


# ------------------------------------------------------------------------------------------------ public conv

PUBLIC_CONV = {  # batch, Cin, Cout, (H, W), kernel, conv kwargs
    "3x3-p1": (17, 8, 16, (7, 9), (3, 3), {"padding": 1}),
    "1x1-s2": (8, 16, 8, (8, 7), (1, 1), {"stride": 2}),
    "3x2-same": (8, 6, 10, (6, 7), (3, 2), {"padding": "same"}),
    "3x3-s12-d2": (9, 5, 12, (9, 10), (3, 3), {"stride": (1, 2), "padding": (2, 1), "dilation": 2}),
    "3x3-g2": (8, 8, 12, (6, 6), (3, 3), {"padding": 1, "groups": 2}),
    "3x3-depthwise": (33, 12, 12, (5, 6), (3, 3), {"padding": 1, "groups": 12}),
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("case", PUBLIC_CONV, ids=list(PUBLIC_CONV))
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_masked_conv2d_takes_the_sparse_route(calls, limit, case, fmt):
    b, cin, cout, hw, kernel, conv = PUBLIC_CONV[case]
    groups = conv.get("groups", 1)
    x = torch.randn(b, cin, *hw).contiguous(memory_format=fmt).requires_grad_()
    mask = _mask((cout, cin // groups, *kernel), "sparse", 0.05)
    assert sparse_cpu.use_conv(x, mask, groups), "the mask must be below the crossover for this test"
    w = _poisoned(torch.randn(cout, cin // groups, *kernel), mask).requires_grad_()
    bias = torch.randn(cout, requires_grad=True) if fmt == torch.contiguous_format else None
    y = functional.masked_conv2d(x, w, mask, bias, **conv)
    grad = torch.randn(y.shape)
    y.backward(grad)
    assert calls.get("conv_forward") == 1 and calls.get("conv_backward", 0) >= 1, calls
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in (x, w, bias)]
    ref_y = F.conv2d(leaves[0], torch.where(mask, leaves[1], 0), leaves[2], **conv)
    ref_y.backward(grad.double())
    _close_conv(y, ref_y, "y")
    for name, got, ref in zip(("dX", "dW", "db"), (x.grad, w.grad, None if bias is None else bias.grad), leaves):
        if got is not None:
            _close_conv(got, ref.grad, name)
    assert bool((w.grad[~mask] == 0).all()), "dW must be exactly zero where the mask is False"
    assert y.is_contiguous(memory_format=fmt) and x.grad.is_contiguous(memory_format=fmt)


def test_masked_conv2d_unbatched_input(calls, limit):
    x = torch.randn(5, 7, 6, requires_grad=True)
    mask = _mask((9, 5, 3, 3), "sparse", 0.1)
    w, b = torch.randn(9, 5, 3, 3, requires_grad=True), torch.randn(9, requires_grad=True)
    y = functional.masked_conv2d(x, w, mask, b, padding=1)
    grad = torch.randn(y.shape)
    y.backward(grad)
    assert y.shape == (9, 7, 6) and calls.get("conv_forward") == 1, calls
    ref_y, ref_dx, ref_dw, ref_db = _conv_oracle(x[None], w, mask, b, grad[None], (1, 1), (1,) * 4, (1, 1), 1)
    for name, got, ref in (
        ("y", y, ref_y[0]),
        ("dX", x.grad, ref_dx[0]),
        ("dW", w.grad, ref_dw),
        ("db", b.grad, ref_db),
    ):
        _close_conv(got, ref, name)


@pytest.mark.parametrize("channels_last", [False, True])
def test_masked_conv2d_layer(calls, limit, channels_last):
    layer = MaskedConv2d(8, 16, 3, padding=1, stride=(2, 1))
    layer.set_mask_(_mask(tuple(layer.weight.shape), "sparse", 0.05))
    x = torch.randn(17, 8, 9, 7, requires_grad=True)
    if channels_last:  # as model.to(memory_format=torch.channels_last) leaves it: weight and mask too
        layer = layer.to(memory_format=torch.channels_last)
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    y = layer(x)
    grad = torch.randn(y.shape)
    y.backward(grad)
    assert calls.get("conv_forward") == 1 and calls.get("conv_backward", 0) >= 1, calls
    ref = _conv_oracle(x, layer.weight, layer.mask, layer.bias, grad, (2, 1), (1,) * 4, (1, 1), 1)
    for name, got, r in zip(("y", "dX", "dW", "db"), (y, x.grad, layer.weight.grad, layer.bias.grad), ref):
        _close_conv(got, r, name)
    assert bool((layer.weight.grad[~layer.mask] == 0).all())


# ------------------------------------------------------------------------------------------------ the bindings


def test_bindings_refuse_bad_sizes():
    ext = _backend.ext()
    buf = torch.zeros(1 << 16)  # every buffer large enough that a missing check reads garbage, not unmapped memory
    ptr, idx = torch.zeros(64, dtype=torch.int64), torch.zeros(64, dtype=torch.int32)
    p, i, f = ptr.data_ptr(), idx.data_ptr(), buf.data_ptr()
    rows = dict(a=f, lda=16, rows=2, ptr=p, idx=i, w=f, w_outer=1, w_inner=1, bias=0, c=f, ldc=16, lanes=16, threads=1)
    ext.sparse_rows(**rows)  # the valid call each refusal below departs from
    for bad in ({"lanes": 8}, {"lanes": 0}, {"lanes": 24, "lda": 32, "ldc": 32}, {"lda": 8}, {"ldc": 24},
                {"rows": -1}, {"ptr": 0}, {"c": 0}):  # fmt: skip
        with pytest.raises(ValueError, match="sparse_rows"):
            ext.sparse_rows(**{**rows, **bad})
    gw = dict(dy=f, ldd=16, x=f, ldx=16, rows=2, ptr=p, idx=i, dw=f, ldw=4, lanes=16, threads=1)
    ext.sparse_grad_weight(**gw)
    for bad in ({"lanes": 4}, {"ldd": 8}, {"ldx": 20}, {"rows": -1}, {"ptr": 0}, {"dw": 0}):
        with pytest.raises(ValueError, match="sparse_grad_weight"):
            ext.sparse_grad_weight(**{**gw, **bad})
    conv = dict(kind=0, x=f, h=5, w=5, y=f, oh=3, ow=3, cout=2, cin_g=1, cout_g=2, kh=3, kw=3, sh=1, sw=1, dh=1,
                dw=1, ptr=p, idx=i, weight=f, bias=0, lanes=16, out=f, threads=1)  # fmt: skip
    ext.sparse_conv(**conv)
    for bad in ({"kind": 3}, {"kind": -1}, {"lanes": 8}, {"cout": 0}, {"cout_g": 3}, {"kh": 0}, {"sh": 0},
                {"dw": 0}, {"oh": 4}, {"ow": 4}, {"dh": 2}, {"ptr": 0}, {"y": 0}):  # fmt: skip
        with pytest.raises(ValueError, match="sparse_conv"):
            ext.sparse_conv(**{**conv, **bad})
    before = ext.sparse_force_isa(0)
    try:
        for bad in (1, 5, 32, -8):
            with pytest.raises(ValueError, match="lanes"):
                ext.sparse_force_isa(bad)
        assert ext.sparse_isa() == _detected_isa(), "a refused setting must not change the ISA"
    finally:
        ext.sparse_force_isa(before)
