"""Gradient-carried quantizer state (GradScale, amax histories) in a user's own training loop.

The state gets its new value as its gradient. ``lowbit.optimizer(tx)`` makes any
optax optimizer take that value; a plain optimizer that steps the state like a
weight, or a gradient that leaves it out, is reported.
"""

import functools
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.nnx import variablelib

import lowbit
from lowbit import recipes
from lowbit.nn.variables import OverwriteWithGradient
from lowbit.recipes import carried
from lowbit.trainer.step import init_state, make_train_step

pytestmark = pytest.mark.filterwarnings("ignore:recipe .* is unused")

_REAL = nnx.All(nnx.Param, nnx.Not(OverwriteWithGradient))
# SGD with a power-of-two step: its update is exact, so two programs that compute the same
# gradients (XLA may fuse Adam's moment arithmetic differently in each) end bit for bit equal.
_LR = 2.0**-3
_STEPS = 6


class _MLP(nnx.Module):
    """Written without lowbit. Three layers: fp4 keeps the first and last at 8 bits, the middle gets GradScale."""

    def __init__(self, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(8, 16, rngs=rngs)
        self.fc2 = nnx.Linear(16, 16, rngs=rngs)
        self.fc3 = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        return self.fc3(jax.nn.relu(self.fc2(jax.nn.relu(self.fc1(x)))))


def _batch(i: int):
    return jax.random.normal(jax.random.key(i), (16, 8)), jax.random.randint(jax.random.key(100 + i), (16,), 0, 4)


def _loss(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x).astype(jnp.float32), y).mean()


@functools.cache
def _quantized_once(recipe: str):
    model = lowbit.quantize(_MLP(nnx.Rngs(0)), recipe)
    model(_batch(0)[0])  # the first call creates the quantizer state
    return model


def _quantized(recipe: str):
    """A fresh copy (tests train it); quantizing and discovering once per recipe keeps the file fast."""
    return nnx.clone(_quantized_once(recipe))


def _nnx_loop(model, tx):
    """The loop Flax's docs teach; ``tx`` is the one line that changes."""
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(_loss)(model, x, y)
        # optax mixes float32 hyperparameters with int32 counters; the suite runs strict promotion.
        with jax.numpy_dtype_promotion("standard"):
            optimizer.update(model, grads)
        return loss

    for i in range(_STEPS):
        step(model, optimizer, *_batch(i))
    jax.effects_barrier()
    return model


def _split_loop(model, tx):
    """A ``jax.grad`` loop over ``nnx.split`` state."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, rest, x, y):
        grads = jax.grad(lambda p: _loss(nnx.merge(graphdef, p, rest, copy=True), x, y))(params)
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

    for i in range(_STEPS):
        params, opt_state = step(params, opt_state, rest, *_batch(i))
    return nnx.merge(graphdef, params, rest)


@functools.cache
def _lowbit_step(recipe: str):
    """What lowbit's own train step makes of the model: same optimizer, same data."""
    policy = recipes.get(recipe).policy
    graphdef, state = init_state(
        _quantized(recipe), optax.sgd(_LR), policy=policy, loss_scale=recipes.get(recipe).make_loss_scale()
    )
    step = jax.jit(make_train_step(graphdef, optax.sgd(_LR), policy=policy))
    for i in range(_STEPS):
        state, _ = step(state, *_batch(i))
    return nnx.merge(graphdef, state.params, state.overwrite, state.rest)


def _flat(model, what) -> dict[str, np.ndarray]:
    return {
        jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(nnx.state(model, what))
    }


def _assert_trained_as_lowbit_step(model, recipe: str):
    initial, want = _flat(_quantized_once(recipe), OverwriteWithGradient), _lowbit_step(recipe)
    state, want_state = _flat(model, OverwriteWithGradient), _flat(want, OverwriteWithGradient)
    assert initial and state.keys() == initial.keys()
    for path, value in state.items():
        assert not np.array_equal(value, initial[path]), f"{path} never updated"
        np.testing.assert_array_equal(value, want_state[path], err_msg=path)
    for path, value in _flat(want, _REAL).items():
        np.testing.assert_array_equal(_flat(model, _REAL)[path], value, err_msg=path)


