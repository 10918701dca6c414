"""Packed weights on a device mesh: the partition specs of a QTensor's arrays, the placement of a packed model's
weights from its annotations, and one 8-device run: sharded packed inference equals one device, save / load keeps it.

The multi-device run happens in one fresh process with 8 simulated CPU devices
(``--xla_force_host_platform_device_count`` only takes effect before jax starts).
"""

import json
import os
import subprocess
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec

from lowbit import quant
from lowbit.nn import packed
from lowbit.nn.lm import LM
from lowbit.ptq import RTN, quantize_weights
from lowbit.quant import Block, Channel, Group, Quantizer
from lowbit.quant.kinds import PTF, Uniform
from lowbit.quant.qtensor import codes_axis, partition_specs
from lowbit.trainer import sharding

P = PartitionSpec
MESH = AbstractMesh((2, 2, 2), sharding.AXES)

INT4_G8_ROWS = Quantizer(format="int4", granularity=Group(size=8, axis=0))
INT4_G8_ASYM = Quantizer(format="int4", granularity=Group(size=8), kind=Uniform(symmetric=False))
INT8_COLUMNS = Quantizer(format="int8", granularity=Channel(axis=-1))
INT8_ROWS = Quantizer(format="int8", granularity=Channel(axis=0))
INT8_PTF_ROWS = Quantizer(format="int8", granularity=Channel(axis=0), kind=PTF(max_power=3))
INT4_TILES = Quantizer(format="int4", granularity=Block(shape=(16, 16)))
MXFP4_DOWN = Quantizer(format="mxfp4_e2m1", granularity=Group(axis=0))  # blocks down the columns
MXFP6_ROWS = Quantizer(format="mxfp6_e3m2")  # 6-bit codes: 4 a 3-byte triple
NVFP4_TILES = Quantizer(format="nvfp4", granularity=Block(shape=(16, 16)))


def _qt(q, shape=(64, 48), seed=0):
    x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    return quant.quantize(q, jnp.asarray(x)), x


def _specs(qt):
    return {f: getattr(qt, f) for f in ("codes", "scale", "zero_point", "tensor_scale", "exponent")}


@pytest.mark.parametrize(
    ("q", "shape", "lead"),
    [
        (INT4_G8_ROWS, (64, 48), 0),
        (INT8_COLUMNS, (64, 48), 0),
        (INT8_COLUMNS, (1, 48), 1),  # axes of length 1 hold nothing: the next one is outermost
        (MXFP4_DOWN, (64, 48), 1),  # Group.to_blocks moves the blocks' axis last
        (NVFP4_TILES, (64, 48), 0),  # tile rows outermost
        (NVFP4_TILES, (16, 48), 1),  # one row of tiles: the tile columns are outermost
        (NVFP4_TILES, (16, 16), None),  # one tile: every run of codes mixes rows and columns
    ],
)
def test_codes_axis_is_the_outermost_stored_axis(q, shape, lead):
    assert codes_axis(jax.eval_shape(lambda x: quant.quantize(q, x), jax.ShapeDtypeStruct(shape, jnp.float32))) == lead


# (id, quantizer, shape, logical spec, {field: spec} for every array the QTensor has)
SPECS = [
    ("group-rows", INT4_G8_ROWS, (64, 48), P("fsdp"), dict(codes=P("fsdp"), scale=P("fsdp", None, None))),
    (
        "group-rows-two-mesh-axes",
        INT4_G8_ROWS,
        (64, 48),
        P(("fsdp", "tensor")),
        dict(codes=P(("fsdp", "tensor")), scale=P(("fsdp", "tensor"), None, None)),
    ),
    (
        "asymmetric-groups-along-rows",
        INT4_G8_ASYM,
        (64, 48),
        P("fsdp"),
        dict(codes=P("fsdp"), scale=P("fsdp", None, None), zero_point=P("fsdp", None, None)),
    ),
    ("per-column-split-rows", INT8_COLUMNS, (64, 48), P("fsdp"), dict(codes=P("fsdp"), scale=P(None, None))),
    ("per-row-split-rows", INT8_ROWS, (64, 48), P("tensor"), dict(codes=P("tensor"), scale=P("tensor", None))),
    (
        "ptf-exponents-per-row",
        INT8_PTF_ROWS,
        (64, 48),
        P("fsdp"),
        dict(codes=P("fsdp"), scale=P(None, None), exponent=P("fsdp", None)),
    ),
    ("int4-tiles", INT4_TILES, (64, 48), P("fsdp"), dict(codes=P("fsdp"), scale=P("fsdp", None, None, None))),
    (
        "mx-blocks-down-columns",
        MXFP4_DOWN,
        (64, 48),
        P(None, "tensor"),
        dict(codes=P("tensor"), scale=P("tensor", None)),
    ),
    ("mxfp6-triples", MXFP6_ROWS, (64, 32), P("fsdp"), dict(codes=P("fsdp"), scale=P("fsdp", None))),
    (
        "nvfp4-tensor-scale-replicated",
        NVFP4_TILES,
        (64, 48),
        P("fsdp"),
        dict(codes=P("fsdp"), scale=P("fsdp", None, None), tensor_scale=P()),
    ),
    ("size-1-mesh-axis-splits-nothing", INT4_G8_ROWS, (64, 48), P("data"), dict(codes=P(), scale=P(None, None, None))),
]


