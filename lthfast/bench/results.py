"""The JSON document every ``lthfast bench`` run writes, its validation, the crossover and the printed table.

Schema "lthfast.bench/1" (documented in benchmarks/README.md): top-level run metadata, ``config``, ``shapes``,
``rows`` (one per sparsity x block, each with a ``results`` entry per provider) and ``crossover``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import tempfile
from pathlib import Path

import torch

SCHEMA = "lthfast.bench/1"

_TOP = {
    "schema": str, "kind": str, "created": str, "command": str, "notes": str, "machine": dict, "device": dict,
    "versions": dict, "git": dict, "config": dict, "shapes": dict, "rows": list, "crossover": dict,
}  # fmt: skip
_ROW = {"sparsity": float, "block": int, "density": float, "tile_density": float, "tile_index_ms": float}
_OK = {"median_ms": float, "p20_ms": float, "p80_ms": float, "timer": str, "density": float, "max_err": float}


class SchemaError(ValueError):
    """A benchmark document does not follow the schema; the message names the key."""


class OutputError(ValueError):
    """A result file cannot be written where asked (it exists, or the folder is not writable); names the path."""


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: torch.device) -> dict:
    """``{"type", "name", ...}`` for the device the benchmark ran on."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {
            "type": "cuda", "name": props.name, "capability": list(torch.cuda.get_device_capability(device)),
            "memory_gb": round(props.total_memory / 2**30, 1), "sm_count": props.multi_processor_count,
        }  # fmt: skip
    return {"type": "cpu", "name": _cpu_name(), "threads": torch.get_num_threads()}


