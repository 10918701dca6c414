"""Throughput of every registered format's quantize / encode / decode.

Every number is a throughput ratio measured in one process, alternating with its
references (``_timing``: median of per-round ratios over >= 5 rounds):

* ``x2``: against a jitted ``x * 2`` on the same float32 array, the memory-bound
  reference an elementwise kernel cannot beat (> 1 means faster than it), in
  wall time and (``x2_cpu``) in process CPU time, which a loaded machine barely
  stretches;
* ``ml_dtypes``: lowbit's speedup over ml_dtypes' numpy casts, where ml_dtypes
  has the format: ``astype(T).astype(float32)`` for quantize, ``astype(T)`` for
  encode, ``view(T).astype(float32)`` for decode;
* ``qwix`` (only if ``import qwix`` works): ``qwix.dequantize(qwix.quantize(x,
  dtype))`` against ``x * 2``, for formats jax.numpy has as a dtype. qwix scales
  per tensor (an absmax reduction first), so it does more work than a cast.

Quantize is round-half-even and saturating; ``stochastic`` is quantize with
stochastic rounding. Block formats (registry names ``mx*`` / ``nv*``, when
``lowbit.formats.block`` exists) quantize a (rows, 1024) array along its last axis.
A size sweep times quantize for a few formats against ``x * 2`` from 2^10 to
2^26 elements. The regime matters: at 2^24 each call's fresh 64 MiB output costs
page faults that dominate ``x * 2``, while --quick's 2^20 arrays stay in cache,
so there every op of a kernel shows in its ratio.

Writes ``results/bench_formats.json``, ``results/bench_formats.md`` and
``results/bench_formats_sizes.png`` next to this script.

Usage::

    python benchmarks/bench_formats.py            # 2^24 elements, 9 rounds (several minutes)
    python benchmarks/bench_formats.py --quick    # 2^20 elements, 5 rounds (about a minute)
"""

from __future__ import annotations

import argparse
import importlib
import json
import pathlib

import _timing
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from lowbit import formats
from lowbit.formats import BinaryFormat, FloatFormat, IntFormat

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
OPS = ("quantize", "stochastic", "encode", "decode")
ML_OPS = ("quantize", "encode", "decode")  # the operations ml_dtypes has a cast for
SWEEP_FORMATS = ("float8_e4m3fn", "float8_e5m2", "float4_e2m1fn", "int8", "fp4_radix4", "float8_e8m0fnu")
BLOCK_ROW = 1024  # last-axis length for block formats: a multiple of every block size
MIN_SAMPLE_S = 0.02  # calls repeat within a sample up to this long: steadier under load
# The targets: saturating round-to-nearest at >= 0.9x of x*2 and >= 4x
# ml_dtypes for FP8/FP6/FP4 and integer formats; stochastic rounding >= 0.6x.
TARGET_X2 = {"quantize": 0.9, "stochastic": 0.6}
TARGET_ML_DTYPES = {"quantize": 4.0}

try:
    import qwix
except ImportError:
    qwix = None


def _has_target(fmt) -> bool:
    return isinstance(fmt, IntFormat) or (isinstance(fmt, FloatFormat) and fmt.bits in (4, 6, 8))


def _element_formats():
    return [(n, f) for n in formats.names() if isinstance(f := formats.get(n), (FloatFormat, IntFormat, BinaryFormat))]


def _block_formats():
    try:
        importlib.import_module("lowbit.formats.block")
    except ImportError:
        return []
    return [(n, formats.get(n)) for n in formats.names() if n.startswith(("mx", "nv"))]


def _lowbit_fns(fmt, x, key):
    """name -> (jitted callable, args) for lowbit's four operations on ``x``."""
    enc = jax.jit(lambda v: formats.encode(fmt, v))  # saturate=False: the cast ml_dtypes does
    return {
        "quantize": (jax.jit(lambda v: formats.quantize(fmt, v)), (x,)),
        "stochastic": (jax.jit(lambda v, k: formats.quantize(fmt, v, rounding="stochastic", key=k)), (x, key)),
        "encode": (enc, (x,)),
        "decode": (jax.jit(lambda c: formats.decode(fmt, c)), (enc(x),)),
    }


def _ml_dtypes_fns(name, x_np):
    """ml_dtypes' numpy casts matching each operation, or {} where ml_dtypes lacks the format."""
    dtype = getattr(ml_dtypes, name, None)
    if dtype is None:
        return {}
    codes = x_np.astype(dtype)
    return {
        "quantize": (lambda v: v.astype(dtype).astype(np.float32), (x_np,)),
        "encode": (lambda v: v.astype(dtype), (x_np,)),
        "decode": (lambda c: c.astype(np.float32), (codes,)),
    }


def _qwix_fn(name, x):
    dtype = getattr(jnp, name, None)
    if qwix is None or dtype is None:
        return None
    try:
        fn = jax.jit(lambda v: qwix.dequantize(qwix.quantize(v, dtype)))
        jax.block_until_ready(fn(x))
    except Exception:  # a dtype qwix does not quantize to: no column entry
        return None
    return fn, (x,)


