"""lowbit.ptq weight methods: GPTQ against an independent numpy transcription of the published algorithm, GPTQ and
AWQ against RTN, SmoothQuant's exact migration, SmoothQuant + GPTQ against GPTQ on the smoothed problem and against
SmoothQuant + RTN at W4A8, ``quantize_weights`` on a user's MLP and the built-in ViT, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import VIT_WEIGHTS
from flax import nnx

from lowbit import formats, quant
from lowbit.nn.vit import ViT
from lowbit.ptq import (
    AWQ,
    GPTQ,
    RTN,
    SmoothQuant,
    awq,
    gptq,
    hessian,
    op_sqnr,
    output_error,
    quantize_weights,
    rtn,
    smooth,
    smoothed_hessian,
    smoothing_scales,
    smoothquant,
)
from lowbit.quant import Channel, Group, Quantizer

K, N, ROWS = 32, 16, 256
INT4_CHANNEL = Quantizer(format="int4", granularity=Channel())
INT4_G8 = Quantizer(format="int4", granularity=Group(size=8))
INT8 = Quantizer(format="int8")  # dynamic per-tensor activations: A8


# ----- an independent GPTQ: IST-DASLab/gptq's ``fasterquant`` in numpy (weights as (outputs, inputs)) --------------
def _ref_scale(w, maxq):
    """Symmetric absmax step of each output row (an all-zero row keeps step 1)."""
    amax = np.max(np.abs(w), axis=1)
    return (np.where(amax > 0, amax, 1) / np.float32(maxq)).astype(np.float32)


def _ref_quantize(w, scale, maxq):
    return np.clip(np.round(w / scale), -maxq - 1, maxq) * scale


def _ref_gptq(W, H, bits, groupsize, blocksize, percdamp, actorder):
    W, H = W.astype(np.float32).copy(), H.astype(np.float64).copy()
    maxq, columns = 2 ** (bits - 1) - 1, W.shape[1]
    scale = _ref_scale(W, maxq)
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if actorder:
        perm = np.argsort(-np.diag(H), kind="stable")
        W, H = W[:, perm], H[perm][:, perm]
    H[np.diag_indices(columns)] += percdamp * np.mean(np.diag(H))
    Hinv = np.linalg.cholesky(np.linalg.inv(H)).T.astype(np.float32)
    Q = np.zeros_like(W)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1, Q1, Err1, Hinv1 = W[:, i1:i2].copy(), np.zeros((W.shape[0], i2 - i1), np.float32), None, Hinv[i1:i2, i1:i2]
        Err1 = np.zeros_like(Q1)
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            if groupsize != -1 and (i1 + i) % groupsize == 0:
                scale = _ref_scale(W[:, i1 + i : i1 + i + groupsize], maxq)  # the matrix, not the block's copy
            q = _ref_quantize(w, scale, maxq)
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= np.outer(err1, Hinv1[i, i:])
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q[:, np.argsort(perm)] if actorder else Q


def _problem(seed=0, dead=()):
    """A least-squares problem with correlated inputs: ``(x (ROWS, K), w (K, N), H)``."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(K, K)).astype(np.float32)
    x = (rng.normal(size=(ROWS, K)) @ mix * 0.5 + rng.normal(size=(ROWS, K))).astype(np.float32)
    x[:, list(dead)] = 0
    w = rng.normal(size=(K, N)).astype(np.float32)
    return x, w, np.asarray(hessian(x))


def _error(x, w, w_q):
    return float(np.sum((x @ w - x @ np.asarray(w_q)) ** 2))


CASES = [(INT4_CHANNEL, -1, False), (INT4_G8, 8, True)]


@pytest.mark.parametrize("quantizer, groupsize, act_order", CASES)
def test_gptq_equals_numpy_reference(quantizer, groupsize, act_order):
    # Block 16 with groups of 8: lazy updates across blocks, and groups that start inside a block.
    x, w, h = _problem(dead=(5,))
    mine = np.asarray(gptq.quantize(w, h, quantizer, GPTQ(block_size=16, act_order=act_order)).weight)
    ref = _ref_gptq(w.T, h, 4, groupsize, 16, 0.01, act_order).T
    np.testing.assert_allclose(mine, ref, rtol=0, atol=1e-5)  # float32 step division, not a different level
    assert np.all(mine[5] == 0)  # the dead input