def device_tag(device: torch.device) -> str:
    """A file-name tag: ``cpu-2core`` (``cpu-2core-1thread`` when torch uses fewer threads than there are cores)
    or the GPU's name, e.g. ``h100-80gb-hbm3``."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower().replace("nvidia", "")
        return re.sub(r"[^a-z0-9]+", "-", name).strip("-")
    cores, threads = os.cpu_count() or 1, torch.get_num_threads()
    return f"cpu-{cores}core" + (f"-{threads}thread" if threads != cores else "")


def git_info() -> dict:
    """The commit of the checkout lthfast was imported from, and whether tracked files differ from it.

    ``LTHFAST_GIT_COMMIT``, when set, names the commit instead, with ``dirty`` unknown (None): a tree sent to a
    remote GPU machine may carry no .git, or a stale one (seen on the lent H200: it reported an older commit)."""
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    if os.environ.get("LTHFAST_GIT_COMMIT"):
        return {"commit": os.environ["LTHFAST_GIT_COMMIT"], "dirty": None}
    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def document(kind: str, body: dict, device: torch.device, command: str, notes: str, provider: str) -> dict:
    """Wrap a run's ``{"config", "shapes", "rows"}`` with the metadata and the crossover of ``provider``."""
    from lthfast._backend import describe

    machine = {
        "platform": platform.platform(), "processor": _cpu_name(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        # at the end of the run: other processes' load explains noisy CPU numbers
        "load_avg_1_5_15_min": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }  # fmt: skip
    doc = {
        "schema": SCHEMA,
        "kind": kind,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "notes": notes,
        "machine": machine,
        "device": device_info(device),
        "versions": describe(),
        "git": git_info(),
        **body,
    }
    doc["crossover"] = {provider: crossover(doc["rows"], provider)}
    validate(doc)
    return doc


def beats_dense(result: dict, dense: dict) -> bool:
    """Clearly faster than dense in the same row: a faster median, and (where both have them) its p80 below
    dense's p20, so that noise on a shared machine does not make a crossover."""
    if result["status"] != "ok" or dense["status"] != "ok" or result["median_ms"] >= dense["median_ms"]:
        return False
    if None in (result.get("p80_ms"), dense.get("p20_ms")):
        return True
    return result["p80_ms"] < dense["p20_ms"]


def crossover(rows: list[dict], provider: str = "lthfast") -> dict[str, float | None]:
    """Per block size: the lowest sparsity from which ``provider`` beats dense (``beats_dense``) at that and every
    measured higher sparsity. Keys are block sizes as strings (JSON keys); None where it never does (or was not
    measured), so a single win at a low sparsity followed by losses does not count as a crossover.
    """
    out: dict[str, float | None] = {}
    for block in sorted({r["block"] for r in rows}):
        points = []
        for r in sorted((r for r in rows if r["block"] == block), key=lambda r: r["sparsity"]):
            by_name = {res["provider"]: res for res in r["results"]}
            if provider in by_name and "dense" in by_name and by_name[provider]["status"] == "ok":
                points.append((r["sparsity"], beats_dense(by_name[provider], by_name["dense"])))
        found = None
        for sparsity, wins in reversed(points):
            if not wins:
                break
            found = sparsity
        out[str(block)] = found
    return out


def _check(obj: dict, spec: dict, where: str) -> None:
    for key, kind in spec.items():
        if key not in obj:
            raise SchemaError(f"{where}: missing key {key!r}")
        value = obj[key]
        ok = isinstance(value, (int, float)) if kind is float else isinstance(value, kind)
        if not ok or (kind is not bool and isinstance(value, bool)):
            raise SchemaError(f"{where}.{key}: expected {kind.__name__}, got {type(value).__name__}")


def validate(doc: dict) -> None:
    """Raise ``SchemaError`` naming the first key that breaks schema ``lthfast.bench/1``."""
    _check(doc, _TOP, "document")
    if doc["schema"] != SCHEMA:
        raise SchemaError(f"document.schema: expected {SCHEMA!r}, got {doc['schema']!r}")
    if doc["kind"] not in ("layer", "train"):
        raise SchemaError(f"document.kind: expected 'layer' or 'train', got {doc['kind']!r}")
    for i, row in enumerate(doc["rows"]):
        _check(row, _ROW | {"results": list}, f"rows[{i}]")
        for j, res in enumerate(row["results"]):
            where = f"rows[{i}].results[{j}]"
            _check(res, {"provider": str, "status": str}, where)
            if res["status"] == "ok":
                _check(res, _OK | {"speedup_vs_dense": float}, where)
                if "noisy" in res and not isinstance(res["noisy"], bool):  # documents made before it lack the key
                    raise SchemaError(f"{where}.noisy: expected bool, got {type(res['noisy']).__name__}")
            elif res["status"] in ("skipped", "error"):
                _check(res, {"reason": str}, where)
            else:
                raise SchemaError(f"{where}.status: expected ok, skipped or error, got {res['status']!r}")


def check_output(paths: list[Path], force: bool = False) -> None:
    """Before anything is measured: refuse a result file that exists (unless ``force``) and a folder that cannot
    be written (created if missing). Raises ``OutputError`` naming the file or folder."""
    for path in map(Path, paths):
        if path.exists() and not force:
            raise OutputError(f"{path} exists; pass --force to overwrite it, or another --out")
        if path.is_dir():
            raise OutputError(f"{path} is a folder, expected a file path")
    for folder in dict.fromkeys(Path(p).parent for p in paths):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".probe.", dir=folder)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise OutputError(f"cannot write to {folder}: {exc.strerror or exc}") from None


def fresh_folder(parent: Path, name: str) -> Path:
    """Create and return ``parent/name`` (``name-2``, ``name-3``, ... when taken): a folder no earlier run wrote."""
    parent = Path(parent)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        for i in range(1, 1000):
            folder = parent / (name if i == 1 else f"{name}-{i}")
            try:
                folder.mkdir()
                return folder
            except FileExistsError:
                continue
    except OSError as exc:
        raise OutputError(f"cannot create a result folder in {parent}: {exc.strerror or exc}") from None
    raise OutputError(f"{parent}: no free folder name for {name}")


