"""MaskedSGD / MaskedAdam / MaskedAdamW: torch's numbers on the alive weights, pruned weights and state exactly zero.

The fused kernel performs torch's single-tensor float32 operations in torch's order (an FMA where ATen uses one,
torch's own square root), so weights and state are compared with torch's for equality, not closeness. The reference
is torch's optimizer (foreach=False) under ``mask_optimizer``.
"""

import copy

import pytest
import torch
from prune_models import ConvNet, image_batch, tie_free_
from torch import nn
from torch.nn.utils import prune as torch_prune

import lthfast
from lthfast import _backend
from lthfast.pruning import fused_optim

HAS_KERNEL = _backend.ext_loaded() and hasattr(_backend.ext(), "adam_step")
needs_kernel = pytest.mark.skipif(not HAS_KERNEL, reason="lthfast._C without the fused optimizer kernels")

CASES = {
    "sgd": (lthfast.MaskedSGD, torch.optim.SGD, {"lr": 1e-3, "weight_decay": 1e-2}),
    "momentum": (lthfast.MaskedSGD, torch.optim.SGD, {"lr": 1e-3, "momentum": 0.9, "dampening": 0.1}),
    "nesterov-max": (
        lthfast.MaskedSGD,
        torch.optim.SGD,
        {"lr": 1e-3, "momentum": 0.8, "nesterov": True, "weight_decay": 1e-2, "maximize": True},
    ),
    "adam": (lthfast.MaskedAdam, torch.optim.Adam, {"lr": 1e-2}),
    "adam-wd-amsgrad": (lthfast.MaskedAdam, torch.optim.Adam, {"lr": 1e-2, "weight_decay": 1e-2, "amsgrad": True}),
    "adam-max-beta": (lthfast.MaskedAdam, torch.optim.Adam, {"lr": 1e-2, "betas": (0.3, 0.9), "maximize": True}),
    "adamw-amsgrad": (lthfast.MaskedAdamW, torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True}),
}


@torch.no_grad()
def convnet() -> nn.Module:
    """ConvNet (odd shapes: conv 8x3x3x3 and 16x8x3x3, Linear 144->32 and 32->10), tie-free weights scaled by
    1 / sqrt(fan-in) so that training does not diverge."""
    model = tie_free_(ConvNet())
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            m.weight.mul_(m.weight[0].numel() ** -0.5)
    return model


def masked_convnet(density: float) -> nn.Module:
    """``convnet()`` sparsified, masked at random at ``density``."""
    model = lthfast.sparsify(convnet())
    for m in model.modules():
        if isinstance(m, (lthfast.nn.MaskedLinear, lthfast.nn.MaskedConv2d)):
            m.set_mask_(torch.rand(m.mask.shape) < density)
            m.apply_mask_()
    return model


def pair(case: str, density: float = 0.3):
    """(fused model, MaskedX), (reference model, torch's X under mask_optimizer): the same weights."""
    fused_cls, torch_cls, kwargs = CASES[case]
    model = masked_convnet(density)
    ref = copy.deepcopy(model)
    ref_opt = torch_cls(ref.parameters(), foreach=False, **kwargs)
    lthfast.mask_optimizer(ref_opt, ref)
    return (model, fused_cls(model.parameters(), model=model, foreach=False, **kwargs)), (ref, ref_opt)


def train(*runs, steps: int = 1, seed: int = 0, extra=None) -> None:
    """``steps`` steps of every (model, optimizer) on the same batches; ``extra(model)`` is added to the loss."""
    for s in range(steps):
        torch.manual_seed(seed * 1000 + s)
        x = image_batch()
        for model, opt in runs:
            opt.zero_grad()
            loss = model(x.to(next(model.parameters()))).square().mean()
            if extra is not None:
                loss = loss + extra(model)
            loss.backward()
            opt.step()