@pytest.mark.parametrize("quantizer, groupsize, act_order", CASES)
def test_gptq_beats_rtn_on_correlated_inputs(quantizer, groupsize, act_order):
    x, w, h = _problem(seed=1)
    res = gptq.quantize(w, h, quantizer, GPTQ(block_size=16, act_order=act_order))
    assert _error(x, w, res.weight) < 0.8 * _error(x, w, rtn.quantize(w, quantizer))
    # The returned parameters are the grid the weights lie on.
    if groupsize > 0:
        assert res.params.scale.shape == (K // groupsize, 1, N) and res.group.shape == (K,)
        step = np.asarray(res.params.scale)[np.asarray(res.group), 0]  # (K, N)
        levels = np.asarray(res.weight) / step
        np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)


def test_awq_no_worse_than_rtn_and_better_with_outlier_channels():
    x, w, _ = _problem(seed=2)
    x[:, :3] *= 20  # a few inputs carry large activations: AWQ protects their weights
    h = np.asarray(hessian(x))
    res = awq.quantize(w, h, np.mean(np.abs(x), 0), INT4_G8, AWQ())
    e_rtn = float(output_error(w, rtn.quantize(w, INT4_G8), h))
    assert float(res.error) <= e_rtn * (1 + 1e-6) and float(res.error) < 0.9 * e_rtn
    assert 0 < float(res.alpha) < 1
    np.testing.assert_allclose(float(res.error), float(output_error(w, res.weight, h)), rtol=1e-5)
    s = np.asarray(res.scales)
    assert np.max(s) * np.min(s) == pytest.approx(1, rel=1e-5)


INT3_G8 = Quantizer(format=formats.IntFormat(bits=3, signed=True, name="int3"), granularity=Group(size=8))


def test_awq_clip_search_shrinks_outlier_groups_at_3_bits():
    x, w, h = _problem(seed=4)
    w[::5, ::3] *= 6  # a few large weights stretch their groups' ranges: clipping them costs less than the grid
    act = np.mean(np.abs(x), 0)
    plain = awq.quantize(w, h, act, INT3_G8, AWQ(clip_grid=0))
    clipped = awq.quantize(w, h, act, INT3_G8, AWQ())
    assert float(clipped.error) < 0.95 * float(plain.error)
    np.testing.assert_allclose(float(clipped.error), float(output_error(w, clipped.weight, h)), rtol=1e-5)
    c, s = np.asarray(clipped.scaled), np.asarray(clipped.scales)[:, None]
    assert np.all(np.abs(c) <= np.abs(w * s) * (1 + 1e-6))  # clipping only shrinks
    assert not np.array_equal(c, w * s)  # ... and some group was clipped
    # the effective weight is Q(clipped) / s, exactly
    q = rtn.oriented(INT3_G8, K)
    np.testing.assert_array_equal(clipped.weight, quant.fake_quant(q, clipped.scaled) / clipped.scales[:, None])
    # never above RTN, as without clipping
    assert float(clipped.error) <= float(output_error(w, rtn.quantize(w, INT3_G8), h)) * (1 + 1e-6)


def test_smoothquant_leaves_the_float_output_unchanged():
    x, w, _ = _problem(seed=3)
    x[:, 7] *= 50  # an outlier channel
    s = np.asarray(smoothing_scales(np.max(np.abs(x), 0), w, 0.5))
    ref = np.sqrt(np.maximum(np.max(np.abs(x), 0), 1e-5)) / np.sqrt(np.max(np.abs(w), 1))
    np.testing.assert_allclose(s, ref, rtol=1e-6)
    xs, ws = smooth(jnp.asarray(x), jnp.asarray(w), s)
    np.testing.assert_allclose(np.asarray(xs @ ws), x @ w, rtol=1e-5, atol=1e-5 * np.max(np.abs(x @ w)))
    assert np.max(np.abs(xs)) < np.max(np.abs(x)) / 3  # the outlier migrated into the weight