def write_json(doc: dict, path: Path, force: bool = False) -> Path:
    """Write ``doc`` to ``path``; an existing file is overwritten only with ``force`` (else FileExistsError)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w" if force else "x") as f:
        f.write(json.dumps(doc, indent=1) + "\n")
    return path


NOISY_MARK = "~"


def _cell(res: dict) -> str:
    if res["status"] != "ok":
        return res["status"]
    ratio = res.get("speedup_vs_dense")
    ratio_text = f"{ratio:5.2f}x" if ratio is not None else "    -"
    mark = NOISY_MARK if res.get("noisy") else " "
    if "samples_per_s" in res:
        return f"{res['samples_per_s']:9.1f}/s {ratio_text}{mark}"
    return f"{res['median_ms']:9.3f} ms {ratio_text}{mark}"


def noisy_cells(doc: dict) -> list[tuple[float, int, str]]:
    """(sparsity, block, provider) of every measurement flagged noisy (``timing.Timing.noisy``)."""
    return [
        (row["sparsity"], row["block"], res["provider"])
        for row in doc["rows"]
        for res in row["results"]
        if res["status"] == "ok" and res.get("noisy")
    ]


def format_table(doc: dict) -> str:
    """The printed table: one line per (sparsity, block), each provider's median and its speed-up over dense,
    then the skipped/failed providers with their reasons, the tile-index build times and the crossover."""
    rows = doc["rows"]
    names = list(dict.fromkeys(res["provider"] for row in rows for res in row["results"]))
    width = max([20] + [len(n) for n in names])
    head = f"{'sparsity':>8} {'block':>5} {'density':>7} {'tiles':>6} {'index ms':>8}  "
    lines = [head + "  ".join(f"{n:>{width}}" for n in names)]
    reasons: dict[tuple[str, str, str], list[str]] = {}
    for row in rows:
        by_name = {res["provider"]: res for res in row["results"]}
        cells = [f"{_cell(by_name[n]):>{width}}" if n in by_name else f"{'-':>{width}}" for n in names]
        lines.append(
            f"{row['sparsity']:>8.3g} {row['block']:>5d} {row['density']:>7.4f} {row['tile_density']:>6.3f} "
            f"{row['tile_index_ms']:>8.3f}  " + "  ".join(cells)
        )
        for res in row["results"]:
            if res["status"] != "ok":
                reasons.setdefault((res["provider"], res["status"], res["reason"]), []).append(
                    f"{row['sparsity']:g}/{row['block']}"
                )
    unit = "samples/s" if doc["kind"] == "train" else "median ms"
    lines.append(f"cells: {unit} and speed-up over dense in the same row (>1 faster); tiles: fraction of tiles alive")
    times = [row["tile_index_ms"] for row in rows]
    if times:
        tile = rows[0].get("tile")
        scope = ", all layers" if doc["kind"] == "train" else ""
        lines.append(
            f"tile index build after a prune ({tile[0]}x{tile[1]} tiles{scope}): "
            f"median {sorted(times)[len(times) // 2]:.3f} ms, max {max(times):.3f} ms (not part of the timings above)"
        )
    for (name, status, reason), where in reasons.items():
        shown = ", ".join(where) if len(where) < len(rows) else "all rows"
        lines.append(f"{status}: {name} ({shown}): {reason}")
    noisy = noisy_cells(doc)
    for provider, per_block in doc["crossover"].items():
        text = ", ".join(f"block {b}: {'none' if s is None else f'{s:g}'}" for b, s in per_block.items())
        caveat = " (from noisy rows: rerun on an idle machine before quoting it)" if noisy else ""
        lines.append(f"crossover (lowest sparsity from which {provider} beats dense): {text}{caveat}")
    if noisy:
        from lthfast.bench.timing import NOISY_RANGE, NOISY_ROUND_RATIO

        measured = sum(res["status"] == "ok" for row in rows for res in row["results"])
        lines.append(
            f"{NOISY_MARK} noisy: {len(noisy)} of {measured} measurements spread too far "
            f"(slowest/fastest round > {NOISY_ROUND_RATIO:g}, or p20-p80 range > {NOISY_RANGE:.0%} of the median): "
            "the machine was busy; compare them with care"
        )
    return "\n".join(lines)
