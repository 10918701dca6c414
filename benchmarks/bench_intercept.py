"""What interception costs: op discovery per model, and the train step against another checkout.

* **Discovery**: seconds from ``lowbit.quantize(model, recipe)`` to the model's
  ops found and their quantizer state created (``lowbit.nn.discover`` on one
  example batch), median of a few runs, for the built-in models.
* **A/B step** (``--ab PATH``): the stock ViT's compiled train step (the
  ``bench_train.py`` model, batch and step) timed with this checkout's lowbit
  and with the lowbit at ``PATH`` (e.g. a ``git worktree`` of an older commit),
  each in its own process, alternating order round by round; the ratio is the
  median of per-round ratios of CPU seconds per step, with its quartiles.
  Interception runs while a step is traced, so the compiled step, and its time,
  should not move.

Usage: ``python benchmarks/bench_intercept.py [--ab PATH] [--recipes int8,fp4] [--rounds 7]``; writes
``results/bench_intercept.json`` and ``.md`` and prints the table. Record the load: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
RESULTS = Path(__file__).resolve().parent / "results"
HERE = Path(__file__).resolve()


def discovery(names: list[str], repeats: int) -> list[dict]:
    """Median seconds to discover the ops of each built-in model under each recipe."""
    import jax.numpy as jnp

    import lowbit
    from lowbit.nn import discover, models

    rows = []
    for spec in ("mlp", "cnn", "vit"):
        for name in names:
            times = []
            for _ in range(repeats):
                model = models.build(spec, image_shape=(8, 8, 1), num_classes=10, seed=0)
                x = jnp.ones((1, 8, 8, 1), jnp.float32)
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    qmodel = lowbit.quantize(model, name)
                    discover(qmodel, x)
                times.append(time.perf_counter() - t0)
            rows.append(dict(model=spec, recipe=name, discovery_s=statistics.median(times)))
    return rows


def worker(recipe: str, dim: int, steps: int) -> None:
    """Print one JSON line: CPU seconds per train step of the stock ViT with the lowbit on ``sys.path``."""
    import bench_train

    import lowbit
    from lowbit import recipes

    x, y = bench_train.batch()
    stepper = bench_train.Stepper.lowbit(bench_train.vit(dim), recipes.get(recipe), x, y)
    stepper()  # warm up
    t0 = time.process_time()
    stepper.steps = steps
    stepper()
    print(json.dumps(dict(cpu_s_per_step=(time.process_time() - t0) / steps, lowbit=os.path.dirname(lowbit.__file__))))


def _run_side(path: str | None, recipe: str, dim: int, steps: int) -> float:
    env = dict(os.environ)
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join([path, env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, str(HERE), "--worker", recipe, "--dim", str(dim), "--steps", str(steps)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])["cpu_s_per_step"]


def ab(path: str, names: list[str], dim: int, rounds: int, steps: int) -> list[dict]:
    """Per recipe: new/old CPU time per step, median and quartiles over alternating rounds."""
    rows = []
    for name in names:
        ratios, new, old = [], [], []
        for r in range(rounds):
            order = [None, path] if r % 2 == 0 else [path, None]
            got = {side: _run_side(side, name, dim, steps) for side in order}
            new.append(got[None])
            old.append(got[path])
            ratios.append(got[None] / got[path])
        q1, med, q3 = statistics.quantiles(ratios, n=4)
        rows.append(
            dict(
                recipe=name,
                dim=dim,
                new_s=statistics.median(new),
                old_s=statistics.median(old),
                ratio=med,
                q1=q1,
                q3=q3,
                rounds=rounds,
            )
        )
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", default="int8,fp4,nvfp4", help="comma-separated recipes (default: int8,fp4,nvfp4)")
    ap.add_argument("--ab", default=None, help="another lowbit checkout to time the train step against")
    ap.add_argument("--dim", type=int, default=64, help="ViT width of the A/B step (default: 64)")
    ap.add_argument("--rounds", type=int, default=7, help="alternating A/B rounds (default: 7)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per side and round (default: 20)")
    ap.add_argument("--repeats", type=int, default=3, help="discovery runs per model (default: 3)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker, args.dim, args.steps)
        return
    names = args.recipes.split(",")
    load = os.getloadavg()[0]
    result = dict(load=load, discovery=discovery(names, args.repeats))
    if args.ab:
        result["ab"] = ab(args.ab, names, args.dim, args.rounds, args.steps)
    result["load_after"] = os.getloadavg()[0]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_intercept.json").write_text(json.dumps(result, indent=1))
    cmd = "python benchmarks/bench_intercept.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "## bench_intercept: op discovery per model, and the train step A/B against another checkout",
        "",
        f"`{cmd.strip()}`; load average {load:.2f} before, {result['load_after']:.2f} after.",
        "",
        "| model | recipe | discovery (s) |",
        "|---|---|---:|",
    ]
    lines += [f"| {r['model']} | {r['recipe']} | {r['discovery_s']:.2f} |" for r in result["discovery"]]
    if args.ab:
        lines += [
            "",
            f"| recipe | ViT d={args.dim} step, this (ms CPU) | other (ms CPU) | this/other | IQR |",
            "|---|---:|---:|---:|---|",
        ]
        lines += [
            f"| {r['recipe']} | {1e3 * r['new_s']:.1f} | {1e3 * r['old_s']:.1f} | {r['ratio']:.3f} | "
            f"{r['q1']:.3f}–{r['q3']:.3f} |"
            for r in result["ab"]
        ]
    text = "\n".join(lines) + "\n"
    (RESULTS / "bench_intercept.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
