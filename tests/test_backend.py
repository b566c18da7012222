import pytest
import torch

import lthfast
from lthfast import _backend


def test_context_manager_restores_previous_backend():
    before = lthfast.get_backend()
    with lthfast.backend("triton"):
        assert lthfast.get_backend() == "triton"
        with lthfast.backend("auto"):
            assert lthfast.get_backend() == "auto"
        assert lthfast.get_backend() == "triton"
    assert lthfast.get_backend() == before


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown lthfast backend 'cudnn'"):
        lthfast.set_backend("cudnn")


def test_torch_backend_never_uses_triton():
    x = torch.randn(3)
    with lthfast.backend("torch"):
        assert not _backend.use_triton(x)


def test_auto_on_cpu_follows_the_interpreter(monkeypatch):
    x = torch.randn(3)
    with lthfast.backend("auto"):
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert not _backend.use_triton(x)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert _backend.use_triton(x) == _backend.triton_available()


def test_forced_triton_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with lthfast.backend("triton"), pytest.raises(RuntimeError, match="cannot run here"):
        _backend.use_triton(torch.randn(3))


def test_info_lists_versions_and_extension(capsys):
    from lthfast.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for key in ("torch", "triton", "numpy", "device", "_C", "backend"):
        assert key in out


@pytest.mark.parametrize("fast", [True, False], ids=["environ-dict", "os.environ.get"])
@pytest.mark.parametrize(("value", "on"), [(None, False), ("", False), ("0", False), ("false", False),
                                           ("False", False), ("1", True), ("true", True)])  # fmt: skip
def test_interpreter_flag_is_read_at_every_call(monkeypatch, fast, value, on):
    """interpreter_enabled reads os.environ's backing dict (one lookup) where CPython has it, os.environ.get
    elsewhere: the same answer, and a change made through os.environ is seen at the next call."""
    if not fast:
        monkeypatch.setattr(_backend, "_ENVIRON_DATA", None)
    elif _backend._ENVIRON_DATA is None:
        pytest.skip("no os.environ backing dict on this platform")
    if value is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", value)
    assert _backend.interpreter_enabled() is on
    monkeypatch.setenv("TRITON_INTERPRET", "0" if on else "1")
    assert _backend.interpreter_enabled() is (not on)


def test_cli_starts_without_the_optional_extras():
    """`lthfast info` / `--help` on the base install (torch, numpy): tqdm, matplotlib, yaml ... are the imp extra."""
    import subprocess
    import sys

    blocked = ("tqdm", "tqdm.auto", "matplotlib", "yaml", "safetensors", "mnist1d", "sklearn")
    code = (
        "import sys, runpy\n"
        f"for m in {blocked!r}: sys.modules[m] = None\n"
        "sys.argv = ['lthfast', 'info']\n"
        "runpy.run_module('lthfast', run_name='__main__')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "backend" in done.stdout
