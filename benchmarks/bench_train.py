"""Train-step time and peak memory of every recipe relative to fp32, as the ViT widens; qwix beside it.

The model is lowbit's ViT, a stock Flax NNX model (``lowbit.nn.vit.ViT``): fp32
trains it as it is, every other recipe trains ``lowbit.quantize(model, recipe)``,
whose quantizer state ``lowbit.describe`` creates before the split, as a user
would. The step is the public one of ``lowbit.trainer.step``: ``init_state``
splits the model and ``make_train_step`` (forward, quantized backward, AdamW
through optax, loss scaling) is jitted as ``lowbit.train`` does, minus the
data-parallel shardings (one device). The input is one fixed synthetic
digits-shaped batch (64 x 8x8x1, patch 2: 17 tokens), so data loading is not
timed. ViT depth 2, 4 heads, MLP 2d, for widths d = 64, 128, 256, 512: as matmuls
grow, the quantizers' elementwise work (linear in the activations) shrinks
relative to the matmuls (quadratic in d).

Timing: each candidate is paired with fp32 of the same model in the same
process; a sample is N consecutive steps after compilation (N chosen so a fp32
sample lasts ~0.25 s), and the pair alternates order each round
(``_timing.alternate``). The ratio is the median over rounds of candidate time /
fp32 time (>1: slower), both in wall time and in process CPU time; the latter is
the primary measure on a shared, oversubscribed machine (see ``time_pair``).
Targets are checked on it. Every row records the load average when it was taken.

Memory: XLA's compile-time ``memory_analysis()`` of the step: arguments (train
state + batch) + outputs + temporaries - aliased bytes, i.e. the step's peak
live buffers as planned by the compiler, not a measured RSS.

``--matmul`` builds every recipe with ``Recipe.with_matmul(mode)`` (``real``
applies where the operands allow it, the other matmuls stay fake). Separately,
int8_lsq is timed in each mode, comparing the real int8 path with fake quant;
the dots of each compiled step are counted by dtype to show which path ran.

``--peers`` (needs qwix: ``pip install 'lowbit[peers]'``) also runs qwix's
``quantize_model`` (a ``qwix.QtProvider`` with one ``QtRule`` for every op) on
the same float model, in the same process, through the very same step function,
so only the quantization differs: ``qwix_int8`` (int8 weights and activations,
dynamic absmax, float gradients: qwix's default QAT, beside lowbit's ``int8``)
and ``qwix_fp8`` (float8_e4m3fn weights and activations, float8_e5m2 gradients,
beside lowbit's ``fp8``); each gets its own fp32 pairing. A configuration qwix
cannot compile for a model is recorded with its error instead of a time.

User models: the same comparison (lowbit ``int8``/``fp8``, and with ``--peers``
the two qwix configurations, each against fp32) on models written without
lowbit: ``user_mlp``, an NNX MLP with an ``nnx.Linear``, a raw ``@`` on its own
``nnx.Param`` and a linear head, and the built-in ``cnn`` (``lowbit.nn.models``:
two ``nnx.Conv``, two ``nnx.Linear``).

Targets (CPU-time step ratio to fp32): fp8 <= 1.2 at d=64, <= 1.05 at d=256,
<= 1.1 at d=512; fp4 <= 1.3 at d=64 and <= 1.1 at d=512; int8 <= 1.0 at d=256;
mxfp4/nvfp4 <= 1.2 at d=256; int8_lsq <= 1.0 at every width; with ``--peers``,
lowbit int8 <= qwix int8 and lowbit fp8 <= qwix fp8 at every width.

Usage: ``python benchmarks/bench_train.py [--quick] [--widths 64,128] [--recipes fp32,fp8] [--matmul auto]
[--peers] [--out DIR]``. Writes ``benchmarks/results/bench_train.{json,md,png}`` (``--quick``:
``bench_train_quick.*``; ``--out``: into DIR instead).
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import math
import os
import re
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402

import lowbit  # noqa: E402
from lowbit import recipes  # noqa: E402
from lowbit.nn import models  # noqa: E402
from lowbit.nn.vit import ViT  # noqa: E402
from lowbit.trainer.step import init_state, make_optimizer, make_train_step  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BATCH, IMAGE, CLASSES, PATCH, DEPTH, HEADS = 64, (8, 8, 1), 10, 2, 2, 4
WIDTHS, QUICK_WIDTHS = "64,128,256,512", "64,128"
SAMPLE_S = 0.25
TARGETS = {
    ("fp8", 64): 1.2,
    ("fp8", 256): 1.05,
    ("fp8", 512): 1.1,
    ("fp4", 64): 1.3,
    ("fp4", 512): 1.1,
    ("int8", 256): 1.0,
    ("mxfp4", 256): 1.2,
    ("nvfp4", 256): 1.2,
    **{("int8_lsq", d): 1.0 for d in (64, 128, 256, 512)},
}
MATMUL_COMPARE = "int8_lsq"
QUICK_RECIPES = ["fp32", "fp8", "fp4", "int8", "int8_lsq"]
# qwix configuration -> (the lowbit recipe it is compared with, its QtRule's fields).
PEERS = {
    "qwix_int8": ("int8", dict(weight_qtype=jnp.int8, act_qtype=jnp.int8)),
    "qwix_fp8": ("fp8", dict(weight_qtype=jnp.float8_e4m3fn, act_qtype=jnp.float8_e4m3fn, bwd_qtype=jnp.float8_e5m2)),
}
PEER_LABELS = {
    "qwix_int8": "int8 weights + activations, float gradients",
    "qwix_fp8": "e4m3 weights + activations, e5m2 gradients",
}
USER_RECIPES = ("int8", "fp8")  # the lowbit side of the peers
# Optimized HLO names a dot's operands without their types ("%dot.3 = s32[..] dot(%a, %b)"),
# so the operand dtypes are looked up from the instructions that define them.
_DEF = re.compile(r"%([\w.\-]+) = (\w+)\[")
_DOT = re.compile(r"= (\w+)\[[^\n]*? dot\(%([\w.\-]+), %([\w.\-]+)\)")


class UserMLP(nnx.Module):
    """A model as a user writes it, without lowbit: an ``nnx.Linear``, a raw ``@`` on its own weight, a head."""

    def __init__(self, *, image_shape: tuple[int, int, int], num_classes: int, rngs: nnx.Rngs, hidden: int = 256):
        self.fc = nnx.Linear(math.prod(image_shape), hidden, rngs=rngs)
        self.w = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (hidden, hidden)))
        self.head = nnx.Linear(hidden, num_classes, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        h = jax.nn.relu(self.fc(images.reshape(images.shape[0], -1)))
        return self.head(jax.nn.relu(h @ self.w[...]))


USER_MODELS: dict[str, Callable[[], nnx.Module]] = {
    "user_mlp": lambda: UserMLP(image_shape=IMAGE, num_classes=CLASSES, rngs=nnx.Rngs(0)),
    "cnn": lambda: models.build("cnn", image_shape=IMAGE, num_classes=CLASSES, seed=0),
}


def vit(dim: int) -> nnx.Module:
    """The float ViT of width ``dim``."""
    return ViT(
        image_shape=IMAGE,
        num_classes=CLASSES,
        patch_size=PATCH,
        dim=dim,
        depth=DEPTH,
        heads=HEADS,
        mlp_dim=2 * dim,
        rngs=nnx.Rngs(0),
    )


class Stepper:
    """One model's compiled train step and its evolving state; a call runs ``steps`` steps."""

    def __init__(self, model: nnx.Module, recipe: recipes.Recipe, x, y):
        # Any schedule does: only the cost of a step matters, not where training goes.
        tx = make_optimizer(1e-3, 0.05, 10, 10_000)
        graphdef, self.state = init_state(model, tx, policy=recipe.policy, loss_scale=recipe.make_loss_scale())
        t0 = time.perf_counter()
        self.compiled = jax.jit(make_train_step(graphdef, tx, policy=recipe.policy)).lower(self.state, x, y).compile()
        self.compile_s = time.perf_counter() - t0
        self.x, self.y, self.steps = x, y, 1
        self.params = sum(math.prod(v.shape) for v in jax.tree.leaves(self.state.params))

    @classmethod
    def lowbit(cls, model: nnx.Module, recipe: recipes.Recipe, x, y) -> Stepper:
        """``model`` as is for fp32, else ``lowbit.quantize(model, recipe)`` with its ops discovered."""
        if recipe.name != "fp32":
            model = lowbit.quantize(model, recipe)
            with warnings.catch_warnings():
                # A recipe's attention rule matches nothing in a model without attention: expected here.
                warnings.filterwarnings("ignore", message=r"recipe .* is unused")
                lowbit.describe(model, recipe.policy.cast_to_compute(x[:1]))
        return cls(model, recipe, x, y)

    @classmethod
    def qwix(cls, model: nnx.Module, rule: dict, x, y) -> Stepper:
        """``qwix.quantize_model(model, QtProvider([QtRule(**rule)]), x)``, trained in float32 like fp32."""
        import qwix

        provider = qwix.QtProvider([qwix.QtRule(module_path=".*", **rule)])
        return cls(qwix.quantize_model(model, provider, x[:1]), recipes.get("fp32"), x, y)

    def __call__(self):
        state = self.state
        for _ in range(self.steps):
            state, _ = self.compiled(state, self.x, self.y)
        self.state = state
        return state

    def twin(self) -> Stepper:
        """The same compiled step with its own state."""
        return copy.copy(self)

    def memory(self) -> dict:
        m = self.compiled.memory_analysis()
        parts = dict(
            argument=m.argument_size_in_bytes,
            output=m.output_size_in_bytes,
            temp=m.temp_size_in_bytes,
            alias=m.alias_size_in_bytes,
        )
        return dict(parts, peak=parts["argument"] + parts["output"] + parts["temp"] - parts["alias"])

    def dots(self) -> dict[str, int]:
        """Dot instructions of the optimized step by dtypes, e.g. ``{"s8xs8->s32": 14, "f32xf32->f32": 28}``."""
        text = self.compiled.as_text()
        types = dict(_DEF.findall(text))
        return dict(
            collections.Counter(
                f"{types.get(lhs, '?')}x{types.get(rhs, '?')}->{out}" for out, lhs, rhs in _DOT.findall(text)
            )
        )


