"""Progress off a terminal: one plain line per finished unit, no escape codes; a resumed run says where it picks
up, and `lthfast report` says where an unfinished run stopped."""

import io
import shutil

import pytest

from lthfast.imp import run
from lthfast.imp.progress import Progress, describe_unit
from lthfast.imp.report import report


@pytest.fixture(autouse=True)
def idle_machine(monkeypatch):
    """The lines below are exact: no load warning from the machine the tests share (tested with a busy one)."""
    monkeypatch.setattr("os.getloadavg", lambda: (0.0, 0.0, 0.0))


def test_a_busy_machine_is_announced_once_when_training_starts(monkeypatch):
    monkeypatch.setattr("os.getloadavg", lambda: (9.0, 9.0, 9.0))
    for device, expected in (("cpu", 1), ("cuda", 0)):
        stream = io.StringIO()
        with Progress(2, stream=stream, device=device) as p:
            p.done()
            p.line("unit")
        warnings = [line for line in stream.getvalue().splitlines() if line.startswith("lthfast: warning: ")]
        assert len(warnings) == expected
        assert all("load average 9.00" in w for w in warnings)
    stream = io.StringIO()
    with Progress(2, quiet=True, stream=stream, device="cpu"):
        pass
    assert stream.getvalue() == ""


def test_plain_lines_numbered_by_finished_units():
    stream = io.StringIO()
    with Progress(3, stream=stream) as p:  # a StringIO is not a terminal: no bars
        assert not p.interactive and p.units is None
        for k in range(3):
            p.iterations.reset(total=30)
            p.iterations.set_description(f"r0 L{k} ticket")
            p.iterations.update(30)
            p.done()
            p.line(f"unit {k} finished")
    assert stream.getvalue().splitlines() == ["[1/3] unit 0 finished", "[2/3] unit 1 finished", "[3/3] unit 2 finished"]


def test_quiet_prints_nothing():
    stream = io.StringIO()
    with Progress(2, quiet=True, stream=stream) as p:
        assert p.iterations is None
        p.done()
        p.line("x")
    assert stream.getvalue() == ""


def test_a_resumed_unit_says_where_it_resumes():
    stream = io.StringIO()
    with Progress(5, interactive=False, stream=stream) as p:
        p.done(2)  # the driver counts the finished units first
        p.iterations.reset(total=30)  # train_unit: the unit's length, then what its checkpoint holds, then its label
        p.iterations.update(20)
        p.iterations.set_description("r1 L2 random_prune")
        p.iterations.update(10)
        p.done()
        p.iterations.reset(total=30)
        p.iterations.set_description("r1 L3 ticket")  # later units say nothing
    text = stream.getvalue()
    assert text.splitlines() == [
        "[2/5] resuming at replicate 1, level 2 (random prune), 20 of its 30 iterations done (2 of 5 units finished)"
    ]


def test_a_fresh_run_says_nothing_about_resuming():
    stream = io.StringIO()
    with Progress(2, interactive=False, stream=stream) as p:
        p.iterations.reset(total=30)
        p.iterations.set_description("r0 L0 ticket")
    assert stream.getvalue() == ""
    assert describe_unit("custom label") == "custom label"


def test_a_run_off_a_terminal_writes_plain_lines_and_resumes_by_name(tiny, capsys):
    result = run({**tiny, "quiet": False, "name": "p"})
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\x1b" not in err and "\r" not in err
    assert [line.split()[0] for line in lines] == ["[1/3]", "[2/3]", "[3/3]"]
    assert "L2 ticket" in lines[-1]

    (result.path / "replicate_0" / "level_2" / "done.json").unlink()  # killed after its last checkpoint
    text = report(result.path, plots=False)
    assert "unfinished: 2 of 3 units finished; stopped at replicate 0, level 2 (ticket) at iteration 30" in text
    shutil.rmtree(result.path / "replicate_0" / "level_2")
    assert "stopped at replicate 0, level 2 (ticket) before it started" in report(result.path, plots=False)

    run({**tiny, "quiet": False, "name": "p"})
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "[2/3] resuming at replicate 0, level 2 (ticket), from its start (2 of 3 units finished)"
    assert lines[1].startswith("[3/3]") and len(lines) == 2
    assert "unfinished" not in report(result.path, plots=False)
