"""Masks: validation on write, statistics, files, apply_ to every layout, and all-or-nothing validation."""

import pytest
import torch
from prune_models import mlp, tie_free_
from torch.nn.utils import prune as torch_prune

import lthfast
from lthfast import Masks
from lthfast.nn import MaskedConv2d, MaskedLinear


def random_masks(model, density=0.6) -> Masks:
    return Masks({n: torch.rand(p.shape) < density for n, p in lthfast.prunable(model).items()})


def test_prunable_names_follow_named_parameters(convnet):
    names = list(lthfast.prunable(convnet))
    expected = [n for n, _ in convnet.named_parameters() if n.endswith("weight")]
    assert names == expected == ["conv1.weight", "conv2.weight", "body.1.weight", "out.weight"]
    assert list(lthfast.prunable(convnet, include="conv*")) == ["conv1.weight", "conv2.weight"]
    assert list(lthfast.prunable(convnet, exclude=["out", "conv1"])) == ["conv2.weight", "body.1.weight"]
    assert all(p is dict(convnet.named_parameters())[n] for n, p in lthfast.prunable(convnet).items())


def test_module_walk_is_named_modules(convnet):
    # all_layers walks modules with a stack: named_modules' names, pre-order and dedup (a shared module, and its
    # subtree, listed at its first place only), None children skipped
    from torch import nn

    from lthfast.pruning.layers import _named_modules

    shared = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Conv2d(1, 1, 1), nn.ReLU()))
    model = nn.Module()
    model.a = nn.Sequential(nn.Linear(3, 3), shared)
    model.b = shared[1]
    model.c = None
    model.d = nn.ModuleList([shared, nn.Linear(1, 1), model.a])
    model.e = nn.ModuleDict({"z": nn.Linear(2, 1), "y": shared[0]})
    for m in (model, convnet, shared):
        assert [(n, id(x)) for n, x in _named_modules(m)] == [(n, id(x)) for n, x in m.named_modules()]


def test_prunable_rejects_unknown_pattern(convnet):
    with pytest.raises(ValueError, match="'fc9'"):
        lthfast.prunable(convnet, exclude="fc9")


def test_write_validation(convnet):
    masks = Masks.ones(convnet)
    with pytest.raises(TypeError, match="conv1.weight.*bool"):
        masks["conv1.weight"] = torch.ones(8, 3, 3, 3)
    with pytest.raises(ValueError, match="conv1.weight.*shape"):
        masks["conv1.weight"] = torch.ones(8, 3, 3, dtype=torch.bool)
    with pytest.raises(TypeError):
        masks[3] = torch.ones(2, dtype=torch.bool)
    assert masks["conv1.weight"].shape == (8, 3, 3, 3)


def test_statistics_are_exact_counts(convnet):
    masks = random_masks(convnet)
    alive = {n: int(m.sum()) for n, m in masks.items()}
    total = {n: m.numel() for n, m in masks.items()}
    assert masks.alive_count() == sum(alive.values())
    assert masks.total_count() == sum(total.values()) == sum(p.numel() for p in lthfast.prunable(convnet).values())
    assert masks.density() == sum(alive.values()) / sum(total.values())
    assert masks.layer_density() == {n: alive[n] / total[n] for n in masks}
    report = masks.sparsity_report()
    for name in masks:
        assert name in report and str(alive[name]) in report
    assert f"{masks.density():.4f}" in report.splitlines()[-1]


def test_clone_is_independent(convnet):
    masks = random_masks(convnet)
    copy = masks.clone()
    masks["out.weight"][:] = False
    assert copy["out.weight"].any() and copy != masks


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_save_load_roundtrip(tmp_path, convnet, suffix):
    masks = random_masks(convnet)
    path = tmp_path / f"masks{suffix}"
    masks.save(path)
    loaded = Masks.load(path)
    assert loaded == masks and list(loaded) == list(masks)
    assert all(m.dtype == torch.bool for m in loaded.values())


def test_load_rejects_bad_files(tmp_path):
    with pytest.raises(ValueError, match="masks.npy"):
        Masks.load(tmp_path / "masks.npy")
    torch.save({"fc.weight": torch.ones(3)}, tmp_path / "float.pt")
    with pytest.raises(TypeError, match="float.pt.*bool"):
        Masks.load(tmp_path / "float.pt")


