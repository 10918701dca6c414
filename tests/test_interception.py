"""Interception under every JAX structure a user's model may use: never an op silently in float.

Models here are written the way users write them, without lowbit: module-level
``jax.jit`` helpers, ``jax.checkpoint``, ``lax.scan``/``fori_loop``/``while_loop``/
``cond``/``switch``, ``jax.vmap``, a ``dot_general`` imported under another name,
``nnx.remat``, ``nnx.vmap`` + ``nnx.scan`` stacked layers, linen's ``nn.scan``. The
float model always runs first (users evaluate it before quantizing), so any op
served from a float trace cache would show.
"""

import functools
import os
import threading
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FAST_COMPILE
from flax import linen, nnx
from jax.lax import dot_general as aliased_dot_general  # bound before lowbit installs its hooks

import lowbit
from lowbit.nn.intercept import NotQuantizedError

D = 16
DN = (((1,), (0,)), ((), ()))


@jax.jit
def jit_matmul(x, w):
    return x @ w


@functools.partial(jax.jit, static_argnames=("act",))
def jit_act(x, w, act):
    return act(x @ w)


@jax.checkpoint
def remat_layer(x, w):
    return jnp.tanh(x @ w)


def _scan(x, w):
    return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=1)[0]


def _while(x, w):
    def body(carry):
        i, h = carry
        return i + 1, jnp.tanh(h @ w)

    return jax.lax.while_loop(lambda c: c[0] < 1, body, (0, x))[1]


# structure -> how a layer computes tanh(x @ w) with it; every one is the plain layer, numerically.
STRUCTURES = {
    "plain": lambda m, x, w: jnp.tanh(x @ w),
    "jit": lambda m, x, w: jnp.tanh(jit_matmul(x, w)),
    "jit_static": lambda m, x, w: jit_act(x, w, act=jnp.tanh),
    "checkpoint": lambda m, x, w: remat_layer(x, w),
    "nnx_remat": lambda m, x, w: nnx.remat(lambda mod, h: jnp.tanh(h @ mod.w[...]))(m, x),
    "scan": lambda m, x, w: _scan(x, w),
    "fori_loop": lambda m, x, w: jax.lax.fori_loop(0, 1, lambda i, h: jnp.tanh(h @ w), x),
    "cond": lambda m, x, w: jax.lax.cond(jnp.sum(x) == jnp.sum(x), lambda: jnp.tanh(x @ w), lambda: jnp.tanh(x @ w)),
    "switch": lambda m, x, w: jax.lax.switch(0, [lambda: jnp.tanh(x @ w), lambda: -jnp.tanh(x @ w)]),
    "alias": lambda m, x, w: jnp.tanh(aliased_dot_general(x, w, DN)),
}
FORWARD_ONLY = {"while": lambda m, x, w: _while(x, w)}  # while_loop has no reverse-mode derivative


class Layer(nnx.Module):
    def __init__(self, structure: str, rngs: nnx.Rngs):
        self.structure = structure
        self.w = nnx.Param(jax.random.normal(rngs.params(), (D, D)) / np.sqrt(D))

    def __call__(self, x):
        return {**STRUCTURES, **FORWARD_ONLY}[self.structure](self, x, self.w[...])


class Net(nnx.Module):
    """embed -> one layer per structure -> head."""

    def __init__(self, structures, rngs: nnx.Rngs):
        self.embed = nnx.Linear(8, D, rngs=rngs)
        self.layers = nnx.List([Layer(s, rngs) for s in structures])
        self.head = nnx.Linear(D, 4, rngs=rngs)

    def __call__(self, x):
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


X = jax.random.normal(jax.random.key(1), (8, 8))


def _loss_of(out):
    return jnp.sum(out**2)


def _loss(model, x):
    return _loss_of(model(x))


_grad_step = nnx.jit(nnx.value_and_grad(_loss))  # one compiled forward and backward, as a user's step


def _params(grads):
    return {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(grads) if k[-1] != "sr_key"}


@pytest.fixture(scope="module")
def structured_float():
    return Net(list(STRUCTURES), nnx.Rngs(0))