def time_pair(ref: Stepper, cand: Stepper, repeats: int) -> dict[str, list[float]]:
    """Per-round wall and CPU seconds per step of ``ref`` and ``cand``, alternating order.

    CPU time (all of this process's threads) is kept beside wall time because
    the machine is shared: a step descheduled by other tenants' work takes longer
    on the wall clock but not in CPU time.
    """
    cpu: dict[str, list[float]] = {}
    wall = _timing.alternate({"ref": ref, "cand": cand}, {"ref": (), "cand": ()}, repeats=repeats, cpu_times=cpu)
    per_step = {"ref": ref.steps, "cand": cand.steps}
    return {
        f"{n}_{clock}": [t / per_step[n] for t in times[n]]
        for clock, times in (("wall", wall), ("cpu", cpu))
        for n in ("ref", "cand")
    }


def calibrate(fp32: Stepper) -> int:
    """Steps per sample so that a fp32 sample lasts about ``SAMPLE_S`` (after one warm-up call)."""
    jax.block_until_ready(fp32())
    t0 = time.perf_counter()
    jax.block_until_ready(fp32())
    # One step per sample is enough at large widths; small ones need several.
    return max(1, min(50, round(SAMPLE_S / (time.perf_counter() - t0))))


def measure(label: str, fp32: Stepper, cand: Stepper, repeats: int, target: float | None = None) -> dict:
    """One candidate against fp32: per-round times, ratios, memory, dots and the load average."""
    cand.steps = fp32.steps
    t = time_pair(fp32, cand, repeats)
    mem, base = cand.memory(), fp32.memory()
    row = dict(
        compile_s=cand.compile_s,
        memory=mem,
        memory_ratio=mem["peak"] / base["peak"],
        dots=cand.dots(),
        rounds=t,
        load_average=_timing.load_average(),
    )
    for clock in ("cpu", "wall"):
        ratios = [c / r for r, c in zip(t[f"ref_{clock}"], t[f"cand_{clock}"])]
        row[f"{clock}_ratio"] = statistics.median(ratios)
        row[f"{clock}_ms"] = 1e3 * statistics.median(t[f"cand_{clock}"])
        row[f"fp32_{clock}_ms"] = 1e3 * statistics.median(t[f"ref_{clock}"])
    row.update(target=target, meets_target=None if target is None else row["cpu_ratio"] <= target)
    print(
        f"  {label:28s} cpu {row['cpu_ms']:8.2f} ms/step x{row['cpu_ratio']:.3f}  "
        f"wall {row['wall_ms']:8.2f} ms/step x{row['wall_ratio']:.3f}  (fp32 cpu {row['fp32_cpu_ms']:.2f} ms)  "
        f"peak {mem['peak'] / 2**20:6.1f} MiB  load {row['load_average']}",
        flush=True,
    )
    return row


