"""Delayed scaling: amax history semantics, numerics against a hand-written reference, NNX state, resume, mesh."""

import dataclasses
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import lowbit
import lowbit.nn as lnn
from lowbit import quant
from lowbit.quant import Channel, Delayed, Fixed, Log2, Quantizer, Uniform
from lowbit.trainer import checkpoint, init_state, make_optimizer, make_train_step
from lowbit.training import delayed
from lowbit.training.qdot import DotQuantConfig, quantized_conv, quantized_dot_general

E4M3, E5M2 = "float8_e4m3fn", "float8_e5m2"
DN = (((1,), (0,)), ((), ()))


def _delayed(fmt, length=3, reduction="max"):
    return Quantizer(format=fmt, scale=Delayed(history=length, reduction=reduction))


# ----- the Quantizer fields ----------------------------------------------------------------------


def test_delayed_defaults():
    q = Quantizer(format=E4M3, scale=Delayed())
    assert (q.scale.history, q.scale.reduction) == (16, "max")
    assert Quantizer(format=E4M3, scale=Delayed()) == q  # filled defaults keep equality and hashing
    assert hash(Quantizer(format=E4M3, scale=Delayed(history=16))) == hash(q)


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: Delayed(history=0), "Delayed.history"),
        (lambda: Delayed(history=True), "Delayed.history"),
        (lambda: Delayed(history=2.0), "Delayed.history"),
        (lambda: Delayed(reduction="mean"), "Delayed.reduction"),
        (lambda: Quantizer(format=E4M3, granularity=Channel(), scale=Delayed()), "Quantizer.scale"),
    ],
)
def test_bad_delayed_fields_name_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_delayed_needs_a_symmetric_uniform_grid():
    with pytest.raises(ValueError, match="symmetric Uniform"):
        Quantizer(format="int8", scale=Delayed(), kind=Uniform(symmetric=False))
    with pytest.raises(ValueError, match="symmetric Uniform"):
        Quantizer(format="int8", scale=Delayed(), kind=Log2())
    with pytest.raises(ValueError, match="scale"):
        Quantizer(format="mxfp4_e2m1", scale=Delayed())


def test_fake_quant_of_a_delayed_quantizer_takes_the_step():
    q = _delayed(E4M3)
    x = jnp.linspace(-3.0, 3.0, 64, dtype=jnp.float32)
    with pytest.raises(ValueError, match="scale= is missing"):
        quant.fake_quant(q, x)
    fixed = Quantizer(format=E4M3, scale=Fixed(step=0.01))
    np.testing.assert_array_equal(quant.fake_quant(q, x, scale=jnp.float32(0.01)), quant.fake_quant(fixed, x))


# ----- history semantics ---------------------------------------------------------------------------


def test_update_puts_the_current_amax_first_and_drops_the_oldest():
    h = jnp.array([4.0, 3.0, 2.0, 1.0], jnp.float32)
    np.testing.assert_array_equal(delayed.update(h, jnp.float32(5.0)), [5.0, 4.0, 3.0, 2.0])
    np.testing.assert_array_equal(delayed.update(jnp.zeros((1,), jnp.float32), jnp.float32(7.0)), [7.0])


@pytest.mark.parametrize("reduction, clip", [("max", 9.0), ("most_recent", 2.0)])
def test_reduction_and_step(reduction, clip):
    q = _delayed(E4M3, 4, reduction)
    h = jnp.array([2.0, 9.0, 0.0, 1.0], jnp.float32)
    assert float(delayed.reduce(q, h)) == clip
    assert float(delayed.step(q, h)) == np.float32(clip) / np.float32(448.0)


@pytest.mark.parametrize("reduction", ["max", "most_recent"])
def test_empty_history_gives_step_one(reduction):
    """TransformerEngine's initial scale: the format's own grid until the history holds an amax."""
    q = _delayed(E5M2, 4, reduction)
    assert float(delayed.step(q, delayed.history_init(4))) == 1.0
    assert float(delayed.step(q, jnp.array([0.0, 3.0, 0.0, 0.0], jnp.float32))) == (
        1.0 if reduction == "most_recent" else np.float32(3.0) / np.float32(57344.0)
    )


def test_amax_ignores_non_finite_entries():
    q = _delayed(E4M3)
    x = jnp.array([1.0, -6.0, jnp.inf, jnp.nan, 2.0], jnp.float32)
    assert float(delayed.amax(q, x)) == 6.0


# ----- quantized_dot_general against a hand-written reference -----------------------------------------


