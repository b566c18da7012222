"""Builds the optional C++ extension ``lthfast._C`` from ``csrc/`` through ``CMakeLists.txt``.

The extension is plain C++ with pybind11 (no libtorch), so it compiles in seconds and works with any
torch. If the build fails the package still installs and uses its pure-PyTorch twin, unless
``LTHFAST_REQUIRE_EXT=1`` is set, in which case the failure is fatal (``make test`` and CI set it).
"""

import os
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


def _cmake_executable() -> str:
    try:
        import cmake  # the PyPI wheel, listed in pyproject's build requirements

        return str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
    except ImportError:
        return "cmake"


class CMakeBuild(build_ext):
    def build_extensions(self) -> None:
        self._failed: set[str] = set()
        super().build_extensions()
        # An optional extension that failed is dropped, so that the install (editable or not) does not look for
        # its file when it copies the outputs.
        self.extensions = [ext for ext in self.extensions if ext.name not in self._failed]

    def build_extension(self, ext: Extension) -> None:
        require = os.environ.get("LTHFAST_REQUIRE_EXT", "0") == "1"
        try:
            self._build_with_cmake(ext)
        except Exception as exc:  # noqa: BLE001 - any build failure must be reported, not swallowed silently
            if require:
                raise RuntimeError(f"lthfast: building {ext.name} failed and LTHFAST_REQUIRE_EXT=1: {exc}") from exc
            msg = (
                f"\nWARNING: lthfast: building the C++ extension {ext.name} failed ({exc}).\n"
                "WARNING: lthfast installs without it and uses the pure-PyTorch threshold path.\n"
                "WARNING: set LTHFAST_REQUIRE_EXT=1 to make this failure fatal.\n"
            )
            print(msg, file=sys.stderr)  # pip hides a successful build's output without -v, but shows its warnings
            warnings.warn(msg.replace("\nWARNING: ", " ").strip(), stacklevel=1)
            self._failed.add(ext.name)

    def _build_with_cmake(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = "Debug" if self.debug else "Release"
        cmake = _cmake_executable()
        configure = [
            cmake,
            str(ROOT),
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DLTHFAST_OUTPUT_DIR={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DLTHFAST_EXT_SUFFIX={sysconfig.get_config_var('EXT_SUFFIX')}",
        ]
        jobs = str(os.cpu_count() or 2)
        subprocess.run(configure, cwd=build_dir, check=True)
        subprocess.run([cmake, "--build", ".", "--config", cfg, "-j", jobs], cwd=build_dir, check=True)


setup(ext_modules=[CMakeExtension("lthfast._C")], cmdclass={"build_ext": CMakeBuild})