def assert_same(a, b) -> None:
    (model_a, opt_a), (model_b, opt_b) = a, b
    for (name, pa), pb in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(pa, pb) and bool(pa.isfinite().all()), name
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert sa.keys() == sb.keys(), name
        for key in sa:
            assert torch.equal(sa[key], sb[key]), (name, key)


def assert_pruned_plus_zero(model, opt) -> None:
    """Pruned weights and every weight-shaped state tensor are +0.0, bit for bit."""
    for name, m in model.named_modules():
        if isinstance(m, (lthfast.nn.MaskedLinear, lthfast.nn.MaskedConv2d)):
            pruned = ~m.mask
            for key, t in [("weight", m.weight.detach()), *opt.state[m.weight].items()]:
                if t.shape == m.weight.shape:
                    assert not bool(t.view(torch.int32)[pruned].any()), (name, key)


@pytest.mark.parametrize("density", [0.02, 0.5, 1.0])  # gathered at alive offsets, masked dense, full mask
@pytest.mark.parametrize("case", list(CASES))
def test_matches_torch(case, density):
    fused, ref = pair(case, density)
    train(fused, ref, steps=6)
    assert_same(fused, ref)
    assert_pruned_plus_zero(*fused)


@needs_kernel
def test_the_kernel_steps_everything_in_one_call(monkeypatch):
    fused, ref = pair("adam")
    calls = []
    real = _backend.ext()

    class Spy:
        def __getattr__(self, name):
            return getattr(real, name)

        def adam_step(self, *args):
            calls.append(len(args[2]))
            return real.adam_step(*args)

    monkeypatch.setattr(_backend, "ext", lambda: Spy())
    train(fused, ref, steps=3)
    assert calls == [8, 8, 8]  # 4 weights and 4 biases, one call per step
    assert_same(fused, ref)


@needs_kernel
@pytest.mark.parametrize("case", ["nesterov-max", "adam-wd-amsgrad"])
def test_scalar_kernels_agree(case):
    fused, ref = pair(case)
    previous = _backend.ext().optim_vector_kernels(False)
    try:
        train(fused, ref, steps=4)
    finally:
        _backend.ext().optim_vector_kernels(previous)
    assert_same(fused, ref)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", ["momentum", "adamw-amsgrad"])
def test_large_layers_on_threads(case, threads):
    """Enough alive entries (> 64k) to split over threads, in both modes (20% gathered, 60% masked dense)."""
    fused_cls, torch_cls, kwargs = CASES[case]
    model = lthfast.sparsify(nn.Sequential(nn.Linear(1023, 517), nn.ReLU(), nn.Linear(517, 257)))
    model[0].set_mask_(torch.rand(517, 1023) < 0.2)
    model[2].set_mask_(torch.rand(257, 517) < 0.6)
    for m in (model[0], model[2]):
        m.apply_mask_()
    ref = copy.deepcopy(model)
    runs = [(model, fused_cls(model.parameters(), model=model, **kwargs))]
    runs.append((ref, torch_cls(ref.parameters(), foreach=False, **kwargs)))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(3):
            x = torch.randn(9, 1023)
            for m, opt in runs:
                opt.zero_grad()
                m(x).square().mean().backward()
                opt.step()
    finally:
        torch.set_num_threads(before)
    assert_same(*runs)


def test_float64_run_bounds_the_drift():
    model = masked_convnet(0.1)
    ref = copy.deepcopy(model).double()
    runs = [(model, lthfast.MaskedAdam(model.parameters(), lr=1e-3, model=model))]
    runs.append((ref, lthfast.MaskedAdam(ref.parameters(), lr=1e-3, model=ref)))  # float64: torch's own step
    for _ in range(5):
        x = image_batch()
        for m, opt in runs:
            opt.zero_grad()
            m(x.to(next(m.parameters()).dtype)).square().mean().backward()
            opt.step()
    for p32, p64 in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p32.double(), p64, atol=1e-6, rtol=0)  # a few float32 ulps a step