def measure_peer(label: str, fp32: Stepper, model: nnx.Module, peer: str, x, y, repeats: int) -> dict:
    """One qwix configuration against fp32; a configuration qwix cannot build or compile is kept as its error."""
    try:
        cand = Stepper.qwix(model, PEERS[peer][1], x, y)
    except Exception as e:  # qwix's limits are a result here (e.g. e5m2 gradients through a conv)
        error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        print(f"  {label:28s} qwix failed: {error}", flush=True)
        return dict(error=error, load_average=_timing.load_average())
    return measure(label, fp32, cand, repeats)


def batch():
    """The fixed synthetic digits-shaped batch: (images, labels)."""
    rng = np.random.default_rng(0)
    return (
        jnp.asarray(rng.random((BATCH, *IMAGE), np.float32)),
        jnp.asarray(rng.integers(0, CLASSES, BATCH), jnp.int32),
    )


def bench_width(dim: int, names: list[str], mode: str, repeats: int, peers: list[str]) -> dict:
    x, y = batch()
    model = vit(dim)
    fp32 = Stepper.lowbit(model, recipes.get("fp32"), x, y)
    fp32.steps = calibrate(fp32)
    out = dict(dim=dim, steps_per_sample=fp32.steps, params=fp32.params, recipes={}, matmul_compare={}, peers={})

    def lowbit_row(name, m):
        # fp32 against itself shows the pairing's noise floor; its own compiled step
        # would be the same program, so a twin saves a compilation.
        cand = fp32.twin() if name == "fp32" else Stepper.lowbit(model, recipes.get(name).with_matmul(m), x, y)
        return measure(f"d={dim} {name} {m}", fp32, cand, repeats, TARGETS.get((name, dim)))

    for name in names:
        out["recipes"][name] = lowbit_row(name, mode)
    for m in ("fake", "real", "auto"):
        out["matmul_compare"][m] = (
            out["recipes"][MATMUL_COMPARE] if m == mode and MATMUL_COMPARE in names else lowbit_row(MATMUL_COMPARE, m)
        )
    for peer in peers:
        row = out["peers"][peer] = measure_peer(f"d={dim} {peer}", fp32, model, peer, x, y, repeats)
        mine = out["recipes"][PEERS[peer][0]]
        if "error" not in row:
            mine["peer"], mine["meets_peer"] = peer, mine["cpu_ratio"] <= row["cpu_ratio"]
    pairs = [*out["recipes"].values(), *out["matmul_compare"].values()]
    for clock in ("cpu", "wall"):
        out[f"fp32_{clock}_ms"] = statistics.median(r[f"fp32_{clock}_ms"] for r in pairs)
    out["fp32_memory"] = fp32.memory()
    out["fp32_dots"] = fp32.dots()
    return out