def bench_format(name, fmt, x, x_np, key, repeats, block: bool):
    """One format: every ratio, from one alternating timing group."""
    fns, args = {"x2": _timing.reference(x)}, {"x2": (x,)}
    for op, (fn, a) in _lowbit_fns(fmt, x, key).items():
        fns[op], args[op] = fn, a
    baselines = {} if block else _ml_dtypes_fns(name, x_np)
    for op, (fn, a) in baselines.items():
        fns[f"ml_dtypes_{op}"], args[f"ml_dtypes_{op}"] = fn, a
    q = None if block else _qwix_fn(name, x)
    if q is not None:
        fns["qwix"], args["qwix"] = q
    cpu = {}
    times = _timing.alternate(fns, args, repeats=repeats, min_sample_s=MIN_SAMPLE_S, cpu_times=cpu)
    ref = times["x2"]
    row = {
        "name": name,
        "kind": "block" if block else "element",
        "bits": getattr(fmt, "bits", None),
        "target": (not block) and _has_target(fmt),
    }
    row["x2"] = {op: _timing.ratio(ref, times[op]) for op in OPS}
    row["x2_cpu"] = {op: _timing.ratio(cpu["x2"], cpu[op]) for op in OPS}
    row["ml_dtypes"] = {op: _timing.ratio(times[f"ml_dtypes_{op}"], times[op]) for op in baselines}
    if q is not None:
        row["qwix"] = _timing.ratio(ref, times["qwix"])
    row["ms"] = {k: 1e3 * _timing.median(v) for k, v in times.items()}
    return row


def misses(row) -> list[str]:
    """The targets a row falls short of (empty for formats without targets)."""
    if not row["target"]:
        return []
    # A miss needs both clocks: a loaded machine stretches wall time alone.
    out = [
        f"{op} x2 {row['x2'][op]:.3f} (cpu {row['x2_cpu'][op]:.3f}) < {t}"
        for op, t in TARGET_X2.items()
        if max(row["x2"][op], row["x2_cpu"][op]) < t
    ]
    out += [
        f"{op} ml_dtypes {row['ml_dtypes'][op]:.2f} < {t}"
        for op, t in TARGET_ML_DTYPES.items()
        if op in row["ml_dtypes"] and row["ml_dtypes"][op] < t
    ]
    return out


def size_sweep(log2_sizes, repeats):
    """Quantize throughput (elements/s) of SWEEP_FORMATS and of x*2 at each size."""
    series = {"x*2": [], **{n: [] for n in SWEEP_FORMATS}}
    rng = np.random.default_rng(1)
    for k in log2_sizes:
        x = jnp.asarray(rng.standard_normal(1 << k, dtype=np.float32))
        fns = {"x*2": _timing.reference(x)}
        fns.update({n: jax.jit(lambda v, n=n: formats.quantize(n, v)) for n in SWEEP_FORMATS})
        times = _timing.alternate(fns, {n: (x,) for n in fns}, repeats=repeats, min_sample_s=MIN_SAMPLE_S)
        for n in fns:
            series[n].append((1 << k) / _timing.median(times[n]))
        gelems = "  ".join(f"{n} {series[n][-1] / 1e9:.2f}" for n in fns)
        print(f"  2^{k}: {gelems}  (Gelem/s)", flush=True)
    return {"log2_sizes": list(log2_sizes), "elements_per_s": series}


