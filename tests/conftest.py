"""Test configuration: Hypothesis profiles, strict dtype promotion, fast compiles under CI.

The ``ci`` profile (selected when the ``CI`` environment variable is set) is sized for
the whole suite, end-to-end tests included, to aim at a 15-minute budget on 2 cores;
``dev`` draws more examples for local runs. Override with ``HYPOTHESIS_PROFILE=<name>``.
"""

import gc
import os
import shutil
import tempfile

# Under CI, XLA compiles at LLVM -O0 with its CPU backend's older elemental emitters (the
# MLIR fusion emitters, the default, spend ~10 ms compiling each fusion): the suite is dominated by
# compiling many small programs. The train step of a depth-1 nvfp4 ViT compiles in 2.6 s instead of
# 5.9-7.2 s, and the whole suite (pytest -n 2, 2 cores) took 810 s instead of 1198 s. The HLO
# passes (fusion, algebraic simplification) are the same and fast math is off at every setting;
# what differs is the last bits of some float ops (tanh and rsqrt are approximated differently,
# dots and reductions sum in another order), which a quantizer can turn into another rounding
# decision (tests/test_accuracy_pins.py pins under these flags;
# test_interception's scan-vs-unrolled test allows that order). Set XLA_FLAGS yourself to test
# at the default settings. The README's commands still run with the user's environment
# (tests/test_readme.py drops these flags for them). Should a later jaxlib drop the emitter flag,
# XLA refuses to start and names it ("Unknown flag in XLA_FLAGS"): take it out here then.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
if os.environ.get("CI") and "XLA_FLAGS" not in os.environ:
    os.environ["XLA_FLAGS"] = FAST_COMPILE

# One XLA compilation cache for the whole run, shared by both xdist workers and every subprocess
# they start (the CLI runs, the multi-device trainings): the same step or kernel compiled in two
# places is compiled once. Every compile is kept (most take well under the default 1 s floor).
# Cached executables are the ones XLA built, so no result depends on it; the directory is a
# fresh one per run, removed at the end (pytest_unconfigure), unless JAX_COMPILATION_CACHE_DIR
# was set by the caller. Measured on two subsets of the suite (2 workers): -8 % and -17 % wall time.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="lowbit-tests-xla-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # noqa: E402  (after XLA_FLAGS: the backend reads it once)
from hypothesis import HealthCheck, settings  # noqa: E402

# Tracing allocates millions of short-lived objects; at Python's default thresholds (700, 10, 10) the
# cyclic collector ran often enough to take ~10 % of a compile-heavy test (-3.5 % on a 3-file subset).
gc.set_threshold(50_000, 50, 100)

# Strict promotion turns every silent upcast into an error, so a test exercising a
# bfloat16 or float16 path fails if the library promotes behind the user's back.
jax.config.update("jax_numpy_dtype_promotion", "strict")

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=12, derandomize=True, print_blob=True, **_COMMON)
settings.register_profile("dev", max_examples=200, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

# The weighted ops of a depth-1 ViT, in forward order (attention's einsums have no weight):
# what weight export and weight-only PTQ name.
VIT_WEIGHTS = [
    "patch_embed:dot_general0",
    "blocks/0/attn/qkv:dot_general0",
    "blocks/0/attn/proj:dot_general0",
    "blocks/0/mlp_in:dot_general0",
    "blocks/0/mlp_out:dot_general0",
    "head:dot_general0",
]

# One recipe per kind of quantizer machinery, for the tests that run every recipe through a second or third
# model structure (linen, a CNN, one training step): each policy (fp32, bf16, fp16), each stateless element
# family (float, integer, a block format, rule-based ternary) and each kind of quantizer state (delayed
# amax histories, GradScale and PACT clips, stochastic-rounding keys with 2D blocks and RHT, learned LSQ
# steps). Every registered recipe still runs through every JAX structure in test_interception.py, which
# is where an op left in float would show.
REPRESENTATIVE_RECIPES = (
    "fp32",
    "bf16",
    "fp16",
    "fp8",
    "int8",
    "mxfp8",
    "ternary",
    "fp8_delayed",
    "fp4",
    "nvfp4",
    "int8_lsq",
)


def pytest_unconfigure(config):
    # The process that made the cache directory removes it: the main process (or the only one),
    # never an xdist worker (workers inherit the variable, so their _OWN_CACHE is False).
    if _OWN_CACHE and not hasattr(config, "workerinput"):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
