"""Fake-quantization throughput relative to a jitted ``x * 2`` (4096 x 4096 float32).

Each case is a jitted ``lowbit.quant.fake_quant`` (dynamic absmax scales: one
reduction, then one elementwise pass). Ratios are throughput relative to the
reference (``>1`` faster), the median over alternating rounds (see ``_timing``).
Targets: per-channel int8/int4 >= 0.9, per-tensor FP8 (E4M3) >= 0.85.
qwix appears as an extra column only when ``import qwix`` works.

Usage: ``python benchmarks/bench_quant.py [--repeats N] [--size N]``
Writes ``benchmarks/results/bench_quant.json``.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402

from lowbit import quant  # noqa: E402

CASES = {
    # name: (Quantizer, target ratio or None, qwix equivalent as (qtype, channelwise_axes) or None)
    "int8_per_channel": (quant.Quantizer(format="int8", granularity=quant.Channel(axis=-1)), 0.9, ("int8", (1,))),
    "int4_per_channel": (quant.Quantizer(format="int4", granularity=quant.Channel(axis=-1)), 0.9, ("int4", (1,))),
    "fp8_e4m3_per_tensor": (quant.Quantizer(format="float8_e4m3fn"), 0.85, ("float8_e4m3fn", ())),
    "int8_per_channel_axis0": (quant.Quantizer(format="int8", granularity=quant.Channel(axis=0)), None, ("int8", (0,))),
    "int4_group128": (quant.Quantizer(format="int4", granularity=quant.Group(size=128, axis=0)), None, None),
    "int8_per_channel_e8m0": (
        quant.Quantizer(format="int8", granularity=quant.Channel(), scale_format="e8m0"),
        None,
        None,
    ),
    "uint8_asym_per_channel": (
        quant.Quantizer(format="uint8", granularity=quant.Channel(), kind=quant.Uniform(symmetric=False)),
        None,
        None,
    ),
    # Diagnostics: the elementwise pass alone (a fixed step needs no reduction over x).
    "int8_fixed_step": (quant.Quantizer(format="int8", scale=quant.Fixed(step=0.03)), None, None),
    "fp8_e4m3_fixed_step": (quant.Quantizer(format="float8_e4m3fn", scale=quant.Fixed(step=0.01)), None, None),
}


def _qwix_fns():
    """qwix quantize-dequantize per case, or {} when qwix is not importable."""
    try:
        from qwix._src.core import qarray  # qwix has no public fake-quant entry point
    except ImportError:
        return {}
    fns = {}
    for name, (_, _, spec) in CASES.items():
        if spec is not None:
            qtype, axes = spec
            fns[name] = jax.jit(
                lambda v, qtype=qtype, axes=axes: qarray.dequantize(
                    qarray.quantize_api(v, getattr(jnp, qtype), channelwise_axes=axes)
                )
            )
    return fns


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--size", type=int, default=4096)
    args = ap.parse_args(argv)

    x = jax.random.normal(jax.random.key(0), (args.size, args.size), jnp.float32)
    fns = {"x*2": _timing.reference(x)}
    for name, (q, _, _) in CASES.items():
        fns[name] = jax.jit(lambda v, q=q: quant.fake_quant(q, v))
    qwix = {f"qwix:{k}": f for k, f in _qwix_fns().items()}
    fns.update(qwix)
    times = _timing.alternate(fns, {n: (x,) for n in fns}, repeats=args.repeats)

    ref = times["x*2"]
    rows = {}
    print(f"{'case':28s} {'ms':>8s} {'ratio':>7s} {'target':>7s}" + ("  qwix" if qwix else ""))
    print(f"{'x*2 (reference)':28s} {1e3 * _timing.median(ref):8.2f}")
    for name, (_, target, _) in CASES.items():
        r = _timing.ratio(ref, times[name])
        row = {
            "ms": 1e3 * _timing.median(times[name]),
            "ratio": r,
            "target": target,
            "meets_target": None if target is None else r >= target,
        }
        if f"qwix:{name}" in times:
            row["qwix_ratio"] = _timing.ratio(ref, times[f"qwix:{name}"])
        rows[name] = row
        extra = f"  {row['qwix_ratio']:.3f}" if "qwix_ratio" in row else ""
        tgt = "" if target is None else f"{target:.2f}"
        print(f"{name:28s} {row['ms']:8.2f} {r:7.3f} {tgt:>7s}{extra}")

    result = {
        "benchmark": "bench_quant",
        "shape": [args.size, args.size],
        "dtype": "float32",
        "repeats": args.repeats,
        "reference_ms": 1e3 * _timing.median(ref),
        "cases": rows,
        "machine": _timing.machine_info(),
        "loadavg_1min": os.getloadavg()[0],
    }
    _timing.write_json("bench_quant", result)
    return result


if __name__ == "__main__":
    main()
