"""The README's code runs as written, and every documented ``lthfast`` command line is accepted.

A user copies these first; the README's own-IMP-loop example once assigned ``mask_optimizer``'s hook handle to
``opt`` and called ``opt.zero_grad()`` on it, which nothing caught because its training step was ``...``.
"""

from __future__ import annotations

import contextlib
import io
import pathlib
import re
import shlex

import pytest
import torch

import lthfast
from lthfast.cli import build_parser
from lthfast.imp.cli import config_from_args

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
COMMAND = re.compile(r"(?:-m lthfast|^lthfast) (imp|ablate|bench|report|demo|info)\b(.*)")


def python_block(after: str) -> str:
    """The first ```python block of the README that follows the text ``after``."""
    text = (ROOT / "README.md").read_text()
    start = text.index(after)
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def documented_commands() -> list[tuple[str, str]]:
    """(file, command line) for every ``lthfast`` subcommand in a ```bash block of the docs."""
    found = []
    for path in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():
                line = line.split(" #")[0].strip()
                if COMMAND.search(line):
                    found.append((path.relative_to(ROOT).as_posix(), line))
    return found


def test_own_imp_loop_example_runs_and_does_what_it_says():
    code = python_block("As a faster backend for your own IMP loop")
    torch.manual_seed(0)
    namespace: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), namespace)
    model, init = namespace["model"], namespace["init"]
    masks = lthfast.Masks.from_model(model)
    # Three levels: 20% of the alive hidden weights (global among them), 10% of the output layer's, each level.
    assert masks["0.weight"].sum().item() == 235200 - _pruned(235200, 0.2, 3)
    assert masks["2.weight"].sum().item() == 3000 - _pruned(3000, 0.1, 3)
    for name, mask in masks.items():
        weight = model.get_submodule(name.rsplit(".", 1)[0]).weight.detach()
        original = init.model_state[name]
        # Rewound: the survivors hold their initial values, the pruned weights are exactly zero.
        assert torch.equal(weight[mask], original[mask])
        assert torch.count_nonzero(weight[~mask]) == 0
    assert "0.weight" in out.getvalue() and "density" in out.getvalue()
    # It trained between prunes: pruning the untrained initial weights the same way gives other masks.
    untrained = torch.nn.Sequential(torch.nn.Linear(784, 300), torch.nn.ReLU(), torch.nn.Linear(300, 10))
    init.rewind_(untrained)
    lthfast.sparsify(untrained)
    for _ in range(3):
        lthfast.strategies.magnitude_(untrained, 0.2, overrides={"2.weight": 0.1})
    assert not torch.equal(lthfast.Masks.from_model(untrained)["0.weight"], masks["0.weight"])


def _pruned(total: int, fraction: float, levels: int) -> int:
    alive = total
    for _ in range(levels):
        alive -= round(fraction * alive)
    return total - alive


def test_threshold_example_runs():
    code = python_block("## Global magnitude threshold")
    generator = torch.Generator().manual_seed(1)
    weights = [torch.randn(shape, generator=generator) for shape in ((64, 32), (10, 64), (3, 3, 5, 5))]
    masks = [torch.ones_like(w, dtype=torch.bool) for w in weights]
    alive_before = sum(int(m.sum()) for m in masks)
    *first, last = [line for line in code.splitlines() if line.strip()]
    namespace = {"weights": weights, "masks": masks}
    exec(compile("\n".join(first), "README.md", "exec"), namespace)
    before = [m.clone() for m in masks]
    exec(compile(last, "README.md", "exec"), namespace)
    assert "zero_weights=True" in last
    # Five calls (one changes nothing), each pruning 10-20% of what is alive: the masks only shrank.
    assert sum(int(m.sum()) for m in masks) < alive_before * 0.8**3
    for weight, mask, old in zip(weights, masks, before):
        assert not (mask & ~old).any()
        # The last call zeroed exactly the weights it pruned; those pruned earlier keep their values.
        assert torch.equal(weight == 0, old & ~mask)


def test_docs_have_commands():
    files = {file for file, _ in documented_commands()}
    assert "README.md" in files and len(documented_commands()) >= 10


@pytest.mark.parametrize(("file", "line"), documented_commands())
def test_documented_command_is_accepted(file, line):
    """Parsed by the real parser; for ``imp``, the options also pass Config's validation (nothing runs)."""
    match = COMMAND.search(line)
    argv = [match.group(1), *shlex.split(match.group(2).replace("...", ""))]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{file}: `{line}` is refused by the parser (exit {exc.code})")
    if argv[0] in ("imp", "ablate"):
        cfg = config_from_args(args)
    if argv[0] == "ablate":  # (a newer command: its examples are held to the whole validation)
        from lthfast.imp.ablate import parse_granularities

        for g in parse_granularities(args.granularities):
            cfg.replace(block=g.block, nm=g.nm).validate()