def test_apply_to_plain_model_zeroes_pruned_weights(convnet):
    before = {n: p.detach().clone() for n, p in lthfast.prunable(convnet).items()}
    masks = random_masks(convnet)
    masks.apply_(convnet)
    for name, p in lthfast.prunable(convnet).items():
        assert torch.equal(p.detach(), torch.where(masks[name], before[name], 0.0))


def test_apply_to_masked_and_torch_layouts(convnet):
    masks = random_masks(convnet)
    sparse = lthfast.sparsify(tie_free_(type(convnet)()))
    masks.apply_(sparse)
    assert Masks.from_model(sparse) == masks
    for name, p in lthfast.prunable(sparse).items():
        assert not p.detach()[~masks[name]].any()
    torch_pruned = tie_free_(type(convnet)())
    for module in (torch_pruned.conv1, torch_pruned.out):
        torch_prune.identity(module, "weight")
    masks.apply_(torch_pruned)
    from_torch = Masks.from_model(torch_pruned)
    assert list(from_torch) == ["conv1.weight", "out.weight"]
    assert torch.equal(from_torch["out.weight"], masks["out.weight"])
    assert torch.equal(torch_pruned.out.weight, torch_pruned.out.weight_orig * masks["out.weight"])
    assert not torch_pruned.out.weight_orig.detach()[~masks["out.weight"]].any()


def test_from_model_returns_copies(convnet):
    sparse = lthfast.sparsify(convnet)
    masks = Masks.from_model(sparse)
    sparse.out.mask[:] = False
    assert masks["out.weight"].all()


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (lambda m: torch.ones(3, 3, dtype=torch.bool), ValueError, "out.weight.*shape"),
        (lambda m: torch.ones(m.shape, device="meta", dtype=torch.bool), ValueError, "out.weight.*meta"),
    ],
)
def test_apply_validates_everything_first(convnet, bad, error, match):
    sparse = lthfast.sparsify(convnet)
    before = {n: p.detach().clone() for n, p in lthfast.prunable(sparse).items()}
    masks = Masks({n: torch.rand(p.shape) < 0.5 for n, p in lthfast.prunable(sparse).items()})
    masks._masks["out.weight"] = bad(masks["out.weight"])  # bypass write validation: apply_ must still catch it
    with pytest.raises(error, match=match):
        masks.apply_(sparse)
    assert all(m.mask.all() for m in sparse.modules() if hasattr(m, "mask"))
    assert all(torch.equal(p.detach(), before[n]) for n, p in lthfast.prunable(sparse).items())


