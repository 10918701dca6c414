"""Where a quantized train step's time goes: a per-op profile and the compiled HLO, by source.

For each recipe (and, with ``--peers``, qwix's two configurations) this compiles
the same train step as ``bench_train.py`` (stock ViT, fixed digits-shaped batch,
``lowbit.trainer.step.make_train_step``) and reports:

* **Per-op profile.** ``jax.profiler.trace`` over ``--steps`` steps; XLA:CPU
  records one event per executed thunk (a fusion, a dot, a conditional...),
  named after its HLO instruction. Each instruction is attributed to the
  Python source that emitted it, read from the compiled HLO's stack frames:
  the innermost frame in a known file decides (``SOURCES``). Per category:
  milliseconds of thunk time per step (summed over threads, so it tracks
  CPU time, not wall time) and the number of thunks per step. On a CPU with
  a 64-wide model most thunks run for microseconds, so their count (each
  costs a dispatch) matters as much as their bytes.
* **Compiled HLO.** Instructions of the entry computation and its called
  computations: fusions, reductions, conditionals, dots by operand dtype, and
  XLA's ``cost_analysis`` flops and bytes accessed per step.

Thunk times vary by up to ±20 % between runs on a shared 2-core machine; the counts
are exact. Usage: ``python benchmarks/profile_step.py [--widths 64,256]
[--recipes fp32,int8,fp8] [--peers]``; writes ``results/profile_step.{json,md}``.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402
import bench_train  # noqa: E402

from lowbit import recipes  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# (category, path fragment): the first fragment found in an instruction's
# innermost-first stack decides. Dots are told apart by opcode first. Library
# frames (flax, optax, qwix) never reach the HLO's source information, so only
# lowbit's own files can be named here.
SOURCES = (
    ("quantizers", "/lowbit/quant/"),
    ("quantizers", "/lowbit/formats/"),
    ("gradient scale / amax history", "/lowbit/training/gradscale.py"),
    ("gradient scale / amax history", "/lowbit/training/delayed.py"),
    ("learned quantizers (LSQ/PACT/SAWB)", "/lowbit/training/ste.py"),
    ("product glue (rescale, residuals, keys)", "/lowbit/training/qdot.py"),
    ("product glue (rescale, residuals, keys)", "/lowbit/recipes/"),
    ("step (loss, NaN skip, loss scale)", "/lowbit/trainer/"),
    ("step (loss, NaN skip, loss scale)", "/lowbit/training/loss_scale.py"),
    ("model (float ops)", "/lowbit/nn/"),
)
DOTS = "dots and convolutions"
OTHER = "library code without source frames (optax, flax, qwix)"
CATEGORIES = [DOTS, *dict.fromkeys(c for c, _ in SOURCES), OTHER]

_FILE = re.compile(r'^(\d+) "(.*)"$')
_LOC = re.compile(r"^(\d+) \{file_name_id=(\d+)")
_FRAME = re.compile(r"^(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)\}")
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = .*? ([a-z][\w\-]*)\(")
_FRAME_ID = re.compile(r"stack_frame_id=(\d+)")
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_COMP = re.compile(r"^(?:ENTRY )?%([\w.\-]+) ")


def _tables(text: str):
    """The HLO text's FileNames, FileLocations and StackFrames tables."""
    files, locs, frames, section = {}, {}, {}, None
    for line in text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = line
            continue
        if not line.strip() or line.startswith(("HloModule", "%", "ENTRY")):
            section = None if not line.strip() else section
            continue
        if section == "FileNames" and (m := _FILE.match(line)):
            files[int(m.group(1))] = m.group(2)
        elif section == "FileLocations" and (m := _LOC.match(line)):
            locs[int(m.group(1))] = int(m.group(2))
        elif section == "StackFrames" and (m := _FRAME.match(line)):
            frames[int(m.group(1))] = (int(m.group(2)), int(m.group(3)))
    return files, locs, frames


