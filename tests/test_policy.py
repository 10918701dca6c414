"""Tests for lowbit.training.policy."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lowbit.training.policy import Policy, get_policy

F64, F32, BF16, F16 = (jnp.dtype(d) for d in (jnp.float64, jnp.float32, jnp.bfloat16, jnp.float16))
ALIASES = {
    F64: ["float64", "f64", "fp64", "double"],
    F32: ["float32", "f32", "fp32", "single"],
    BF16: ["bfloat16", "bf16"],
    F16: ["float16", "f16", "fp16", "half"],
}
KEYS = {"param_dtype": ["params", "p"], "compute_dtype": ["compute", "c"], "output_dtype": ["output", "o"]}


@st.composite
def policy_specs(draw):
    """A spec string in any accepted spelling, and the policy it must parse to."""
    expected, parts = {}, []
    for field, keys in KEYS.items():
        if draw(st.booleans()):  # An omitted field must default to float32.
            dtype = draw(st.sampled_from(list(ALIASES)))
            expected[field] = dtype
            key, name = draw(st.sampled_from(keys)), draw(st.sampled_from(ALIASES[dtype]))
            pad = draw(st.sampled_from(["", " "]))
            parts.append(f"{pad}{key}{pad}={pad}{draw(st.sampled_from([name, name.upper()]))}{pad}")
    if not parts:
        parts, expected = ["c=f32"], {"compute_dtype": F32}
    return ",".join(draw(st.permutations(parts))), Policy(**expected)


@given(policy_specs())
def test_parse_accepts_every_spelling_and_round_trips(case):
    spec, expected = case
    policy = Policy.parse(spec)
    assert policy == expected
    assert Policy.parse(str(policy)) == policy
    assert get_policy(spec) == policy


def test_str_is_canonical():
    assert str(Policy.parse("c=bf16")) == "params=float32,compute=bfloat16,output=float32"


@pytest.mark.parametrize(
    "spec, fragments",
    [
        ("compute=fp8", ["compute_dtype", "'fp8'", "bfloat16/bf16"]),
        ("p=int8", ["param_dtype", "'int8'", "float32/f32"]),
        ("o=", ["output_dtype", "''", "allowed"]),
        ("weights=f32", ["'weights'", "params, p, compute, c, output, o"]),
        ("compute", ["'compute'", "key=value"]),
        ("", ["''", "key=value"]),
        ("c=f16,compute=bf16", ["compute", "more than once"]),
    ],
)
def test_parse_errors_name_field_value_and_allowed(spec, fragments):
    with pytest.raises(ValueError) as err:
        Policy.parse(spec)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_constructor_accepts_dtypes_and_names():
    policy = Policy(param_dtype=np.float32, compute_dtype="BF16", output_dtype=jnp.float16)
    assert (policy.param_dtype, policy.compute_dtype, policy.output_dtype) == (F32, BF16, F16)
    assert Policy() == Policy(param_dtype=F32, compute_dtype=F32, output_dtype=F32)


@pytest.mark.parametrize(
    "value, error", [(jnp.int8, ValueError), ("float8_e4m3fn", ValueError), (None, TypeError), (object(), TypeError)]
)
def test_constructor_rejects_non_policy_dtypes(value, error):
    with pytest.raises(error, match="compute_dtype"):
        Policy(compute_dtype=value)


def test_frozen_keyword_only_and_hashable():
    policy = get_policy("bf16")
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.compute_dtype = F16
    with pytest.raises(TypeError):
        Policy(F32, BF16, F32)
    # Hashable: usable as a static jit argument.
    fn = jax.jit(lambda x, p: p.cast_to_compute(x), static_argnums=1)
    assert fn(jnp.ones(2), policy).dtype == BF16


@pytest.mark.parametrize("name, compute", [("fp32", F32), ("bf16", BF16), ("fp16", F16)])
def test_presets_keep_float32_params_and_outputs(name, compute):
    assert get_policy(name) == Policy(param_dtype=F32, compute_dtype=compute, output_dtype=F32)


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match=r"'fp8'.*fp32, bf16, fp16"):
        get_policy("fp8")


@pytest.mark.parametrize(
    "method, field",
    [("cast_to_param", "param_dtype"), ("cast_to_compute", "compute_dtype"), ("cast_to_output", "output_dtype")],
)
def test_casts_only_floating_leaves(method, field):
    policy = Policy(param_dtype=F16, compute_dtype=BF16, output_dtype=F16)
    target = getattr(policy, field)
    untouched = {
        "int": jnp.arange(3, dtype=jnp.int32),
        "bool": jnp.array([True, False]),
        "uint8": np.arange(4, dtype=np.uint8),
        "python_float": 0.5,
        "none": None,
    }
    floats = {
        "f32": jnp.linspace(0, 1, 5),
        "bf16": jnp.ones(2, BF16),
        "f16": jnp.ones((), F16),
        "np": np.ones(3, np.float32),
    }
    out = getattr(policy, method)({**untouched, **floats})
    for key, value in untouched.items():
        assert out[key] is value
    for key, value in floats.items():
        assert out[key].dtype == target
        np.testing.assert_array_equal(np.asarray(out[key], np.float32), np.asarray(value, np.float32))


def test_cast_traces_under_jit():
    policy = get_policy("fp16")
    out = jax.jit(policy.cast_to_compute)({"w": jnp.ones(3), "step": jnp.int32(7)})
    assert out["w"].dtype == F16 and out["step"].dtype == jnp.int32
