"""Train-step time and peak memory of every recipe relative to fp32, as the ViT widens.

The step is ``lowbit.trainer.loop``'s own: ``_initial_state`` splits the model
and ``_train_step`` (forward, quantized backward, AdamW, loss scaling) is jitted
exactly as ``train`` does, minus the data-parallel shardings (one device). The
input is one fixed synthetic digits-shaped batch (64 x 8x8x1, patch 2: 17
tokens), so data loading is not timed. ViT depth 2, 4 heads, MLP 2d, for widths
d = 64, 128, 256, 512: as matmuls grow, the quantizers' elementwise work (linear
in the activations) shrinks relative to the matmuls (quadratic in d).

Timing: each recipe is paired with fp32 of the same width in the same process;
a sample is N consecutive steps after compilation (N chosen so a fp32 sample
lasts ~0.25 s), and the pair alternates order each round (``_timing.alternate``).
The ratio is the median over rounds of recipe time / fp32 time (>1: slower),
both in wall time and in process CPU time; the latter is the primary measure on
a shared, oversubscribed machine (see ``time_pair``). Targets are checked on it.

Memory: XLA's compile-time ``memory_analysis()`` of the step: arguments (train
state + batch) + outputs + temporaries - aliased bytes, i.e. the step's peak
live buffers as planned by the compiler, not a measured RSS.

``--matmul`` builds every recipe with ``Recipe.with_matmul(mode)`` (``real``
applies where the operands allow it, the other matmuls stay fake). Separately,
int8_lsq is timed in each mode, comparing the real int8 path with fake quant;
the dots of each compiled step are counted by dtype to show which path ran.

Targets (step-time ratio): fp8 <= 1.2 at d=64 and <= 1.1 at d=512; fp4 <= 1.3
at d=64 and <= 1.1 at d=512; int8_lsq <= 1.0 at every width.

Usage: ``python benchmarks/bench_train.py [--quick] [--widths 64,128] [--recipes fp32,fp8] [--matmul auto]``
Writes ``benchmarks/results/bench_train.{json,md,png}`` (``--quick``: ``bench_train_quick.*``).
"""

from __future__ import annotations

import argparse
import collections
import copy
import functools
import json
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402

from lowbit.nn.vit import ViT  # noqa: E402
from lowbit import recipes  # noqa: E402
from lowbit.trainer import loop

RESULTS = Path(__file__).resolve().parent / "results"
BATCH, IMAGE, PATCH, DEPTH, HEADS = 64, (8, 8, 1), 2, 2, 4
SAMPLE_S = 0.25
TARGETS = {("fp8", 64): 1.2, ("fp8", 512): 1.1, ("fp4", 64): 1.3, ("fp4", 512): 1.1,
           **{("int8_lsq", d): 1.0 for d in (64, 128, 256, 512)}}
MATMUL_COMPARE = "int8_lsq"
QUICK_RECIPES = ["fp32", "fp8", "fp4", "int8_lsq"]
# Optimized HLO names a dot's operands without their types ("%dot.3 = s32[..] dot(%a, %b)"),
# so the operand dtypes are looked up from the instructions that define them.
_DEF = re.compile(r"%([\w.\-]+) = (\w+)\[")
_DOT = re.compile(r"= (\w+)\[[^\n]*? dot\(%([\w.\-]+), %([\w.\-]+)\)")