def _lowbit_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "gradient-carried" in str(w.message)]


@pytest.mark.parametrize("recipe", ["fp4", "fp8_delayed"])
def test_the_plain_nnx_loop_with_lowbit_optimizer_trains_the_state_as_lowbit_step_does(recipe):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = _nnx_loop(_quantized(recipe), lowbit.optimizer(optax.sgd(_LR)))
    assert not _lowbit_warnings(caught)
    _assert_trained_as_lowbit_step(model, recipe)


def test_a_jax_grad_loop_over_split_state_with_lowbit_optimizer_trains_the_state():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = _split_loop(_quantized("fp8_delayed"), lowbit.optimizer(optax.sgd(_LR)))
    assert not _lowbit_warnings(caught)
    _assert_trained_as_lowbit_step(model, "fp8_delayed")


def test_a_plain_optimizer_stepping_the_state_is_reported_with_the_op_and_the_fix():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = _nnx_loop(_quantized("fp4"), optax.adam(1e-3))
    reports = _lowbit_warnings(caught)
    assert reports and all(
        re.match(r"lowbit: op fc2:\S+: .*\(grad_scale\) was trained like a weight", r) for r in reports
    ), reports
    assert "nnx.Optimizer(model, lowbit.optimizer(tx), wrt=nnx.Param)" in reports[0]
    scale = next(v for p, v in _flat(model, OverwriteWithGradient).items() if "grad_scale" in p)
    assert np.frexp(scale)[0] != 0.5  # what was reported: GradScale is no power of two any more


def _watched_grad():
    """The gradient of a product that read an amax history: its backward pass checks the history.

    A new function each time: ``jit`` and ``make_jaxpr`` reuse the trace of a function they have seen.
    """
    return jax.grad(
        lambda x, h: carried.watch("blocks/0:einsum1", x, {"amax_lhs": h, "amax_grad": jnp.abs(h)}).sum(),
        argnums=(0, 1),
    )