def _category(frame: int | None, files, locs, frames) -> str:
    stack, seen = [], set()
    while frame and frame in frames and frame not in seen:  # a root frame is its own parent
        seen.add(frame)
        loc, parent = frames[frame]
        stack.append(files.get(locs.get(loc), ""))
        frame = parent
    for f in stack:  # innermost first
        for cat, frag in SOURCES:
            if frag in f:
                return cat
    return OTHER


def classify(text: str) -> dict[str, str]:
    """HLO instruction name -> category, for every instruction of the optimized module.

    A fusion counts as a dot when its fused computation holds a dot or a
    convolution (XLA:CPU wraps dots into ``ynn_fusion``s with their epilogues).
    """
    files, locs, frames = _tables(text)
    comp_has_dot, comp, out, calls = {}, None, {}, {}
    for line in text.splitlines():
        if (m := _COMP.match(line)) and line.rstrip().endswith("{"):
            comp = m.group(1)
            comp_has_dot.setdefault(comp, False)
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name, op = m.group(1), m.group(2)
        frame = (f := _FRAME_ID.search(line)) and f.group(1)
        if op in ("dot", "convolution"):
            comp_has_dot[comp] = True
        if (c := _CALLS.search(line)) and op == "fusion":
            calls[name] = c.group(1)
        out[name] = (
            DOTS if op in ("dot", "convolution") else _category(int(frame) if frame else None, files, locs, frames)
        )
    for name, comp in calls.items():
        if comp_has_dot.get(comp):
            out[name] = DOTS
    return out


def hlo_counts(stepper) -> dict:
    """Counts over the optimized step and XLA's cost analysis."""
    text = stepper.compiled.as_text()
    ops = collections.Counter(m.group(2) for line in text.splitlines() if (m := _INSTR.match(line)))
    cost = stepper.compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    entry = text[text.index("\nENTRY") :]
    entry = entry[: entry.index("\n}")]
    thunk_ops = collections.Counter(m.group(2) for line in entry.splitlines() if (m := _INSTR.match(line)))
    return dict(
        entry_fusions=thunk_ops["fusion"],
        conditionals=thunk_ops["conditional"],
        reduces=ops["reduce"],
        dots=stepper.dots(),
        gflops=(cost or {}).get("flops", 0.0) / 1e9,
        mib_accessed=(cost or {}).get("bytes accessed", 0.0) / 2**20,
    )


