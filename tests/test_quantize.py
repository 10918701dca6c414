"""lowbit.quantize / describe on models written without lowbit: NNX and linen, rules, include/exclude."""

import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPRESENTATIVE_RECIPES
from flax import nnx
from jax import lax

import lowbit
from lowbit import recipes
from lowbit.quant import Quantizer
from lowbit.recipes import Recipe, Rule
from lowbit.training import DotQuantConfig

X = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))


class Head(nnx.Module):
    """A submodule whose matmul is a raw einsum on its own parameter."""

    def __init__(self, rngs):
        self.w = nnx.Param(0.1 * jax.random.normal(rngs.params(), (16, 10)))

    def __call__(self, x):
        return jnp.einsum("bd,dk->bk", x, self.w[...])


class CNN(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.fc = nnx.Linear(8 * 8 * 4, 16, rngs=rngs)
        self.head = Head(rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.conv(x))
        return self.head(jax.nn.relu(self.fc(x.reshape(x.shape[0], -1))))


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16)(x.reshape(x.shape[0], -1)))
        return x @ self.param("w_out", nn.initializers.lecun_normal(), (16, 10))


class RawOps(nnx.Module):
    """Every raw op lowbit intercepts, inside one module's method."""

    def __init__(self, rngs):
        self.w = nnx.Param(0.1 * jax.random.normal(rngs.params(), (64, 64)))
        self.k = nnx.Param(0.1 * jax.random.normal(rngs.params(), (3, 3, 1, 2)))

    def __call__(self, x):
        h = x.reshape(x.shape[0], -1)
        h = h @ self.w[...]
        h = jnp.matmul(h, self.w[...])
        h = lax.dot_general(h, self.w[...], (((1,), (0,)), ((), ())))
        h = jnp.einsum("...d,dk->...k", h, self.w[...])
        c = lax.conv_general_dilated(x, self.k[...], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return h + c.reshape(c.shape[0], -1)[:, :64]


def _quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kw)


@nnx.jit
def _loss_and_grad(model, x):
    return nnx.value_and_grad(lambda m: jnp.sum(m(x) ** 2))(model)


@pytest.mark.parametrize("name", REPRESENTATIVE_RECIPES)
def test_every_recipe_quantizes_an_nnx_cnn_with_a_raw_einsum_head(name):
    model = CNN(nnx.Rngs(0))
    qmodel = _quiet(lowbit.quantize, model, name)
    desc = _quiet(lowbit.describe, qmodel, X)
    ops = [(d.path, d.kind) for d in desc.quantized + desc.unmatched]
    assert ops == [("conv", "conv"), ("fc", "dot_general"), ("head", "einsum")]
    assert len(desc) == (3 if recipes.get(name).quantized else 0)
    loss, grads = _loss_and_grad(qmodel, X)
    assert np.isfinite(float(loss))
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("name", REPRESENTATIVE_RECIPES)
def test_every_recipe_quantizes_a_linen_mlp_and_accepts_its_float_params(name):
    model = LinenMLP()
    params = model.init(jax.random.key(0), X)["params"]
    qmodel = _quiet(lowbit.quantize, model, name)
    variables = _quiet(qmodel.init, jax.random.key(0), X)
    # The float params are the quantized model's params: same paths and values.
    assert jax.tree.structure(variables["params"]) == jax.tree.structure(params)
    state = {k: v for k, v in variables.items() if k != "params"}
    assert set(state) <= set(lowbit.nn.LINEN_COLLECTIONS.values())
    y = _quiet(qmodel.apply, {"params": params, **state}, X, mutable=list(state))[0]
    assert y.shape == (4, 10) and np.all(np.isfinite(np.asarray(y)))
    desc = _quiet(lowbit.describe, qmodel, X)
    assert [(d.path, d.kind) for d in desc.quantized + desc.unmatched] == [
        ("Dense_0", "dot_general"),
        ("", "dot_general"),
    ]


def test_fp32_and_unmatched_ops_are_bit_identical_to_float():
    model = CNN(nnx.Rngs(0))
    np.testing.assert_array_equal(lowbit.quantize(model, "fp32")(X), model(X))
    never = Recipe(name="never", rules=(Rule(path="nothing", dot=DotQuantConfig(lhs=Quantizer(format="int4"))),))
    with pytest.warns(UserWarning, match="rule 0 .*path='nothing'.* matches no op"):
        out = lowbit.quantize(model, never)(X)
    np.testing.assert_array_equal(out, model(X))


