"""sparsify / densify / dense_state_dict / from_torch_prune / to_torch_prune: layouts, state dicts, copies."""

import copy
import io
import pickle
import warnings

import pytest
import torch
from prune_models import ConvNet, image_batch, tie_free_
from torch import nn
from torch.nn.utils import prune as torch_prune

import lthfast
from lthfast import Masks
from lthfast.nn import MaskedConv2d, MaskedLinear


def pruned_sparse(model, density=0.5):
    sparse = lthfast.sparsify(model)
    Masks({n: torch.rand(p.shape) < density for n, p in lthfast.prunable(sparse).items()}).apply_(sparse)
    return sparse


def test_sparsify_keeps_parameters_dtype_and_outputs():
    model = tie_free_(ConvNet()).double()
    x = image_batch().double()
    expected = model(x)
    params = dict(model.named_parameters())
    sparse = lthfast.sparsify(model)
    assert sparse is model
    assert isinstance(model.conv1, MaskedConv2d) and isinstance(model.out, MaskedLinear)
    assert all(p is params[n] for n, p in model.named_parameters())
    assert all(m.mask.all() for m in model.modules() if hasattr(m, "mask"))
    assert model.conv1.weight.dtype == torch.float64 and model.conv1.mask.dtype == torch.bool
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_sparsify_filters_by_pattern(convnet):
    lthfast.sparsify(convnet, include="conv*", exclude="conv2")
    assert isinstance(convnet.conv1, MaskedConv2d)
    assert type(convnet.conv2) is nn.Conv2d and type(convnet.out) is nn.Linear


def test_sparsify_root_module_and_subclass_warning():
    assert isinstance(lthfast.sparsify(nn.Linear(3, 4)), MaskedLinear)

    class MyLinear(nn.Linear):
        pass

    model = nn.Sequential(MyLinear(3, 4), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match="0.weight"):
        lthfast.sparsify(model)
    assert type(model[0]) is MyLinear and isinstance(model[1], MaskedLinear)


