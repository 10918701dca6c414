"""Block-format fake quantization relative to a jitted ``x * 2`` (4096 x 4096 float32).

Each case is a jitted ``lowbit.formats.quantize`` of a block format along the
last axis: one pass that reduces each block's amax, then one elementwise pass
that scales, rounds and scales back. Ratios are throughput relative to the
reference (``>1`` faster), the median over alternating rounds (see ``_timing``).
Targets: MXFP4 and NVFP4 >= 0.6 (qwix 0.1.8 measured 0.44 and 0.41 on the
development machine); the other MX formats are reported without a target.

It also times the block maxima alone (the bits of ``max |x|`` over each 32-block,
one jitted reduction) and prints the two-pass bound ``t(x*2) / (t(x*2) + t(amax))``:
what a kernel made of a reduction pass plus an elementwise pass no cheaper than
``x*2`` can reach. XLA cannot fuse a reduction into the elementwise pass that
consumes it, so the block formats' ratios are measured against this bound.

Usage: ``python benchmarks/bench_block.py [--repeats N] [--size N]``
Writes ``benchmarks/results/bench_block.json``.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402

from lowbit import formats  # noqa: E402

TARGETS = {
    "mxfp4_e2m1": 0.6,
    "nvfp4": 0.6,
    "mxfp8_e4m3": None,
    "mxfp8_e5m2": None,
    "mxfp6_e3m2": None,
    "mxfp6_e2m3": None,
    "mxint8": None,
}


def _block_amax_bits(x: jax.Array) -> jax.Array:
    """The float32 bits of ``max |x|`` over each 32-element block of the last axis."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32) & jnp.uint32(0x7FFFFFFF)
    return jnp.max(bits.reshape(*x.shape[:-1], x.shape[-1] // 32, 32), axis=-1)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--size", type=int, default=4096)
    args = ap.parse_args(argv)

    x = jax.random.normal(jax.random.key(0), (args.size, args.size), jnp.float32)
    fns = {"x*2": _timing.reference(x), "amax": jax.jit(_block_amax_bits)}
    for name in TARGETS:
        fns[name] = jax.jit(functools.partial(formats.quantize, formats.get(name)))
    times = _timing.alternate(fns, {n: (x,) for n in fns}, repeats=args.repeats)

    ref = times["x*2"]
    ref_ms, amax_ms = 1e3 * _timing.median(ref), 1e3 * _timing.median(times["amax"])
    bound = ref_ms / (ref_ms + amax_ms)
    rows = {}
    print(f"| {'format':12s} | {'ms':>8s} | {'ratio':>6s} | {'target':>6s} |")
    print(f"|{'-' * 14}|{'-' * 10}|{'-' * 8}|{'-' * 8}|")
    print(f"| {'x*2':12s} | {ref_ms:8.2f} | {1.0:6.3f} | {'':6s} |")
    for name, target in TARGETS.items():
        r = _timing.ratio(ref, times[name])
        rows[name] = {
            "ms": 1e3 * _timing.median(times[name]),
            "ratio": r,
            "target": target,
            "meets_target": None if target is None else r >= target,
        }
        tgt = "" if target is None else f"{target:.2f}"
        print(f"| {name:12s} | {rows[name]['ms']:8.2f} | {r:6.3f} | {tgt:>6s} |")

    print(f"block maxima alone: {amax_ms:.2f} ms; two-pass bound t(x*2) / (t(x*2) + t(amax)) = {bound:.3f}")
    result = {
        "benchmark": "bench_block",
        "shape": [args.size, args.size],
        "dtype": "float32",
        "repeats": args.repeats,
        "reference_ms": ref_ms,
        "block_amax_ms": amax_ms,
        "two_pass_bound": bound,
        "cases": rows,
        "machine": _timing.machine_info(),
    }
    _timing.write_json("bench_block", result)
    return result


if __name__ == "__main__":
    main()
