"""Packed weight-only inference (lowbit.nn.packed): packed logits == fake-quant logits bit for bit, for every PTQ
method and the exported formats, on a user's MLP, a user's einsum model and the built-in LM; packed state; honest
bytes; save / load; bad input."""

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lowbit.nn as lnn
from lowbit import quant
from lowbit.nn import export, packed
from lowbit.nn.lm import LM
from lowbit.nn.packed import PackedParam
from lowbit.ptq import AWQ, GPTQ, RTN, SmoothQuant, quantize_weights
from lowbit.quant import Channel, Group, Quantizer, serialize

K, N = 32, 16
MIX = np.random.default_rng(7).normal(size=(K, K)).astype(np.float32)  # correlated inputs: GPTQ has work to do


class UserMLP(nnx.Module):
    """Written without lowbit: nnx.Linear layers and a raw ``@`` on a parameter."""

    def __init__(self, rngs, n=N):
        self.fc1 = nnx.Linear(K, K, rngs=rngs)
        self.w2 = nnx.Param(jax.random.normal(rngs.params(), (K, K)) / 6)
        self.out = nnx.Linear(K, n, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.gelu(jax.nn.gelu(self.fc1(x)) @ self.w2[...]))


class UserEinsum(nnx.Module):
    """Raw einsums with multi-axis weights: out-heads ``(D, H, d)`` and a two-axis contraction ``(H, d, E)``."""

    def __init__(self, rngs):
        self.w_in = nnx.Param(jax.random.normal(rngs.params(), (K, 2, 8)) / 6)
        self.w_out = nnx.Param(jax.random.normal(rngs.params(), (2, 8, N)) / 4)

    def __call__(self, x):
        h = jax.nn.gelu(jnp.einsum("bD,Dhd->bhd", x, self.w_in[...]))
        return jnp.einsum("bhd,hdE->bE", h, self.w_out[...])


def _batches(seed=0, n=2):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(64, K)) @ MIX).astype(np.float32) for _ in range(n)]


def _tokens(seed=0, n=2):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 32, size=(4, 8)).astype(np.int32) for _ in range(n)]


MODELS = {
    "mlp": (lambda: UserMLP(nnx.Rngs(0)), _batches),
    "einsum": (lambda: UserEinsum(nnx.Rngs(0)), _batches),
    "lm": (lambda: LM(vocab_size=32, context=8, dim=K, depth=1, heads=2, mlp_dim=K, rngs=nnx.Rngs(0)), _tokens),
}
INT4_G8 = Quantizer(format="int4", granularity=Group(size=8))
INT4_G32 = Quantizer(format="int4", granularity=Group(size=32))
INT8_CHANNEL = Quantizer(format="int8", granularity=Channel())
NF4_G8 = Quantizer(format="nf4", granularity=Group(size=8))

# (id, model, method, weight quantizer, what the packed weights must carry: "+"-joined)
CASES = [
    ("rtn-int4-g32-mlp", "mlp", RTN(), INT4_G32, "rtn"),
    ("rtn-int8-channel-einsum", "einsum", RTN(), INT8_CHANNEL, "rtn"),
    ("rtn-nf4-g8-lm", "lm", RTN(), NF4_G8, "rtn"),
    ("gptq-int4-g8-mlp", "mlp", GPTQ(block_size=16), INT4_G8, "matrix"),
    ("gptq-act-order-int4-g8-einsum", "einsum", GPTQ(block_size=16, act_order=True), INT4_G8, "perm"),
    ("gptq-act-order-int4-g8-mlp", "mlp", GPTQ(block_size=16, act_order=True), INT4_G8, "perm"),
    ("awq-int4-g8-lm", "lm", AWQ(grid=4), INT4_G8, "in_scale"),
    ("smoothquant-weight-only-int8-mlp", "mlp", SmoothQuant(), INT8_CHANNEL, "in_scale"),
    (
        "smoothquant+gptq-act-order-int4-g8-einsum",
        "einsum",
        SmoothQuant(then=GPTQ(block_size=16, act_order=True)),
        INT4_G8,
        "perm+in_scale",
    ),
]

_nnx_forward = nnx.jit(lambda m, x: m(x))


_jax_forward = jax.jit(lambda state, x, graphdef: nnx.merge(graphdef, state)(x), static_argnums=2)


def _logits(model, x):
    """``(nnx.jit logits, jax.jit logits on the split state)`` as bytes (bit-exact comparisons)."""
    graphdef, state = nnx.split(model)
    return np.asarray(_nnx_forward(model, x)).tobytes(), np.asarray(_jax_forward(state, x, graphdef)).tobytes()


