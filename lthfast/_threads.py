"""CPU threads of the ``lthfast`` command on a machine it may share: a passive OpenMP wait and a load warning.

torch's OpenMP threads spin while they wait for work. When another process holds one of the cores, the spinning
and the waits for a descheduled thread made an all-core training run 12-20x slower than one thread (a 2-core VM
with one other busy process); with ``OMP_WAIT_POLICY=PASSIVE`` waiting threads sleep and the same run costs about
what one thread does. libgomp reads the variable once, when torch loads it, so the command sets it and starts
itself again (``reexec_with_passive_wait``) unless the user chose a policy.
"""

from __future__ import annotations

import os
import sys

WAIT_POLICY = "OMP_WAIT_POLICY"
# Commands that compute on the CPU threads (the others start as they are).
COMPUTING_COMMANDS = ("imp", "bench", "demo")
# How far the 1-minute load average may exceed the cores this run leaves free before it warns (load averages
# of an idle machine hover a little above 0).
LOAD_MARGIN = 0.5

THREADS_HELP = (
    "Threads: on CPU, torch uses every core by default (--threads 0). The lthfast command sets "
    f"{WAIT_POLICY}=PASSIVE unless it is set, so that waiting threads sleep instead of spinning (spinning made "
    "all-core runs 15-20x slower beside one other busy process). It warns, in one line, when the 1-minute load "
    f"average exceeds the cores this run leaves free (cores - threads) by more than {LOAD_MARGIN:g}: "
    "then --threads 1 is usually faster."
)


def passive_wait_argv(argv: list[str], environ=os.environ, cpu_count: int | None = None) -> list[str] | None:
    """The command line to start again under a passive OpenMP wait, or None when there is no need: the user set
    ``OMP_WAIT_POLICY``, the command does not compute (``info``, ``report``, ``--help`` alone), or one core.

    ``argv``: the command's arguments (``sys.argv[1:]``)."""
    command = next((a for a in argv if not a.startswith("-")), None)
    if WAIT_POLICY in environ or command not in COMPUTING_COMMANDS or (cpu_count or os.cpu_count() or 1) < 2:
        return None
    if any(a in ("-h", "--help") for a in argv):
        return None
    # sys.orig_argv keeps the interpreter's own flags and the script (or -m module) that started the command
    original = list(getattr(sys, "orig_argv", []))
    if len(original) > len(argv) and original[len(original) - len(argv) :] == list(argv):
        return [sys.executable, *original[1:]]
    return [sys.executable, "-m", "lthfast", *argv]


def reexec_with_passive_wait(argv: list[str]) -> None:
    """Replace this process by the same command with ``OMP_WAIT_POLICY=PASSIVE`` (see ``passive_wait_argv``);
    returns only when no restart is needed or it failed (then the run goes on under torch's default wait)."""
    new_argv = passive_wait_argv(argv)
    if new_argv is None:
        return
    os.environ[WAIT_POLICY] = "PASSIVE"
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(new_argv[0], new_argv)
    except OSError:
        pass


def load_warning(threads: int, load: float | None = None, cores: int | None = None) -> str | None:
    """One line when the machine is busier than this run can afford: the 1-minute load average above
    ``cores - threads + LOAD_MARGIN``; None otherwise (or where the platform has no load average)."""
    if load is None:
        if not hasattr(os, "getloadavg"):
            return None
        load = os.getloadavg()[0]
    cores = cores or os.cpu_count() or 1
    if load <= cores - threads + LOAD_MARGIN:
        return None
    hint = "; --threads 1 is usually faster here" if threads > 1 else ""
    return (
        f"lthfast: warning: the machine is busy (1-minute load average {load:.2f} on {cores} cores) and this run "
        f"uses {threads} thread{'s' if threads != 1 else ''}: expect slow training and noisy timings{hint}"
    )
