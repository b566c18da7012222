"""The package's public names import the ways users write them (a fresh interpreter for each: nothing cached)."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "statement",
    [
        "import lthfast.strategies as s; assert s.magnitude_",
        "from lthfast.strategies import magnitude_",
        "import lthfast, lthfast.strategies; assert lthfast.strategies is lthfast.pruning.strategies",
        "import lthfast.prune as p; assert p.l1_unstructured",
    ],
)
def test_public_modules_import(statement):
    done = subprocess.run([sys.executable, "-c", statement], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
