"""Sharded training step per mesh shape (issue 22): step time and the collectives of the compiled program.

For each model (the built-in ViT at digits size, the built-in LM), mesh
(``data`` × ``fsdp`` × ``tensor``, ``lowbit.trainer.sharding``) and recipe, the
train step is built and compiled exactly as ``lowbit.trainer.loop`` does:
``lowbit.quantize``, one forward call (``describe``) so the quantizer state
exists, ``init_state``, ``state_shardings`` and ``check_blocks`` (a mesh it
refuses is recorded with its message, not compiled), then ``jax.jit(
make_train_step(...), in_shardings=(placed, batch, batch), out_shardings=(placed,
replicated))``. Random data: only time and program structure are measured.

Collectives: counted in the compiled HLO text (``lower(...).compile().as_text()``)
per kind (all-gather, reduce-scatter, all-reduce, collective-permute,
all-to-all; an async ``-start``/``-done`` pair counts once), with the bytes of
their results on one device (all-gather: the gathered tensor; all-reduce: the
whole tensor; reduce-scatter: one shard). All-reduces of scalars only (amax,
finite checks, the loss) are counted separately. The counts are of the program,
not of one step's execution: a collective in a branch of a ``lax.cond`` (how
quantizers pick a scale) counts once though only one branch runs.

Step time: every recipe's compiled step on one mesh is called in alternating
rounds (``_timing.alternate``: at least 5 rounds after one warm-up), each
waiting for its result; a ratio is the median over rounds of the quantized
step's time over fp32's. The devices are simulated on the host CPU
(``--xla_force_host_platform_device_count=8``, set for a child process: jax
reads it once), all sharing the machine's cores: step times compare recipes on
one mesh, not meshes with each other, and say nothing about real interconnects.

Writes ``<out>.md`` (this run's table) and appends one record per (model, mesh,
recipe) to ``<out>.jsonl``.

Usage::

    python benchmarks/bench_sharding.py                                  # everything (tens of minutes)
    python benchmarks/bench_sharding.py --models vit --meshes 'fsdp=8;fsdp=4,tensor=2' --recipes fp8 --steps 5

``--meshes`` is ``;``-separated (a mesh's axes are ``,``-separated); fp32, the
baseline, is always run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402
from bench_accuracy import lowbit_commit  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEVICES = 8
DEVICE_FLAG = f"--xla_force_host_platform_device_count={DEVICES}"
MODELS = ("vit", "lm")
RECIPES = ("fp32", "fp8", "int8", "mxfp8", "nvfp4")
MESHES = ("data=1", "data=8", "fsdp=8", "tensor=8", "data=2,fsdp=2,tensor=2", "fsdp=4,tensor=2")
BATCH = {"vit": 64, "lm": 32}  # global batch: images / windows of 64 tokens
KINDS = ("all-gather", "reduce-scatter", "all-reduce", "collective-permute", "all-to-all")
SHORT = {
    "all-gather": "AG",
    "reduce-scatter": "RS",
    "all-reduce": "AR",
    "collective-permute": "CP",
    "all-to-all": "A2A",
}

# `%name = SHAPE opcode(` where SHAPE is an array shape or a tuple of them; `-start` is an async
# collective's first half (its `-done` is not counted).
_OP = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>.*?)\s+"
    r"(?P<kind>all-gather|reduce-scatter|all-reduce|collective-permute|all-to-all)(?P<start>-start)?\("
)
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_BITS = {"pred": 8, "s4": 4, "u4": 4, "s2": 2, "u2": 2, "f4e2m1fn": 4}


def _element_bits(dtype: str) -> int:
    if dtype in _BITS:
        return _BITS[dtype]
    if dtype.startswith("f8") or dtype in ("s8", "u8"):
        return 8
    digits = re.search(r"\d+", dtype)
    return int(digits.group()) if digits else 32


def _arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    """The array shapes in an HLO shape text (``f32[4,64]{1,0}`` or a tuple of them)."""
    return [(t, tuple(int(d) for d in dims.split(",") if d)) for t, dims in _ARRAY.findall(shape)]


def _nbytes(arrays: list[tuple[str, tuple[int, ...]]]) -> int:
    total = 0
    for dtype, dims in arrays:
        n = 1
        for d in dims:
            n *= d
        total += n * _element_bits(dtype) // 8
    return total


def count_collectives(hlo: str) -> dict[str, dict[str, int]]:
    """Collectives in an HLO module's text, per kind: ``{kind: {"count", "bytes", "scalar"}}``.

    ``bytes``: the sizes of the results on one device (of an async
    ``all-gather-start`` or ``collective-permute-start``, whose result tuple
    also holds the operands, the outputs only).
    ``scalar``: how many of the ops have only scalar results (e.g. an amax, or
    several combined into one tuple all-reduce).
    """
    out = {k: dict(count=0, bytes=0, scalar=0) for k in KINDS}
    for line in hlo.splitlines():
        m = _OP.match(line)
        if m is None:
            continue
        arrays = _arrays(m.group("shape"))
        if m.group("start") and m.group("kind") == "all-gather":  # (operands, outputs)
            arrays = arrays[len(arrays) // 2 :]
        elif m.group("start") and m.group("kind") == "collective-permute":  # (operand, output, contexts...)
            arrays = arrays[1:2]
        entry = out[m.group("kind")]
        entry["count"] += 1
        entry["bytes"] += _nbytes(arrays)
        entry["scalar"] += bool(arrays) and all(dims == () for _, dims in arrays)
    return out


def _split(text: str, allowed: Sequence[str] | None, what: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()] if text else []
    if not items:
        raise argparse.ArgumentTypeError(f"--{what}: empty")
    if allowed is not None:
        bad = [s for s in items if s not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"--{what}: unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
    return items


def _meshes(text: str) -> list[str]:
    """``;``-separated meshes (each ``data=2,fsdp=2,tensor=2``), normalised through ``parse_mesh``."""
    from lowbit.trainer.sharding import parse_mesh

    meshes = []
    for part in (p for p in text.split(";") if p.strip()):
        try:
            sizes = parse_mesh(part)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from e
        n = 1
        for v in sizes.values():
            n *= v
        if n > DEVICES:
            raise argparse.ArgumentTypeError(
                f"--meshes: {part.strip()} needs {n} devices; the simulation has {DEVICES}"
            )
        meshes.append(",".join(f"{a}={v}" for a, v in sizes.items() if v > 1) or "data=1")
    if not meshes:
        raise argparse.ArgumentTypeError("--meshes: empty")
    return meshes


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated (default: {','.join(MODELS)})")
    ap.add_argument(
        "--recipes",
        default=",".join(RECIPES),
        help=f"comma-separated; fp32 is added first (default: {','.join(RECIPES)})",
    )
    ap.add_argument("--meshes", default=";".join(MESHES), help=f"semicolon-separated (default: {';'.join(MESHES)})")
    ap.add_argument("--steps", type=int, default=10, help="timed rounds per mesh, at least 5 (default: 10)")
    ap.add_argument("--out", default=str(RESULTS / "bench_sharding"), help="output stem: <out>.md, <out>.jsonl")
    args = ap.parse_args(argv)
    from lowbit import recipes

    try:
        args.models = _split(args.models, MODELS, "models")
        names = _split(args.recipes, recipes.names(), "recipes")
        args.recipes = ["fp32", *(r for r in dict.fromkeys(names) if r != "fp32")]
        args.meshes = list(dict.fromkeys(_meshes(args.meshes)))
    except argparse.ArgumentTypeError as e:
        ap.error(str(e))
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    return args


def _model(name: str) -> Any:
    from flax import nnx

    if name == "vit":
        from lowbit.nn.vit import ViT

        return ViT(image_shape=(8, 8, 1), num_classes=10, dim=64, depth=2, heads=4, mlp_dim=128, rngs=nnx.Rngs(0))
    from lowbit.nn.lm import LM

    return LM(vocab_size=256, context=64, dim=128, depth=2, heads=4, mlp_dim=512, rngs=nnx.Rngs(0))


def _data(name: str) -> tuple[Any, Any]:
    import numpy as np

    rng = np.random.default_rng(0)
    if name == "vit":
        x = rng.uniform(size=(BATCH[name], 8, 8, 1)).astype(np.float32)
        return x, rng.integers(0, 10, BATCH[name]).astype(np.int32)
    t = rng.integers(0, 256, (BATCH[name], 65)).astype(np.int32)
    return t[:, :-1], t[:, 1:]


def build(model_name: str, recipe_name: str, mesh_text: str) -> dict[str, Any]:
    """The trainer's sharded step for one configuration, compiled: ``{"step", "args", "hlo", "compile_s"}``.

    Raises:
      ValueError: ``check_blocks`` refuses the mesh for this recipe.
    """
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    import lowbit
    from lowbit import recipes
    from lowbit.nn.describe import describe
    from lowbit.nn.quantize import is_quantized
    from lowbit.nn.quantize import ops as quantized_ops
    from lowbit.trainer import sharding
    from lowbit.trainer.step import init_state, make_optimizer, make_train_step

    recipe = recipes.get(recipe_name)
    mesh = sharding.make_mesh(mesh_text)
    x, y = _data(model_name)
    model = lowbit.quantize(_model(model_name), recipe)
    if is_quantized(model) and not quantized_ops(model):  # as loop.train: quantizer state before the split
        describe(model, recipe.policy.cast_to_compute(x[:1]))
    tx = make_optimizer(3e-3, 0.05, warmup_steps=10, total_steps=100)
    graphdef, state = init_state(model, tx, policy=recipe.policy, loss_scale=recipe.make_loss_scale())
    placed = sharding.state_shardings(state, mesh)
    sharding.check_blocks(placed, state, recipe, mesh=mesh)
    batch = sharding.batch_sharding(mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    jitted = jax.jit(
        make_train_step(graphdef, tx, policy=recipe.policy),
        in_shardings=(placed, batch, batch),
        out_shardings=(placed, replicated),
    )
    args = (jax.device_put(state, placed), jax.device_put(x, batch), jax.device_put(y, batch))
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return dict(step=compiled, args=args, hlo=compiled.as_text(), compile_s=time.perf_counter() - t0)


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def run_mesh(model_name: str, mesh_text: str, recipe_names: Sequence[str], steps: int) -> list[dict[str, Any]]:
    """Every recipe on one mesh: compiled, counted, then timed side by side."""
    records, built = [], {}
    for r in recipe_names:
        rec: dict[str, Any] = dict(model=model_name, mesh=mesh_text, recipe=r, batch=BATCH[model_name])
        try:
            b = build(model_name, r, mesh_text)
        except Exception as e:
            if isinstance(e, ValueError) and str(e).startswith(("mesh:", "sharding of")):
                # check_blocks (a shard boundary inside a block) or state_shardings refused the layout
                rec.update(refused=str(e).removeprefix("mesh: "))
                print(f"  {model_name} {mesh_text} {r}: refused ({e})", flush=True)
            else:  # e.g. a batch the mesh's batch axes do not divide
                traceback.print_exc()
                rec.update(failed=_reason(e))
        else:
            built[r] = b
            rec.update(collectives=count_collectives(b["hlo"]), compile_s=b["compile_s"])
        records.append(rec)
    if built:
        cpu: dict[str, list[float]] = {}
        times = _timing.alternate(
            {r: b["step"] for r, b in built.items()},
            {r: b["args"] for r, b in built.items()},
            repeats=steps,
            warmup=1,
            cpu_times=cpu,
        )
        for rec in records:
            r = rec["recipe"]
            if r in times:
                rec.update(
                    step_ms=_timing.median(times[r]) * 1e3, times_s=times[r], cpu_ms=statistics.median(cpu[r]) * 1e3
                )
                if "fp32" in times:
                    rec["vs_fp32"] = statistics.median(t / f for t, f in zip(times[r], times["fp32"], strict=True))
                    rec["cpu_vs_fp32"] = statistics.median(t / f for t, f in zip(cpu[r], cpu["fp32"], strict=True))
    load = _timing.load_average()
    for rec in records:
        rec["load_average"] = load
        c = rec.get("collectives")
        brief = " ".join(f"{SHORT[k]}={v['count']}" for k, v in c.items() if v["count"]) if c else ""
        if "step_ms" in rec:
            print(
                f"  {model_name} {mesh_text} {rec['recipe']}: {rec['step_ms']:.1f} ms"
                f" ({rec.get('vs_fp32', float('nan')):.2f}x fp32), compile {rec['compile_s']:.1f} s, {brief or 'none'}"
                f"; load {load}",
                flush=True,
            )
    return records


def _size(n: int, sign: bool = False) -> str:
    """Bytes for a table cell: ``12 B``, ``4.3 KiB``, ``68 KiB``, ``13.6 MiB``."""
    plus = "+" if sign and n > 0 else ""
    if abs(n) < 1024:
        return f"{plus}{n} B"
    k = n / 1024
    if abs(k) >= 1024:
        return f"{plus}{k / 1024:.1f} MiB"
    return f"{plus}{k:.1f} KiB" if abs(k) < 10 else f"{plus}{k:.0f} KiB"


def _cell(c: dict[str, int], kind: str) -> str:
    if not c["count"]:
        return "0"
    scalar = f" ({c['scalar']} scalar)" if kind == "all-reduce" else ""
    return f"{c['count']}{scalar} / {_size(c['bytes'])}"


def _diff(c: dict, base: dict) -> str:
    """What the recipe's program has that fp32's on the same mesh does not (or has fewer of)."""
    parts = []
    for k in KINDS:
        dn, db = c[k]["count"] - base[k]["count"], c[k]["bytes"] - base[k]["bytes"]
        if dn or db:
            scalar = c[k]["scalar"] - base[k]["scalar"]
            extra = f", {scalar:+d} scalar" if k == "all-reduce" and scalar else ""
            parts.append(f"{SHORT[k]} {dn:+d}{extra} ({_size(db, sign=True)})")
    return "; ".join(parts) or "same"


def table(records: list[dict[str, Any]], header: dict[str, Any]) -> str:
    """The Markdown report of one run."""
    lines = [
        "# bench_sharding: the sharded train step per mesh shape",
        "",
        "Each (model, mesh, recipe): the train step compiled as `lowbit.trainer.loop` compiles it "
        "(`state_shardings`, `check_blocks`, `jax.jit(make_train_step(...), in_shardings=(placed, batch, batch), "
        "out_shardings=(placed, replicated))`) on random data. ViT: digits size (8×8×1, dim 64, depth 2, 4 heads, "
        f"MLP 128), global batch {BATCH['vit']}; LM: context 64, dim 128, depth 2, 4 heads, MLP 512, vocab 256, "
        f"global batch {BATCH['lm']} windows. AdamW as `lowbit train`.",
        "",
        f"**Simulated devices**: {DEVICES} XLA host devices (`{DEVICE_FLAG}`) sharing this machine's "
        f"{header['cores']} CPU cores ({header['cpu']}), so step times are relative only: they compare recipes on "
        "one mesh, not meshes with each other, and say nothing about interconnects. Step: median of "
        f"{header['rounds']} rounds after a warm-up, every recipe of a mesh called in alternating order; ×fp32: the "
        "median over rounds of the recipe's step time over fp32's (CPU-time ratio, steadier under load, in the JSONL).",
        "",
        "Collectives: ops in the compiled HLO (`.lower(...).compile().as_text()`): AG all-gather, RS reduce-scatter, "
        "AR all-reduce (scalar: only scalar results, e.g. amax or finite checks, several of which XLA may combine "
        "into one op), CP collective-permute, A2A all-to-all; `count / bytes` of their results on one device. "
        "The program's ops, not one step's execution: a collective inside a `lax.cond` branch counts once. "
        "XLA's CPU backend does not turn an all-reduce followed by a slice into a reduce-scatter (GPU and TPU "
        "compiles do): an FSDP gradient shows here as an all-reduce of the whole gradient (in AR's bytes), "
        "so RS stays 0.",
        "",
        f"lowbit {header['commit']}, jax {header['jax']} (jaxlib {header['jaxlib']}), flax {header['flax']}; "
        f"load before {header['load_before']}, after {header['load_after']}; {header['date']}; "
        f"`{header['command']}`.",
    ]
    for model in dict.fromkeys(r["model"] for r in records):
        rows = [r for r in records if r["model"] == model]
        lines += [
            "",
            f"## {'ViT (digits size)' if model == 'vit' else 'LM'}",
            "",
            "| mesh | recipe | step (ms) | ×fp32 | AG | RS | AR | CP | A2A | vs fp32 on this mesh | load |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
        ]
        base = {r["mesh"]: r for r in rows if r["recipe"] == "fp32" and "collectives" in r}
        for r in rows:
            head = f"| {r['mesh']} | {r['recipe']} |"
            if "collectives" not in r:
                why = r.get("refused") or r.get("failed", "")
                lines.append(f"{head} — | — | — | — | — | — | — | {'refused: ' if 'refused' in r else ''}{why} | — |")
                continue
            c = r["collectives"]
            step = f"{r['step_ms']:.1f}" if "step_ms" in r else "—"
            ratio = f"{r['vs_fp32']:.2f}" if "vs_fp32" in r else "—"
            diff = "—" if r["recipe"] == "fp32" or r["mesh"] not in base else _diff(c, base[r["mesh"]]["collectives"])
            cells = " | ".join(_cell(c[k], k) for k in KINDS)
            lines.append(f"{head} {step} | {ratio} | {cells} | {diff} | {r['load_average'].split()[0]} |")
    return "\n".join(lines) + "\n"


def in_child() -> bool:
    return DEVICE_FLAG in os.environ.get("XLA_FLAGS", "").split()


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if not in_child():
        # jax reads XLA_FLAGS once, when its backend starts: the simulated devices need a fresh process.
        flags = f"{os.environ.get('XLA_FLAGS', '')} {DEVICE_FLAG}".strip()
        env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
        sys.exit(subprocess.run([sys.executable, os.path.relpath(__file__), *argv], env=env).returncode)

    import flax
    import jax

    assert len(jax.devices()) >= DEVICES, jax.devices()
    load_before = _timing.load_average()
    info = _timing.machine_info()
    commit = lowbit_commit()
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    print(f"load {load_before}; {len(jax.devices())} devices; models {args.models}; meshes {args.meshes}", flush=True)
    base = dict(
        lowbit_commit=commit,
        command=info["command"],
        jax=jax.__version__,
        flax=flax.__version__,
        xla_flags=info["xla_flags"],
        rounds=max(args.steps, _timing.MIN_REPEATS),
        date=info["date"],
    )
    records = []
    with stem.with_suffix(".jsonl").open("a") as jsonl:
        for model in args.models:
            for mesh in args.meshes:
                for rec in run_mesh(model, mesh, args.recipes, args.steps):
                    rec = dict(base, **rec)
                    jsonl.write(json.dumps(rec) + "\n")
                    jsonl.flush()
                    records.append(rec)
    header = dict(
        info,
        commit=commit,
        flax=flax.__version__,
        rounds=base["rounds"],
        load_before=load_before,
        load_after=_timing.load_average(),
    )
    text = table(records, header)
    stem.with_suffix(".md").write_text(text)
    print(text)
    print(f"wrote {stem.with_suffix('.md')}, appended {len(records)} records to {stem.with_suffix('.jsonl')}")


if __name__ == "__main__":
    main()