def bench_user(name: str, mode: str, repeats: int, peers: list[str]) -> dict:
    """lowbit's int8/fp8 and the peers against fp32 on a model written without lowbit."""
    x, y = batch()
    model = USER_MODELS[name]()
    fp32 = Stepper.lowbit(model, recipes.get("fp32"), x, y)
    fp32.steps = calibrate(fp32)
    rows = {
        r: measure(f"{name} {r} {mode}", fp32, Stepper.lowbit(model, recipes.get(r).with_matmul(mode), x, y), repeats)
        for r in USER_RECIPES
    }
    rows.update({p: measure_peer(f"{name} {p}", fp32, model, p, x, y, repeats) for p in peers})
    timed = [r for r in rows.values() if "error" not in r]
    return dict(
        model=name,
        params=fp32.params,
        steps_per_sample=fp32.steps,
        rows=rows,
        fp32_cpu_ms=statistics.median(r["fp32_cpu_ms"] for r in timed),
        fp32_memory=fp32.memory(),
    )


def _load_range(rows) -> str:
    """The 1-minute load averages recorded with ``rows``, as ``min–max``."""
    loads = [float(r["load_average"].split()[0]) for r in rows if r["load_average"] != "unknown"]
    return f"{min(loads):.1f}–{max(loads):.1f}" if loads else "unknown"


