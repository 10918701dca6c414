"""Tests for lowbit.training.loss_scale."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lowbit.training.loss_scale import (
    DynamicLossScale,
    NoOpLossScale,
    StaticLossScale,
    all_finite,
    skip_nonfinite,
)
from lowbit.training.policy import Policy

F32, BF16, F16 = (jnp.dtype(d) for d in (jnp.float32, jnp.bfloat16, jnp.float16))
NONFINITE = [jnp.inf, -jnp.inf, jnp.nan]


def _optimizer_update(opt, grads, state, params):
    # optax's adam computes `b1 ** count` (Python float ** int32), which strict
    # promotion (set by conftest) rejects; the optimizer's internals are not under
    # test, so they run under the default rules.
    with jax.numpy_dtype_promotion("standard"):
        return opt.update(grads, state, params)


def _scale_of(ls):
    return float(ls.loss_scale)


# --- DynamicLossScale: the schedule ------------------------------------------------


def test_dynamic_defaults():
    ls = DynamicLossScale()
    assert ls.loss_scale.dtype == F32 and _scale_of(ls) == 2.0**15
    assert ls.counter.dtype == jnp.int32 and int(ls.counter) == 0
    assert (ls.min_scale, ls.period, ls.factor) == (1.0, 2000, 2.0)


def test_doubles_after_period_consecutive_finite_steps():
    ls = DynamicLossScale(loss_scale=8.0, period=3)
    for expected_counter in (1, 2):
        ls = ls.adjust(jnp.array(True))
        assert _scale_of(ls) == 8.0 and int(ls.counter) == expected_counter
    ls = ls.adjust(jnp.array(True))
    assert _scale_of(ls) == 16.0 and int(ls.counter) == 0


@pytest.mark.parametrize("bad", NONFINITE)
def test_halves_on_nonfinite_gradients_and_resets_counter(bad):
    ls = DynamicLossScale(loss_scale=64.0, period=3).adjust(True).adjust(True)
    grads = {"w": jnp.array([1.0, bad], F16), "b": jnp.zeros(2)}
    ls = ls.adjust(all_finite(grads))
    assert _scale_of(ls) == 32.0 and int(ls.counter) == 0
    # The interrupted run of finite steps starts over: two more are not enough.
    ls = ls.adjust(True).adjust(True)
    assert _scale_of(ls) == 32.0


def test_never_drops_below_min_scale():
    ls = DynamicLossScale(loss_scale=16.0, min_scale=3.0)
    scales = []
    for _ in range(5):
        ls = ls.adjust(False)
        scales.append(_scale_of(ls))
    assert scales == [8.0, 4.0, 3.0, 3.0, 3.0]


def test_growth_stops_short_of_float32_overflow():
    top = float(2.0**127)
    ls = DynamicLossScale(loss_scale=top, period=1).adjust(True)
    assert _scale_of(ls) == top and int(ls.counter) == 0


@given(
    flags=st.lists(st.booleans(), max_size=30),
    period=st.integers(1, 4),
    log2_min=st.integers(-2, 3),
    log2_initial=st.integers(0, 6),
)
def test_schedule_matches_reference(flags, period, log2_min, log2_initial):
    min_scale = 2.0**log2_min
    ls = DynamicLossScale(loss_scale=2.0**log2_initial, period=period, min_scale=min_scale)
    scale, counter = 2.0**log2_initial, 0
    for finite in flags:
        ls = ls.adjust(jnp.array(finite))
        if not finite:
            scale, counter = max(scale / 2, min_scale), 0
        elif counter + 1 == period:
            scale, counter = scale * 2, 0
        else:
            counter += 1
        assert (_scale_of(ls), int(ls.counter)) == (scale, counter)
        assert ls.min_scale == min_scale


# --- Pytree behaviour ----------------------------------------------------------------


def test_config_survives_flatten_unflatten():
    ls = DynamicLossScale(loss_scale=4.0, min_scale=0.25, period=7, factor=4)
    leaves, treedef = jax.tree_util.tree_flatten(ls)
    assert len(leaves) == 2  # scale and counter; the config is aux data.
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert (rebuilt.min_scale, rebuilt.period, rebuilt.factor) == (0.25, 7, 4.0)
    structure = jax.tree_util.tree_structure
    assert structure(DynamicLossScale(min_scale=0.5)) != structure(DynamicLossScale())
    assert jax.tree.map(lambda x: x, ls).min_scale == 0.25


def test_min_scale_kept_across_jit():
    back_off = jax.jit(lambda ls: ls.adjust(jnp.array(False)))
    ls = DynamicLossScale(loss_scale=8.0, min_scale=2.0)
    for _ in range(4):
        ls = back_off(ls)
    assert isinstance(ls, DynamicLossScale)
    assert _scale_of(ls) == 2.0 and ls.min_scale == 2.0


def test_scan_carries_a_dynamic_scale():
    flags = jnp.array([True, True, False, True, True])
    initial = DynamicLossScale(loss_scale=4.0, period=2)
    final, scales = jax.lax.scan(lambda ls, f: (ls.adjust(f), ls.loss_scale), initial, flags)
    np.testing.assert_array_equal(scales, [4.0, 4.0, 8.0, 4.0, 4.0])
    assert _scale_of(final) == 8.0


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"min_scale": 0.0}, "min_scale"),
        ({"min_scale": float("inf")}, "min_scale"),
        ({"min_scale": "1"}, "min_scale"),
        ({"period": 0}, "period"),
        ({"period": 1.5}, "period"),
        ({"period": True}, "period"),
        ({"factor": 1.0}, "factor"),
        ({"factor": float("nan")}, "factor"),
    ],
)
def test_invalid_config_is_a_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DynamicLossScale(**kwargs)


def test_python_numbers_become_float32_and_int32():
    assert StaticLossScale(loss_scale=1024).loss_scale.dtype == F32
    ls = DynamicLossScale(loss_scale=2, counter=3)
    assert ls.loss_scale.dtype == F32 and ls.counter.dtype == jnp.int32


# --- scale / unscale dtypes ---------------------------------------------------------

SCALES = [NoOpLossScale(), StaticLossScale(loss_scale=2.0**10), DynamicLossScale(loss_scale=2.0**10)]


@pytest.mark.parametrize("ls", SCALES, ids=lambda ls: type(ls).__name__)
@pytest.mark.parametrize("dtype", [F16, BF16, F32])
def test_scale_and_unscale_keep_dtypes(ls, dtype):
    factor = 1.0 if isinstance(ls, NoOpLossScale) else 2.0**10
    loss = jnp.array(0.75, dtype)
    scaled = ls.scale(loss)
    assert scaled.dtype == dtype and float(scaled) == 0.75 * factor
    grads = {"w": jnp.full((2, 3), 8.0, dtype), "master": jnp.ones(3), "step": jnp.arange(2)}
    out = ls.unscale(grads)
    assert jax.tree.map(lambda x: x.dtype, out) == jax.tree.map(lambda x: x.dtype, grads)
    np.testing.assert_array_equal(np.asarray(out["w"], np.float32), 8.0 / factor)
    np.testing.assert_array_equal(out["step"], grads["step"])


def test_unscale_does_not_need_the_reciprocal_in_the_leaf_dtype():
    # 2^-25 is below float16's smallest subnormal, but 2^15 / 2^25 = 2^-10 is not.
    out = StaticLossScale(loss_scale=2.0**25).unscale(jnp.array(2.0**15, F16))
    assert out.dtype == F16 and float(out) == 2.0**-10


def test_noop_and_static_adjust_return_themselves():
    for ls in SCALES[:2]:
        assert ls.adjust(jnp.array(False)) is ls


# --- all_finite ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F16, BF16, F32])
@pytest.mark.parametrize("bad", NONFINITE)
def test_all_finite_detects_any_nonfinite_leaf(dtype, bad):
    tree = {"a": jnp.ones(3), "b": [jnp.zeros((2, 2), dtype), jnp.arange(3)]}
    assert bool(all_finite(tree))
    tree["b"][0] = tree["b"][0].at[1, 1].set(bad)
    assert not bool(all_finite(tree))


def test_all_finite_without_floating_leaves_is_true():
    assert bool(all_finite({})) and bool(all_finite({"n": jnp.arange(3), "m": jnp.array([True])}))


# --- skip_nonfinite ---------------------------------------------------------------------


def test_nonfinite_step_leaves_params_and_adamw_state_unchanged():
    opt = skip_nonfinite(optax.adamw(1e-2, weight_decay=0.1))

    @jax.jit
    def step(params, state, grads):
        updates, state = _optimizer_update(opt, grads, state, params)
        return optax.apply_updates(params, updates), state

    params = {"w": jnp.linspace(-1.0, 1.0, 4), "b": jnp.ones(())}
    state = opt.init(params)
    params, state = step(params, state, jax.tree.map(jnp.ones_like, params))
    assert int(state.notfinite_count) == 0

    bad_grads = {"w": jnp.array([1.0, jnp.inf, 0.0, 1.0]), "b": jnp.ones(())}
    new_params, new_state = step(params, state, bad_grads)
    jax.tree.map(np.testing.assert_array_equal, new_params, params)
    jax.tree.map(np.testing.assert_array_equal, new_state.inner_state, state.inner_state)
    assert (int(new_state.notfinite_count), int(new_state.total_notfinite)) == (1, 1)
    assert not bool(new_state.last_finite)

    newer_params, newer_state = step(new_params, new_state, jax.tree.map(jnp.ones_like, params))
    assert not np.array_equal(newer_params["w"], params["w"])
    assert (int(newer_state.notfinite_count), int(newer_state.total_notfinite)) == (0, 1)


def test_skip_nonfinite_rejects_negative_limit():
    with pytest.raises(ValueError, match="max_consecutive_errors"):
        skip_nonfinite(optax.sgd(1.0), max_consecutive_errors=-1)


# --- Toy regression in float16 and bfloat16 -------------------------------------------


def _train(policy, loss_scale, tiny, steps=40):
    """Fits y = x @ w_true with float32 master weights, computing in the policy's dtypes.

    The loss is multiplied by ``tiny`` in the compute dtype, so unscaled gradients
    can fall below that dtype's range. Returns the first step's gradients, the
    final weights' float32 mean squared error (without ``tiny``) and the final scale.
    """
    x = jax.random.normal(jax.random.key(0), (16, 4))
    targets = x @ jnp.array([0.5, -1.0, 2.0, 0.25])
    opt = skip_nonfinite(optax.adam(0.05))

    @jax.jit
    def step(params, opt_state, loss_scale):
        def loss_fn(p):
            p, xc, tc = policy.cast_to_compute((p, x, targets))
            err = xc @ p["w"] - tc
            loss = policy.cast_to_output(jnp.mean(err * err) * jnp.asarray(tiny, policy.compute_dtype))
            return loss_scale.scale(loss)

        grads = loss_scale.unscale(jax.grad(loss_fn)(params))
        updates, opt_state = _optimizer_update(opt, grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss_scale.adjust(all_finite(grads)), grads

    params = {"w": jnp.zeros(4)}
    opt_state = opt.init(params)
    for i in range(steps):
        params, opt_state, loss_scale, grads = step(params, opt_state, loss_scale)
        if i == 0:
            first_grads = grads
    assert params["w"].dtype == F32
    mse = float(jnp.mean((x @ params["w"] - targets) ** 2))
    return first_grads["w"], mse, loss_scale


INITIAL_MSE = 5.0  # mean(targets^2) for these inputs, i.e. the loss at w = 0.


@pytest.mark.parametrize("output", [F32, F16])
def test_float16_gradients_underflow_without_loss_scaling(output):
    grads, mse, _ = _train(Policy(compute_dtype=F16, output_dtype=output), NoOpLossScale(), tiny=2.0**-23)
    assert not np.any(np.asarray(grads))
    assert mse == pytest.approx(INITIAL_MSE, rel=0.05)


@pytest.mark.parametrize(
    "output, loss_scale",
    [
        (F32, DynamicLossScale()),
        (F16, DynamicLossScale()),
        (F32, StaticLossScale(loss_scale=2.0**15)),
        # 2^24 overflows a float16 loss: the scale must back off below 2^16 on its own.
        (F16, DynamicLossScale(loss_scale=2.0**24)),
    ],
)
def test_float16_trains_with_loss_scaling(output, loss_scale):
    grads, mse, final = _train(Policy(compute_dtype=F16, output_dtype=output), loss_scale, tiny=2.0**-23)
    assert mse < INITIAL_MSE / 10
    if output == F16:
        assert _scale_of(final) < 2.0**16


@pytest.mark.parametrize("loss_scale", [NoOpLossScale(), DynamicLossScale()], ids=lambda ls: type(ls).__name__)
def test_bfloat16_trains_with_and_without_scaling(loss_scale):
    # bfloat16 has float32's exponent range, so the same tiny loss does not underflow.
    grads, mse, _ = _train(Policy(compute_dtype=BF16, output_dtype=BF16), loss_scale, tiny=2.0**-23)
    assert np.all(np.asarray(grads) != 0)
    assert mse < INITIAL_MSE / 10