def _quantize(model, batches, **kwargs):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "quantize_weights: .*stays float")  # the LM's tied head
        return quantize_weights(model, batches, **kwargs)


@pytest.fixture(scope="module")
def quantized():
    """``case id -> (float model, fake-quant model, packed model, rows, held-out input)`` (built once)."""
    out = {}
    for case_id, name, method, weights, _ in CASES:
        make, data = MODELS[name]
        model, batches = make(), data()
        fake, rows = _quantize(model, batches, weights=weights, method=method)
        pk, rows_p = _quantize(model, batches, weights=weights, method=method, pack=True)
        assert rows == rows_p
        out[case_id] = (model, fake, pk, rows, jnp.asarray(data(seed=9, n=1)[0]))
    return out


@pytest.mark.parametrize("case_id, name, method, weights, carries", CASES, ids=[c[0] for c in CASES])
def test_packed_logits_equal_fake_quant_logits(quantized, case_id, name, method, weights, carries):
    model, fake, pk, rows, x = quantized[case_id]
    assert _logits(pk, x) == _logits(fake, x)  # bit for bit, under nnx.jit and under jax.jit on the split state
    assert _logits(pk, x)[0] != _logits(model, x)[0]  # and quantized
    pws = packed.packed_weights(pk)
    quantized_ops = [r for r in rows if r["method"] != "float"]
    assert len(pws) == len(quantized_ops) == packed.memory(pk)["packed_ops"]
    for path, pw in pws.items():
        # Each dequantized weight is the fake-quant model's parameter, bit for bit.
        ref = nnx.to_flat_state(nnx.state(fake, nnx.Param))
        want = dict(("/".join(map(str, p)), v.get_value()) for p, v in ref)[path]
        assert np.asarray(packed.dequantize(pw)).tobytes() == np.asarray(want).tobytes(), path
        assert pw.qt.codes.dtype == jnp.uint8
        if carries == "rtn":
            assert pw.contracted is None and pw.perm is None and pw.in_scale is None
        else:
            assert pw.contracted is not None and pw.qt.shape[0] * pw.qt.shape[1] == pw.size
            carried = set(carries.split("+"))
            assert (pw.perm is not None) == ("perm" in carried) and (pw.in_scale is not None) == ("in_scale" in carried)


def test_packed_state_holds_codes_not_float_weights(quantized):
    model, _, pk, rows, _ = quantized["gptq-act-order-int4-g8-mlp"]
    graphdef, state = nnx.split(pk)
    weight_shapes = {tuple(pw.shape) for pw in packed.packed_weights(pk).values()}
    for leaf in jax.tree.leaves(state):
        assert not (jnp.issubdtype(leaf.dtype, jnp.floating) and tuple(leaf.shape) in weight_shapes), leaf.shape
    packed_leaves = jax.tree.leaves(nnx.state(pk, PackedParam))
    assert {leaf.dtype for leaf in packed_leaves} == {
        jnp.dtype(jnp.uint8),
        jnp.dtype(jnp.float32),
        jnp.dtype(jnp.int32),
    }
    assert sum(leaf.dtype == jnp.uint8 for leaf in packed_leaves) == 3  # one codes array per weight
    # Optimizers and grads take nnx.Param: the packed weights are not among them; the biases are.
    assert {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(pk, nnx.Param))} == {"fc1/bias", "out/bias"}
    # A packed weight reads as the float weight (shape, dtype, [...] and @) and refuses writes.
    assert pk.w2.shape == (K, K) and pk.w2.dtype == jnp.float32 and pk.w2[...].shape == (K, K)
    np.testing.assert_array_equal(pk.w2[:2], pk.w2[...][:2])
    with pytest.raises(TypeError, match="read-only"):
        pk.w2[...] = jnp.zeros((K, K))
    # split / merge round-trips the packed form
    again = nnx.merge(graphdef, state)
    assert isinstance(again.w2, PackedParam) and again.w2.get_raw_value().qt.codes.dtype == jnp.uint8