def test_apply_rejects_unknown_layer():
    model = mlp()
    masks = Masks.ones(model)
    masks["9.weight"] = torch.ones(3, 3, dtype=torch.bool)
    with pytest.raises(KeyError, match="9.weight"):
        masks.apply_(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_zero_pruned_is_exact_even_over_nan(dtype):
    from lthfast.pruning.layers import zero_pruned_

    t = torch.randn(7, 9, dtype=dtype)
    t[0, 0], t[1, 1], t[2, 2] = float("nan"), float("inf"), -0.0
    mask = torch.rand(7, 9) < 0.5
    mask[0, 0], mask[1, 1] = False, True
    expected = torch.where(mask, t, torch.zeros((), dtype=dtype))
    view = t.t()  # non-contiguous works too
    zero_pruned_(view, mask.t())
    assert torch.equal(t[~mask], torch.zeros(int((~mask).sum()), dtype=dtype))
    assert torch.equal(t[mask].isinf(), expected[mask].isinf())
    assert torch.equal(t[mask & ~t.isinf()], expected[mask & ~expected.isinf()])
    assert not torch.signbit(t[~mask]).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_masked_module_apply_mask_is_exact_even_over_nan(dtype, kind):
    layer = MaskedLinear(9, 7, dtype=dtype) if kind == "linear" else MaskedConv2d(3, 7, 3, dtype=dtype)
    with torch.no_grad():
        w = layer.weight.view(7, -1)
        w.copy_(torch.randn(w.shape, dtype=dtype))
        w[0, 0], w[1, 1], w[2, 2], w[3, 3] = float("nan"), float("inf"), -0.0, -0.0
    mask = torch.rand(layer.weight.shape) < 0.5
    m2 = mask.view(7, -1)
    m2[0, 0], m2[1, 1], m2[2, 2], m2[3, 3] = False, True, True, False
    layer.set_mask_(mask)
    before = layer.weight.detach().clone()
    layer.apply_mask_()
    after = layer.weight.detach()
    assert torch.equal(after[~mask], torch.zeros(int((~mask).sum()), dtype=dtype))
    assert not torch.signbit(after[~mask]).any()  # +0.0 over -0.0, NaN and inf
    kept = mask & ~before.isnan()
    assert torch.equal(after[kept], before[kept])
    assert torch.equal(torch.signbit(after[kept]), torch.signbit(before[kept]))
    assert after.view(7, -1)[1, 1].isinf()


def _masked_model(dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(  # 212K weights: 3 threads split them mid-layer, off the 16-weight steps
        MaskedLinear(37, 29, dtype=dtype),
        MaskedConv2d(5, 11, 3, dtype=dtype),
        MaskedLinear(701, 299, dtype=dtype),
        MaskedLinear(3, 1, dtype=dtype),
    )
    with torch.no_grad():
        for m in model:
            w = m.weight.view(-1)
            w.copy_(torch.randn(w.shape, generator=gen, dtype=torch.float64).to(dtype))
            w[::7] = -0.0
            w[3::11], w[5::13] = float("nan"), float("-inf")
            m.mask.copy_(torch.rand(m.mask.shape, generator=gen) < 0.7)
            m.apply_mask_()
            w[1::5] = torch.randn(w[1::5].shape, generator=gen, dtype=torch.float64).to(dtype)  # dead, nonzero again
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("vector", [True, False], ids=["avx2", "scalar"])
@pytest.mark.parametrize("threads", [1, 3])
def test_apply_in_one_pass_matches_layer_by_layer(dtype, vector, threads):
    from lthfast import _backend

    ext = _backend.ext()
    if ext is None:
        pytest.skip("lthfast._C is not built")
    fast, slow = _masked_model(dtype, 0), _masked_model(dtype, 0)
    gen = torch.Generator().manual_seed(1)
    masks = Masks({f"{i}.weight": (torch.rand(m.mask.shape, generator=gen) < 0.5) & m.mask for i, m in enumerate(fast)})
    versions = [(m.weight._version, m.mask._version) for m in fast]
    previous_threads = torch.get_num_threads()
    previous_vector = ext.set_vector_kernels(vector)
    try:
        torch.set_num_threads(threads)
        masks.apply_(fast)
    finally:
        ext.set_vector_kernels(previous_vector)
        torch.set_num_threads(previous_threads)
    for layer, mask in masks.layers_of(slow):  # the per-layer path: set_mask_ + zero_pruned_
        layer.write_mask_(mask)
    for i, (f, s) in enumerate(zip(fast, slow)):
        assert torch.equal(f.mask, s.mask) and f.mask.data_ptr() != masks[f"{i}.weight"].data_ptr()
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[f.weight.element_size()]
        assert torch.equal(f.weight.detach().view(bits), s.weight.detach().view(bits)), f"layer {i}"
        assert f.weight._version > versions[i][0] and f.mask._version > versions[i][1]
        assert not torch.signbit(f.weight[~f.mask]).any() and bool((f.weight[~f.mask] == 0).all())


@pytest.mark.parametrize("n", [1, 4096, 4097, 10000])
def test_any_alive_finds_one_alive_entry_anywhere(n):
    from lthfast.pruning.layers import any_alive

    for pos in sorted({0, n // 2, n - 1, min(4096, n - 1)}):
        mask = torch.zeros(n, dtype=torch.bool)
        assert not any_alive(mask) and not any_alive(mask.view(1, n))
        mask[pos] = True
        assert any_alive(mask) and any_alive(mask.view(1, n)), pos
        strided = torch.zeros(n, 2, dtype=torch.bool)
        strided[pos, 1] = True
        assert any_alive(strided.t()) and not any_alive(strided.t()[0]), pos
    assert not any_alive(torch.zeros(0, 3, dtype=torch.bool))