# ----- SmoothQuant + GPTQ ------------------------------------------------------------------------------------------
INT16 = formats.IntFormat(bits=16, signed=True, name="int16")
SQ_GPTQ = [GPTQ(block_size=16), GPTQ(block_size=16, act_order=True)]


def test_smoothquant_gptq_float_invariance():
    # The composition's float part: GPTQ on (diag(s) w, H / (s sᵀ)) solves the op's own problem.
    x, w, _ = _problem(seed=3)
    x[:, 7] *= 50  # an outlier channel
    h = np.asarray(hessian(x))
    s = smoothing_scales(np.max(np.abs(x), 0), w, 0.5)
    xs, ws = smooth(jnp.asarray(x), jnp.asarray(w), s)
    # The rescaled Hessian is the Hessian of the smoothed inputs: nothing to recapture.
    h_s = smoothed_hessian(h, s)
    np.testing.assert_allclose(h_s, np.asarray(hessian(xs)), rtol=1e-4, atol=1e-5 * np.max(np.abs(h_s)))
    # ... and it measures the same output error: ||x (w - v)||² == ||(x / s) diag(s) (w - v)||².
    v = rtn.quantize(w, INT4_G8)
    np.testing.assert_allclose(float(output_error(ws, v * s[:, None], h_s)), float(output_error(w, v, h)), rtol=1e-4)
    # With (near) identity quantization, int16 weights and activations, the model computes its float output:
    # the op divides its input by the s its stored Q(diag(s) w) was smoothed with.
    model, batches = UserMLP(nnx.Rngs(1)), _batches(seed=1)
    xt = jnp.asarray(batches[0])
    q16 = Quantizer(format=INT16, granularity=Channel())
    q, rows = quantize_weights(
        model, batches, weights=q16, method=SmoothQuant(then=GPTQ(block_size=16)), activations=Quantizer(format=INT16)
    )
    # Measured: op errors 1.2e-10 .. 2.3e-10, model output 4.0e-9 (relative squared errors).
    assert all(r["method"] == "smoothquant+gptq" and r["error"] < 1e-8 for r in rows)
    ref = model(xt)
    assert float(jnp.mean((q(xt) - ref) ** 2)) < 1e-8 * float(jnp.mean(ref**2))
    assert not np.allclose(np.asarray(q.out.kernel[...]), np.asarray(model.out.kernel[...]), rtol=1e-2)  # smoothed


class Linear(nnx.Module):
    """One op, ``x @ w``: its stored weight and input scale are the method's result for that op alone."""

    def __init__(self, w):
        self.w = nnx.Param(jnp.asarray(w))

    def __call__(self, x):
        return x @ self.w[...]


@pytest.mark.parametrize("config", SQ_GPTQ, ids=["plain", "act-order"])
def test_smoothquant_gptq_is_gptq_on_the_smoothed_weight_and_hessian(config):
    rng = np.random.default_rng(5)
    # Small integers (an outlier channel x32, a dead input): every sum of xᵀx is exact in float32 in any order, so
    # the Hessian quantize_weights accumulates is hessian(x) bit for bit.
    x = np.clip(np.round(rng.normal(size=(64, K)) @ MIX / 2), -8, 8).astype(np.float32)
    x[:, 3] *= 32
    x[:, 5] = 0
    w = rng.normal(size=(K, N)).astype(np.float32)
    q, rows = quantize_weights(Linear(w), [x], weights=INT4_G8, method=SmoothQuant(then=config), activations=INT8)
    # The reference by hand: the scales, the smoothed weight and Hessian, GPTQ itself.
    h = np.asarray(hessian(x), np.float64)
    s = smoothing_scales(np.max(np.abs(x), 0), w, 0.5)
    s64 = np.asarray(s, np.float64)
    ref = gptq.quantize(jnp.asarray(w) * s[:, None], h / np.outer(s64, s64), INT4_G8, config)
    stored = np.asarray(q.w[...])
    assert stored.tobytes() == np.asarray(ref.weight).tobytes()
    np.testing.assert_array_equal(np.asarray(q.lowbit_dot_general0.input_scale[...]).ravel(), np.asarray(s))
    assert np.all(stored[5] == 0)  # GPTQ's dead input, in the smoothed basis too
    # ... and that is not SmoothQuant's RTN, nor GPTQ of the unsmoothed weight (the test can tell them apart).
    assert not np.array_equal(stored, np.asarray(smoothquant.quantize(w, np.max(np.abs(x), 0), INT4_G8).weight))
    assert not np.array_equal(stored, np.asarray(gptq.quantize(w, h, INT4_G8, config).weight))
    # The row's error is the effective weight Q(diag(s) w) / s on the op's own inputs.
    (row,) = rows
    assert row["method"] == "smoothquant+gptq"
    assert row["error"] == pytest.approx(
        float(output_error(w, ref.weight / s[:, None], h)) / float(output_error(w, jnp.zeros_like(w), h)), rel=1e-5
    )
    # The function the op used, with its GPTQ result for packing.
    res = smoothquant.quantize(w, np.max(np.abs(x), 0), INT4_G8, SmoothQuant(then=config), h=h)
    assert np.asarray(res.weight).tobytes() == np.asarray(ref.weight).tobytes() and res.gptq is not None
    jax.tree.map(np.testing.assert_array_equal, (res.gptq.params, res.gptq.group), (ref.params, ref.group))