class Wide(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(256, 256, rngs=rngs)
        self.fc2 = nnx.Linear(256, 64, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.relu(self.fc1(x)))


@pytest.mark.parametrize(
    "weights, ratio", [(Quantizer(format="int4", granularity=Group(size=128)), 0.3), (INT8_CHANNEL, 0.27)]
)
def test_memory_is_the_packed_bytes(weights, ratio):
    model = Wide(nnx.Rngs(0))
    batches = [np.random.default_rng(0).normal(size=(32, 256)).astype(np.float32)]
    pk, _ = quantize_weights(model, batches, weights=weights, method="rtn", pack=True)
    mem = packed.memory(pk)
    n = 256 * 256 + 256 * 64
    assert mem["float32_bytes"] == 4 * (n + 256 + 64) and mem["packed_ops"] == 2
    assert mem["packed_float32_bytes"] == 4 * n and mem["bytes"] == mem["packed_bytes"] + 4 * (256 + 64)
    assert mem["packed_bytes"] == sum(pw.nbytes for pw in packed.packed_weights(pk).values())
    assert mem["ratio"] == mem["bytes"] / mem["float32_bytes"] <= ratio
    assert packed.memory(model)["ratio"] == 1.0 and packed.memory(model)["packed_ops"] == 0


# ----- exported (QAT) weights --------------------------------------------------------------------------------------
def _float_with(model, values):
    """A float copy of ``model`` with the parameters ``values`` (``{path: array}``)."""
    ref = nnx.clone(model)
    for path, v in nnx.to_flat_state(nnx.state(ref, nnx.Param)):
        name = "/".join(map(str, path))
        if name in values:
            v.set_value(jnp.asarray(values[name]))
    return ref


@pytest.mark.parametrize("fmt", ["fp8", "nf4", "mxfp8", "mxfp4", "nvfp4", "int4"])
def test_exported_formats_pack_exactly(fmt):
    model = UserMLP(nnx.Rngs(1))
    x = jnp.asarray(_batches(seed=3, n=1)[0])
    qmodel = lnn.quantize(model, "fp32")
    lnn.discover(qmodel, x)
    exported = export.export(qmodel, fmt)
    pk = packed.from_export(qmodel, exported, model)
    # The reference: export's own fake quantization of the same weights, in a float model.
    reference = nnx.clone(qmodel)
    export.fake_quant_weights(reference, fmt)
    values = {
        "/".join(map(str, p)): v.get_value()
        for p, v in nnx.to_flat_state(nnx.state(reference, nnx.Param))
        if not any(str(k).startswith("lowbit_") for k in p)
    }
    assert _logits(pk, x) == _logits(_float_with(model, values), x)
    pws = packed.packed_weights(pk)
    assert set(pws) == {"fc1/kernel", "w2", "out/kernel"}
    if fmt in ("mxfp8", "mxfp4", "nvfp4"):  # blocks run along the weight's inputs (axis 0 of a (K, N) kernel)
        assert all(pw.qt.quantizer.granularity.axis == 0 for pw in pws.values())
        assert (pws["w2"].qt.tensor_scale is not None) == (fmt == "nvfp4")
    assert packed.memory(pk)["packed_bytes"] == export.nbytes(exported)


# ----- save / load ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case_id", ["gptq-act-order-int4-g8-einsum", "awq-int4-g8-lm", "rtn-int8-channel-einsum"])
def test_save_load_roundtrip(quantized, case_id, tmp_path):
    model, _, pk, _, x = quantized[case_id]
    packed.save(pk, tmp_path / "packed")
    # Another initialisation of the same architecture: its values are not used.
    fresh = {"UserEinsum": lambda: UserEinsum(nnx.Rngs(5)), "LM": lambda: MODELS["lm"][0]()}[type(model).__name__]()
    loaded = packed.load(fresh, tmp_path / "packed")
    assert _logits(loaded, x) == _logits(pk, x)
    assert packed.memory(loaded) == packed.memory(pk)
    for path, pw in packed.packed_weights(loaded).items():
        ref = packed.packed_weights(pk)[path]
        assert pw.qt.quantizer == ref.qt.quantizer and pw.contracted == ref.contracted
        jax.tree.map(np.testing.assert_array_equal, pw, ref)


# ----- bad input -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(quantized, tmp_path_factory):
    pk = quantized["gptq-act-order-int4-g8-mlp"][2]
    return packed.save(pk, tmp_path_factory.mktemp("packed") / "mlp")


def _tampered(saved, tmp_path, edit):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(saved, copy)
    manifest = json.loads((copy / packed.MANIFEST).read_text())
    edit(manifest)
    (copy / packed.MANIFEST).write_text(json.dumps(manifest))
    return copy


def _set(path, value):
    def edit(manifest):
        *head, last = path
        node = manifest
        for key in head:
            node = node[key]
        node[last] = value

    return edit


@pytest.mark.parametrize(
    "path, value, match",
    [
        (("weights", 0, "quantizer", "format"), "int9", r"weights\[0\]\.quantizer\.format"),
        (("weights", 0, "quantizer", "granularity", "size"), 16, r"weights\[0\]\.arrays\.scale"),
        (("weights", 0, "quantizer", "granularity", "type"), "Pickle", r"quantizer\.granularity\.type='Pickle'"),
        (("weights", 1, "shape"), [16, 64], r"weights\[1\]\.shape=\[16, 64\] does not fit qt_shape"),
        (("weights", 1, "contracted"), [0, 0], r"weights\[1\]\.contracted=\[0, 0\] is invalid"),
        (("weights", 1, "dtype"), "float64", "sha256"),  # consistent with the rest: only the checksum knows
        (("weights", 0, "contracted"), "0", r"weights\[0\]\.contracted"),
        (("weights", 0, "quantizer", "rounding"), "toward_zero", "sha256"),
        (("version",), 2, "kind/version"),
    ],
)
def test_tampered_manifest_is_a_clear_error(saved, tmp_path, path, value, match):
    with pytest.raises(ValueError, match=match):
        packed.load(UserMLP(nnx.Rngs(0)), _tampered(saved, tmp_path, _set(path, value)))


def test_wrong_model_or_files_are_clear_errors(saved, tmp_path):
    with pytest.raises(ValueError, match="does not fit the model"):
        packed.load(UserMLP(nnx.Rngs(0), n=8), saved)  # another head width
    with pytest.raises(ValueError, match="does not fit the model: parameters"):
        packed.load(UserEinsum(nnx.Rngs(0)), saved)
    with pytest.raises(ValueError, match="cannot read manifest.json"):
        packed.load(UserMLP(nnx.Rngs(0)), tmp_path)
    with pytest.raises(TypeError, match="flax.nnx.Module"):
        packed.load(object(), saved)
    with pytest.raises(ValueError, match="not empty"):
        packed.save(packed.load(UserMLP(nnx.Rngs(0)), saved), saved)
    with pytest.raises(ValueError, match="no packed weight"):
        packed.save(UserMLP(nnx.Rngs(0)), tmp_path / "empty")


def test_pack_names_bad_ops_and_shapes():
    model = UserMLP(nnx.Rngs(0))
    w = model.fc1.kernel[...]
    pw = packed.packed_weight(quant.quantize(INT8_CHANNEL.along(1), w), w.shape, None, w.dtype)
    with pytest.raises(ValueError, match=r"op fc9:dot_general0: the model has no module at path 'fc9'"):
        packed.pack(model, {"fc9:dot_general0": pw})
    with pytest.raises(ValueError, match=r"op out:dot_general0: .* no float parameter of the packed weight's shape"):
        packed.pack(model, {"out:dot_general0": pw})
    with pytest.raises(ValueError, match="op name 'fc1' is invalid"):
        packed.pack(model, {"fc1": pw})
    with pytest.raises(ValueError, match="name the same parameter"):
        packed.pack(model, {"fc1:dot_general0": pw, "fc1:dot_general1": pw})
    with pytest.raises(TypeError, match=r"weights\['fc1:dot_general0'\] has type Array"):
        packed.pack(model, {"fc1:dot_general0": w})
    with pytest.raises(ValueError, match=r"qt.shape=\(32, 32\) is invalid; allowed: \(64, 8\)"):
        packed.packed_weight(pw.qt, (8, 64), (1,), jnp.float32)
    with pytest.raises(ValueError, match="pack=True with activations is invalid"):
        quantize_weights(model, _batches(n=1), weights=INT8_CHANNEL, activations=Quantizer(format="int8"), pack=True)
    with pytest.raises(TypeError, match="pack='yes' is invalid"):
        quantize_weights(model, _batches(n=1), weights=INT8_CHANNEL, pack="yes")
    with pytest.raises(TypeError, match="lowbit.quantize"):
        packed.from_export(model, {}, model)


def test_a_quantizer_that_is_not_data_is_refused():
    q = Quantizer(format="int4", granularity=Group(size=8, axis=0))
    assert serialize.from_dict(serialize.to_dict(q)) == q
    from lowbit import formats

    mine = formats.FloatFormat(ebits=3, mbits=2, bias=2, specials="fnuz")
    with pytest.raises(ValueError, match="Quantizer.format=.* cannot be saved"):
        serialize.to_dict(Quantizer(format=mine))
    with pytest.raises(ValueError, match=r"quantizer.scale: .*Percentile.q"):
        serialize.from_dict(serialize.to_dict(q) | {"scale": {"type": "Percentile", "q": 500.0, "static": False}})