def test_sparsify_names_modules_tied_to_a_converted_weight():
    first, second = nn.Linear(8, 8), nn.Linear(8, 8)
    second.weight = first.weight
    model = nn.Sequential(first, nn.ReLU(), second)
    with pytest.warns(UserWarning, match=r"weight is tied to a converted one: \['2 \(weight of 0\)'\]"):
        lthfast.sparsify(model)
    assert type(model[0]) is MaskedLinear and type(model[2]) is nn.Linear and model[2].weight is model[0].weight
    reused = nn.Linear(4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one module reached twice is converted once, and is not "tied"
        model = lthfast.sparsify(nn.Sequential(reused, reused))
    assert model[0] is model[1] and type(model[0]) is MaskedLinear


def test_dense_state_dict_of_a_pruned_bias_and_embedding_loads_strictly():
    """torch.nn.utils.prune (and lthfast.prune, its drop-in) reparametrize any tensor of any module."""
    import lthfast.prune as fast_prune

    def build():
        torch.manual_seed(5)
        return nn.Sequential(nn.Embedding(12, 6), nn.Linear(6, 4), nn.Linear(4, 3))

    model = build()
    fast_prune.l1_unstructured(model[1], "bias", amount=0.5)
    torch_prune.random_unstructured(model[0], "weight", amount=0.5)
    with pytest.raises(ValueError, match=r"^1: \['bias'\] pruned with torch.nn.utils.prune"):
        lthfast.sparsify(model)  # it would lose bias_orig: refused before any module changes
    assert type(model[2]) is nn.Linear
    lthfast.sparsify(model, include="2")
    model[2].set_mask_(torch.rand(3, 4) < 0.5)
    dense = lthfast.dense_state_dict(model)
    assert sorted(dense) == ["0.weight", "1.bias", "1.weight", "2.bias", "2.weight"]
    fresh = build()
    fresh.load_state_dict(dense, strict=True)
    assert torch.equal(fresh[0].weight, model[0].weight_orig * model[0].weight_mask)
    assert torch.equal(fresh[1].bias, model[1].bias_orig * model[1].bias_mask)
    assert torch.equal(fresh[2].weight, model[2].weight * model[2].mask)
    tokens = torch.tensor([[1, 5, 7]])
    torch.testing.assert_close(fresh(tokens), model(tokens), rtol=0, atol=0)


def test_sparsify_keeps_hooks_and_optimizer(convnet):
    calls = []
    convnet.out.register_forward_hook(lambda module, inputs, output: calls.append(type(module).__name__))
    optimizer = torch.optim.SGD(convnet.parameters(), lr=0.1)
    lthfast.sparsify(convnet)
    before = convnet.out.weight.detach().clone()
    convnet(image_batch()).square().sum().backward()
    optimizer.step()
    assert calls == ["MaskedLinear"]
    assert not torch.equal(convnet.out.weight.detach(), before)


def test_dense_state_dict_loads_strictly_into_the_original(convnet):
    sparse = pruned_sparse(tie_free_(ConvNet()))
    assert "out.mask" in sparse.state_dict()
    state = lthfast.dense_state_dict(sparse)
    assert list(state) == list(convnet.state_dict())
    convnet.load_state_dict(state, strict=True)
    x = image_batch()
    torch.testing.assert_close(convnet(x), sparse(x), rtol=0, atol=0)
    assert torch.equal(state["out.weight"], sparse.out.weight * sparse.out.mask)


def test_original_state_dict_loads_into_sparsified_keeping_masks(convnet):
    sparse = pruned_sparse(tie_free_(ConvNet()))
    masks = Masks.from_model(sparse)
    sparse.load_state_dict(convnet.state_dict(), strict=True)  # no mask keys: current masks stay
    assert Masks.from_model(sparse) == masks
    for name, p in lthfast.prunable(sparse).items():
        expected = torch.where(masks[name], dict(convnet.named_parameters())[name], 0.0)
        assert torch.equal(p.detach(), expected)
    sparse.load_state_dict(pruned_sparse(tie_free_(ConvNet())).state_dict())  # with masks: the masks load
    assert Masks.from_model(sparse) != masks


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_of_sparsified_models(how, convnet):
    sparse = pruned_sparse(convnet)
    if how == "deepcopy":
        clone = copy.deepcopy(sparse)
    elif how == "pickle":
        clone = pickle.loads(pickle.dumps(sparse))
    else:
        buffer = io.BytesIO()
        torch.save(sparse, buffer)
        buffer.seek(0)
        clone = torch.load(buffer, weights_only=False)
    x = image_batch()
    torch.testing.assert_close(clone(x), sparse(x), rtol=0, atol=0)
    assert Masks.from_model(clone) == Masks.from_model(sparse)
    # The copy's load hooks act on the copy, not on the original.
    clone.load_state_dict(tie_free_(ConvNet()).state_dict())
    assert not torch.equal(clone.out.weight, sparse.out.weight)
    assert Masks.from_model(clone) == Masks.from_model(sparse)


def test_densify_keeps_parameters_and_values(convnet):
    sparse = pruned_sparse(convnet)
    x = image_batch()
    expected = sparse(x)
    params = dict(sparse.named_parameters())
    masks = Masks.from_model(sparse)
    dense = lthfast.densify(sparse)
    assert type(dense.conv1) is nn.Conv2d and type(dense.out) is nn.Linear and not hasattr(dense.out, "mask")
    assert all(p is params[n] for n, p in dense.named_parameters())
    assert not dense.out.weight.detach()[~masks["out.weight"]].any()
    torch.testing.assert_close(dense(x), expected, rtol=0, atol=0)
    assert dense.conv2.stride == (2, 2)


def test_torch_prune_roundtrip(convnet):
    sparse = pruned_sparse(convnet)
    x = image_batch()
    expected = sparse(x)
    masks = Masks.from_model(sparse)
    params = {id(p) for p in sparse.parameters()}
    lthfast.to_torch_prune(sparse)
    assert torch_prune.is_pruned(sparse) and "out.weight_mask" in sparse.state_dict()
    assert {id(p) for p in sparse.parameters()} == params
    torch.testing.assert_close(sparse(x), expected, rtol=0, atol=0)
    assert Masks.from_model(sparse) == masks
    lthfast.from_torch_prune(sparse)
    assert isinstance(sparse.out, MaskedLinear) and {id(p) for p in sparse.parameters()} == params
    assert Masks.from_model(sparse) == masks
    torch.testing.assert_close(sparse(x), expected, rtol=0, atol=0)


def test_from_torch_prune_of_torch_pruned_model(convnet):
    reference = copy.deepcopy(convnet)
    params = [(m, "weight") for m in convnet.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    torch_prune.global_unstructured(params, torch_prune.L1Unstructured, amount=0.4)
    torch_prune.l1_unstructured(convnet.out, "weight", amount=0.3)
    masks = {f"{n}.weight": m.weight_mask.bool() for n, m in convnet.named_modules() if hasattr(m, "weight_mask")}
    x = image_batch()
    expected = convnet(x)
    lthfast.from_torch_prune(convnet)
    assert not torch_prune.is_pruned(convnet)
    assert Masks.from_model(convnet) == masks
    torch.testing.assert_close(convnet(x), expected, rtol=1e-6, atol=1e-6)
    assert "out.weight_orig" not in convnet.state_dict()
    copy.deepcopy(convnet)  # torch-pruned modules fail this after a forward; masked modules do not
    assert set(lthfast.dense_state_dict(convnet)) == set(reference.state_dict())


def test_from_torch_prune_rejects_pruned_bias_before_changing_anything(convnet):
    torch_prune.l1_unstructured(convnet.conv1, "weight", amount=0.5)
    torch_prune.l1_unstructured(convnet.out, "weight", amount=0.5)
    torch_prune.l1_unstructured(convnet.out, "bias", amount=0.5)
    with pytest.raises(ValueError, match="out.*bias"):
        lthfast.from_torch_prune(convnet)
    assert type(convnet.conv1) is nn.Conv2d and torch_prune.is_pruned(convnet.conv1)
