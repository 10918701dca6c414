"""benchmarks/bench_pair.py: names are checked before anything compiles; qwix configurations pair like recipes."""

import sys
from pathlib import Path

import jax
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_pair  # noqa: E402
import bench_train  # noqa: E402


def test_unknown_recipe_fails_before_compiling():
    with pytest.raises(ValueError, match="nope"):
        bench_pair.main(["nope", "fp8", "--widths", "8"])


def test_too_few_rounds_is_refused():
    with pytest.raises(SystemExit):
        bench_pair.main(["int8", "fp8", "--rounds", "1"])


@pytest.mark.slow  # compiles a qwix train step (about a minute on 2 cores); qwix is the optional [peers] extra
def test_a_qwix_configuration_steps_the_same_model():
    pytest.importorskip("qwix")
    x, y = bench_train.batch()
    model = bench_train.vit(16)
    with jax.numpy_dtype_promotion("standard"):  # qwix's own code promotes implicitly
        peer = bench_pair._stepper(model, "qwix_int8", x, y)
    assert any(k.startswith("s8xs8") for k in peer.dots())  # qwix's real int8 dots, not our recipe