def test_include_and_exclude_narrow_to_exactly_the_matched_ops():
    model = CNN(nnx.Rngs(0))
    only_head = _quiet(lowbit.describe, lowbit.quantize(model, "fp8", include=r"^head$"), X)
    assert [d.path for d in only_head] == ["head"]
    no_head = _quiet(lowbit.describe, lowbit.quantize(model, "fp8", exclude="head"), X)
    assert [d.path for d in no_head] == ["conv", "fc"]
    with pytest.raises(ValueError, match="include/exclude leave no op"):
        _quiet(lowbit.quantize(model, "fp8", include="nope"), X)


def test_quantized_model_leaves_the_argument_untouched_and_keeps_float_params():
    model = CNN(nnx.Rngs(0))
    before = jax.tree.map(np.asarray, nnx.state(model))
    qmodel = _quiet(lowbit.quantize, model, "int4_lsq")
    _quiet(qmodel, X)
    after = jax.tree.map(np.asarray, nnx.state(model))
    jax.tree.map(np.testing.assert_array_equal, before, after)
    assert not hasattr(model, "_lowbit_recipe") and type(model) is CNN
    # Float params keep their paths and values; learned quantizer state is added as NNX Params.
    qparams = nnx.to_flat_state(nnx.state(qmodel, nnx.Param))
    float_params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    added = {p for p, _ in qparams if p not in float_params}
    for path, value in qparams:
        if path in float_params:
            np.testing.assert_array_equal(value[...], float_params[path][...])
    assert added == {
        ("conv", "lowbit_conv0", "act_step"),
        ("conv", "lowbit_conv0", "weight_step"),
        ("fc", "lowbit_dot_general0", "act_step"),
        ("fc", "lowbit_dot_general0", "weight_step"),
        ("head", "lowbit_einsum0", "act_step"),
        ("head", "lowbit_einsum0", "weight_step"),
    }


def test_edges_are_the_first_and_last_weighted_op_of_any_model():
    desc = _quiet(lowbit.describe, lowbit.quantize(CNN(nnx.Rngs(0)), "fp4"), X)
    by_path = {d.path: d for d in desc}
    assert by_path["conv"].lhs.startswith("pact 8-bit") and by_path["head"].rhs.startswith("sawb 8-bit")
    assert by_path["fc"].lhs.startswith("pact 4-bit") and by_path["fc"].rhs.startswith("sawb 4-bit")


def test_every_raw_op_inside_a_method_is_intercepted():
    qmodel = lowbit.quantize(
        RawOps(nnx.Rngs(0)),
        Recipe(
            name="e4m3",
            rules=(
                Rule(dot=DotQuantConfig(lhs=Quantizer(format="float8_e4m3fn"), rhs=Quantizer(format="float8_e4m3fn"))),
            ),
        ),
    )
    desc = lowbit.describe(qmodel, X)
    assert [(d.key, d.kind) for d in desc] == [
        ("dot_general0", "dot_general"),
        ("dot_general1", "dot_general"),
        ("dot_general2", "dot_general"),
        ("einsum0", "einsum"),
        ("conv0", "conv"),
    ]
    assert all(d.path == "" for d in desc)
    model = RawOps(nnx.Rngs(0))
    assert not np.array_equal(qmodel(X), model(X))  # quantized...
    np.testing.assert_allclose(qmodel(X), model(X), rtol=0.2, atol=0.2)  # ...but close


def test_rules_select_by_kind_and_path_first_match_wins():
    int8 = DotQuantConfig(lhs=Quantizer(format="int8"), rhs=Quantizer(format="int8"))
    int4 = DotQuantConfig(lhs=Quantizer(format="int4"), rhs=Quantizer(format="int4"))
    recipe = Recipe(
        name="mixed",
        rules=(Rule(kinds=("conv",), dot=int8), Rule(path="head|fc", dot=int4), Rule(path="head", dot=int8)),
    )
    with pytest.warns(UserWarning, match="rule 2"):
        desc = lowbit.describe(lowbit.quantize(CNN(nnx.Rngs(0)), recipe), X)
    assert {d.path: (d.rule, d.lhs) for d in desc} == {"conv": (0, "int8"), "fc": (1, "int4"), "head": (1, "int4")}