def _outlier_batches(seed, n=3):
    """Correlated inputs whose channels 2, 11 and 20 are 40x the others (SmoothQuant's problem)."""
    batches = _batches(seed, n)
    for x in batches:
        x[:, [2, 11, 20]] *= 40
    return batches


def test_smoothquant_gptq_w4a8_beats_smoothquant_rtn_on_outlier_channels():
    model, batches = UserMLP(nnx.Rngs(2)), _outlier_batches(0)
    x = _outlier_batches(9, n=1)[0]  # held out
    ref = model(jnp.asarray(x))
    errors, sqnr, out = {}, {}, {}
    for method in (SmoothQuant(), SmoothQuant(then=GPTQ(block_size=16))):
        q, rows = quantize_weights(model, batches, weights=INT4_G8, method=method, activations=INT8)
        errors[method.name] = [r["error"] for r in rows]  # the weights' share, on the calibration inputs
        sqnr[method.name] = [r["sqnr_db"] for r in op_sqnr(model, q, x)]  # W4A8: int8 activations included
        out[method.name] = float(jnp.mean((q(jnp.asarray(x)) - ref) ** 2) / jnp.mean(ref**2))
    # Measured: errors 1.4e-4 / 6.0e-4 / 4.2e-4 against 3.6e-4 / 3.7e-3 / 2.5e-3; op SQNR 37.3 / 30.3 / 29.4 dB
    # against 34.1 / 23.7 / 21.4 dB; model output 1.1e-3 against 7.3e-3.
    assert all(e < 0.5 * r for e, r in zip(errors["smoothquant+gptq"], errors["smoothquant"], strict=True))
    assert all(g > r + 2 for g, r in zip(sqnr["smoothquant+gptq"], sqnr["smoothquant"], strict=True))
    assert out["smoothquant+gptq"] < 0.5 * out["smoothquant"]


# ----- any NNX model ---------------------------------------------------------------------------------------------
class UserMLP(nnx.Module):
    """A model written without lowbit: nnx.Linear layers and a raw ``@``."""

    def __init__(self, rngs):
        # Shapes (32, 32), (32, 32), (32, 16): two GPTQ compilations, one shared with the tests above.
        self.fc1 = nnx.Linear(K, K, rngs=rngs)
        self.w2 = nnx.Param(jax.random.normal(rngs.params(), (K, K)) / 6)
        self.out = nnx.Linear(K, N, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.gelu(jax.nn.gelu(self.fc1(x)) @ self.w2[...]))


MIX = np.random.default_rng(7).normal(size=(K, K)).astype(np.float32)  # correlated inputs


def _batches(seed=0, n=3):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(64, K)) @ MIX).astype(np.float32) for _ in range(n)]