def profile(stepper, steps: int) -> dict:
    """Per-category thunk milliseconds and thunk counts per step, from one traced run of ``steps`` steps."""
    from jax.profiler import ProfileData

    names = classify(stepper.compiled.as_text())
    stepper.steps = steps
    jax.block_until_ready(stepper())  # warm
    tmp = tempfile.mkdtemp(prefix="lowbit_profile_")
    try:
        with jax.profiler.trace(tmp):
            jax.block_until_ready(stepper())
        (path,) = glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)
        data = ProfileData.from_file(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ms, count = collections.Counter(), collections.Counter()
    for plane in data.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            for ev in line.events:
                # A thunk's event carries its instruction's name (".clone" for branch copies).
                cat = names.get(ev.name) or names.get(ev.name.removesuffix(".clone"))
                if cat is not None:
                    ms[cat] += ev.duration_ns / 1e6 / steps
                    count[cat] += 1 / steps
    return dict(
        ms={c: ms[c] for c in CATEGORIES},
        thunks={c: count[c] for c in CATEGORIES},
        total_ms=sum(ms.values()),
        total_thunks=sum(count.values()),
    )


def run(widths: list[int], names: list[str], peers: list[str], steps: int) -> dict:
    x, y = bench_train.batch()
    out = dict(machine=_timing.machine_info(), command=" ".join(sys.argv), widths=[])
    for dim in widths:
        model = bench_train.vit(dim)
        rows = {}
        for name in names + peers:
            if name in bench_train.PEERS:
                st = bench_train.Stepper.qwix(model, bench_train.PEERS[name][1], x, y)
            else:
                st = bench_train.Stepper.lowbit(model, recipes.get(name), x, y)
            rows[name] = dict(hlo=hlo_counts(st), profile=profile(st, steps), load_average=_timing.load_average())
            p = rows[name]["profile"]
            print(
                f"d={dim} {name:10s} thunk time {p['total_ms']:7.2f} ms/step, {p['total_thunks']:6.0f} thunks/step, "
                f"load {rows[name]['load_average']}",
                flush=True,
            )
        out["widths"].append(dict(dim=dim, rows=rows))
    return out


def markdown(result: dict) -> str:
    mi = result["machine"]
    lines = [
        "# profile_step: where the quantized step's time goes",
        "",
        f"{mi['date']}, `{result['command']}`; {mi['cpu']}, {mi['cores']} cores, jax {mi['jax']}. "
        "Per-op profile of the compiled train step (`jax.profiler` thunk events, summed over threads, "
        "per step), each HLO instruction attributed to the source that emitted it; ms and thunks per step. "
        "Thunk times vary by up to ±20 % run to run (one traced run of a few steps); thunk and HLO counts are exact. "
        "Library frames (flax, optax, qwix) are left out of the HLO's source information, so an op emitted "
        "by qwix inside a model's `__call__` counts as the model's: qwix's quantizers are in *model (float ops)*. "
        "*Product glue* holds all of `quantized_dot_general` except the dots, including the transposes around "
        "the backward dots that fp32 counts under *model*.",
        "",
    ]
    for w in result["widths"]:
        rows = w["rows"]
        names = list(rows)
        lines += [f"## d={w['dim']}", "", "| category | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for cat in CATEGORIES:
            cells = [f"{r['profile']['ms'][cat]:.2f} ms / {r['profile']['thunks'][cat]:.0f}" for r in rows.values()]
            if any(r["profile"]["thunks"][cat] for r in rows.values()):
                lines.append(f"| {cat} | " + " | ".join(cells) + " |")
        lines.append(
            "| **total** | "
            + " | ".join(
                f"**{r['profile']['total_ms']:.2f} ms / {r['profile']['total_thunks']:.0f}**" for r in rows.values()
            )
            + " |"
        )
        for key, label, fmt in (
            ("entry_fusions", "fusions (entry)", "{:d}"),
            ("conditionals", "conditionals", "{:d}"),
            ("reduces", "reduce instructions", "{:d}"),
            ("gflops", "GFLOP / step", "{:.3f}"),
            ("mib_accessed", "MiB accessed / step", "{:.1f}"),
        ):
            lines.append(f"| *{label}* | " + " | ".join(fmt.format(r["hlo"][key]) for r in rows.values()) + " |")
        lines.append(
            "| *dots (lhs x rhs -> out)* | "
            + " | ".join(", ".join(f"{k}: {v}" for k, v in r["hlo"]["dots"].items()) for r in rows.values())
            + " |"
        )
        lines.append("| *load (1 min)* | " + " | ".join(r["load_average"].split()[0] for r in rows.values()) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="64,256", help="comma-separated ViT widths (default: 64,256)")
    ap.add_argument(
        "--recipes",
        default="fp32,int8,fp8,fp8_delayed,fp4,nvfp4",
        help="comma-separated recipes (default: fp32,int8,fp8,fp8_delayed,fp4,nvfp4)",
    )
    ap.add_argument("--peers", action="store_true", help="add qwix's int8 and fp8 configurations (needs qwix)")
    ap.add_argument("--steps", type=int, default=5, help="steps traced per configuration (default: 5)")
    args = ap.parse_args(argv)
    names = args.recipes.split(",")
    for n in names:
        recipes.get(n)  # an unknown name fails before anything compiles
    if args.steps < 1:
        ap.error(f"--steps={args.steps} must be >= 1")
    result = run(
        [int(w) for w in args.widths.split(",")], names, list(bench_train.PEERS) if args.peers else [], args.steps
    )
    RESULTS.mkdir(exist_ok=True)
    _timing.write_json("profile_step", result)
    (RESULTS / "profile_step.md").write_text(markdown(result) + "\n")
    print(f"wrote {RESULTS / 'profile_step.md'}")


if __name__ == "__main__":
    main()
