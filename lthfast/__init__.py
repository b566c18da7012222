"""lthfast: a sparse-accelerated engine for lottery-ticket research in PyTorch."""

__version__ = "0.1.0"

from lthfast._backend import backend, get_backend, set_backend  # noqa: E402

__all__ = ["__version__", "backend", "get_backend", "set_backend"]
