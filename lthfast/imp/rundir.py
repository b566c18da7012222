"""The run directory: layout, atomic writes, completion markers, and readers that explain corrupt files.

Layout (``runs/<name>/``)::

    config.json  env.json  summary.csv  plots/*.png
    replicate_<r>/rewind.pt                      the rewind state (lthfast.pruning.Snapshot, a deep copy)
    replicate_<r>/level_<k>/                     one "unit": the ticket trained at level k
        mask.safetensors  model.safetensors  checkpoint.pt  metrics.jsonl  sparsity.json  done.json
    replicate_<r>/level_<k>/<control>/           the same files for a control branch at level k

Every file is written to a temporary name in its folder and renamed over the target (``os.replace`` is atomic on
POSIX), so a kill at any moment leaves either the old or the new file, never a torn one. A unit is finished only
when ``done.json`` exists, and it is written last. Files get the mode the umask gives a new file (0644 under the
usual 022: others on a shared filesystem can read a run), and the same run writes the same safetensors bytes.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import torch

from lthfast.imp.errors import CheckpointError, RunDirError

DONE = "done.json"


# ---- atomic writes ------------------------------------------------------------------------------------------
def _umask() -> int:
    """The process's umask (read from /proc on Linux; elsewhere set and restored)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic(path: Path, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then rename it over ``path``.

    The temporary file is created 0600 (``mkstemp``); it gets the mode ``open`` would have given a new file
    (0666 less the umask) before the rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    _atomic(path, write)


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_torch(path: Path, obj) -> None:
    _atomic(path, lambda tmp: torch.save(obj, tmp))


def canonical_safetensors_header(path: str | os.PathLike) -> None:
    """Rewrite a safetensors file's JSON header with its keys sorted, in place and at the same length.

    safetensors serializes the ``__metadata__`` dict from a Rust hash map, whose order changes from one process
    to the next, so two identical runs wrote different bytes. Offsets are unchanged: only the header moves."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= size:  # the same content in another order: never longer; the padding is spaces
            f.seek(8)
            f.write(text.ljust(size, b" "))


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A safetensors file of CPU, contiguous copies of ``tensors``."""
    from safetensors.torch import save_file

    cpu = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}

    def write(tmp: str) -> None:
        save_file(cpu, tmp)
        canonical_safetensors_header(tmp)

    _atomic(path, write)


def save_masks(path: Path, masks) -> None:
    """``masks.save`` (safetensors for a ``.safetensors`` path, its header canonical) through an atomic write."""

    def write(tmp: str) -> None:
        masks.save(tmp)
        if str(tmp).endswith(".safetensors"):
            canonical_safetensors_header(tmp)

    _atomic(path, write)


# ---- readers that name the file and the way out -------------------------------------------------------------
def recovery_hint(path: Path) -> str:
    folder = Path(path).parent
    return f"delete {folder} to redo that part of the run, or rerun with --force to start the whole run over"


def load_torch(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to unpickle means the file cannot be trusted
        raise CheckpointError(f"{path} is corrupt or unreadable ({type(exc).__name__}); {recovery_hint(path)}") from exc


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{path} is corrupt or unreadable ({type(exc).__name__}); {recovery_hint(path)}") from exc


def load_masks(path: Path, device=None):
    from lthfast.pruning import Masks

    try:
        return Masks.load(path, device=device)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{path} is corrupt or unreadable ({type(exc).__name__}); {recovery_hint(path)}") from exc


def load_json(path: Path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is corrupt or unreadable ({type(exc).__name__}); {recovery_hint(path)}") from exc


# ---- layout -------------------------------------------------------------------------------------------------
class RunDir:
    """Paths of one run directory (nothing is created until ``prepare``)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    config = property(lambda self: self.root / "config.json")
    env = property(lambda self: self.root / "env.json")
    summary = property(lambda self: self.root / "summary.csv")
    plots = property(lambda self: self.root / "plots")

    def replicate(self, r: int) -> Path:
        return self.root / f"replicate_{r}"

    def unit(self, r: int, level: int, branch: str = "ticket") -> Path:
        """Folder of the ticket (branch "ticket") or of a control branch at ``level`` of replicate ``r``."""
        path = self.replicate(r) / f"level_{level}"
        return path if branch == "ticket" else path / branch

    def rewind_path(self, r: int) -> Path:
        return self.replicate(r) / "rewind.pt"

    def check_not_foreign(self) -> None:
        """RunDirError when the folder holds files but no config.json: not a run directory, so not ours to touch."""
        if self.root.is_dir() and not self.config.exists() and any(p.name != ".lock" for p in self.root.iterdir()):
            raise RunDirError(f"{self.root} exists and is not an lthfast run directory; use --force or another --name")

    def lock(self, force: bool = False):
        """Hold an exclusive lock on the run directory until the returned file is closed (or the process dies).

        Raises RunDirError when another process holds it: two processes writing one run would interleave; and,
        unless ``force``, when the folder is not a run directory (before the lock file is created in it).
        """
        import fcntl

        if not force:
            self.check_not_foreign()
        check_writable(self.root)
        handle = open(self.root / ".lock", "w")  # noqa: SIM115 - closed by the caller
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise RunDirError(
                f"{self.root} is in use by another lthfast process; wait for it or pick another --name"
            ) from None
        return handle

    def prepare(self, identity: dict, full_config: dict, force: bool) -> bool:
        """Create the folder, or check that an existing one was made with the same config.

        Returns True when an existing run is resumed (its temporary files left by a killed run are removed).
        Raises RunDirError when the folder cannot be written, is not a run directory or holds a run with another
        config. With ``force`` its contents are deleted first, whatever they are: the way out of a corrupt file.
        """
        resumed = False
        if force:
            self._wipe()
        elif self.config.exists():
            old = load_json(self.config)
            old_identity = old.get("identity", {}) if isinstance(old, dict) else {}
            # runs made before levels and replicates left the identity recorded them: they extend like new ones
            old_identity = {k: v for k, v in old_identity.items() if k not in ("levels", "replicates")}
            if old_identity != identity:
                changed = sorted(k for k in set(old_identity) | set(identity) if old_identity.get(k) != identity.get(k))
                diff = ", ".join(f"{k}: {old_identity.get(k)!r} -> {identity.get(k)!r}" for k in changed[:4])
                raise RunDirError(
                    f"{self.root} holds a run with a different config ({diff}); "
                    "use --force to start it over or --name to pick another run directory"
                )
            for stale in self.root.rglob(".*.tmp*"):
                stale.unlink(missing_ok=True)
            resumed = True
        else:
            self.check_not_foreign()
        check_writable(self.root)
        write_json(self.config, {"identity": identity, "config": full_config})
        return resumed

    def _wipe(self) -> None:
        import shutil

        for child in self.root.iterdir():
            if child.name == ".lock":
                continue
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()


def check_writable(folder: Path) -> None:
    """Create ``folder`` and write a probe file in it; RunDirError naming it when that fails."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise RunDirError(f"cannot write to output directory {folder}: {exc.strerror or exc}") from None


def is_done(unit: Path) -> bool:
    return (Path(unit) / DONE).is_file()


def git_commit() -> str:
    """The checkout's commit (with "-dirty" when it has changes), or "unknown"."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment() -> dict:
    """Versions, device, backend (``lthfast._backend.describe()``) and the git commit."""
    import platform
    import sys

    from lthfast._backend import describe

    env = dict(describe())
    env.update(git_commit=git_commit(), host=platform.node(), argv=sys.argv)
    return env