@pytest.mark.parametrize(("case", "q", "shape", "spec", "want"), SPECS, ids=[c[0] for c in SPECS])
def test_partition_specs(case, q, shape, spec, want):
    mesh = AbstractMesh((1, 2, 2), sharding.AXES) if case.startswith("size-1") else MESH
    qt, _ = _qt(q, shape)
    got = partition_specs(qt, spec, mesh)
    assert {f: s for f, s in _specs(got).items() if s is not None} == want
    assert jax.tree.structure(got) == jax.tree.structure(qt)  # device_put's tree
    abstract = jax.eval_shape(lambda x: quant.quantize(q, x), jax.ShapeDtypeStruct(shape, jnp.float32))
    assert partition_specs(abstract, spec, mesh) == got


def _pieces(a, spec, n):
    """The ``n`` shards of ``a`` along the one axis ``spec`` splits."""
    (axis,) = [i for i, e in enumerate(spec) if e is not None]
    return np.split(np.asarray(a), n, axis=axis)


# Quantizers whose scales are local to the split: each device's shards are the QTensor of its slice quantized alone.
LOCAL = [
    (INT4_G8_ROWS, (64, 48), 0),
    (INT4_G8_ASYM, (64, 48), 0),
    (INT8_ROWS, (64, 48), 0),
    (INT4_TILES, (64, 48), 0),
    (MXFP4_DOWN, (64, 48), 1),
    (MXFP6_ROWS, (64, 32), 0),
]


@pytest.mark.parametrize(("q", "shape", "axis"), LOCAL, ids=lambda v: str(getattr(v, "granularity", v)))
def test_each_shard_is_its_slice_quantized_alone(q, shape, axis):
    qt, x = _qt(q, shape)
    spec = P(*([None] * axis), ("fsdp", "tensor"))
    got = _specs(partition_specs(qt, spec, MESH))
    alone = [quant.quantize(q, jnp.asarray(s)) for s in np.split(x, 4, axis=axis)]
    for field, s in got.items():
        if s is None:
            continue
        assert any(e is not None for e in s), field  # every array is split
        for i, piece in enumerate(_pieces(getattr(qt, field), s, 4)):
            np.testing.assert_array_equal(piece, np.asarray(getattr(alone[i], field)), err_msg=f"{field} shard {i}")


REFUSED = [
    (
        INT4_G8_ROWS,
        (64, 48),
        P(None, "tensor"),
        r"axis 1 .* split over 'tensor', but the codes are one flat array.*only axis 0 can be split",
    ),
    (MXFP4_DOWN, (64, 48), P("tensor"), r"axis 0 .*row-major in the order \(48, 64\).*only axis 1 can be split"),
    (NVFP4_TILES, (16, 48), P("tensor"), r"leaves 8 elements per shard, not a multiple of the quantizer's 16-element"),
    (
        Quantizer(format="int4", granularity=Group(size=32, axis=0)),
        (64, 48),
        P(("data", "fsdp", "tensor")),
        r"leaves 8 elements per shard, not a multiple of the quantizer's 32-element scale blocks "
        r"\(group\(32, axis 0\)\)",
    ),
    (INT8_COLUMNS, (5, 48), P("fsdp"), r"axis 0 of size 5 is split over 'fsdp' \(2 shards\), which does not divide it"),
    (
        Quantizer(format="int4", granularity=Channel()),
        (2, 3),
        P("fsdp"),
        r"leaves 3 4-bit codes per shard, not whole bytes \(2 codes per byte\)",
    ),
    (
        Quantizer(format="float6_e2m3fn", granularity=Channel()),
        (2, 6),
        P("fsdp"),
        r"leaves 6 6-bit codes per shard, not whole bytes \(4 codes per 3 bytes\)",
    ),
    (INT4_G8_ROWS, (64, 48), P("pipe"), r"mesh axes \['pipe'\] are not in the mesh \(data, fsdp, tensor\)"),
    (INT4_G8_ROWS, (64, 48), P("fsdp", None, None), r"spec .* has 3 entries; allowed: at most 2"),
]


