"""Test configuration: Hypothesis profiles and strict dtype promotion.

The ``ci`` profile (selected when the ``CI`` environment variable is set) keeps the
whole suite inside its 10-minute budget on 2 cores; ``dev`` draws more examples for
local runs. Override with ``HYPOTHESIS_PROFILE=<name>``.
"""

import os

import jax
from hypothesis import HealthCheck, settings

# Strict promotion turns every silent upcast into an error, so a test exercising a
# bfloat16 or float16 path fails if the library promotes behind the user's back.
jax.config.update("jax_numpy_dtype_promotion", "strict")

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=25, derandomize=True, print_blob=True, **_COMMON)
settings.register_profile("dev", max_examples=200, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))