class Stepper:
    """One recipe's compiled train step and its evolving state; a call runs ``steps`` steps."""

    def __init__(self, recipe, dim: int, x, y):
        model = ViT(image_shape=IMAGE, num_classes=10, patch_size=PATCH, dim=dim, depth=DEPTH, heads=HEADS,
                    mlp_dim=2 * dim, recipe=recipe, rngs=nnx.Rngs(0))
        # Any schedule does: only the cost of a step matters, not where training goes.
        tx = loop.make_optimizer(1e-3, 0.05, 10, 10_000)
        graphdef, _, self.state = loop._initial_state(model, recipe, tx)
        t0 = time.perf_counter()
        self.compiled = jax.jit(functools.partial(loop._train_step, graphdef, recipe.policy, tx)).lower(
            self.state, x, y).compile()
        self.compile_s = time.perf_counter() - t0
        self.x, self.y, self.steps, self.cpu_s = x, y, 1, []
        self.params = sum(math.prod(v.shape) for v in jax.tree.leaves(self.state.params))

    def __call__(self):
        t0 = time.process_time()
        state = self.state
        for _ in range(self.steps):
            state, metrics = self.compiled(state, self.x, self.y)
        self.state = jax.block_until_ready(state)
        self.cpu_s.append((time.process_time() - t0) / self.steps)
        return metrics

    def twin(self) -> "Stepper":
        """The same compiled step with its own state and samples."""
        other = copy.copy(self)
        other.cpu_s = []
        return other

    def memory(self) -> dict:
        m = self.compiled.memory_analysis()
        parts = dict(argument=m.argument_size_in_bytes, output=m.output_size_in_bytes,
                     temp=m.temp_size_in_bytes, alias=m.alias_size_in_bytes)
        return dict(parts, peak=parts["argument"] + parts["output"] + parts["temp"] - parts["alias"])

    def dots(self) -> dict[str, int]:
        """Dot instructions of the optimized step by dtypes, e.g. ``{"s8xs8->s32": 14, "f32xf32->f32": 28}``."""
        text = self.compiled.as_text()
        types = dict(_DEF.findall(text))
        return dict(collections.Counter(f"{types.get(lhs, '?')}x{types.get(rhs, '?')}->{out}"
                                        for out, lhs, rhs in _DOT.findall(text)))


def time_pair(ref: Stepper, cand: Stepper, repeats: int) -> dict[str, list[float]]:
    """Per-round wall and CPU seconds per step of ``ref`` and ``cand``, alternating order.

    CPU time (all of this process's threads) is kept beside wall time because
    the machine is shared: a step descheduled by other tenants' work takes longer
    on the wall clock but not in CPU time.
    """
    ref.cpu_s.clear()
    cand.cpu_s.clear()
    wall = _timing.alternate({"ref": ref, "cand": cand}, {"ref": (), "cand": ()}, repeats=repeats)
    n = len(wall["ref"])  # the untimed warmup round's CPU samples come first: drop them
    return dict(ref_wall=[t / ref.steps for t in wall["ref"]], cand_wall=[t / cand.steps for t in wall["cand"]],
                ref_cpu=ref.cpu_s[-n:], cand_cpu=cand.cpu_s[-n:])


def bench_width(dim: int, names: list[str], mode: str, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((BATCH, *IMAGE), np.float32))
    y = jnp.asarray(rng.integers(0, 10, BATCH), jnp.int32)
    fp32 = Stepper(recipes.get("fp32"), dim, x, y)
    jax.block_until_ready(fp32())
    t0 = time.perf_counter()
    jax.block_until_ready(fp32())
    # One step per sample is enough at large widths; small ones need several.
    steps = max(1, min(50, round(SAMPLE_S / (time.perf_counter() - t0))))
    fp32.steps = steps
    base_mem = fp32.memory()
    out = dict(dim=dim, steps_per_sample=steps, params=fp32.params, recipes={}, matmul_compare={})

    def measure(name, m):
        # fp32 against itself shows the pairing's noise floor; its own compiled step
        # would be the same program, so a twin saves a compilation.
        cand = fp32.twin() if name == "fp32" else Stepper(recipes.get(name).with_matmul(m), dim, x, y)
        cand.steps = steps
        t = time_pair(fp32, cand, repeats)
        mem = cand.memory()
        row = dict(compile_s=cand.compile_s, memory=mem, memory_ratio=mem["peak"] / base_mem["peak"],
                   dots=cand.dots(), rounds=t)
        for clock in ("cpu", "wall"):
            ratios = [c / r for r, c in zip(t[f"ref_{clock}"], t[f"cand_{clock}"])]
            row[f"{clock}_ratio"] = statistics.median(ratios)
            row[f"{clock}_ms"] = 1e3 * statistics.median(t[f"cand_{clock}"])
            row[f"fp32_{clock}_ms"] = 1e3 * statistics.median(t[f"ref_{clock}"])
        target = TARGETS.get((name, dim))
        row.update(target=target, meets_target=None if target is None else row["cpu_ratio"] <= target)
        print(f"  d={dim:4d} {name:9s} {m:5s} cpu {row['cpu_ms']:8.2f} ms/step x{row['cpu_ratio']:.3f}  "
              f"wall {row['wall_ms']:8.2f} ms/step x{row['wall_ratio']:.3f}  (fp32 cpu {row['fp32_cpu_ms']:.2f} ms)  "
              f"peak {mem['peak'] / 2**20:6.1f} MiB  load {_timing.load_average()}", flush=True)
        return row

    for name in names:
        out["recipes"][name] = measure(name, mode)
    for m in ("fake", "real", "auto"):
        out["matmul_compare"][m] = (out["recipes"][MATMUL_COMPARE] if m == mode and MATMUL_COMPARE in names
                                    else measure(MATMUL_COMPARE, m))
    pairs = [*out["recipes"].values(), *out["matmul_compare"].values()]
    for clock in ("cpu", "wall"):
        out[f"fp32_{clock}_ms"] = statistics.median(r[f"fp32_{clock}_ms"] for r in pairs)
    out["fp32_memory"] = base_mem
    out["fp32_dots"] = fp32.dots()
    return out