def test_quantize_weights_user_mlp_gptq_and_awq_beat_rtn():
    model, batches = UserMLP(nnx.Rngs(0)), _batches()
    x = jnp.asarray(_batches(seed=9, n=1)[0])  # held out, same distribution
    before = jax.tree.map(np.asarray, nnx.state(model))
    ref = model(x)
    outs, errors = {}, {}
    for method in (RTN(), GPTQ(block_size=16), AWQ(grid=4)):
        q, rows = quantize_weights(model, batches, weights=INT4_G8, method=method)
        outs[method.name] = float(jnp.mean((q(x) - ref) ** 2))
        assert [r["name"] for r in rows] == ["fc1:dot_general0", ":dot_general0", "out:dot_general0"]
        assert all(r["method"] == method.name for r in rows)
        errors[method.name] = [(r.get("error"), r.get("rtn_error")) for r in rows]
    assert outs["gptq"] < outs["rtn"] and outs["awq"] <= outs["rtn"] * 1.05
    assert all(e < r for e, r in errors["gptq"]) and all(e <= r * (1 + 1e-5) for e, r in errors["awq"])
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, nnx.state(model)))
    # exclude keeps an op float
    q, rows = quantize_weights(model, batches, weights=INT4_G8, method="rtn", exclude="out:.*")
    assert [r["name"] for r in rows] == ["fc1:dot_general0", ":dot_general0"]
    np.testing.assert_array_equal(np.asarray(q.out.kernel[...]), np.asarray(model.out.kernel[...]))


