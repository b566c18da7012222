"""More levels or replicates extend a finished run in place (finished units untouched); fewer are refused before
anything is written; a run directory made when levels and replicates were part of the identity resumes as it was."""

import json
from pathlib import Path

import pytest

from lthfast.imp import RunDirError, run
from lthfast.imp.config import Config, digest


def _files(root: Path, pattern: str) -> dict[Path, tuple[bytes, int]]:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in root.glob(pattern) if p.is_file()}


def _untouched(files: dict[Path, tuple[bytes, int]]) -> bool:
    return all(p.read_bytes() == data and p.stat().st_mtime_ns == mtime for p, (data, mtime) in files.items())


def test_more_levels_extend_the_run_without_recomputing(tiny):
    first = run({**tiny, "levels": 1})  # named from the config: the longer run must find the same folder
    before = _files(first.path, "replicate_0/**/*")
    assert {p.parent.name for p in before if p.name == "done.json"} == {"level_0", "level_1"}
    longer = run({**tiny, "levels": 2})
    assert longer.path == first.path and _untouched(before)
    assert (longer.path / "replicate_0/level_2/done.json").is_file()
    assert [r["level"] for r in longer.rows] == [0, 1, 2]
    assert json.loads((longer.path / "config.json").read_text())["config"]["levels"] == 2
    # The added level is what a run made with 2 levels from the start computes.
    direct = run({**tiny, "levels": 2, "out_dir": str(Path(tiny["out_dir"]) / "direct")})
    assert [r["test_acc"] for r in direct.rows] == [r["test_acc"] for r in longer.rows]


def test_more_replicates_extend_the_run_without_recomputing(tiny):
    first = run({**tiny, "levels": 1, "controls": "random_reinit"})
    before = _files(first.path, "replicate_0/**/*")
    wider = run({**tiny, "levels": 1, "controls": "random_reinit", "replicates": 2})
    assert wider.path == first.path and _untouched(before)
    assert sorted((r["replicate"], r["level"], r["branch"]) for r in wider.rows) == [
        (r, lv, b) for r in (0, 1) for lv, b in ((0, "ticket"), (1, "random_reinit"), (1, "ticket"))
    ]
    assert "±" in wider.table()


def test_fewer_levels_or_replicates_are_refused_before_anything_changes(tiny):
    result = run({**tiny, "levels": 2, "replicates": 2, "name": "long"})
    before = _files(result.path, "**/*")
    with pytest.raises(RunDirError, match=r"holds levels 0-2 and this run asks for levels=1.*--force"):
        run({**tiny, "levels": 1, "replicates": 2, "name": "long"})
    with pytest.raises(RunDirError, match=r"holds 2 replicates and this run asks for replicates=1"):
        run({**tiny, "levels": 2, "name": "long"})
    assert _files(result.path, "**/*").keys() == before.keys() and _untouched(
        {p: v for p, v in before.items() if p.name != ".lock"}
    )
    with pytest.raises(RunDirError, match="different config.*lr"):  # the other options still must match
        run({**tiny, "levels": 3, "replicates": 2, "name": "long", "lr": 0.01})


def test_a_run_made_with_levels_in_its_identity_resumes_and_extends(tiny):
    """Runs made before levels and replicates left the identity: named by the old digest, config.json holding them."""
    cfg = Config.from_dict(tiny)
    assert "levels" not in cfg.identity() and "replicates" not in cfg.identity()
    new = run(tiny)
    old_name = f"mlp-synthetic-{digest(cfg.legacy_identity())}"
    assert old_name != new.path.name
    old = new.path.rename(new.path.parent / old_name)
    config = json.loads((old / "config.json").read_text())
    config["identity"] = cfg.legacy_identity()
    (old / "config.json").write_text(json.dumps(config))
    before = _files(old, "replicate_0/**/*")
    again = run(tiny)  # the same command as the one that made it
    assert again.path == old and _untouched(before) and not new.path.exists()
    extended = run({**tiny, "levels": 3, "name": old_name})  # more levels: named explicitly
    assert extended.path == old and _untouched(before) and (old / "replicate_0/level_3/done.json").is_file()