def _fq_ref(x, step, fmt):
    """Hand-written fake quantization: saturate onto ml_dtypes' grid at ``step``."""
    dt = {E4M3: ml_dtypes.float8_e4m3fn, E5M2: ml_dtypes.float8_e5m2}[fmt]
    top = float(ml_dtypes.finfo(dt).max)
    v = np.clip(np.float32(x) / np.float32(step), -top, top)
    return v.astype(dt).astype(np.float32) * np.float32(step)


def _ref_step(hist, fmt, reduction):
    clip = hist.max() if reduction == "max" else hist[0]
    return (
        np.float32(clip)
        / np.float32(float(ml_dtypes.finfo({E4M3: ml_dtypes.float8_e4m3fn, E5M2: ml_dtypes.float8_e5m2}[fmt]).max))
        if clip > 0
        else np.float32(1)
    )


@pytest.mark.parametrize("reduction", ["max", "most_recent"])
def test_steps_match_a_hand_written_reference(reduction):
    """Five steps with the operands' range changing: outputs, gradients and histories as TransformerEngine's recipe."""
    cfg = DotQuantConfig(
        lhs=_delayed(E4M3, 3, reduction),
        rhs=_delayed(E4M3, 3, reduction),
        dlhs_grad=_delayed(E5M2, 3, reduction),
        drhs_grad=_delayed(E5M2, 3, reduction),
    )
    assert cfg.amax_histories == dict(lhs=3, rhs=3, grad=3)

    def loss(x, w, t, hist):
        return jnp.sum(quantized_dot_general(x, w, DN, cfg, amax_history=hist) * t)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 3)))
    hist = {k: delayed.history_init(3) for k in ("lhs", "rhs", "grad")}
    ref = {k: np.zeros(3, np.float32) for k in hist}
    rng = np.random.default_rng(0)
    for scale in (1.0, 4.0, 0.5, 0.25, 2.0):
        x = (rng.standard_normal((8, 16)) * scale).astype(np.float32)
        w = rng.standard_normal((16, 4)).astype(np.float32)
        t = (rng.standard_normal((8, 4)) / scale).astype(np.float32)  # the incoming gradient g = t
        out, (dx, dw, new) = step(x, w, t, hist)

        amax = dict(lhs=np.abs(x).max(), rhs=np.abs(w).max(), grad=np.abs(t).max())
        xq = _fq_ref(x, _ref_step(ref["lhs"], E4M3, reduction), E4M3)
        wq = _fq_ref(w, _ref_step(ref["rhs"], E4M3, reduction), E4M3)
        gq = _fq_ref(t, _ref_step(ref["grad"], E5M2, reduction), E5M2)
        np.testing.assert_allclose(out, np.sum((xq @ wq) * t), rtol=1e-5)
        np.testing.assert_allclose(dx, gq @ wq.T, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(dw, xq.T @ gq, rtol=1e-5, atol=1e-6)
        ref = {k: np.concatenate([[amax[k]], ref[k][:-1]]).astype(np.float32) for k in ref}
        for k in ref:
            np.testing.assert_array_equal(new[k], ref[k])
        hist = new
    assert np.all(ref["lhs"] > 0)  # the history filled and rolled


def test_empty_history_is_the_unscaled_grid_and_a_history_of_the_own_amax_is_current_scaling():
    """Dot and conv, bit for bit: empty history == ``Fixed()`` (step 1); history [amax(x)] == absmax scaling."""

    def cfg(**kw):
        return DotQuantConfig(
            lhs=Quantizer(format=E4M3, **kw),
            rhs=Quantizer(format=E4M3, **kw),
            dlhs_grad=Quantizer(format=E5M2, **kw),
            drhs_grad=Quantizer(format=E5M2, **kw),
        )

    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
    w = jax.random.normal(jax.random.key(1), (3, 3, 3, 4)) * 0.3
    conv = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def grads(c):
        f = lambda x, w, t, hist: jnp.sum(t * quantized_conv(x, w, c, amax_history=hist, **conv))
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))

    t = jax.random.normal(jax.random.key(2), (2, 6, 6, 4)) * 1e-3  # the incoming gradient, well below 1
    late = grads(cfg(scale=Delayed(history=3)))
    empty = {k: delayed.history_init(3) for k in ("lhs", "rhs", "grad")}
    own = {
        k: jnp.array([float(jnp.max(jnp.abs(v))), 0.0, 0.0], jnp.float32)
        for k, v in (("lhs", x), ("rhs", w), ("grad", t))
    }
    for hist, ref in ((empty, cfg(scale=Fixed())), (own, cfg())):
        (a, (ax, aw)), (b, (bx, bw)) = grads(ref)(x, w, t, None), late(x, w, t, hist)
        assert float(a) == float(b)
        np.testing.assert_array_equal(ax, bx)
        np.testing.assert_array_equal(aw, bw)
    # The two differ: unscaled, the gradient's entries below e5m2's smallest normal (2^-14) lose bits.
    assert not np.array_equal(late(x, w, t, empty)[1][1], late(x, w, t, own)[1][1])