@pytest.mark.parametrize("recipe", lowbit.recipes.names())
def test_every_structure_quantizes_like_plain_code(recipe, structured_float):
    """Each structure, mixed in one model, for every named recipe, quantizes like the plain model.

    The loss is bit for bit the plain model's. Gradients agree to float32
    summation order: scan, remat and cond change how XLA fuses and orders the
    backward pass's reductions, even in fp32 (measured: a few ulp).
    """
    float_out = structured_float(X)  # the float model runs first: its traces must not be reused
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "rule unused" warnings of recipes with edge rules
        q = lowbit.quantize(structured_float, recipe, X)  # ops discovered now: the step below may be jitted
        plain = lowbit.quantize(Net(["plain"] * len(STRUCTURES), nnx.Rngs(0)), recipe, X)
        loss_q, grads_q = _grad_step(q, X)
        loss_p, grads_p = _grad_step(plain, X)
    # The ops as discovered (no extra pass): the strict grad step above already checked that each ran
    # through its quantizer (NotQuantizedError otherwise).
    desc = lowbit.describe(q)
    # cond and switch trace both branches: their second branch's product is an op that this input never takes
    untaken = {(f"layers/{i}", "dot_general1") for i, s in enumerate(STRUCTURES) if s in ("cond", "switch")}
    ran = [(o.path, o.key, o.rule) for o in desc.quantized + desc.unmatched if (o.path, o.key) not in untaken]
    plain_desc = lowbit.describe(plain)
    assert sorted(ran) == sorted((o.path, o.key, o.rule) for o in plain_desc.quantized + plain_desc.unmatched)
    assert float(loss_q) == float(loss_p)
    gq = {k: v for k, v in _params(grads_q).items() if not any(k.startswith(f"{p}/lowbit_{o}/") for p, o in untaken)}
    gp = _params(grads_p)
    assert gq.keys() == gp.keys()
    for k in gq:  # an op left in float would be off by its quantization error, orders of magnitude more
        np.testing.assert_allclose(
            gq[k], gp[k], rtol=1e-5, atol=1e-6 * float(np.abs(gp[k]).max()), err_msg=f"{recipe}: gradient of {k}"
        )
    if len(desc):
        assert float(loss_q) != float(_loss_of(float_out)), f"{recipe}: describe lists quantized ops, output is float"


def test_while_loop_forward():
    float_model = Net(["while"], nnx.Rngs(0))
    float_model(X)
    q = lowbit.quantize(float_model, "int4")
    plain = lowbit.quantize(Net(["plain"], nnx.Rngs(0)), "int4")
    np.testing.assert_array_equal(q(X), plain(X))
    assert ("layers/0", "dot_general0") in {(o.path, o.key) for o in lowbit.describe(q, X)}


class Attention(nnx.Module):
    """Per-example attention through jax.vmap: q @ k.T is a product of two activations."""

    def __init__(self, rngs):
        self.qkv = nnx.Linear(D, 3 * D, rngs=rngs)
        self.out = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, x):  # x: (batch, tokens, D)
        q, k, v = jnp.split(self.qkv(x), 3, axis=-1)

        def one(qi, ki, vi):
            return jax.nn.softmax(qi @ ki.T / np.sqrt(D)) @ vi

        return self.out(jax.vmap(one)(q, k, v))


def test_vmapped_activation_products_are_activations():
    q = lowbit.quantize(Attention(nnx.Rngs(0)), "int4")
    desc = lowbit.describe(q, jnp.ones((2, 5, D)))
    weighted = {(o.path, o.key): o.weighted for o in desc.quantized + desc.unmatched}
    assert weighted == {
        ("qkv", "dot_general0"): True,
        ("", "dot_general0"): False,
        ("", "dot_general1"): False,
        ("out", "dot_general0"): True,
    }
    # int4's weight rule (per-channel int4) is for weights only: the activation products get the int8 rule
    rules = {(o.path, o.key): o.rhs for o in desc}
    assert "int8" in rules[("", "dot_general0")] and "int4" in rules[("qkv", "dot_general0")]


def test_vmapped_weight_product_is_per_example():
    """Under jax.vmap a per-tensor statistic is per example, as for any function vmap maps."""

    class PerExample(nnx.Module):
        def __init__(self, rngs):
            self.w = nnx.Param(jax.random.normal(rngs.params(), (8, D)))

        def __call__(self, x):
            return jax.vmap(lambda xi: xi @ self.w[...])(x)

    q = lowbit.quantize(PerExample(nnx.Rngs(0)), "int8")
    (op,) = lowbit.describe(q, X)
    assert op.weighted
    rows = jnp.concatenate([q(X[i : i + 1]) for i in range(X.shape[0])])
    np.testing.assert_array_equal(q(X), rows)


