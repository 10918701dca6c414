"""Shared timing helpers for the benchmark scripts.

Machines drift (turbo, other tenants, page cache), so a candidate is never timed
alone: every round calls the reference and each candidate back to back, in an
order that alternates from round to round, and a ratio is the median of the
per-round ratios. The reference is a jitted ``x * 2``: one read and one write of
the array, i.e. what a memory-bound elementwise kernel cannot beat.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib
import ml_dtypes
import numpy as np

MIN_REPEATS = 5


def _ready(out: Any) -> Any:
    """Wait for device work; numpy results are already there."""
    return jax.block_until_ready(out)


def time_call(fn: Callable, *args, number: int = 1) -> float:
    """Wall seconds per call of ``fn(*args)``, over ``number`` calls that each wait for their result."""
    t0 = time.perf_counter()
    for _ in range(number):
        _ready(fn(*args))
    return (time.perf_counter() - t0) / number


def reference(x: jax.Array) -> Callable:
    """The memory-bound reference: a jitted ``x * 2`` (warmed up on ``x``)."""
    fn = jax.jit(lambda v: v * jnp.asarray(2, v.dtype))
    _ready(fn(x))
    return fn


def alternate(
    fns: Mapping[str, Callable],
    args: Mapping[str, tuple],
    repeats: int = 7,
    warmup: int = 1,
    min_sample_s: float = 0.0,
    cpu_times: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """Per-round wall times of every function, called in alternating order.

    Args:
      fns: name -> callable; one of them is usually the reference.
      args: name -> positional arguments for that callable.
      repeats: timed rounds (at least ``MIN_REPEATS``).
      warmup: untimed rounds first (compilation, page faults).
      min_sample_s: each sample repeats its call until it lasts about this long
        (calls on small arrays take microseconds, below the scheduler's noise).
      cpu_times: if given, filled like the result with the process's CPU seconds
        per call (all threads, user + system). Other tenants stretch wall time
        but barely CPU time, so CPU ratios between XLA kernels stay steady on a
        loaded machine; they overstate single-threaded numpy, whose CPU time is
        its wall time, against multi-threaded XLA.

    Returns:
      name -> ``repeats`` wall seconds per call, round ``i`` at index ``i``.
    """
    repeats = max(repeats, MIN_REPEATS)
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            _ready(fns[n](*args[n]))
    number = {n: max(1, math.ceil(min_sample_s / time_call(fns[n], *args[n]))) if min_sample_s else 1 for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    if cpu_times is not None:
        cpu_times.update({n: [] for n in names})
    for i in range(repeats):
        # Forward on even rounds, backward on odd: neither side always runs on a warm cache.
        for n in names if i % 2 == 0 else reversed(names):
            cpu0 = time.process_time()
            times[n].append(time_call(fns[n], *args[n], number=number[n]))
            if cpu_times is not None:
                cpu_times[n].append((time.process_time() - cpu0) / number[n])
    return times


def ratio(ref_times: list[float], times: list[float]) -> float:
    """Throughput of a candidate relative to the reference (>1: faster), median over rounds."""
    return statistics.median(r / t for r, t in zip(ref_times, times))


def median(times: list[float]) -> float:
    """Median wall seconds of one function's rounds."""
    return statistics.median(times)


def load_average() -> str:
    """1, 5 and 15 minute load averages: other work on the machine skews every timing."""
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def cpu_model() -> str:
    """The CPU's marketing name with its family and model (Linux ``/proc/cpuinfo``; ``platform`` elsewhere).

    Family and model tell CPU types apart that share a name ("AMD EPYC"), and
    quantized training on two CPU types ends at other accuracies (tests/test_accuracy_pins.py).
    """
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if not line.strip():
                    break  # the first processor says it all
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    return f"{fields['model name']} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"


def machine_info() -> dict[str, Any]:
    """What a reader needs to compare numbers across runs."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "numpy": np.__version__,
        "ml_dtypes": ml_dtypes.__version__,
        "backend": jax.default_backend(),
        # Quantized training turns last-bit float differences into other rounding decisions: the same code
        # trained under the CI suite's compile flags (tests/conftest.py) gives other accuracies than at the defaults.
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "devices": [str(d) for d in jax.devices()],
        "load_average": load_average(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable), *sys.argv]),
    }


def write_json(name: str, result: Mapping[str, Any]) -> str:
    """Write ``result`` to ``benchmarks/results/<name>.json``; returns the path."""
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{name}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out}")
    return out