def test_all_pruned_layer_and_a_single_alive_weight():
    fused, ref = pair("adam-wd-amsgrad")
    for model, _ in (fused, ref):
        model.conv2.set_mask_(torch.zeros_like(model.conv2.mask))
        single = torch.zeros_like(model.out.mask)
        single[3, 7] = True
        model.out.set_mask_(single)
    train(fused, ref, steps=4)
    assert_same(fused, ref)
    assert_pruned_plus_zero(*fused)
    assert fused[0].out.weight[3, 7] != 0


def test_gradient_at_pruned_entries_is_never_read():
    """A loss on the stored weight itself puts a gradient on pruned entries: the fused step ignores it (torch's
    moves them and the guard zeroes them after), so alive entries and the zeros agree."""
    fused, ref = pair("adam", 0.3)
    train(fused, ref, steps=4, extra=lambda m: sum(p.sum() for p in m.parameters()))
    assert_same(fused, ref)
    assert_pruned_plus_zero(*fused)


def _swap_in_place(model, mask):
    model.conv1.mask[...] = mask


def _swap_data(model, mask):
    model.conv1.mask.data = mask.clone()


def _swap_data_twice(model, mask):
    model.conv1.mask.data = ~mask  # freed by the next swap, whose storage may take its address
    model.conv1.mask.data = mask.clone()


def _swap_state_dict(model, mask):
    model.load_state_dict({**model.state_dict(), "conv1.mask": mask})


@pytest.mark.parametrize("swap", [_swap_in_place, _swap_data, _swap_data_twice, _swap_state_dict])
@pytest.mark.parametrize("case", ["momentum", "adam-wd-amsgrad"])
def test_mask_changed_between_steps(case, swap):
    fused, ref = pair(case, 0.5)
    train(fused, ref, steps=3)  # state everywhere alive
    new = torch.rand(fused[0].conv1.mask.shape) < 0.3  # prunes some, revives others
    for model, _ in (fused, ref):
        swap(model, new)
    train(fused, ref, steps=3, seed=1)
    assert torch.equal(fused[0].conv1.mask, new)
    assert_same(fused, ref)
    assert_pruned_plus_zero(*fused)


def test_weight_written_between_steps_is_zeroed_again():
    fused, ref = pair("momentum")
    train(fused, ref, steps=2)
    for model, _ in (fused, ref):
        with torch.no_grad():
            model.body[1].weight.fill_(0.25)  # a rewind to values that are not zero where pruned
    train(fused, ref, steps=2, seed=1)
    assert_same(fused, ref)
    assert_pruned_plus_zero(*fused)


@needs_kernel
def test_pruned_entries_zeroed_once_per_change(monkeypatch):
    fused, ref = pair("adam", 0.1)
    calls = []
    real = fused_optim.zero_pruned_
    monkeypatch.setattr(fused_optim, "zero_pruned_", lambda t, m: calls.append(t.shape) or real(t, m))
    train(fused, steps=1)
    assert len(calls) == 4 * 3  # each weight and its two moments, at the first step
    calls.clear()
    train(fused, steps=3)
    assert calls == []
    fused[0].out.mask[0, :5] = False
    train(fused, steps=2)
    assert calls == [fused[0].out.weight.shape] * 3


@pytest.mark.parametrize("case", ["momentum", "adam-wd-amsgrad"])
def test_state_dict_round_trip_with_torch(case):
    fused_cls, torch_cls, kwargs = CASES[case]
    fused, ref = pair(case)
    train(fused, ref, steps=3)
    # fused -> torch and torch -> fused, then both keep going
    to_torch = torch_cls(fused[0].parameters(), foreach=False, **kwargs)
    to_torch.load_state_dict(fused[1].state_dict())
    lthfast.mask_optimizer(to_torch, fused[0])
    to_fused = fused_cls(ref[0].parameters(), model=ref[0], **kwargs)
    to_fused.load_state_dict(ref[1].state_dict())
    assert fused[1].state_dict()["param_groups"] == to_torch.state_dict()["param_groups"]
    train((fused[0], to_torch), (ref[0], to_fused), steps=3, seed=1)
    assert_same((fused[0], to_torch), (ref[0], to_fused))
    assert_pruned_plus_zero(ref[0], to_fused)