def test_a_rule_naming_a_kind_the_model_lacks_warns():
    recipe = Recipe(name="conv_only", rules=(Rule(kinds=("conv",), dot=DotQuantConfig(lhs=Quantizer(format="int8"))),))
    with pytest.warns(UserWarning, match="runs no conv op"):
        lowbit.describe(lowbit.quantize(nnx.Linear(64, 3, rngs=nnx.Rngs(0)), recipe), X.reshape(4, 64))


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: lowbit.quantize(CNN(nnx.Rngs(0)), "fp5"), ValueError, "recipe='fp5' is unknown; allowed: fp32"),
        (lambda: lowbit.quantize(CNN(nnx.Rngs(0)), "fp8", include="("), ValueError, "include='\\(' is not a valid"),
        (lambda: lowbit.quantize(CNN(nnx.Rngs(0)), "fp8", exclude=3), TypeError, "exclude=3"),
        (lambda: lowbit.quantize(lambda x: x, "fp8"), TypeError, "flax.nnx.Module or a flax.linen.Module"),
        (lambda: lowbit.quantize(CNN(nnx.Rngs(0)), 8), TypeError, "recipe=8"),
        (lambda: lowbit.quantize(lowbit.quantize(CNN(nnx.Rngs(0)), "fp8"), "fp8"), ValueError, "already quantized"),
        (lambda: Rule(path="["), ValueError, "Rule.path='\\['"),
        (lambda: Rule(kinds=("matmul",)), ValueError, "Rule.kinds='matmul'"),
        (lambda: Rule(kinds="conv"), TypeError, "Rule.kinds='conv'"),
        (lambda: Rule(position="middle"), ValueError, "Rule.position='middle'"),
        (lambda: Rule(operands="both"), ValueError, "Rule.operands='both'"),
        (lambda: Recipe(name="r", rules=[Rule()]), TypeError, "Recipe.rules"),
        (lambda: lowbit.describe(CNN(nnx.Rngs(0)), X), TypeError, "from lowbit.quantize"),
    ],
)
def test_bad_input_is_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_describe_table_and_dicts():
    desc = _quiet(lowbit.describe, lowbit.quantize(CNN(nnx.Rngs(0)), "fp8"), X)
    text = str(desc)
    assert "conv:conv0" in text and "head:einsum0" in text and "float8_e4m3fn" in text
    row = desc.quantized[0].as_dict()
    assert row["path"] == "conv" and row["kind"] == "conv" and row["rhs"] == "float8_e4m3fn channel(axis 3)"
    assert re.search("float8_e5m2", row["dlhs"])


def test_stochastic_rounding_keys_advance_per_call_and_are_reproducible():
    def two_steps(seed):
        qmodel = lowbit.quantize(CNN(nnx.Rngs(0)), "nvfp4", seed=seed)
        lowbit.describe(qmodel, X)
        key0 = np.asarray(qmodel.fc.lowbit_dot_general0.sr_key[...])
        grads = [np.asarray(_loss_and_grad(qmodel, X)[1].fc.kernel[...]) for _ in range(2)]
        assert not np.array_equal(key0, np.asarray(qmodel.fc.lowbit_dot_general0.sr_key[...]))
        return grads

    a, b, other = two_steps(3), two_steps(3), two_steps(4)
    np.testing.assert_array_equal(a, b)  # same seed, same draws
    assert not np.array_equal(a[0], a[1])  # same params, new keys: new stochastic rounding of the gradient
    assert not np.array_equal(a[0], other[0])


def test_an_unused_catch_all_rule_does_not_warn():
    # Earlier rules took every op: nothing is wrong with the recipe (the built-in nvfp4 on a ViT without convs).
    int8 = DotQuantConfig(lhs=Quantizer(format="int8"), rhs=Quantizer(format="int8"))
    recipe = Recipe(name="dots_then_rest", rules=(Rule(kinds=("dot_general",), dot=int8), Rule(dot=int8)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        desc = lowbit.describe(lowbit.quantize(nnx.Linear(64, 3, rngs=nnx.Rngs(0)), recipe), X.reshape(4, 64))
    assert [d.rule for d in desc] == [0]
