"""Import time of lowbit's packages in a fresh process, against ``import jax`` alone (median of 5).

python benchmarks/bench_import.py
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402

MODULES = ("jax", "lowbit", "lowbit.formats", "lowbit.quant", "lowbit.training", "lowbit.nn", "lowbit.trainer")
RUNS = 5


def import_seconds(module: str) -> float:
    """Wall seconds of ``import module`` in a fresh interpreter (interpreter start-up excluded)."""
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout)


def main() -> None:
    info = _timing.machine_info()
    rows = []
    for m in MODULES:
        import_seconds(m)  # warm the page cache and the bytecode
        rows.append((m, statistics.median(import_seconds(m) for _ in range(RUNS))))
    info["load_average_after"] = _timing.load_average()
    _timing.write_json("bench_import", dict(machine=info, seconds=dict(rows)))
    lines = [
        "## bench_import: import time in a fresh process",
        "",
        f"`{info['command']}` on {info['date']}, {info['cpu']}, jax {info['jax']}; load before "
        f"{info['load_average']}, after {info['load_average_after']}. Median of {RUNS} fresh interpreters.",
        "",
        "| module | seconds | over `import jax` |",
        "|---|---:|---:|",
    ]
    base = dict(rows)["jax"]
    lines += [f"| `{m}` | {s:.2f} | {s - base:+.2f} |" for m, s in rows]
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_import.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
