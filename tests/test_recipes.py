"""Every named recipe on a small model written without lowbit; the int8/int4 and fp8_delayed recipes in detail."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lowbit.nn as lnn
from lowbit import quant, recipes
from lowbit.quant import Absmax, Channel, Delayed, Tensor
from lowbit.recipes import op as oprule
from lowbit.training.qdot import uses_real_matmul


class _Head(nnx.Module):
    def __init__(self, rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (16, 10)) * 0.1)

    def __call__(self, x):
        return jnp.einsum("bd,dk->bk", x, self.w[...])  # a raw einsum inside a submodule


class _CNN(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.fc = nnx.Linear(6 * 6 * 4, 16, rngs=rngs)
        self.head = _Head(rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.conv(x))
        return self.head(jax.nn.relu(self.fc(x.reshape(x.shape[0], -1))))


# No attention products in these models: the recipes' activation-product rules go unused.
pytestmark = pytest.mark.filterwarnings("ignore:recipe .* is unused")

X = jax.random.normal(jax.random.key(1), (4, 6, 6, 1))
_DIFF = nnx.DiffState(0, (nnx.Param, lnn.OverwriteWithGradient))


def _quantized(name):
    qm = lnn.quantize(_CNN(nnx.Rngs(0)), name)
    return qm, lnn.describe(qm, X)


# (Every recipe on an NNX CNN with a raw-einsum head, forward and gradient finite: tests/test_quantize.py.)
_CALLS = (
    oprule.OpCall(kind="dot_general", dn=(((1,), (0,)), ((), ()))),
    oprule.OpCall(
        kind="conv",
        conv=(("dimension_numbers", ("NHWC", "HWIO", "NHWC")), ("padding", "SAME"), ("window_strides", (1, 1))),
    ),
)


def _overwrite_recipes():
    """Recipes with state replaced by its gradient (GradScale, amax histories)."""
    return [
        n
        for n in recipes.names()
        if any(
            c == "overwrite"
            for r in recipes.get(n).rules
            for call in _CALLS
            for c, _ in oprule.state_init(
                r, call, jnp.ones((3, 3, 1, 4) if call.kind == "conv" else (4, 3)), jax.random.key(0)
            ).values()
        )
    ]


@pytest.mark.parametrize("name", recipes.names())
def test_every_recipe_has_summary_rows_and_known_state(name):
    recipe = recipes.get(name)
    assert recipe.name == name and recipe.summary, "every recipe has README summary rows"
    assert all(isinstance(t, str) and isinstance(f, str) and t and f for t, f in recipe.summary)
    for rule in recipe.rules:
        for call in _CALLS:
            rhs = jnp.ones((3, 3, 1, 4) if call.kind == "conv" else (4, 3))
            for category, value in oprule.state_init(rule, call, rhs, jax.random.key(0)).values():
                assert category in oprule.CATEGORIES and bool(jnp.all(jnp.isfinite(value)))


def test_overwrite_recipes_are_found():
    assert {"fp4", "fp8_delayed"} <= set(_overwrite_recipes())


@pytest.mark.parametrize("name", _overwrite_recipes())
def test_overwrite_state_after_one_step_is_finite_and_positive(name):
    """GradScale and amax histories: the value each op's state takes after one step (its "gradient")."""
    qm, _ = _quantized(name)
    _, grads = nnx.jit(nnx.value_and_grad(lambda m: jnp.sum(m(X) ** 2), argnums=_DIFF))(qm)
    new = jax.tree.leaves(nnx.state(grads, lnn.OverwriteWithGradient))
    assert new and all(bool(jnp.all(jnp.isfinite(v))) and float(jnp.ravel(v)[0]) > 0 for v in new)


