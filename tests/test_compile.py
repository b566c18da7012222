"""torch.compile of models with MaskedLinear and MaskedConv2d: one graph, no graph breaks (torch._dynamo.explain),
compiled results equal to eager ones, in-place mask changes seen without recompiling.

The masked ops are torch.library custom ops with fake implementations, so dynamo records each as one opaque node;
the tile-index cache and the CPU block path's thread pool live inside the ops' real implementations, out of
dynamo's sight. Inductor's first compile costs ~30 s cold on the 2-core CI machine, so one test uses it (the
``--compile`` path of the IMP driver) and the others use dynamo alone or aot_eager.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lthfast.bench.masks import block_mask
from lthfast.nn import MaskedConv2d, MaskedLinear
from lthfast.ops import linear_torch


class Net(nn.Module):
    """Two masked convolutions (one strided), a masked linear and a large block-sparse masked linear."""

    def __init__(self, device=None) -> None:
        super().__init__()
        self.c1 = MaskedConv2d(3, 4, 3, padding=1, device=device)
        self.c2 = MaskedConv2d(4, 6, 3, stride=2, device=device)
        self.fc = MaskedLinear(6 * 2 * 2, 512, device=device)
        self.out = MaskedLinear(512, 10, device=device)
        for layer in (self.c1, self.c2, self.fc, self.out):
            layer.set_mask_(torch.rand(layer.weight.shape, device=device) < 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.c2(F.relu(self.c1(x)))).flatten(1)
        return self.out(F.relu(self.fc(x)))


def _step(model, x, y):
    return F.cross_entropy(model(x), y)


def _grads(model, x, y):
    model.zero_grad(set_to_none=True)
    loss = _step(model, x, y)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def _assert_same(eager, compiled, tol):
    (loss_e, grads_e), (loss_c, grads_c) = eager, compiled
    torch.testing.assert_close(loss_c, loss_e, **tol)
    for g_e, g_c in zip(grads_e, grads_c):
        torch.testing.assert_close(g_c, g_e, **tol)


@pytest.mark.parametrize("amp", [False, True])
def test_no_graph_breaks(amp):
    model = Net()
    x, y = torch.randn(4, 3, 6, 6), torch.randint(0, 10, (4,))

    def step(x, y):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            return _step(model, x, y)

    explained = torch._dynamo.explain(step)(x, y)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    ops = [str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert sum("lthfast.masked_conv2d" in op for op in ops) == 2 and sum("masked_linear_fwd" in op for op in ops) == 2


def test_inductor_fullgraph_matches_eager_and_follows_mask_changes(monkeypatch):
    monkeypatch.setattr(linear_torch, "CPU_MIN_MACS", 0)  # let the block path take this small layer
    torch._dynamo.reset()
    model = Net()
    x, y = torch.randn(64, 3, 6, 6), torch.randint(0, 10, (64,))
    assert linear_torch.plan(model.fc.mask, 64) is None  # 50% unstructured: every tile alive, dense path
    compiled = torch.compile(model, fullgraph=True)
    tol = {"atol": 1e-5, "rtol": 1e-4}  # inductor fuses the elementwise ops around the custom ops (float32)
    _assert_same(_grads(model, x, y), _grads(compiled, x, y), tol)
    # A new mask written in place: the compiled graph reads the buffer, and the ops' tile-index cache follows
    # the mask's version counter. The second mask makes fc block-sparse, so the CPU block path runs inside.
    with torch.no_grad():
        model.fc.set_mask_(block_mask(512, 24, 0.9, 32))
        model.fc.apply_mask_()
    assert linear_torch.plan(model.fc.mask, 64) is not None
    with torch.compiler.set_stance("fail_on_recompile"):
        compiled_result = _grads(compiled, x, y)
    _assert_same(_grads(model, x, y), compiled_result, tol)
    assert bool((model.fc.weight.grad[~model.fc.mask] == 0).all())


def test_aot_eager_under_autocast_matches_eager():
    model = Net()
    x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 10, (8,))

    def step(x, y):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _step(model, x, y)

    eager = step(x, y)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x, y)
    assert compiled.dtype == eager.dtype == torch.float32  # cross_entropy runs in float32 under autocast
    torch.testing.assert_close(compiled, eager, atol=0, rtol=0)  # the same aten ops in the same dtypes


@pytest.mark.gpu
def test_gpu_compiled_triton_ops_match_eager(triton_backend):
    torch._dynamo.reset()
    model = Net(device="cuda")
    x, y = torch.randn(64, 3, 6, 6, device="cuda"), torch.randint(0, 10, (64,), device="cuda")
    compiled = torch.compile(model, fullgraph=True)
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    _assert_same(_grads(model, x, y), _grads(compiled, x, y), {"atol": 1e-4, "rtol": 1e-4})
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager_amp = _step(model, x, y)
        compiled_amp = torch.compile(model, fullgraph=True)
        torch.testing.assert_close(_step(compiled_amp, x, y), eager_amp, atol=2e-2, rtol=2e-2)
