"""Test configuration: Hypothesis profiles and strict dtype promotion.

The ``ci`` profile (selected when the ``CI`` environment variable is set) keeps the
suite inside its 10-minute budget on 2 cores, together with skipping the ``slow``
end-to-end tests unless ``LOWBIT_SLOW=1``; ``dev`` draws more examples for local
runs. Override with ``HYPOTHESIS_PROFILE=<name>``.
"""

import os

import jax
import pytest
from hypothesis import HealthCheck, settings

# Strict promotion turns every silent upcast into an error, so a test exercising a
# bfloat16 or float16 path fails if the library promotes behind the user's back.
jax.config.update("jax_numpy_dtype_promotion", "strict")

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=12, derandomize=True, print_blob=True, **_COMMON)
settings.register_profile("dev", max_examples=200, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def pytest_collection_modifyitems(config, items):
    """Under CI, ``slow`` end-to-end tests run only with ``LOWBIT_SLOW=1`` (the suite's 10-minute budget).

    They train and resume real runs, kill checkpoint writers and drive the CLI in
    subprocesses; ``LOWBIT_SLOW=1 pytest -n 2 -m slow`` runs them.
    """
    if os.environ.get("CI") and not os.environ.get("LOWBIT_SLOW") and not config.getoption("-m"):
        skip = pytest.mark.skip(reason="slow: set LOWBIT_SLOW=1 to run under CI")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip)
