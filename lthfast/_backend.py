"""Every device and backend decision in lthfast is made here.

Backends:
  "torch"  - pure PyTorch: the reference path on any device, and the block-sparse CPU path.
  "triton" - the Triton kernels: CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` is set
             (Triton's interpreter; this is how CI tests the kernels without a GPU).
  "auto"   - triton where it can run on the tensors' device, torch otherwise (the default).

The choice is read from ``LTHFAST_BACKEND`` at import, and changed with ``set_backend`` or the
``backend(...)`` context manager. The C++ extension ``lthfast._C`` is optional: when it does not load,
one log line says so and the pure-PyTorch twin is used.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import logging
import os
import threading
from collections.abc import Iterator

import torch

log = logging.getLogger("lthfast")

BACKENDS = ("auto", "torch", "triton")
_state = threading.local()
_default_backend = os.environ.get("LTHFAST_BACKEND", "auto").strip().lower() or "auto"
if _default_backend not in BACKENDS:
    raise ValueError(f"LTHFAST_BACKEND={_default_backend!r}: expected one of {BACKENDS}")


def _check_name(name: str) -> str:
    name = str(name).strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown lthfast backend {name!r}: expected one of {BACKENDS}")
    return name


def get_backend() -> str:
    """The active backend name: "auto", "torch" or "triton"."""
    return getattr(_state, "backend", None) or _default_backend


def set_backend(name: str) -> None:
    """Set the backend for this thread (and the process default)."""
    global _default_backend
    _default_backend = _check_name(name)
    _state.backend = _default_backend


@contextlib.contextmanager
def backend(name: str) -> Iterator[str]:
    """Context manager: ``with lthfast.backend("torch"): ...`` runs the block on that backend."""
    name = _check_name(name)
    previous = getattr(_state, "backend", None)
    _state.backend = name
    try:
        yield name
    finally:
        _state.backend = previous


# os.environ's backing dict (CPython; bytes keys on POSIX), which os.environ's writes (and so monkeypatch.setenv)
# update: ``os.environ.get`` runs four Python-level calls (Mapping.get, __getitem__, encodekey, decode), ~5 us per
# op call between the products of a small layer's step (1 thread of the 2-core dev box), one dict lookup here.
_ENVIRON_DATA = getattr(os.environ, "_data", None) if os.name == "posix" else None
if not isinstance(_ENVIRON_DATA, dict):
    _ENVIRON_DATA = None


def interpreter_enabled() -> bool:
    """True when Triton's CPU interpreter is requested (``TRITON_INTERPRET=1``), read at every call."""
    if _ENVIRON_DATA is not None:
        raw = _ENVIRON_DATA.get(b"TRITON_INTERPRET")
        value = "0" if raw is None else raw.decode(errors="replace")
    else:
        value = os.environ.get("TRITON_INTERPRET", "0")
    return value not in ("", "0", "false", "False")


@functools.cache
def triton_available() -> bool:
    """True when ``triton`` imports."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception as exc:  # noqa: BLE001 - a broken triton install means no triton backend
        log.info("lthfast: triton is installed but failed to import (%s); using the torch backend", exc)
        return False
    return True


def cuda_available() -> bool:
    return torch.cuda.is_available()


def triton_runs_on(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors of ``device``."""
    if device.type == "cuda":
        return triton_available()
    return device.type == "cpu" and interpreter_enabled() and triton_available()  # the cheap flag first


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """Decide, for one op call, whether to run the Triton kernels on these tensors.

    Raises when the backend is forced to "triton" but cannot run on the tensors' device, so that a
    test or benchmark never silently measures the fallback.
    """
    name = getattr(_state, "backend", None) or _default_backend  # get_backend(), inlined: once per op call
    if name == "torch":
        return False
    device = next(t for t in tensors if t is not None).device
    runs = triton_runs_on(device)
    if name == "triton" and not runs:
        why = "triton is not importable" if not triton_available() else f"device {device} needs TRITON_INTERPRET=1"
        raise RuntimeError(f"lthfast backend 'triton' cannot run here: {why}")
    return runs


@functools.cache
def ext():
    """The C++ extension module ``lthfast._C``, or None when it is not built."""
    try:
        return importlib.import_module("lthfast._C")
    except ImportError as exc:
        log.warning("lthfast: C++ extension lthfast._C not loaded (%s); using the pure-PyTorch threshold", exc)
        return None


def ext_loaded() -> bool:
    return ext() is not None


def describe() -> dict[str, str]:
    """Versions, device and backend, for ``python -m lthfast info`` and run metadata."""
    import platform

    import numpy

    from lthfast import __version__

    triton_version = "not installed"
    if triton_available():
        triton_version = importlib.import_module("triton").__version__
    cpu = platform.processor() or platform.machine()
    device = torch.cuda.get_device_name(0) if cuda_available() else f"cpu ({cpu})"
    return {
        "lthfast": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "numpy": numpy.__version__,
        "device": device,
        "cuda": str(torch.version.cuda) if cuda_available() else "none",
        "cpu_threads": str(torch.get_num_threads()),
        "_C": "loaded" if ext_loaded() else "not loaded",
        "triton_interpreter": "on" if interpreter_enabled() else "off",
        "backend": get_backend(),
    }