@pytest.mark.parametrize(("q", "shape", "spec", "match"), REFUSED)
def test_partition_specs_refuse_what_the_arrays_cannot_hold(q, shape, spec, match):
    qt, _ = _qt(q, shape)
    with pytest.raises(ValueError, match=match):
        partition_specs(qt, spec, MESH)


def test_partition_specs_takes_a_partition_spec():
    with pytest.raises(TypeError, match="spec has type tuple; allowed: a jax.sharding.PartitionSpec"):
        partition_specs(_qt(INT4_G8_ROWS)[0], ("fsdp",), MESH)


# ----- PackedWeight: the (K, N) view, perm and in_scale ----------------------------------------------------------
def _matrix_weight():
    """A (2, 8, 16) weight contracted over its first two axes: a (16, 16) view with a permutation and input scales."""
    m = np.random.default_rng(1).normal(size=(16, 16)).astype(np.float32)
    qt = quant.quantize(INT4_G8_ROWS, jnp.asarray(m))
    return packed.packed_weight(
        qt, (2, 8, 16), (0, 1), np.float32, perm=jnp.arange(16)[::-1], in_scale=jnp.ones(16, jnp.float32)
    )


@pytest.mark.parametrize(
    ("spec", "fallback", "stored", "replicated", "match"),
    [
        (P("fsdp", None, None), "error", P("fsdp", None), (), None),  # the first contracted axis: rows of K
        (P("fsdp", None, "tensor"), "replicate", P("fsdp", None), ("tensor",), None),
        (
            P("fsdp", None, "tensor"),
            "error",
            None,
            None,
            r"w: weight axis 2 \(of shape \(2, 8, 16\)\) is split over 'tensor', but the packed codes are one flat "
            r"array stored row-major with axis 0 outermost.*pass fallback='replicate'",
        ),
        (
            P(None, "fsdp", None),
            "error",
            None,
            None,
            r"weight axis 1 .* the \(K, N\) view flattens it behind axis 0, so its split is no range of K",
        ),
        (P(None, "fsdp", None), "replicate", P(None, None), ("fsdp",), None),
        (P("data"), "error", P(None, None), (), None),  # data has size 1 here: nothing to split
    ],
)
def test_placement_of_a_matrix_view(spec, fallback, stored, replicated, match):
    pw, mesh = _matrix_weight(), AbstractMesh((1, 2, 2), sharding.AXES)
    if match:
        with pytest.raises(ValueError, match=match):
            packed.placement(pw, spec, mesh, fallback=fallback, name="w")
        return
    where = packed.placement(pw, spec, mesh, fallback=fallback, name="w")
    assert (where.spec, where.stored, where.replicated) == (spec, stored, replicated)
    assert where.arrays.qt.codes == (P(stored[0]) if stored[0] else P())
    # The permutation scatters rows anywhere and in_scale is per input after it: both whole everywhere.
    assert where.arrays.perm == P() and where.arrays.in_scale == P()
    assert jax.tree.structure(where.arrays) == jax.tree.structure(pw)


# ----- a packed model's placements ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def packed_lm():
    lm = LM(vocab_size=256, context=16, dim=64, depth=1, heads=2, mlp_dim=128, rngs=nnx.Rngs(0))
    tokens = [np.random.default_rng(0).integers(0, 256, (2, 16)).astype(np.int32)]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "quantize_weights: .*stays float")  # the tied head
        pk, _ = quantize_weights(
            lm, tokens, weights=Quantizer(format="int4", granularity=Group(size=32)), method=RTN(), pack=True
        )
    return pk