def test_forward_only_call_leaves_no_trace_and_mismatched_histories_are_refused():
    cfg = DotQuantConfig(lhs=_delayed(E4M3, 2))
    x, w = jnp.ones((2, 3)), jnp.ones((3, 2))
    with pytest.raises(ValueError, match="amax_history"):
        quantized_dot_general(x, w, DN, cfg)
    with pytest.raises(ValueError, match="amax_history"):
        quantized_dot_general(x, w, DN, cfg, amax_history=dict(lhs=jnp.zeros(2), rhs=jnp.zeros(2)))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        quantized_dot_general(x, w, DN, cfg, amax_history=dict(lhs=jnp.zeros(3)))
    with pytest.raises(ValueError, match="amax_history"):
        quantized_dot_general(x, w, DN, DotQuantConfig(), amax_history=dict(lhs=jnp.zeros(2)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dlhs_rhs=_delayed(E4M3)), "dlhs_rhs"),
        (dict(drhs_lhs=_delayed(E4M3)), "drhs_lhs"),
        (dict(dlhs_grad=_delayed(E5M2, 3), drhs_grad=_delayed(E5M2, 4)), "equal Delayed.history"),
        (dict(dlhs_grad=_delayed(E5M2), drhs_grad=_delayed(E5M2), grad_scale=True), "grad_scale"),
    ],
)
def test_bad_delayed_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DotQuantConfig(**kwargs)


def test_real_int8_product_with_delayed_scaling():
    """An int8 delayed quantizer feeds the real int8 dot; its output equals the fake product's."""
    q = Quantizer(format="int8", scale=Delayed(history=2))
    x = jax.random.normal(jax.random.key(2), (4, 32))
    w = jax.random.normal(jax.random.key(3), (32, 8))
    hist = dict(lhs=jnp.array([5.0, 1.0], jnp.float32), rhs=jnp.array([0.0, 0.0], jnp.float32))
    fns = {
        m: jax.jit(
            lambda x, w, h, m=m: quantized_dot_general(x, w, DN, DotQuantConfig(lhs=q, rhs=q, matmul=m), amax_history=h)
        )
        for m in ("real", "fake", "auto")
    }
    np.testing.assert_allclose(fns["real"](x, w, hist), fns["fake"](x, w, hist), rtol=1e-5, atol=1e-5)
    assert "s8[" in fns["auto"].lower(x, w, hist).compile().as_text()  # int8 operands: real on every backend


# ----- NNX: state, train step, resume --------------------------------------------------------------