class Block(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(D, 2 * D, rngs=rngs)
        self.fc2 = nnx.Linear(2 * D, D, rngs=rngs)

    def __call__(self, x):
        return x + self.fc2(jax.nn.gelu(self.fc1(x)))


class Stacked(nnx.Module):
    """The standard LLM layout: layers created by nnx.vmap, run by nnx.scan."""

    def __init__(self, rngs, n=3):
        self.embed = nnx.Linear(8, D, rngs=rngs)

        @nnx.split_rngs(splits=n)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return Block(rngs)

        self.blocks = make(rngs)
        self.head = nnx.Linear(D, 4, rngs=rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(h, block):
            return block(h)

        return self.head(body(self.embed(x), self.blocks))


class Unrolled(nnx.Module):
    """The same layers, one module each."""

    def __init__(self, stacked: Stacked):
        graphdef, state = nnx.split(stacked.blocks)
        self.embed = stacked.embed
        self.blocks = nnx.List([nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state)) for i in range(3)])
        self.head = stacked.head

    def __call__(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


@pytest.mark.parametrize("recipe", ["int8_lsq", "fp4", "fp8_delayed", "nvfp4"])
def test_scan_over_layers_equals_unrolled_layers(recipe):
    """nnx.scan over 3 stacked layers == 3 unrolled layers, bit for bit, forward and gradients.

    The stacked quantizer state has one entry per layer (LSQ steps, GradScale,
    amax histories, stochastic-rounding keys), each equal to the unrolled layer's.
    Gradients that are sums over the batch (biases, PACT clips, LSQ steps, and
    int8_lsq's float weight-gradient products) are reduced inside XLA's compiled
    scan body in another order than in the unrolled graph: those agree to float32
    summation order (relative 1e-5); the forward pass and the quantized
    weight-gradient products agree bit for bit at XLA's default code generation.
    Under the suite's fast-compile flags (conftest.FAST_COMPILE, set under CI) the
    CPU backend's older emitters give a few last bits of the fp4 loss and of the
    nvfp4 weight gradients differently in the scan body than unrolled (measured:
    relative 6e-7), so there everything agrees to 1e-5: a layer quantized with
    another layer's state is off by a grid step, orders of magnitude more.
    """
    bitwise = os.environ.get("XLA_FLAGS") != FAST_COMPILE
    qs = lowbit.quantize(Stacked(nnx.Rngs(0)), recipe)
    qu = lowbit.quantize(Unrolled(Stacked(nnx.Rngs(0))), recipe)
    for _ in range(2):  # twice: the stochastic-rounding keys advance per layer
        (ls, gs), (lu, gu) = nnx.value_and_grad(_loss)(qs, X), nnx.value_and_grad(_loss)(qu, X)
        np.testing.assert_allclose(float(ls), float(lu), rtol=0 if bitwise else 1e-5)  # rtol=0: equal
        stacked, unrolled = _params(gs), _params(gu)
        assert stacked.keys() == {
            k.replace("blocks/0/", "blocks/") for k in unrolled if "blocks/1" not in k and "blocks/2" not in k
        }
        for k, v in stacked.items():
            pairs = (
                [(v[i], unrolled[k.replace("blocks/", f"blocks/{i}/")]) for i in range(3)]
                if k.startswith("blocks/")
                else [(v, unrolled[k])]
            )
            for a, b in pairs:
                if recipe == "int8_lsq" or not k.endswith("kernel") or not bitwise:
                    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()), err_msg=k)
                else:
                    np.testing.assert_array_equal(a, b, err_msg=k)
    state = {
        "/".join(map(str, k)): v
        for k, v in nnx.to_flat_state(nnx.state(qs))
        if k[0] == "blocks" and any(str(p).startswith("lowbit_") for p in k)
    }
    assert state and all(v.shape[0] == 3 for v in state.values())


def test_scan_stacked_training_resumes_bit_exact():
    """Train a scan-stacked model with learned and gradient-carried state; a restored copy continues identically."""
    from lowbit.trainer.step import init_state, make_train_step

    recipe = lowbit.recipes.get("fp4")
    y = jnp.arange(8) % 4
    tx = __import__("optax").adam(1e-2)

    def run(steps, state=None):
        model = lowbit.quantize(Stacked(nnx.Rngs(0)), recipe)
        model(X)
        graphdef, fresh = init_state(model, tx, policy=recipe.policy, loss_scale=recipe.make_loss_scale())
        step = jax.jit(make_train_step(graphdef, tx, policy=recipe.policy))
        state = fresh if state is None else state
        for _ in range(steps):
            state, _ = step(state, X, y)
        return state

    straight = run(4)
    restored = jax.tree.map(lambda a: jnp.asarray(np.asarray(a)), run(2))  # through host memory, as a checkpoint
    resumed = run(2, restored)
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(a, b)
    grad_scale = [v for k, v in nnx.to_flat_state(straight.overwrite) if k[-1] == "grad_scale" and k[0] == "blocks"]
    assert grad_scale and all(g.shape == (3,) for g in grad_scale)


