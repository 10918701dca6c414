"""Scale sources and static calibration: percentile, MSE, KL, running statistics, observers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit import quant
from lowbit.quant import Quantizer, scales

N = 4096


def _clip(q, x):
    return float(quant.qparams(q, x).step().max()) * q.max_level


def _mse(q, x):
    return float(jnp.mean(jnp.square(quant.fake_quant(q, x) - x)))


def _outliers(seed, n=N):
    """Gaussian data plus a handful of large outliers."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n)
    # 2 outliers (0.05%): a 99.9th percentile (the top 4 values) must land in the Gaussian tail
    x[rng.choice(n, 2, replace=False)] = rng.choice([-1, 1], 2) * rng.uniform(20, 40, 2)
    return jnp.asarray(x.astype(np.float32))


@given(seed=st.integers(0, 2**16))
@settings(max_examples=5)
def test_percentile_and_mse_clip_outliers_below_absmax_with_less_error(seed):
    # At 4 bits the outliers' step costs more than clipping them (at 8 bits it need not).
    x = _outliers(seed)
    amax = float(jnp.max(jnp.abs(x)))
    absmax = Quantizer(format="int4")
    for source in (Quantizer(format="int4", scale="percentile", percentile=99.9),
                   Quantizer(format="int4", scale="mse")):
        assert _clip(source, x) < amax
        assert _mse(source, x) < _mse(absmax, x)
    # The search includes the absmax clip itself: never worse, at any width.
    assert _mse(Quantizer(format="int8", scale="mse"), x) <= _mse(Quantizer(format="int8"), x)


@pytest.mark.xfail(strict=False, reason="known defect: kl_threshold does not smooth Q as TensorRT does, so on "
                   "about 7% of seeds every candidate with an empty kept bin scores inf and the clip reaches "
                   "the outliers")
@given(seed=st.integers(0, 2**16))
@settings(max_examples=3)
def test_kl_threshold_inside_histogram_range_and_below_outliers(seed):
    x = _outliers(seed)
    amax = jnp.max(jnp.abs(x))
    r = scales.histogram_range(amax)
    t = float(scales.kl_threshold(scales.histogram(x, r), r, 128))
    assert 128 * float(r) / 2048 <= t <= float(r)  # at least `levels` bins are kept
    assert t < float(amax)  # the outliers are clipped
    assert _clip(Quantizer(format="int8", scale="kl"), x) == pytest.approx(t, rel=1e-6)


@pytest.mark.parametrize("fmt,levels", [("int4", 7), ("int8", 127)])
def test_mse_clip_of_uniform_data_is_near_absmax(fmt, levels):
    # U(-1, 1) clipped at c with step c / M: error c^3 / (12 M^2) + (1 - c)^3 / 3, least at c = 2M / (2M + 1).
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, 4 * N).astype(np.float32))
    assert _clip(Quantizer(format=fmt, scale="mse"), x) == pytest.approx(2 * levels / (2 * levels + 1), abs=0.015)


def test_mse_clip_of_gaussian_int4_matches_known_optimum():
    # Banner et al. (ACIQ): the MSE-optimal clip of N(0, 1) for 16 uniform levels is about 2.55 sigma.
    x = jnp.asarray(np.random.default_rng(1).standard_normal(4 * N).astype(np.float32))
    assert 2.2 <= _clip(Quantizer(format="int4", scale="mse"), x) <= 3.0


def test_percentile_of_uniform_data_and_percentile_100_is_absmax():
    x = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (64, 64)).astype(np.float32))
    assert _clip(Quantizer(format="int8", scale="percentile", percentile=90), x) == pytest.approx(0.9, abs=0.02)
    for gran in (dict(), dict(granularity="channel", axis=0)):
        p100 = quant.qparams(Quantizer(format="int8", scale="percentile", percentile=100, **gran), x)
        amax = quant.qparams(Quantizer(format="int8", **gran), x)
        np.testing.assert_array_equal(p100.step(), amax.step())


def test_percentile_per_channel():
    x = np.random.default_rng(3).uniform(-1, 1, (512, 4)) * np.array([1, 2, 4, 8])
    q = Quantizer(format="int8", scale="percentile", percentile=50, granularity="channel")
    clips = np.asarray(quant.qparams(q, jnp.asarray(x, jnp.float32)).step()).ravel() * 127
    np.testing.assert_allclose(clips, np.percentile(np.abs(x), 50, axis=0), rtol=1e-5)