def test_pack_keeps_the_annotations(packed_lm):
    metas = {
        "/".join(map(str, p)): v.get_metadata() for p, v in nnx.to_flat_state(nnx.state(packed_lm, packed.PackedParam))
    }
    assert metas["blocks/0/mlp_in/kernel"]["out_sharding"] == ("embed", "mlp")
    assert metas["blocks/0/mlp_in/kernel"]["op"] == "blocks/0/mlp_in:dot_general0"
    assert not any(m["eager_sharding"] for m in metas.values())


def test_placements_follow_the_trainers_rules(packed_lm):
    # Megatron's column splits (embed, mlp) -> (fsdp, tensor) split a row-major weight's second axis: refused...
    with pytest.raises(ValueError, match=r"blocks/0/attn/\w+/kernel: weight axis 1 .* is split over '(fsdp|tensor)'"):
        packed.placements(packed_lm, MESH)
    # ... or, asked for, kept whole along that mesh axis and said so.
    where = packed.placements(packed_lm, MESH, fallback="replicate")
    got = {name: (p.spec, p.stored, p.replicated, p.arrays.qt.codes, p.arrays.qt.scale) for name, p in where.items()}
    # RTN int4 g32 along the contracted axis (axis 0): scales (K // 32, 1, N).
    assert got == {
        "blocks/0/attn/qkv/kernel": (
            P("fsdp", "tensor"),
            P("fsdp", None),
            ("tensor",),
            P("fsdp"),
            P("fsdp", None, None),
        ),
        "blocks/0/attn/proj/kernel": (
            P("tensor", "fsdp"),
            P("tensor", None),
            ("fsdp",),
            P("tensor"),
            P("tensor", None, None),
        ),
        "blocks/0/mlp_in/kernel": (P("fsdp", "tensor"), P("fsdp", None), ("tensor",), P("fsdp"), P("fsdp", None, None)),
        "blocks/0/mlp_out/kernel": (
            P("tensor", "fsdp"),
            P("tensor", None),
            ("fsdp",),
            P("tensor"),
            P("tensor", None, None),
        ),
    }
    # Every built-in kernel has "embed" on one axis and "mlp" / "heads" on the other, so any split of the model
    # axes splits some kernel's second axis; data parallelism alone needs no fallback.
    rules = (("embed", None), ("mlp", "tensor"), ("heads", "tensor"), ("vocab", "tensor"))
    with pytest.raises(ValueError, match=r"blocks/0/attn/qkv/kernel: weight axis 1 .* split over 'tensor'"):
        packed.placements(packed_lm, MESH, rules)
    where = packed.placements(packed_lm, AbstractMesh((8, 1, 1), sharding.AXES))
    assert all(p.arrays.qt.codes == P() and not p.replicated for p in where.values())


def test_bad_fallback_and_mesh(packed_lm):
    with pytest.raises(ValueError, match="fallback='maybe' is invalid; allowed: 'error' or 'replicate'"):
        packed.placements(packed_lm, MESH, fallback="maybe")
    with pytest.raises(TypeError, match="mesh has type AbstractMesh; allowed: a jax.sharding.Mesh"):
        packed.shard(packed_lm, MESH, fallback="replicate")
    with pytest.raises(ValueError, match=r"sharding of \['blocks/0/attn/proj/kernel'\]: axis name 'heads' is neither"):
        packed.placements(packed_lm, MESH, (("embed", "fsdp"),))