def test_quantize_weights_builtin_vit_gptq():
    # Shapes (32, 32), (32, 96), (32, 16): all but the qkv weight compiled by the tests above.
    vit = ViT(image_shape=(8, 8, 2), num_classes=N, patch_size=4, dim=K, depth=1, heads=2, mlp_dim=K, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    images = [rng.normal(size=(16, 8, 8, 2)).astype(np.float32) for _ in range(2)]
    q, rows = quantize_weights(vit, images, weights=INT4_G8, method=GPTQ(block_size=16))
    assert [r["name"] for r in rows] == VIT_WEIGHTS
    assert all(r["method"] == "gptq" and r["error"] < r["rtn_error"] for r in rows)
    x = jnp.asarray(images[0])
    assert float(jnp.mean((q(x) - vit(x)) ** 2)) < 0.05 * float(jnp.mean(vit(x) ** 2))


def test_smoothquant_w8a8_model_divides_the_input():
    model, batches = UserMLP(nnx.Rngs(1)), _batches(seed=1)
    x = jnp.asarray(batches[0])
    ref = model(x)
    q, rows = quantize_weights(
        model,
        batches,
        weights=Quantizer(format="int8", granularity=Channel()),
        method="smoothquant",
        activations=Quantizer(format="int8"),
    )
    assert all(r["method"] == "smoothquant" for r in rows)
    # Weights hold Q(diag(s) w): without x / s on the input the output would be far off.
    assert float(jnp.mean((q(x) - ref) ** 2)) < 1e-3 * float(jnp.mean(ref**2))


class ConvNet(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(8, 4, (3, 3), rngs=rngs)
        self.head = nnx.Linear(4 * 4 * 4, N, rngs=rngs)

    def __call__(self, x):
        return self.head(jax.nn.relu(self.conv(x)).reshape(x.shape[0], -1))


def test_convolution_falls_back_to_rtn_and_says_so():
    model = ConvNet(nnx.Rngs(0))
    images = [np.random.default_rng(0).normal(size=(8, 4, 4, 8)).astype(np.float32)]
    with pytest.warns(UserWarning, match="conv:conv0: conv without"):
        q, rows = quantize_weights(model, images, weights=INT4_G8, method="smoothquant")
    conv, head = rows
    assert conv["method"] == "rtn" and "RTN instead of smoothquant" in conv["reason"] and "error" not in conv
    assert head["method"] == "smoothquant" and head["error"] > 0


class Tied(nnx.Module):
    """A tied head: the rhs is the embedding's transpose, computed in the forward pass."""

    def __init__(self, rngs):
        self.embed = nnx.Param(jax.random.normal(rngs.params(), (N, K)))
        self.mid = nnx.Linear(K, K, rngs=rngs)

    def __call__(self, x):
        return self.mid(x) @ self.embed[...].T


def test_a_computed_weight_stays_float_and_says_so():
    model = Tied(nnx.Rngs(0))
    with pytest.warns(UserWarning, match="stays float"):
        q, rows = quantize_weights(model, _batches(n=1), weights=INT4_G8, method="rtn")
    assert [(r["name"], r["method"]) for r in rows] == [("mid:dot_general0", "rtn"), (":dot_general0", "float")]
    np.testing.assert_array_equal(np.asarray(q.embed[...]), np.asarray(model.embed[...]))


# ----- bad input ----------------------------------------------------------------------------------------------------
def test_rank_deficient_calibration_is_a_clear_error():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(4, K)).astype(np.float32)  # 4 samples, 32 inputs: H has rank 4
    w = rng.normal(size=(K, N)).astype(np.float32)
    with pytest.raises(ValueError, match=r"fc9: GPTQ's Hessian .* singular .* more calibration samples .*damping"):
        gptq.quantize(w, hessian(x), INT4_CHANNEL, GPTQ(damping=0.0), name="fc9")


def test_group_size_that_does_not_divide_is_an_error():
    _, w, h = _problem()
    with pytest.raises(ValueError, match="group size 24 does not divide the input dimension 32"):
        gptq.quantize(w, h, Quantizer(format="int4", granularity=Group(size=24)))
    with pytest.raises(ValueError, match=r"fc1:dot_general0: group size 24 does not divide the input dimension 32"):
        quantize_weights(
            UserMLP(nnx.Rngs(0)), _batches(n=1), weights=Quantizer(format="int4", granularity=Group(size=24))
        )


class NoMatmul(nnx.Module):
    def __init__(self):
        self.scale = nnx.Param(jnp.ones((K,)))

    def __call__(self, x):
        return x * self.scale[...]


@pytest.mark.parametrize(
    "then", ["gptq", GPTQ, RTN(), AWQ(), SmoothQuant(), SmoothQuant(then=GPTQ())], ids=lambda t: repr(t)[:20]
)
def test_smoothquant_then_must_be_gptq_or_none(then):
    with pytest.raises(
        ValueError, match=r"SmoothQuant\.then=.* is invalid; allowed: None \(round to nearest\) or GPTQ"
    ):
        SmoothQuant(then=then)


def test_smoothquant_gptq_by_name_and_without_a_hessian():
    x, w, _ = _problem()
    with pytest.raises(ValueError, match=r"fc9: SmoothQuant\(then=GPTQ\(\.\.\.\)\) needs h"):
        smoothquant.quantize(w, np.max(np.abs(x), 0), INT4_G8, SmoothQuant(then=GPTQ()), name="fc9")
    # the CLI's name is quantize_weights' too: smoothing, then GPTQ with its reference settings
    _, rows = quantize_weights(UserMLP(nnx.Rngs(0)), _batches(n=1), weights=INT4_G8, method="smoothquant+gptq")
    assert SmoothQuant(then=GPTQ()).name == "smoothquant+gptq" and SmoothQuant().name == "smoothquant"
    assert all(r["method"] == "smoothquant+gptq" for r in rows)


def test_model_without_quantizable_op_and_bad_arguments():
    with pytest.raises(ValueError, match="no quantizable op"):
        quantize_weights(NoMatmul(), _batches(n=1), weights=INT4_G8)
    with pytest.raises(ValueError, match="select none"):
        quantize_weights(UserMLP(nnx.Rngs(0)), _batches(n=1), weights=INT4_G8, include="nothing")
    with pytest.raises(ValueError, match="method='obq' is invalid"):
        quantize_weights(UserMLP(nnx.Rngs(0)), _batches(n=1), weights=INT4_G8, method="obq")
    with pytest.raises(ValueError, match="batches is empty"):
        quantize_weights(UserMLP(nnx.Rngs(0)), [], weights=INT4_G8)
    with pytest.raises(ValueError, match="GPTQ.damping"):
        GPTQ(damping=-1)
    with pytest.raises(ValueError, match="AWQ.clip_grid"):
        AWQ(clip_grid=-1)
    with pytest.raises(ValueError, match="AWQ.max_shrink"):
        AWQ(max_shrink=1.0)
