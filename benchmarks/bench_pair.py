"""Two recipes' train steps against each other and fp32, alternating in one process, with their spread.

``bench_train.py`` pairs each recipe with fp32 for a few rounds; when two
recipes differ by a few percent (current vs delayed scaling) that is below its
noise. Here fp32, A and B are timed in every round, in an order that rotates
(``_timing.alternate``), for more rounds, and each ratio is given with its
interquartile range over rounds: a B/A ratio whose range straddles 1 is no
evidence either way. Same model, batch and step as ``bench_train.py``
(stock ViT, depth 2, batch 64, process CPU time).

Either side may be a qwix configuration (``qwix_int8``, ``qwix_fp8``; needs the
``[peers]`` extra), timed on the same model in the same process.

Usage: ``python benchmarks/bench_pair.py fp8 fp8_delayed [--widths 64,256,512] [--rounds 15]``;
appends one JSON line per width to ``results/bench_pair.jsonl`` and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402
import bench_train  # noqa: E402

from lowbit import recipes  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _spread(values: list[float]) -> dict:
    q1, median, q3 = statistics.quantiles(values, n=4)
    return dict(median=median, q1=q1, q3=q3)


def _stepper(model, name: str, x, y):
    """A lowbit recipe's step, or a qwix configuration's (``bench_train.PEERS``) on the same model."""
    if name in bench_train.PEERS:
        return bench_train.Stepper.qwix(model, bench_train.PEERS[name][1], x, y)
    return bench_train.Stepper.lowbit(model, recipes.get(name), x, y)


def pair(dim: int, a: str, b: str, rounds: int) -> dict:
    """CPU-time ratios A/fp32, B/fp32 and B/A per round at width ``dim``: medians and quartiles."""
    x, y = bench_train.batch()
    model = bench_train.vit(dim)
    fp32 = bench_train.Stepper.lowbit(model, recipes.get("fp32"), x, y)
    fp32.steps = bench_train.calibrate(fp32)
    sa, sb = (_stepper(model, n, x, y) for n in (a, b))
    sa.steps = sb.steps = fp32.steps
    cpu: dict[str, list[float]] = {}
    _timing.alternate({"fp32": fp32, "a": sa, "b": sb}, {"fp32": (), "a": (), "b": ()}, repeats=rounds, cpu_times=cpu)
    ratios = {
        f"{a}/fp32": [p / q for p, q in zip(cpu["a"], cpu["fp32"])],
        f"{b}/fp32": [p / q for p, q in zip(cpu["b"], cpu["fp32"])],
        f"{b}/{a}": [p / q for p, q in zip(cpu["b"], cpu["a"])],
    }
    return dict(
        dim=dim,
        rounds=rounds,
        steps_per_sample=fp32.steps,
        fp32_cpu_ms=1e3 * statistics.median(cpu["fp32"]) / fp32.steps,
        ratios={k: _spread(v) for k, v in ratios.items()},
        load_average=_timing.load_average(),
        machine=_timing.machine_info(),
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    peers = ", ".join(bench_train.PEERS)
    ap.add_argument("a", help=f"first recipe (or a qwix configuration: {peers})")
    ap.add_argument("b", help=f"second recipe (or a qwix configuration: {peers})")
    ap.add_argument("--widths", default="64,256,512", help="comma-separated ViT widths (default: 64,256,512)")
    ap.add_argument("--rounds", type=int, default=15, help=f"alternating rounds (>= {_timing.MIN_REPEATS})")
    args = ap.parse_args(argv)
    for name in (args.a, args.b):
        if name in bench_train.PEERS:
            import qwix  # noqa: F401  (the optional [peers] extra: fail before anything compiles)
        else:
            recipes.get(name)  # an unknown name fails before anything compiles
    if args.rounds < _timing.MIN_REPEATS:
        ap.error(f"--rounds={args.rounds} must be >= {_timing.MIN_REPEATS}")
    RESULTS.mkdir(exist_ok=True)
    for dim in (int(w) for w in args.widths.split(",")):
        row = pair(dim, args.a, args.b, args.rounds)
        print(
            "d={dim}: ".format(**row)
            + "  ".join(f"{k} {v['median']:.3f} (IQR {v['q1']:.2f}-{v['q3']:.2f})" for k, v in row["ratios"].items())
            + f"  load {row['load_average']}",
            flush=True,
        )
        with (RESULTS / "bench_pair.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