def _cell(row: dict, mark: bool | None = None) -> str:
    if "error" in row:
        return "failed¹"
    return f"{row['cpu_ratio']:.2f}×" + ("" if mark is None else (" ✓" if mark else " ✗"))


def markdown(result: dict) -> str:
    widths = [w["dim"] for w in result["widths"]]
    names = list(result["widths"][0]["recipes"])
    mi = result["machine"]
    header = ["|---|" + "---:|" * len(widths)]

    def ratio_table(clock):
        lines = ["| recipe | " + " | ".join(f"d={d}" for d in widths) + " |", *header]
        for n in names:
            cells = []
            for w in result["widths"]:
                r = w["recipes"][n]
                mark = "" if r["meets_target"] is None or clock != "cpu" else (" ✓" if r["meets_target"] else " ✗")
                cells.append(f"{r[f'{clock}_ratio']:.2f}×{mark}")
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append(
            "| *fp32 ms/step* | " + " | ".join(f"{w[f'fp32_{clock}_ms']:.2f}" for w in result["widths"]) + " |"
        )
        lines.append(
            "| *load (1 min)* | "
            + " | ".join(_load_range([*w["recipes"].values(), *w["matmul_compare"].values()]) for w in result["widths"])
            + " |"
        )
        return lines

    lines = (
        [
            "# bench_train: train-step time and peak memory relative to fp32",
            "",
            f"{mi['date']}, `{mi['command']}`; {mi['cpu']}, {mi['cores']} cores, jax {mi['jax']}, "
            f"flax {mi['flax']}; load average at start {result['load_average_start']}, at end "
            f"{mi['load_average']} (each row's is in the JSON). Wall-clock ratios are noisy on a shared machine "
            "(the fp32 row, fp32 against itself, shows how much); CPU-time ratios are the primary measure.",
            "",
            f"Stock Flax ViT (`lowbit.nn.vit.ViT`) depth {DEPTH}, {HEADS} heads, MLP 2d, quantized by "
            "`lowbit.quantize(model, recipe)`; the step is `lowbit.trainer.step.make_train_step` (forward, "
            f"backward, AdamW); fixed digits-shaped batch {BATCH}x8x8x1, patch {PATCH}; "
            f"matmul mode `{result['matmul']}`; per candidate, {result['repeats']} rounds alternating with fp32, "
            "each sample N steps (N/width: "
            + ", ".join(f"{w['dim']}: {w['steps_per_sample']}" for w in result["widths"])
            + "); median over rounds of candidate / fp32 time (>1: slower). ✓/✗: target met (CPU time).",
            "",
            "## Step time, recipe / fp32, process CPU time",
            "",
        ]
        + ratio_table("cpu")
        + ["", "## Step time, recipe / fp32, wall clock", ""]
        + ratio_table("wall")
        + [
            "",
            "## Peak step memory, MiB (× fp32)",
            "",
            "XLA's compile-time `memory_analysis()` of the jitted step: arguments (state + batch) + outputs + "
            "temporaries − aliases.",
            "",
            "| recipe | " + " | ".join(f"d={d}" for d in widths) + " |",
            *header,
        ]
    )
    lines.append("| fp32 | " + " | ".join(f"{w['fp32_memory']['peak'] / 2**20:.1f}" for w in result["widths"]) + " |")
    for n in names[1:]:
        lines.append(
            f"| {n} | "
            + " | ".join(
                f"{w['recipes'][n]['memory']['peak'] / 2**20:.1f} ({w['recipes'][n]['memory_ratio']:.2f}×)"
                for w in result["widths"]
            )
            + " |"
        )
    lines += [
        "",
        f"## {MATMUL_COMPARE} by matmul mode: step / fp32 (CPU time), and the compiled step's dots",
        "",
        "| mode | " + " | ".join(f"d={d}" for d in widths) + " | dots by dtype (lhs x rhs -> out) |",
        "|---|" + "---:|" * len(widths) + "---|",
    ]
    for m in result["widths"][0]["matmul_compare"]:
        rows = [w["matmul_compare"][m] for w in result["widths"]]
        lines.append(
            f"| {m} | "
            + " | ".join(f"{r['cpu_ratio']:.2f}× ({r['cpu_ms']:.1f} ms)" for r in rows)
            + f" | {_dots(rows[0])} |"
        )
    lines += ["", *peers_markdown(result), "", *users_markdown(result)]
    return "\n".join(lines) + "\n"