def test_an_amax_history_stepped_like_a_weight_is_reported():
    """A plain optimizer's first step pushes a history's newest entry below 0 (its gradient is an amax >= 0)."""
    good, bad = jnp.asarray([2.0, 1.0, 0.0]), jnp.asarray([-1e-3, 0.0, 0.0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jax.jit(_watched_grad())(jnp.ones(3), good)
        jax.jit(_watched_grad())(jnp.ones(3), bad)
        # Under vmap the condition is batched and JAX runs the callback for every row: only the bad one speaks.
        jax.jit(jax.vmap(_watched_grad()))(jnp.ones((2, 3)), jnp.stack([good, bad]))
        jax.effects_barrier()
    reports = _lowbit_warnings(caught)
    assert len(reports) == 2 and all(
        r.startswith(
            "lowbit: op blocks/0:einsum1: its gradient-carried quantizer state (amax_lhs) was trained like a weight"
        )
        for r in reports
    ), reports


def test_lowbit_step_leaves_the_check_out_of_its_program():
    args = jnp.ones(3), jnp.asarray([1.0, 0.0, 0.0])
    assert "debug_callback" in str(jax.make_jaxpr(_watched_grad())(*args))
    with carried.managed():
        assert "debug_callback" not in str(jax.make_jaxpr(_watched_grad())(*args))
    recipe = recipes.get("fp4")
    graphdef, state = init_state(
        _quantized("fp4"), optax.sgd(_LR), policy=recipe.policy, loss_scale=recipe.make_loss_scale()
    )
    step = make_train_step(graphdef, optax.sgd(_LR), policy=recipe.policy)
    assert "debug_callback" not in str(jax.make_jaxpr(step)(state, *_batch(0)))


def test_a_gradient_that_leaves_the_state_out_is_reported_at_trace_time():
    graphdef, params, rest = nnx.split(_quantized("fp4"), _REAL, ...)

    def loss(params):
        return _loss(nnx.merge(graphdef, params, rest, copy=True), *_batch(0))

    frozen = r"op fc2:\S+ is differentiated but its gradient-carried .*\(grad_scale\) is not"
    with pytest.warns(UserWarning, match=frozen):
        jax.make_jaxpr(jax.grad(loss))(params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jax.make_jaxpr(loss)(params)  # no gradient, nothing to say


class _Tiny(nnx.Module):
    def __init__(self, with_state: bool):
        self.w = nnx.Param(jnp.arange(6, dtype=jnp.float32).reshape(2, 3))
        self.b = nnx.Param(jnp.ones((3,), jnp.float32))
        if with_state:
            self.scale = OverwriteWithGradient(jnp.float32(4.0))
            self.history = OverwriteWithGradient(jnp.asarray([3.0, 1.5, 0.0], jnp.float32))


# Gradients as nnx.grad gives them: large for the weights (clipping acts), new values for the state.
_GRADS = {
    "w": jnp.full((2, 3), 5.0),
    "b": jnp.full((3,), -7.0),
    "scale": jnp.float32(8.0),
    "history": jnp.asarray([100.0, 3.0, 1.5]),
}


def _update(model, tx, grads=_GRADS):
    """One ``nnx.Optimizer`` update with ``grads``; returns the updates."""
    state = nnx.state(model, nnx.Param)
    grads = nnx.State({k: jax.tree.map(lambda _, g=grads[k]: g, v) for k, v in state.items()})

    @nnx.jit
    def update(model, optimizer, grads):
        with jax.numpy_dtype_promotion("standard"):
            return optimizer.update(model, grads)

    return update(model, nnx.Optimizer(model, tx, wrt=nnx.Param), grads)


def test_clip_by_global_norm_and_adam_see_only_real_parameters():
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(0.1, weight_decay=0.5))
    without, model = _update(_Tiny(False), lowbit.optimizer(tx)), _Tiny(True)
    with_state = _update(model, lowbit.optimizer(tx))
    for name in ("w", "b"):
        np.testing.assert_array_equal(with_state[name], without[name])
    # The state takes its gradient as its value, exactly.
    assert float(model.scale[...]) == 8.0
    np.testing.assert_array_equal(model.history[...], _GRADS["history"])
    # Unwrapped, the same tx counts the state's "gradients" in the clipping norm: the comparison can tell.
    assert not np.array_equal(_update(_Tiny(True), tx)["w"], without["w"])


def test_a_step_with_non_finite_gradients_keeps_the_state():
    model = _Tiny(True)
    _update(model, lowbit.optimizer(optax.apply_if_finite(optax.sgd(0.1), 3)), {**_GRADS, "b": jnp.full((3,), jnp.nan)})
    assert float(model.scale[...]) == 4.0 and float(model.b[0]) == 1.0
    np.testing.assert_array_equal(model.history[...], [3.0, 1.5, 0.0])


def test_the_linen_collection_is_gradient_carried_in_a_plain_dict():
    params = {"params": {"w": jnp.ones((2,))}, "lowbit_overwrite": {"fc": {"grad_scale": jnp.float32(1.0)}}}
    grads = {"params": {"w": jnp.full((2,), 3.0)}, "lowbit_overwrite": {"fc": {"grad_scale": jnp.float32(2.0)}}}
    tx = lowbit.optimizer(optax.sgd(0.5))
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    assert float(new["lowbit_overwrite"]["fc"]["grad_scale"]) == 2.0
    np.testing.assert_array_equal(new["params"]["w"], [-0.5, -0.5])


def test_bad_input_is_refused_with_the_reason():
    with pytest.raises(TypeError, match="optax.GradientTransformation"):
        lowbit.optimizer(3)
    tx = lowbit.optimizer(optax.sgd(0.1))
    params = nnx.state(_Tiny(True), nnx.Param)
    with pytest.raises(ValueError, match="needs params"):
        tx.update(params, tx.init(params))
    # An optimizer created before the model's first call has no quantizer state in it.
    with pytest.raises(ValueError, match="after the model's first call"):
        tx.update(params, tx.init(nnx.state(_Tiny(False), nnx.Param)), params)


def test_the_linen_bridge_still_maps_the_collection_to_the_variable_type():
    assert variablelib.variable_type_from_name("lowbit_overwrite") is OverwriteWithGradient
    assert variablelib.variable_name_from_type(OverwriteWithGradient) == "lowbit_overwrite"
    assert variablelib.variable_name_from_type(nnx.Param) == "params"