def test_linen_scan_remat_and_jit_helpers():
    """linen: nn.scan, nn.remat and a jit helper quantize like the plain module."""

    class Dense(linen.Module):
        structure: str

        @linen.compact
        def __call__(self, x):
            w = self.param("w", linen.initializers.lecun_normal(), (D, D))
            return {"plain": lambda: jnp.tanh(x @ w), "jit": lambda: jnp.tanh(jit_matmul(x, w))}[self.structure]()

    class ScanBody(linen.Module):
        @linen.compact
        def __call__(self, h, _):
            return Dense("plain")(h), None

    class LinenNet(linen.Module):
        structured: bool

        @linen.compact
        def __call__(self, x):
            h = linen.Dense(D)(x)
            if self.structured:
                h = linen.remat(Dense)("jit")(h)
                h, _ = linen.scan(ScanBody, variable_axes={"params": 0}, split_rngs={"params": True}, length=1)()(
                    h, None
                )
            else:
                h = Dense("plain")(h)
                h = Dense("plain")(h)
            return linen.Dense(4)(h)

    float_model = LinenNet(True)
    params = float_model.init(jax.random.key(0), X)
    float_out = float_model.apply(params, X)
    p = params["params"]
    plain_params = {
        "params": {
            "Dense_0": p["Dense_0"],
            "Dense_1": p["CheckpointDense_0"],
            "Dense_2": jax.tree.map(lambda a: a[0], p["ScanScanBody_0"]["Dense_0"]),
            "Dense_3": p["Dense_1"],
        }
    }
    q, qp = lowbit.quantize(float_model, "int8"), lowbit.quantize(LinenNet(False), "int8")
    out = q.apply(params, X)
    np.testing.assert_array_equal(out, qp.apply(plain_params, X))
    assert bool(jnp.any(out != float_out))


def test_float_and_quantized_models_in_two_threads():
    """Interception is per thread: each model gives its single-thread result while the other runs."""
    float_model = Net(["plain", "jit"], nnx.Rngs(0))
    q = lowbit.quantize(Net(["plain", "jit"], nnx.Rngs(0)), "int4")
    want_float, want_q = np.asarray(float_model(X)), np.asarray(q(X))
    barrier, results, errors = threading.Barrier(2), {"float": [], "quantized": []}, []

    def loop(name, model):
        try:
            barrier.wait()
            for _ in range(20):
                results[name].append(np.asarray(model(X)))
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [
        threading.Thread(target=loop, args=("float", float_model)),
        threading.Thread(target=loop, args=("quantized", q)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results["float"]) == len(results["quantized"]) == 20
    assert all((r == want_float).all() for r in results["float"])
    assert all((r == want_q).all() for r in results["quantized"])


class WithCallback(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(8, 4, rngs=rngs)

    def __call__(self, x):
        h = jax.pure_callback(lambda a: np.asarray(a) * 2, jax.ShapeDtypeStruct(x.shape, x.dtype), x)
        return self.fc(h)


@jax.custom_vjp
def user_matmul(x, w):
    return x @ w


user_matmul.defvjp(lambda x, w: (x @ w, (x, w)), lambda res, g: (g @ res[1].T, res[0].T @ g))


class WithCustomVjp(nnx.Module):
    def __init__(self, rngs):
        self.w = nnx.Param(jnp.ones((8, 4)))

    def __call__(self, x):
        return user_matmul(x, self.w[...])


@pytest.mark.parametrize("model, fragment", [(WithCallback, "pure_callback"), (WithCustomVjp, "custom_vjp")])
def test_what_cannot_be_intercepted_is_an_error(model, fragment):
    q = lowbit.quantize(model(nnx.Rngs(0)), "int8")
    with pytest.raises(NotQuantizedError, match=fragment):
        q(X)
    lenient = lowbit.quantize(model(nnx.Rngs(0)), "int8", strict=False)
    with pytest.warns(UserWarning, match=fragment):
        lenient(X)


def test_discovery_is_abstract_and_may_happen_at_quantize_time():
    calls = []

    class Counted(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(8, 4, rngs=rngs)

        def __call__(self, x):
            jax.debug.callback(lambda: calls.append(1))
            return self.fc(x)

    q = lowbit.quantize(Counted(nnx.Rngs(0)), "int8", X)  # discovers now
    assert lowbit.nn.ops(q) and calls == []  # an abstract trace: nothing ran
    q(X)
    assert calls == [1]


def test_example_args_the_model_cannot_take():
    with pytest.raises(TypeError, match="lowbit.quantize: while discovering the ops of Net.__call__"):
        lowbit.quantize(Net(["plain"], nnx.Rngs(0)), "int8", jnp.ones((2, 3)))
    with pytest.raises(TypeError, match="strict='yes' is invalid"):
        lowbit.quantize(Net(["plain"], nnx.Rngs(0)), "int8", strict="yes")