def _dots(row: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(row.get("dots", {}).items()))


def _errors(rows) -> list[str]:
    errors = sorted({r["error"] for r in rows if "error" in r})
    return ["", *(f"¹ qwix failed: `{e}`" for e in errors)] if errors else []


def peers_markdown(result: dict) -> list[str]:
    peers = result["peers"]
    if not peers:
        return [f"qwix: {result['qwix']}"]
    widths = [w["dim"] for w in result["widths"]]
    lines = [
        f"## qwix {result['qwix']} side by side: step / fp32, process CPU time",
        "",
        "`qwix.quantize_model(model, qwix.QtProvider([qwix.QtRule(module_path='.*', ...)]), x)` on the same "
        "float ViT, trained by the same step function; each row has its own fp32 pairing in this run. "
        "✓/✗ on lowbit: at or below qwix (target).",
        "",
        "| | " + " | ".join(f"d={d}" for d in widths) + " | dots by dtype |",
        "|---|" + "---:|" * len(widths) + "---|",
    ]
    for peer in peers:
        mine = PEERS[peer][0]
        lines.append(
            f"| lowbit `{mine}` | "
            + " | ".join(_cell(w["recipes"][mine], w["recipes"][mine].get("meets_peer")) for w in result["widths"])
            + f" | {_dots(result['widths'][0]['recipes'][mine])} |"
        )
        lines.append(
            f"| qwix {PEER_LABELS[peer]} | "
            + " | ".join(_cell(w["peers"][peer]) for w in result["widths"])
            + f" | {_dots(result['widths'][0]['peers'][peer])} |"
        )
    lines += _errors(w["peers"][p] for w in result["widths"] for p in peers)
    return lines


def users_markdown(result: dict) -> list[str]:
    users = result["user_models"]
    cols = [*USER_RECIPES, *result["peers"]]
    lines = [
        "## Models written without lowbit: step / fp32, process CPU time",
        "",
        "`user_mlp`: `nnx.Linear`, a raw `@` on its own `nnx.Param`, a linear head (hidden 256); `cnn`: "
        "`lowbit.nn.models.CNN` (two `nnx.Conv`, two `nnx.Linear`). lowbit: `lowbit.quantize(model, recipe)`"
        + ("; qwix: `quantize_model` as above" if result["peers"] else "")
        + ". Same batch and step.",
        "",
        "| model | params | fp32 CPU ms/step | "
        + " | ".join(f"lowbit `{c}`" if c in USER_RECIPES else f"qwix {PEER_LABELS[c]}" for c in cols)
        + " | load (1 min) |",
        "|---|---:|---:|" + "---:|" * len(cols) + "---|",
    ]
    for u in users:
        lines.append(
            f"| {u['model']} | {u['params']:,} | {u['fp32_cpu_ms']:.2f} | "
            + " | ".join(_cell(u["rows"][c]) for c in cols)
            + f" | {_load_range(u['rows'].values())} |"
        )
    lines += _errors(r for u in users for r in u["rows"].values())
    return lines


def plot(result: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4), layout="constrained")
    axes = fig.subplots(1, 3)
    widths = [w["dim"] for w in result["widths"]]
    series = [
        (n, [w["recipes"][n] for w in result["widths"]], ":" if n == "fp32" else "-", "o")
        for n in result["widths"][0]["recipes"]
    ]
    series += [(p, [w["peers"][p] for w in result["widths"]], "--", "x") for p in result["peers"]]
    for name, rows, ls, marker in series:
        for ax, key in zip(axes, ("cpu_ratio", "wall_ratio", "memory_ratio")):
            ax.plot(widths, [r.get(key, math.nan) for r in rows], marker=marker, label=name, ls=ls)
    for ax, label in zip(axes, ("step CPU time / fp32", "step wall time / fp32", "peak step memory / fp32")):
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set(xscale="log", xlabel="width d", ylabel=label, xticks=widths, xticklabels=[str(w) for w in widths])
        ax.minorticks_off()
    axes[0].legend(fontsize=8, ncol=2)
    fig.suptitle(f"ViT depth {DEPTH}, batch {BATCH}, digits-shaped input; matmul {result['matmul']}")
    fig.savefig(path, dpi=100)