# ----- static calibration ----------------------------------------------------------------------
def _batches(seed, n=4, shape=(32, 16)):
    rng = np.random.default_rng(seed)
    return [jnp.asarray((rng.standard_normal(shape) * rng.uniform(0.5, 3)).astype(np.float32)) for _ in range(n)]


@given(seed=st.integers(0, 2**16))
@settings(max_examples=10)
def test_static_absmax_is_the_running_max(seed):
    batches = _batches(seed)
    q = Quantizer(format="int8", granularity="channel", static=True)
    state = quant.calibrate(q, lambda b: b * 2, batches)
    hand = np.max([np.max(np.abs(np.asarray(b) * 2), axis=0, keepdims=True) for b in batches], axis=0)
    np.testing.assert_array_equal(state.hi, hand)
    assert int(state.count) == len(batches)
    params = quant.observer(q).scale(state)
    np.testing.assert_array_equal(params.step(), quant.qparams(Quantizer(format="int8", granularity="channel"),
                                                               jnp.concatenate(batches) * 2).step())
    x = batches[0]
    np.testing.assert_array_equal(quant.fake_quant(q, x, state=state), quant.fake_quant(q, x, state=params))


def test_static_asymmetric_running_min_max():
    batches = _batches(1)
    q = Quantizer(format="uint8", symmetric=False, static=True)
    state = quant.calibrate(q, lambda b: b, batches)
    assert float(state.lo.item()) == min(float(b.min()) for b in batches)
    assert float(state.hi.item()) == max(float(b.max()) for b in batches)


def test_static_percentile_is_the_mean_of_batch_percentiles():
    batches = _batches(2)
    q = Quantizer(format="int8", scale="percentile", percentile=99, static=True)
    state = quant.calibrate(q, lambda b: b, batches)
    hand = np.mean([np.percentile(np.abs(np.asarray(b)), 99) for b in batches])
    assert float(state.hi.item()) == pytest.approx(hand, rel=1e-5)


def test_static_kl_histogram_equals_histogram_of_all_batches_in_any_order():
    batches = _batches(3, n=5)
    q = Quantizer(format="int8", scale="kl", static=True)
    fwd = quant.calibrate(q, lambda b: b, batches)
    rev = quant.calibrate(q, lambda b: b, batches[::-1])
    everything = jnp.concatenate(batches)
    r = scales.histogram_range(jnp.max(jnp.abs(everything)))
    np.testing.assert_array_equal(fwd.hist, scales.histogram(everything, r))
    np.testing.assert_array_equal(fwd.hist, rev.hist)
    assert float(fwd.hist_range) == float(r) and int(fwd.hist.sum()) == everything.size
    # The same histogram gives the same threshold as dynamic KL on everything.
    dyn = quant.qparams(Quantizer(format="int8", scale="kl"), everything)
    np.testing.assert_array_equal(quant.observer(q).scale(fwd).step(), dyn.step())


def test_calibrate_pytree_of_tensors_and_errors():
    q = Quantizer(format="int8", static=True)
    states = quant.calibrate(q, lambda b: {"a": b, "b": b[:, :4] * 3}, _batches(4, n=2))
    assert set(states) == {"a", "b"} and isinstance(states["a"], quant.CalibrationState)
    with pytest.raises(ValueError, match="at least one batch"):
        quant.calibrate(q, lambda b: b, [])
    with pytest.raises(ValueError, match="static"):
        quant.calibrate(Quantizer(format="int8"), lambda b: b, _batches(4, n=1))


def test_observer_is_an_explicit_pytree_state_under_jit():
    q = Quantizer(format="int4", granularity="channel", axis=0, static=True)
    obs = quant.observer(q)
    batches = _batches(5)
    state = obs.init(jax.ShapeDtypeStruct(batches[0].shape, jnp.float32))

    @jax.jit
    def step(state, x):
        return obs.update(state, x)

    for b in batches:
        state = step(state, b)
    hand = np.max([np.max(np.abs(np.asarray(b)), axis=1, keepdims=True) for b in batches], axis=0)
    np.testing.assert_array_equal(state.hi, hand)
    assert jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(obs.init(batches[0]))
