"""Shared fixtures: seeds, device, backend.

Triton's interpreter must be requested before any kernel module is imported, so it is switched on here
when there is no CUDA device: that is how the kernels run on CPU tensors in CI.
Every test runs on the "torch" backend unless it asks for ``triton_backend`` (or another backend).
"""

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import lthfast  # noqa: E402
from lthfast import _backend  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_and_backend(request):
    """A fresh, reproducible seed per test (derived from its id) and the torch backend by default."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    with lthfast.backend("torch"):
        yield


@pytest.fixture
def triton_backend():
    """Run the test body on the Triton kernels: the interpreter on CPU tensors where there is no GPU; on a CUDA
    machine compiled, with CUDA as torch's default device, so that the tensors a test makes reach the kernels."""
    if not _backend.triton_available():
        pytest.skip("triton is not importable")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.set_default_device("cuda")
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # fp32 checked at fp32 precision (cuDNN and the conv kernels follow it)
    try:
        with lthfast.backend("triton"):
            yield "triton"
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
        if cuda:
            torch.set_default_device(None)


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
