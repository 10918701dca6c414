"""The built-in language model trained in each recipe: held-out bits per byte and the gap to fp32, several seeds.

Runs ``lowbit compare --model lm --dataset text`` exactly as a user types it,
one seed at a time (every recipe of seed 0, then of seed 1, ...), so that an
interrupted sweep still covers every recipe. Each seed's ``comparison.json`` is
kept under ``results/bench_lm_train/``; the report (``bench_lm_train.md``) is
rebuilt from all of them: mean ± std over seeds of the last epoch's held-out
bits per byte, the gap to fp32 (positive: worse), the median step time and the
commit and command of the runs. The default corpus (the standard library's
sources, 512 KiB) and model (dim 128, depth 2, context 64) are ``lowbit
train``'s.

Usage::

    python benchmarks/bench_lm_train.py                          # RECIPES below; seeds 0, 1, 2
    python benchmarks/bench_lm_train.py --seeds 0 --recipes fp32,fp8
    python benchmarks/bench_lm_train.py --report                 # only rewrite the report
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402
from bench_accuracy import lowbit_commit  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
OUT = RESULTS / "bench_lm_train"
# fp8 and int8, and the block-scaled recipes of issue 19 with the earlier nvfp4 numerics (nvfp4_v0) and fp4.
RECIPES = "fp32,fp8,int8,mxfp8,mxfp4,nvfp4,nvfp4_v0,fp4"


def run_seed(seed: int, recipes: str, epochs: int, work: Path) -> Path:
    """One ``lowbit compare`` over ``recipes`` at ``seed``; its comparison.json, copied with the run's provenance."""
    cmd = ["lowbit", "compare", "--model", "lm", "--dataset", "text", "--recipes", recipes, "--seeds", str(seed)]
    cmd += ["--epochs", str(epochs), "--out", str(work / f"seed{seed}")]
    if shutil.which("lowbit") is None:
        cmd[0:1] = [sys.executable, "-m", "lowbit.cli"]
    machine = _timing.machine_info()  # load before the runs
    subprocess.run(cmd, check=True)
    report = json.loads((work / f"seed{seed}" / "comparison.json").read_text())
    command = " ".join(["lowbit", *cmd[cmd.index("compare") :]]).replace(str(work), "WORK")
    report.update(lowbit_commit=lowbit_commit(), command=command, machine=machine)
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"seed{seed}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    return path


def _mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {std:.3f}"


def report() -> str:
    """Rebuild ``bench_lm_train.md`` from every seed's record."""
    records = [json.loads(p.read_text()) for p in sorted(OUT.glob("seed*.json"))]
    if not records:
        return ""
    by: dict[str, dict[int, dict]] = {}
    for rec in records:
        for row in rec["results"]:
            by.setdefault(row["recipe"], {})[rec["seeds"][0]] = row
    base = by.get("fp32", {})
    lines = [
        f"### Language model: held-out bits per byte ({records[0]['epochs']} epochs, built-in `lm`, stdlib corpus)",
        "",
        "Gap: the recipe's bits per byte minus fp32's on the same seed, averaged (positive: worse). "
        "Step: the median step time of each run; the machine's load when each seed started is below (a step "
        "time taken beside other jobs is not evidence).",
        "",
        "| recipe | seeds | bits/byte | gap to fp32 (bits/byte) | step (ms) | step / fp32 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for recipe, runs in by.items():
        seeds = sorted(runs)
        bits = [runs[s]["bits_per_byte_mean"] for s in seeds]
        gaps = [runs[s]["bits_per_byte_mean"] - base[s]["bits_per_byte_mean"] for s in seeds if s in base]
        step = statistics.median(runs[s]["step_time_ms"] for s in seeds)
        fp32_step = statistics.median(base[s]["step_time_ms"] for s in seeds if s in base) if base else None
        ratio = f"{step / fp32_step:.2f}" if fp32_step else "—"
        gap = _mean_std(gaps) if gaps and recipe != "fp32" else "—"
        lines.append(f"| {recipe} | {','.join(map(str, seeds))} | {_mean_std(bits)} | {gap} | {step:.0f} | {ratio} |")
    commits = sorted({r["lowbit_commit"] for r in records})
    cpus = sorted({r["machine"]["cpu"] for r in records})
    loads = ", ".join(f"seed {r['seeds'][0]}: {r['machine'].get('load_average', '?')}" for r in records)
    lines += [
        "",
        f"Commit {', '.join(commits)}; load at start ({loads}); "
        f"{records[0]['machine'].get('cores', '?')} CPUs ({' and '.join(cpus)}), "
        f"jax {records[0]['machine'].get('jax', '?')}.",
        "Commands (WORK: a scratch directory for the checkpoints):",
        "",
        *sorted({f"    {r['command']}" for r in records}),
    ]
    text = "\n".join(lines) + "\n"
    (RESULTS / "bench_lm_train.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", default=RECIPES, help=f"comma-separated (default: {RECIPES})")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated (default: 0,1,2)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run (default: 2, lowbit train's for text)")
    parser.add_argument("--work", type=Path, help="where the runs' checkpoints go (default: a temporary directory)")
    parser.add_argument("--report", action="store_true", help="only rewrite the report from the records")
    args = parser.parse_args()
    if not args.report:
        work = args.work or Path(tempfile.mkdtemp(prefix="lowbit-bench-lm-"))
        for seed in (int(s) for s in args.seeds.split(",")):
            print(f"wrote {run_seed(seed, args.recipes, args.epochs, work)}", flush=True)
    print(report())


if __name__ == "__main__":
    main()