def plot_sweep(sweep, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    sizes = [2**k for k in sweep["log2_sizes"]]
    for n, eps in sweep["elements_per_s"].items():
        style = {"color": "black", "ls": "--"} if n == "x*2" else {}
        ax.plot(sizes, np.asarray(eps) / 1e9, marker="o", label=n, **style)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("elements (float32)")
    ax.set_ylabel("quantize throughput (Gelem/s)")
    ax.set_title("lowbit quantize (nearest, saturating) vs jitted x*2")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt(v, spec):
    return "—" if v is None else format(v, spec)


def markdown(result) -> str:
    m, cfg = result["machine"], result["config"]
    has_qwix = any("qwix" in r for r in result["formats"])
    lines = [
        "# lowbit format throughput",
        "",
        f"`{m['command']}` on {m['date']}: {m['cpu']}, {m['cores']} cores, {m['platform']}; "
        f"jax {m['jax']}, jaxlib {m['jaxlib']}, ml_dtypes {m['ml_dtypes']}, numpy {m['numpy']}, "
        f"backend {m['backend']}; load average {m['load_average']} at the start.",
        "",
        f"2^{cfg['log2_size']} float32 elements, median over {cfg['repeats']} alternating rounds. "
        "`×x*2`: throughput relative to a jitted `x * 2` (higher is better); "
        "`cpu`: the same ratio in process CPU time, which other tenants barely stretch; "
        "`×ml_dtypes`: speedup over ml_dtypes' numpy cast (wall time). Targets (FP8/FP6/FP4 and "
        f"integer formats): quantize ≥ {TARGET_X2['quantize']}× x*2 and "
        f"≥ {TARGET_ML_DTYPES['quantize']:.0f}× ml_dtypes, stochastic ≥ {TARGET_X2['stochastic']}× x*2; "
        "misses (below target in wall and CPU time alike) are listed per row.",
        "",
    ]
    head = [
        "format",
        "bits",
        *(f"{op} ×x*2" for op in OPS),
        *(f"{op} ×x*2 cpu" for op in TARGET_X2),
        *(f"{op} ×ml_dtypes" for op in ML_OPS),
    ]
    if has_qwix:
        head.append("qwix ×x*2")
    head.append("misses")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["formats"]:
        cells = [
            r["name"],
            _fmt(r["bits"], "d"),
            *(_fmt(r["x2"][op], ".2f") for op in OPS),
            *(_fmt(r["x2_cpu"][op], ".2f") for op in TARGET_X2),
            *(_fmt(r["ml_dtypes"].get(op), ".1f") for op in ML_OPS),
        ]
        if has_qwix:
            cells.append(_fmt(r.get("qwix"), ".2f"))
        cells.append(", ".join(misses(r)) or ("" if r["target"] else "n/a"))
        lines.append("| " + " | ".join(cells) + " |")
    sw = result["size_sweep"]
    lines += [
        "",
        "## Quantize throughput by size (Gelem/s)",
        "",
        "| elements | " + " | ".join(sw["elements_per_s"]) + " |",
        "|" + "---|" * (len(sw["elements_per_s"]) + 1),
    ]
    for i, k in enumerate(sw["log2_sizes"]):
        cells = (f"{v[i] / 1e9:.2f}" for v in sw["elements_per_s"].values())
        lines.append(f"| 2^{k} | " + " | ".join(cells) + " |")
    lines += ["", "![quantize throughput by size](bench_formats_sizes.png)", ""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2^20 elements, 5 rounds, 4 sweep sizes")
    p.add_argument("--log2-size", type=int, help="log2 of the element count (default 24, quick 20)")
    p.add_argument("--repeats", type=int, help=f"alternating rounds, >= {_timing.MIN_REPEATS} (default 9, quick 5)")
    p.add_argument("--formats", help="comma-separated registry names to time (default: every one)")
    p.add_argument("--out", type=pathlib.Path, default=RESULTS, help="output folder")
    args = p.parse_args(argv)
    log2_size = args.log2_size or (20 if args.quick else 24)
    repeats = max(_timing.MIN_REPEATS, args.repeats or (5 if args.quick else 9))
    sweep_sizes = range(10, 23, 4) if args.quick else range(10, 27, 2)

    result = {
        "machine": _timing.machine_info(),
        "config": {
            "log2_size": log2_size,
            "repeats": repeats,
            "quick": args.quick,
            "block_row": BLOCK_ROW,
            "qwix": qwix is not None,
        },
    }
    x_np = np.random.default_rng(0).standard_normal(1 << log2_size, dtype=np.float32)
    x = jnp.asarray(x_np)
    xb = x.reshape(-1, BLOCK_ROW)
    key = jax.random.key(0)
    rows = []
    print(
        f"{'format':22s} "
        + " ".join(f"{op + ' x2':>14s}" for op in OPS)
        + "  "
        + " ".join(f"{op[:3] + ' ml':>7s}" for op in ML_OPS),
        flush=True,
    )
    todo = [(n, f, False) for n, f in _element_formats()] + [(n, f, True) for n, f in _block_formats()]
    if args.formats:
        todo = [t for t in todo if t[0] in args.formats.split(",")]
    for name, fmt, block in todo:
        row = bench_format(name, fmt, xb if block else x, x_np, key, repeats, block)
        rows.append(row)
        ml = " ".join(f"{_fmt(row['ml_dtypes'].get(op), '.1f'):>7s}" for op in ML_OPS)
        flag = "  MISS: " + ", ".join(misses(row)) if misses(row) else ""
        print(f"{name:22s} " + " ".join(f"{row['x2'][op]:14.2f}" for op in OPS) + f"  {ml}{flag}", flush=True)
    result["formats"] = rows
    print("size sweep:", flush=True)
    result["size_sweep"] = size_sweep(sweep_sizes, repeats)
    result["machine"]["load_average_end"] = _timing.load_average()

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_formats.json").write_text(json.dumps(result, indent=1) + "\n")
    md = markdown(result)
    (args.out / "bench_formats.md").write_text(md)
    plot_sweep(result["size_sweep"], args.out / "bench_formats_sizes.png")
    print(md)
    print(f"wrote {args.out / 'bench_formats.json'}, bench_formats.md, bench_formats_sizes.png")


if __name__ == "__main__":
    main()