def _qwix_version() -> str | None:
    """qwix's version, or None when it does not import."""
    try:
        from qwix import version
    except ImportError:
        return None
    return version.__version__


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--widths",
        help=f"comma-separated ViT widths, multiples of {HEADS} (default: {WIDTHS}; --quick: {QUICK_WIDTHS})",
    )
    ap.add_argument(
        "--recipes",
        help="comma-separated (default: every recipe; --quick: "
        + ", ".join(QUICK_RECIPES)
        + "); fp32 is always included",
    )
    ap.add_argument(
        "--matmul", default="auto", choices=("fake", "real", "auto"), help="matmul mode of every recipe (default: auto)"
    )
    ap.add_argument("--repeats", type=int, default=7, help=f"alternating rounds per pair (>= {_timing.MIN_REPEATS})")
    ap.add_argument(
        "--peers",
        action="store_true",
        help="also time qwix's quantize_model (int8, fp8) on the same models (needs qwix: "
        "pip install 'lowbit[peers]'); adds lowbit's int8 and fp8 to the recipes",
    )
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"output folder (default: {RESULTS})")
    ap.add_argument(
        "--quick",
        action="store_true",
        help=f"d = {QUICK_WIDTHS}; {', '.join(QUICK_RECIPES)}; {_timing.MIN_REPEATS} rounds; bench_train_quick.* files",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats = _timing.MIN_REPEATS
        args.recipes = args.recipes or ",".join(QUICK_RECIPES)
    if args.repeats < _timing.MIN_REPEATS:
        ap.error(f"--repeats {args.repeats} is invalid; allowed: >= {_timing.MIN_REPEATS}")
    try:
        widths = [int(d) for d in (args.widths or (QUICK_WIDTHS if args.quick else WIDTHS)).split(",")]
    except ValueError:
        ap.error(f"--widths {args.widths!r} is invalid; allowed: comma-separated integers")
    if any(d < HEADS or d % HEADS for d in widths):
        ap.error(f"--widths {args.widths!r} is invalid; allowed: positive multiples of {HEADS} (the heads)")
    names = args.recipes.split(",") if args.recipes else recipes.names()
    qwix_version = _qwix_version()
    if args.peers and qwix_version is None:
        ap.error("--peers needs qwix, which does not import: pip install 'lowbit[peers]'")
    peers = list(PEERS) if args.peers else []
    # fp32 first (fp32 against itself shows the pairing's noise floor; the tables rely on its place),
    # then the peers' lowbit counterparts the list lacks, then the list in its order.
    missing = [PEERS[p][0] for p in peers if PEERS[p][0] not in names]
    names = ["fp32", *(n for n in missing + names if n != "fp32")]
    unknown = [n for n in names if n not in recipes.names()]
    if unknown:
        ap.error(f"--recipes: unknown {', '.join(unknown)}; allowed: {', '.join(recipes.names())}")
    import flax

    qwix_status = (
        "not installed: no qwix column"
        if qwix_version is None
        else f"{qwix_version}"
        if args.peers
        else f"{qwix_version} installed, not run (--peers runs it)"
    )
    load_start = _timing.load_average()
    print(
        f"load average {load_start}; recipes {', '.join(names)}; matmul {args.matmul}; "
        f"peers {', '.join(peers) or 'none'}",
        flush=True,
    )
    result = dict(
        benchmark="bench_train",
        batch=BATCH,
        image=IMAGE,
        patch=PATCH,
        depth=DEPTH,
        heads=HEADS,
        matmul=args.matmul,
        repeats=args.repeats,
        widths=[bench_width(d, names, args.matmul, args.repeats, peers) for d in widths],
        user_models=[bench_user(u, args.matmul, args.repeats, peers) for u in USER_MODELS],
        peers=peers,
        qwix=qwix_status,
        load_average_start=load_start,
        machine=dict(_timing.machine_info(), flax=flax.__version__, qwix=qwix_version),
    )
    stem = args.out / ("bench_train_quick" if args.quick else "bench_train")
    args.out.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    md = markdown(result)
    stem.with_suffix(".md").write_text(md)
    plot(result, stem.with_suffix(".png"))
    print(md)
    print(f"wrote {stem}.json, .md, .png")
    return result


if __name__ == "__main__":
    main()