@pytest.mark.parametrize("name, weight_bits", [("int8", 8), ("int4", 4)])
def test_absmax_int_recipes_run_int8_dots(name, weight_bits):
    """W8A8 / W4A8: per-channel weights, per-tensor int8 activations, s8 operands in the compiled dots."""
    recipe = recipes.get(name)
    for rule in recipe.rules:
        cfg = rule.dot
        assert cfg.lhs.format.name == "int8" and cfg.lhs.granularity == Tensor() and cfg.lhs.scale == Absmax()
        assert cfg.dlhs_grad is None and cfg.drhs_grad is None  # float gradients
        assert uses_real_matmul(cfg)
    weight = recipe.rules[-1].dot.rhs
    assert (weight.format.name, weight.granularity) == (f"int{weight_bits}", Channel())

    qm, desc = _quantized(name)
    fc = next(e for e in desc if e.path == "fc")
    assert f"int{weight_bits} channel(axis 1)" in fc.rhs and fc.lhs == "int8"
    graphdef, state = nnx.split(qm)

    def loss(state, x):
        return jnp.sum(nnx.merge(graphdef, state)(x) ** 2)

    text = jax.jit(jax.grad(loss)).lower(state, X).compile().as_text()
    # An int32-accumulating dot is what the real path emits for two int8 operands (fc and the einsum head).
    int_dots = [line for line in text.splitlines() if re.search(r"= s32\[[^\]]*\]\S* dot\(", line)]
    assert len(int_dots) == 2 and "s8[" in text, "no int8 dots in the compiled step"


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_absmax_int_forward_matches_hand_quantized_operands(name):
    """The dense op's output is the product of the hand-quantized input and per-channel weight."""
    bits = 8 if name == "int8" else 4
    lin = nnx.Linear(12, 5, rngs=nnx.Rngs(3))
    qm = lnn.quantize(lin, name)
    x = jax.random.normal(jax.random.key(4), (3, 12))
    got = qm(x)
    xn, w, b = np.asarray(x), np.asarray(lin.kernel[...]), np.asarray(lin.bias[...])
    sx = np.float32(np.abs(xn).max()) / np.float32(127)
    sw = (np.abs(w).max(axis=0, keepdims=True) / np.float32(2 ** (bits - 1) - 1)).astype(np.float32)
    xq = np.clip(np.round(xn / sx), -128, 127) * sx
    wq = np.clip(np.round(w / sw), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * sw
    np.testing.assert_allclose(got, xq @ wq + b, rtol=1e-5, atol=1e-5)


def test_fp8_delayed_differs_from_fp8_only_in_the_scale_source():
    fp8, late = recipes.get("fp8"), recipes.get("fp8_delayed")
    assert len(fp8.rules) == len(late.rules)
    for a, b in zip(fp8.rules, late.rules):
        for site in ("lhs", "dlhs_grad", "drhs_grad"):
            qa, qb = getattr(a.dot, site), getattr(b.dot, site)
            assert qa.format == qb.format and qa.scale == Absmax() and isinstance(qb.scale, Delayed)
        assert a.dot.rhs == b.dot.rhs or (a.dot.rhs.scale == Absmax() and isinstance(b.dot.rhs.scale, Delayed))
        assert b.dot.amax_histories  # state for the op


def test_fp8_delayed_first_step_is_unscaled_and_fills_the_histories():
    """Step one runs on the unscaled grid (no history yet) and fills every history with its tensor's amax.

    That a history holding the tensor's own amax reproduces current scaling bit for bit is
    tests/test_delayed_scaling.py's; here the recipe wires it into every op of a model."""
    m = _CNN(nnx.Rngs(0))
    (fp8, _), (late, desc) = _quantized("fp8"), _quantized("fp8_delayed")
    assert all("delayed(max, 16)" in e.lhs and "delayed(max, 16)" in e.dlhs for e in desc)
    nnx.update(fp8, nnx.state(m, nnx.Param))
    nnx.update(late, nnx.state(m, nnx.Param))
    step = nnx.jit(nnx.value_and_grad(lambda mm: jnp.sum(mm(X) ** 2), argnums=_DIFF))
    (la, _), (l1, g1) = step(fp8), step(late)
    assert float(la) != float(l1)  # step one: no history yet, scale 1
    hist = nnx.state(g1, lnn.OverwriteWithGradient)
    # Each op's lhs history now holds its input's amax; the conv's input is X itself.
    conv_lhs = [
        v
        for p, v in jax.tree_util.tree_leaves_with_path(hist)
        if "conv" in jax.tree_util.keystr(p) and "amax_lhs" in jax.tree_util.keystr(p)
    ]
    assert len(conv_lhs) == 1 and float(conv_lhs[0][0]) == float(jnp.max(jnp.abs(X)))
    assert all(float(v[0]) > 0 and float(jnp.max(v[1:])) == 0 for v in jax.tree.leaves(hist))


def test_state_init_allocates_histories_per_delayed_site():
    rule = recipes.get("fp8_delayed").rules[-1]
    call = oprule.OpCall(kind="dot_general", dn=(((1,), (0,)), ((), ())))
    state = oprule.state_init(rule, call, jnp.ones((4, 3)), jax.random.key(0))
    assert {k: (c, v.shape) for k, (c, v) in state.items()} == {
        "amax_lhs": ("overwrite", (16,)),
        "amax_grad": ("overwrite", (16,)),
    }


@pytest.mark.parametrize(
    "name,fmt,grad_rounding",
    [
        ("mxfp8", "mxfp8_e4m3_rceil", "nearest"),
        ("mxfp4", "mxfp4_e2m1_rceil", "stochastic"),
        ("nvfp4", "nvfp4", "stochastic"),
    ],
)
def test_block_recipes_quantize_every_gemm_along_its_own_contraction(name, fmt, grad_rounding):
    """The block format on all four sites of the catch-all rule, placed per GEMM by the product."""
    rule = recipes.get(name).rules[-1]
    assert (rule.path, rule.kinds, rule.operands, rule.position) == (".*", None, "any", "any")
    d = rule.dot
    assert d.placement == "gemm" and d.reuse_fwd and d.dlhs_rhs is None and d.drhs_lhs is None
    assert {q.format.name for q in (d.lhs, d.rhs, d.dlhs_grad, d.drhs_grad)} == {fmt}
    assert (d.lhs.rounding, d.dlhs_grad.rounding, d.drhs_grad.rounding) == ("nearest", grad_rounding, grad_rounding)
    old = recipes.get("nvfp4_v0").rules[0].dot
    assert old.placement == "quantizer" and old.lhs == recipes.get("nvfp4").rules[-1].dot.lhs


def test_mxfp8_linear_op_against_hand_quantized_gemms():
    """The recipe's op: x and W along K; g and W along N; x and g along the tokens M (bit for bit)."""
    from lowbit import formats

    fmt = formats.with_scale_mode("mxfp8_e4m3", "rceil")  # TransformerEngine's MXFP8BlockScaling
    rng = np.random.default_rng(0)
    x, w, g = (jnp.asarray(rng.standard_normal(s, np.float32)) for s in ((64, 32), (32, 96), (64, 96)))
    call = oprule.OpCall(kind="dot_general", dn=(((1,), (0,)), ((), ())))
    rule = recipes.get("mxfp8").rules[-1]
    dot = lambda a, b: jax.lax.dot_general(a, b, call.dn)
    # Blocks down the columns, cut in place (test_block_formats: the bits of quantizing v.T along its rows); a
    # transposed copy would give the dots another operand layout, and their sums other last bits.
    down = quant.Quantizer(format=fmt, granularity=quant.Group(axis=0))
    q_rows, q_cols = (lambda v: quant.fake_quant(down, v)), (lambda v: formats.quantize(fmt, v))

    @jax.jit
    def ours(x, w, g):
        out, vjp = jax.vjp(lambda a, b: oprule.run(rule, call, a, b, {}, None, jnp.float32), x, w)
        return (out, *vjp(g))

    @jax.jit
    def reference(x, w, g):
        _, vjp_x = jax.vjp(lambda a: dot(a, q_cols(w)), x)
        _, vjp_w = jax.vjp(lambda b: dot(q_rows(x), b), w)
        return dot(q_cols(x), q_rows(w)), vjp_x(q_cols(g))[0], vjp_w(q_rows(g))[0]

    for name, a, b in zip(("forward", "dx", "dw"), ours(x, w, g), reference(x, w, g)):
        np.testing.assert_array_equal(a, b, err_msg=name)