class _Net(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(16, 8, rngs=rngs)
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(jax.nn.relu(self.fc(x.reshape(x.shape[0], -1))))


def _batch(seed, n=8):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return jax.random.normal(k1, (n, 4, 4, 1)), jax.random.randint(k2, (n,), 0, 3)


def _state_and_step(model):
    recipe = lowbit.recipes.get("fp8_delayed")
    tx = make_optimizer(1e-2, 0.0, 0, 10)
    graphdef, state = init_state(model, tx, policy=recipe.policy, loss_scale=recipe.make_loss_scale())
    return graphdef, state, jax.jit(make_train_step(graphdef, tx, policy=recipe.policy))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:recipe .* is unused")
def test_nnx_histories_are_overwrite_state_updated_by_the_train_step(tmp_path):
    qm = lnn.quantize(_Net(nnx.Rngs(0)), "fp8_delayed")
    x, y = _batch(0)
    qm(x)  # discovery creates the state
    hist = nnx.state(qm, lnn.OverwriteWithGradient)
    names = sorted(jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(hist))
    assert len(names) == 4 and all(("amax_lhs" in n) or ("amax_grad" in n) for n in names)
    assert all(float(jnp.max(v)) == 0 for v in jax.tree.leaves(hist))  # a forward pass changes nothing

    graphdef, state, step = _state_and_step(qm)
    for seed in range(3):
        state, _ = step(state, *_batch(seed))
    leaves = jax.tree_util.tree_leaves_with_path(state.overwrite)
    for path, h in leaves:
        h = np.asarray(h)
        assert np.all(h[:3] > 0) and np.all(h[3:] == 0), (jax.tree_util.keystr(path), h)
    # The first op's lhs is the flattened input: its history holds the three batches' amaxes, newest first.
    first = next(
        np.asarray(h) for p, h in leaves if "fc" in jax.tree_util.keystr(p) and "amax_lhs" in jax.tree_util.keystr(p)
    )
    want = [float(jnp.max(jnp.abs(_batch(s)[0]))) for s in (2, 1, 0)]
    np.testing.assert_array_equal(first[:3], np.float32(want))

    # Resume: the state round-trips through a checkpoint and continues bit for bit.
    path = checkpoint.save(tmp_path, 0, state, {"recipe": "fp8_delayed"})
    restored, _ = checkpoint.restore(path, state, {"recipe": "fp8_delayed"})
    for a, b in zip(jax.tree.leaves(state.overwrite), jax.tree.leaves(restored.overwrite)):
        np.testing.assert_array_equal(a, b)
    nxt, _ = step(state, *_batch(7))
    again, _ = step(restored, *_batch(7))
    for a, b in zip(jax.tree.leaves((nxt.params, nxt.overwrite)), jax.tree.leaves((again.params, again.overwrite))):
        np.testing.assert_array_equal(a, b)
    # ... and the history matters: an empty one (a resume that lost it) takes a different step.
    wiped = dataclasses.replace(restored, overwrite=jax.tree.map(jnp.zeros_like, restored.overwrite))
    other, _ = step(wiped, *_batch(7))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(nxt.params), jax.tree.leaves(other.params)))

    # nnx.split / merge keeps the histories.
    model = nnx.merge(graphdef, state.params, state.overwrite, state.rest)
    gd2, st2 = nnx.split(model)
    for a, b in zip(
        jax.tree.leaves(nnx.state(nnx.merge(gd2, st2), lnn.OverwriteWithGradient)), jax.tree.leaves(state.overwrite)
    ):
        np.testing.assert_array_equal(a, b)


_MESH_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import lowbit, lowbit.nn as lnn
    from lowbit.trainer import init_state, make_optimizer, make_train_step
    assert len(jax.devices()) == 2, jax.devices()

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(16, 8, rngs=rngs)
            self.head = nnx.Linear(8, 3, rngs=rngs)
        def __call__(self, x):
            return self.head(jax.nn.relu(self.fc(x.reshape(x.shape[0], -1))))

    x = np.array(jax.random.normal(jax.random.key(0), (8, 4, 4, 1)))
    x[6, 1, 2, 0] = 40.0  # the global amax lives in the second device's half of the batch
    y = np.arange(8, dtype=np.int32) % 3
    recipe = lowbit.recipes.get("fp8_delayed")
    results = []
    for n in (2, 1):
        model = lnn.quantize(Net(nnx.Rngs(0)), recipe)
        model(x[:2])
        tx = make_optimizer(1e-2, 0.0, 0, 10)
        graphdef, state = init_state(model, tx, policy=recipe.policy, loss_scale=recipe.make_loss_scale())
        mesh = Mesh(np.array(jax.devices()[:n]), ("data",))
        rep, shard = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
        step = jax.jit(make_train_step(graphdef, tx, policy=recipe.policy), in_shardings=(rep, shard, shard),
                       out_shardings=(rep, rep))
        state = jax.device_put(state, rep)
        for _ in range(2):
            state, _ = step(state, jax.device_put(x, shard), jax.device_put(y, shard))
        results.append(state)
    two, one = results
    lhs = np.asarray(next(v for k, v in jax.tree_util.tree_leaves_with_path(two.overwrite)
                          if "fc" in jax.tree_util.keystr(k) and "amax_lhs" in jax.tree_util.keystr(k)))
    assert lhs[0] == 40.0 and lhs[1] == 40.0, lhs
    for a, b in zip(jax.tree.leaves(two.overwrite), jax.tree.leaves(one.overwrite)):
        # Gradient amaxes: the sharded backward sums in another order (ulp differences, which
        # fp8 gradient codes and Adam can grow in the second step).
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4)
    print("OK")
""")


@pytest.mark.slow
def test_global_amax_under_a_two_device_mesh():
    """GSPMD data parallelism: every history holds the global batch's amax, as on one device."""
    env = dict(
        os.environ,
        XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2".strip(),
        JAX_PLATFORMS="cpu",
        JAX_NUMPY_DTYPE_PROMOTION="strict",
    )
    proc = subprocess.run([sys.executable, "-c", _MESH_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