def test_torch_pruned_layout_and_explicit_masks():
    torch_pruned, plain = convnet(), convnet()
    masks = {name: torch.rand(p.shape) < 0.4 for name, p in lthfast.prunable(plain).items()}
    lthfast.Masks(masks).apply_(plain)
    runs, refs = [], []
    for model in (torch_pruned, plain):
        ref = copy.deepcopy(model)
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=False)
        if model is torch_pruned:
            for m in (model, ref):  # L1 over tie-free weights: the same masks
                params = [(m.conv1, "weight"), (m.conv2, "weight"), (m.body[1], "weight"), (m.out, "weight")]
                torch_prune.global_unstructured(params, torch_prune.L1Unstructured, amount=0.7)
            given = {"model": model}
            lthfast.mask_optimizer(ref_opt, ref)
        else:
            given = {"masks": {p: masks[n] for n, p in lthfast.prunable(plain).items()}}
            lthfast.mask_optimizer(ref_opt, ref, masks)
        runs.append((model, lthfast.MaskedAdamW(model.parameters(), lr=1e-2, **given)))
        refs.append((ref, ref_opt))
    for run, ref in zip(runs, refs):
        train(run, ref, steps=4)
        assert_same(run, ref)
    conv2 = torch_pruned.conv2
    assert torch.count_nonzero(conv2.weight_orig.detach()[conv2.weight_mask == 0]) == 0
    assert torch.count_nonzero(plain.conv2.weight.detach()[~masks["conv2.weight"]]) == 0


@pytest.mark.parametrize("why", ["float64", "no extension", "tensor lr"])
def test_falls_back_to_torch_step_and_zeroing(why, monkeypatch):
    fused, ref = pair("adam-wd-amsgrad")
    if why == "float64":
        for model, _ in (fused, ref):
            model.double()
    elif why == "no extension":
        monkeypatch.setattr(_backend, "ext", lambda: None)
    else:
        for _, opt in (fused, ref):
            opt.param_groups[0]["lr"] = torch.tensor(1e-2)
    train(fused, ref, steps=3, extra=lambda m: m.out.weight.sum())
    assert_same(fused, ref)
    for m in (fused[0].conv1, fused[0].out):
        assert torch.count_nonzero(m.weight.detach()[~m.mask]) == 0


@pytest.mark.gpu
def test_cuda_parameters_step_through_torch():
    fused, ref = pair("adam-wd-amsgrad")
    for model, _ in (fused, ref):
        model.cuda()
    train(fused, ref, steps=3, extra=lambda m: m.out.weight.sum())
    assert_same(fused, ref)
    assert_pruned_plus_zero(*fused)


def test_lr_schedule_param_groups_and_float64_step_counter():
    model = masked_convnet(0.2)
    ref = copy.deepcopy(model)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # torch keeps Adam's step in float64 then
    try:
        runs = []
        for m, make in ((model, lthfast.MaskedAdam), (ref, torch.optim.Adam)):
            groups = [{"params": [m.conv1.weight, m.out.weight], "weight_decay": 0.1}]
            groups.append({"params": [p for n, p in m.named_parameters() if n not in ("conv1.weight", "out.weight")]})
            runs.append((m, make(groups, lr=1e-2, **({"model": m} if m is model else {"foreach": False}))))
        for s in range(4):
            for _, opt in runs:
                opt.param_groups[1]["lr"] = 1e-2 / (s + 1)
            train(*runs, seed=s)
    finally:
        torch.set_default_dtype(default)
    assert runs[0][1].state[model.conv1.weight]["step"].dtype == torch.float64
    assert_same(*runs)