def markdown(result: dict) -> str:
    widths = [w["dim"] for w in result["widths"]]
    names = list(result["widths"][0]["recipes"])
    mi = result["machine"]

    def ratio_table(clock):
        lines = ["| recipe | " + " | ".join(f"d={d}" for d in widths) + " |", "|---|" + "---:|" * len(widths)]
        for n in names:
            cells = []
            for w in result["widths"]:
                r = w["recipes"][n]
                mark = "" if r["meets_target"] is None or clock != "cpu" else (" ✓" if r["meets_target"] else " ✗")
                cells.append(f"{r[f'{clock}_ratio']:.2f}×{mark}")
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("| *fp32 ms/step* | " + " | ".join(f"{w[f'fp32_{clock}_ms']:.2f}" for w in result["widths"])
                     + " |")
        return lines

    lines = ["# bench_train: train-step time and peak memory relative to fp32", "",
             f"{mi['date']}, `{mi['command']}`; {mi['cpu']}, {mi['cores']} cores, jax {mi['jax']}, "
             f"flax {mi['flax']}; load average at start {result['load_average_start']}, at end "
             f"{mi['load_average']}. The machine is shared and oversubscribed: wall-clock ratios are noisy "
             "(the fp32 row, fp32 against itself, shows how much); CPU-time ratios are the primary measure.", "",
             f"ViT depth {DEPTH}, {HEADS} heads, MLP 2d, fixed digits-shaped batch {BATCH}x8x8x1, patch {PATCH}; "
             f"matmul mode `{result['matmul']}`; per recipe, {result['repeats']} rounds alternating with fp32, "
             "each sample N steps (N/width: " + ", ".join(f"{w['dim']}: {w['steps_per_sample']}"
                                                          for w in result["widths"])
             + "); median over rounds of recipe / fp32 time (>1: slower). ✓/✗: target met (CPU time).", "",
             "## Step time, recipe / fp32, process CPU time", ""] + ratio_table("cpu") + [
             "", "## Step time, recipe / fp32, wall clock", ""] + ratio_table("wall") + [
             "", "## Peak step memory, MiB (× fp32)", "",
             "XLA's compile-time `memory_analysis()` of the jitted step: arguments (state + batch) + outputs + "
             "temporaries − aliases.", "",
             "| recipe | " + " | ".join(f"d={d}" for d in widths) + " |", "|---|" + "---:|" * len(widths)]
    lines.append("| fp32 | " + " | ".join(f"{w['fp32_memory']['peak'] / 2**20:.1f}" for w in result["widths"]) + " |")
    for n in names[1:]:
        lines.append(f"| {n} | " + " | ".join(
            f"{w['recipes'][n]['memory']['peak'] / 2**20:.1f} ({w['recipes'][n]['memory_ratio']:.2f}×)"
            for w in result["widths"]) + " |")
    lines += ["", f"## {MATMUL_COMPARE} by matmul mode: step / fp32 (CPU time), and the compiled step's dots", "",
              "| mode | " + " | ".join(f"d={d}" for d in widths) + " | dots by dtype (lhs x rhs -> out) |",
              "|---|" + "---:|" * len(widths) + "---|"]
    for m, _ in result["widths"][0]["matmul_compare"].items():
        rows = [w["matmul_compare"][m] for w in result["widths"]]
        dots = ", ".join(f"{k}: {v}" for k, v in sorted(rows[0]["dots"].items()))
        lines.append(f"| {m} | " + " | ".join(f"{r['cpu_ratio']:.2f}× ({r['cpu_ms']:.1f} ms)" for r in rows)
                     + f" | {dots} |")
    lines += ["", f"qwix: {result['qwix']}"]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4), layout="constrained")
    axes = fig.subplots(1, 3)
    widths = [w["dim"] for w in result["widths"]]
    for n in result["widths"][0]["recipes"]:
        rows = [w["recipes"][n] for w in result["widths"]]
        for ax, key in zip(axes, ("cpu_ratio", "wall_ratio", "memory_ratio")):
            ax.plot(widths, [r[key] for r in rows], marker="o", label=n, ls=":" if n == "fp32" else "-")
    for ax, label in zip(axes, ("step CPU time / fp32", "step wall time / fp32", "peak step memory / fp32")):
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set(xscale="log", xlabel="width d", ylabel=label, xticks=widths, xticklabels=[str(w) for w in widths])
        ax.minorticks_off()
    axes[0].legend(fontsize=8, ncol=2)
    fig.suptitle(f"ViT depth {DEPTH}, batch {BATCH}, digits-shaped input; matmul {result['matmul']}")
    fig.savefig(path, dpi=100)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="64,128,256,512")
    ap.add_argument("--recipes", help="comma-separated (default: every recipe; --quick: fp32, fp8, fp4, int8_lsq)")
    ap.add_argument("--matmul", default="auto", choices=("fake", "real", "auto"),
                    help="matmul mode of every recipe (default: auto)")
    ap.add_argument("--repeats", type=int, default=7, help="alternating rounds per pair (>= 5)")
    ap.add_argument("--quick", action="store_true", help="d = 64, 128; fp32, fp8, fp4, int8_lsq; 5 rounds")
    args = ap.parse_args(argv)
    if args.quick:
        args.widths, args.repeats = "64,128", 5
        args.recipes = args.recipes or ",".join(QUICK_RECIPES)
    names = args.recipes.split(",") if args.recipes else recipes.names()
    if "fp32" not in names:
        names.insert(0, "fp32")  # the fp32 row shows the pairing's noise floor (ratio ~1)
    import flax

    try:
        import qwix  # noqa: F401
        qwix_status = "installed, not benchmarked"
    except ImportError:
        qwix_status = "not installed: no qwix column"
    load_start = _timing.load_average()
    print(f"load average {load_start}; recipes {', '.join(names)}; matmul {args.matmul}", flush=True)
    widths = [bench_width(int(d), names, args.matmul, args.repeats) for d in args.widths.split(",")]
    result = dict(benchmark="bench_train", batch=BATCH, image=IMAGE, patch=PATCH, depth=DEPTH, heads=HEADS,
                  matmul=args.matmul, repeats=max(args.repeats, _timing.MIN_REPEATS), widths=widths,
                  qwix=qwix_status, load_average_start=load_start,
                  machine=dict(_timing.machine_info(), flax=flax.__version__))
    stem = RESULTS / ("bench_train_quick" if args.quick else "bench_train")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    md = markdown(result)
    stem.with_suffix(".md").write_text(md)
    plot(result, stem.with_suffix(".png"))
    print(md)
    print(f"wrote {stem}.json, .md, .png")
    return result


if __name__ == "__main__":
    main()