# ----- 8 devices ---------------------------------------------------------------------------------------------------
_RUN = r"""
import json, sys, warnings
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from lowbit.nn import packed
from lowbit.nn.lm import LM
from lowbit.ptq import GPTQ, RTN, quantize_weights
from lowbit.quant import Group, Quantizer
from lowbit.trainer.sharding import make_mesh

root = sys.argv[1]
assert len(jax.devices()) == 8
mesh = make_mesh("data=2,fsdp=2,tensor=2")
lm = LM(vocab_size=256, context=16, dim=64, depth=1, heads=2, mlp_dim=128, rngs=nnx.Rngs(0))
rng = np.random.default_rng(0)
tokens = [rng.integers(0, 256, (4, 16)).astype(np.int32)]
x = jnp.asarray(rng.integers(0, 256, (4, 16)).astype(np.int32))
forward = nnx.jit(lambda m, x: m(x))
weights = jax.jit(lambda m: {k: packed.dequantize(pw) for k, pw in packed.packed_weights(m).items()})

def where(a):  # the spec without trailing Nones (jit outputs drop them), and device 0's shard shape
    spec = [str(e) for e in a.sharding.spec]
    while spec and spec[-1] == "None":
        spec.pop()
    return [spec, list(a.addressable_shards[0].data.shape)]

def layout(m):
    out = {}
    for name, pw in packed.packed_weights(m).items():
        for field in ("codes", "scale"):
            a = getattr(pw.qt, field)
            out[f"{name}:{field}"] = where(a)
        if pw.perm is not None:
            out[f"{name}:perm"] = where(pw.perm)
    return out

params = nnx.Any(nnx.Param, packed.PackedParam)

def bytes_equal(a, b):
    return all(np.asarray(a[k]).tobytes() == np.asarray(b[k]).tobytes() for k in a) and a.keys() == b.keys()

results = {}
for method in ("rtn", "gptq"):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "quantize_weights: .*stays float")
        pk, _ = quantize_weights(lm, tokens, weights=Quantizer(format="int4", granularity=Group(size=32)),
                                 method=RTN() if method == "rtn" else GPTQ(block_size=32, act_order=True), pack=True)
    sh = packed.shard(pk, mesh, fallback="replicate")
    one, many = np.asarray(forward(pk, x)), np.asarray(forward(sh, x))
    r = dict(
        layout=layout(sh),
        logits_equal=one.tobytes() == many.tobytes(),
        logits_err=float(np.abs(one - many).max() / np.abs(one).max()),
        weights_equal=bytes_equal(weights(pk), weights(sh)),
        embedding=str(sh.embed.embedding.get_value().sharding.spec),
    )
    if method == "gptq":  # save / load on the mesh: the same layout and values
        packed.save(sh, f"{root}/{method}")
        back = packed.load(lm, f"{root}/{method}", mesh, fallback="replicate")
        r["loaded_layout"] = layout(back)
        r["loaded_logits_equal"] = np.asarray(forward(back, x)).tobytes() == many.tobytes()
        r["loaded_arrays_equal"] = all(
            np.asarray(a).tobytes() == np.asarray(b).tobytes()
            for a, b in zip(jax.tree.leaves(nnx.state(back, params)), jax.tree.leaves(nnx.state(sh, params)))
        )
    results[method] = r
json.dump(results, open(f"{root}/results.json", "w"))
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed_sharded")
    # The suite's own flags (conftest.FAST_COMPILE under CI) plus eight host devices.
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", _RUN, str(root)], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((root / "results.json").read_text()), time.perf_counter() - start


def test_sharded_packed_inference_equals_one_device_and_survives_save_load(run):
    results, seconds = run
    for method, r in results.items():
        # The dequantized weights are elementwise functions of their local codes and scales: bit for bit.
        assert r["weights_equal"], method
        # The products' split contractions sum in another order (measured: 7e-7 of the largest logit).
        assert r["logits_err"] <= 1e-5, (method, r["logits_err"])
        lay = r["layout"]
        # Column-parallel qkv (64, 192): codes and scales split over fsdp along the rows, whole along tensor.
        assert lay["blocks/0/attn/qkv/kernel:codes"] == [["fsdp"], [64 * 192 // 2 // 2]]
        assert lay["blocks/0/attn/qkv/kernel:scale"] == [["fsdp"], [1, 1, 192]]
        # Row-parallel mlp_out (128, 64): split over tensor.
        assert lay["blocks/0/mlp_out/kernel:codes"] == [["tensor"], [128 * 64 // 2 // 2]]
        assert lay["blocks/0/mlp_out/kernel:scale"] == [["tensor"], [2, 1, 64]]
        assert r["embedding"] == "P('tensor',)"  # the float parameters as the trainer lays them
    assert results["gptq"]["layout"]["blocks/0/mlp_in/kernel:perm"] == [[], [64]]  # act-order: perm whole
    assert results["gptq"]["loaded_layout"] == results["gptq"]["layout"]
    assert results["gptq"]["loaded_logits_equal"] and results["gptq"]["loaded_arrays_equal"]
    print(f"8-device packed sharding run: {seconds:.1f} s")