def test_deepcopy_keeps_the_masks():
    fused, ref = pair("adam-wd-amsgrad")
    train(fused, ref, steps=2)
    copied = copy.deepcopy(fused)  # model and optimizer together: the copy's parameters and masks
    train(copied, ref, steps=2, seed=1)
    assert_same(copied, ref)
    assert_pruned_plus_zero(*copied)


def test_bad_arguments_are_refused():
    model = masked_convnet(0.5)
    with pytest.raises(TypeError, match="model=.*masks="):
        lthfast.MaskedAdam(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="masks entry 0"):
        lthfast.MaskedSGD(model.parameters(), lr=1e-3, masks={torch.zeros(3): torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="masks entry 0"):
        lthfast.MaskedSGD([model.out.weight], lr=1e-3, masks={model.out.weight: torch.ones(3, dtype=torch.bool)})
    other = masked_convnet(0.5)
    with pytest.raises(ValueError, match="conv1.weight, conv2.weight, body.1.weight, out.weight"):
        lthfast.MaskedAdamW(other.parameters(), lr=1e-3, model=model)


# ------------------------------------------------------------------------------------------------- the step plan


def test_planned_steps_skip_the_sorting(monkeypatch):
    """From the second step on, an unchanged model reuses the sorted parameters (no mask lookup per parameter)."""
    fused, ref = pair("adam", 0.3)
    train(fused, ref, steps=2)
    seen = []
    real = fused[1]._alive_for
    monkeypatch.setattr(fused[1], "_alive_for", lambda *a: seen.append(1) or real(*a))
    train(fused, ref, steps=3, seed=1)
    assert seen == []
    assert_same(fused, ref)


def _freeze_grad(model, opt):  # one parameter without a gradient from now on
    model.conv1.weight.requires_grad_(False)
    model.conv1.weight.grad = None


def _momentum_on(model, opt):
    for g in opt.param_groups:
        g["momentum"] = 0.5


def _new_group(model, opt):
    extra = model.extra = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 5))
    opt.add_param_group({"params": [extra]})


def _state_cleared(model, opt):
    opt.state[model.conv1.weight].clear()


def _weight_data_swapped(model, opt):
    model.conv1.weight.data = model.conv1.weight.data + 0.5  # pruned entries no longer zero


def _state_tensor_swapped(model, opt):  # a new tensor under a state key, nonzero at pruned entries
    state = opt.state[model.conv1.weight]
    key = "momentum_buffer" if "momentum_buffer" in state else "exp_avg"
    if state.get(key) is not None:
        state[key] = state[key] + 0.25


def _state_reloaded(model, opt):
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))


def _mask_in_place(model, opt):
    model.conv1.mask[:2] = False


def _mask_replaced(model, opt):
    model.conv1.mask = model.conv1.mask.clone()
    model.conv1.mask[:, :1] = False


def _weight_written(model, opt):
    with torch.no_grad():
        model.conv1.weight.add_(1.0)


@pytest.mark.parametrize(
    "change",
    [_freeze_grad, _momentum_on, _new_group, _state_cleared, _weight_data_swapped, _mask_in_place, _mask_replaced,
     _weight_written, _state_tensor_swapped, _state_reloaded],
    ids=lambda f: f.__name__.strip("_"),
)  # fmt: skip
@pytest.mark.parametrize("case", ["sgd", "momentum", "adam-wd-amsgrad"])
def test_plan_follows_changes_between_steps(case, change):
    """A change between planned steps, made to both models, leaves them bit-identical to torch's step."""
    if change is _momentum_on and case != "sgd":
        pytest.skip("turns momentum on in the case without it")
    fused, ref = pair(case, 0.3)
    train(fused, ref, steps=3)
    for model, opt in (fused, ref):
        change(model, opt)
    extra = (lambda m: m.extra.square().sum()) if change is _new_group else None
    train(fused, ref, steps=3, seed=1, extra=extra)
    assert_same(fused, ref)
    assert_pruned_plus_zero(*fused)
