"""Print the speed-up table of ``benchmarks/unstructured_cpu.sh``'s JSONs (what docs/performance.md quotes).

    python benchmarks/summarize_unstructured.py [DIR]     (default: benchmarks/results/unstructured)

One block per thread count and case: the dense step's median in ms per sparsity, then per sparsity lthfast's
speed-up over dense and each other provider's (SparseProp, its width variant), "~" where the run flagged the row
noisy (benchmarks/README.md). The CPU comes from the JSONs' ``machine`` record.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

CASES = [  # (label, file name part, block)
    ("linear1024", "linear-train", "1024", 1),
    ("linear1024", "linear-train", "1024", 32),
    ("lenet layer", "linear-train", "lenet", 1),
    ("conv8", "conv-train", "8x8", 1),
    ("conv16", "conv-train", "16x16", 1),
    ("sgd", "train-lenet300", "sgd", 1),
    ("adam", "train-lenet300", "adam", 1),
]
ORDER = ("lthfast", "sparseprop", "sparseprop-width")


def _fmt(r: dict) -> str:
    if r.get("status") != "ok" or r.get("speedup_vs_dense") is None:
        return r.get("status", "?")
    return f"{r['speedup_vs_dense']:.2f}x" + ("~" if r.get("noisy") else "")


def main(argv: list[str]) -> int:
    root = Path(argv[0] if argv else "benchmarks/results/unstructured")
    files = sorted(root.glob("*.json"))
    by_threads: dict[int, list[str]] = defaultdict(list)
    cpus = set()
    for label, kind, tag, block in CASES:
        for path in files:
            if kind not in path.name or f"-{tag}-" not in path.name + "-":
                continue
            doc = json.loads(path.read_text())
            cpus.add(str((doc.get("machine") or {}).get("processor") or "CPU not recorded"))
            threads = int(path.stem.rsplit("-", 1)[-1].removesuffix("thread"))
            rows = [r for r in doc["rows"] if r["block"] == block]
            if not rows:
                continue
            dense = {r["sparsity"]: next((x["median_ms"] for x in r["results"] if x["provider"] == "dense"), None)
                     for r in rows}  # fmt: skip
            lines = by_threads[threads]
            lines.append(f"{label} block {block} dense ms: " + ", ".join(
                f"{s:g}: {ms:.3f}" for s, ms in dense.items() if ms is not None))  # fmt: skip
            for r in rows:
                found = {x["provider"]: x for x in r["results"]}
                parts = [_fmt(found[p]) for p in ORDER if p in found]
                lines.append(f"   {r['sparsity']:<5g} " + " / ".join(parts))
    print("CPU: " + ", ".join(sorted(cpus)))
    for threads in sorted(by_threads):
        print(f"== {threads} thread(s)")
        print("\n".join(by_threads[threads]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
