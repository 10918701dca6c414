"""Tests written for mutants of ``benchmarks/mutation.py`` that no other test caught.

Each test names its mutant and checks an independent oracle or an exact
property (never lowbit's own output at another setting taken on trust).
"""

import jax
import jax.numpy as jnp
import numpy as np

from lowbit import quant
from lowbit.training import DotQuantConfig, gradscale_init, gradscale_update, quantized_dot_general

DN_MATMUL = (((1,), (0,)), ((), ()))
# fp4_radix4's magnitudes: 0 and the powers of four 4^-3 .. 4^3 (Sun et al. 2020).
RADIX4_GRID = np.array([0.0] + [4.0**k for k in range(-3, 4)])


def test_gradscale_stays_within_its_documented_bounds():
    """Mutant ``gradscale-unbounded``: without the clamp, s doubles to inf on zero gradients.

    gradscale.py keeps s in [2^-100, 2^100] so that s and 1/s stay normal float32
    powers of two however long a gradient stays zero (or huge).
    """
    s = gradscale_init()
    for _ in range(130):  # 2^128 would be inf in float32
        s = gradscale_update(s, jnp.float32(0), 64.0)
    assert float(s) == 2.0**100
    s = gradscale_init()  # from 1: 3e38 * 2^100 would be inf, which leaves s as it is
    for _ in range(240):  # max|g s| > 64 halves s on every step; 3e38 * 2^-122 is still > 64
        s = gradscale_update(s, jnp.float32(3e38), 64.0)
    assert float(s) == 2.0**-100


def test_gradscale_quantizes_the_gradient_with_the_updated_scale():
    """Mutant ``qdot-gradscale-stale-scale``: the gradient must be quantized as g * s_new, not g * s_old.

    With identity operands both gradient products return Q(g * s_new) / s_new.
    Here s = 1 and max|g| = 19 <= 64/2, so s_new = 2: the products land on
    {0} + 4^k / 2, a grid disjoint (but 0) from the stale {0} + 4^k; the values are
    checked against a numpy nearest-value search on the radix-4 grid.
    """
    r4 = quant.Quantizer(format="fp4_radix4", scale=quant.Learned())
    cfg = DotQuantConfig(dlhs_grad=r4, drhs_grad=r4, grad_scale=True)
    n = 8
    eye = jnp.eye(n, dtype=jnp.float32)
    # Values whose doubles sit clear of every midpoint of the grid (no ties to decide).
    g = np.linspace(-19.0, 19.0, n * n, dtype=np.float32).reshape(n, n)
    _, vjp = jax.vjp(
        lambda a, b, s: quantized_dot_general(a, b, DN_MATMUL, cfg, grad_scale=s), eye, eye, jnp.float32(1.0)
    )
    dlhs, drhs, new_scale = (np.asarray(t) for t in vjp(jnp.asarray(g)))
    assert float(new_scale) == 2.0
    scaled = np.abs(g.astype(np.float64)) * 2.0
    dist = np.abs(scaled[..., None] - RADIX4_GRID)
    ordered = np.sort(dist, axis=-1)
    assert (ordered[..., 1] - ordered[..., 0] > 1e-3).all()  # the oracle has no ties here
    want = np.sign(g) * RADIX4_GRID[np.argmin(dist, axis=-1)] / 2.0
    np.testing.assert_array_equal(dlhs, want.astype(np.float32))
    np.testing.assert_array_equal(drhs, want.astype(np.float32))


def test_e4m3_tensor_scale_ignores_all_zero_groups():
    """Mutant ``quant-e4m3-tensor-scale-from-empty-groups``: an empty group's placeholder step must not set it.

    Two-level ``e4m3`` scales: the tensor scale is the largest group step over
    448. An all-zero channel has no step (a placeholder 1/7 stands in); letting
    it set the tensor scale would put the real channel's step on a coarse E4M3
    value. Exact property: quantizing [a; 0] gives [quantize(a); 0] bit for
    bit. Oracle: the data channel's largest magnitude maps to 7 steps of
    amax / 7, so it comes back as amax up to float32 rounding.
    """
    q = quant.Quantizer(format="int4", scale_format="e4m3", granularity=quant.Channel(axis=0))
    a = np.linspace(-0.01, 0.01, 16, dtype=np.float32)
    alone = np.asarray(quant.fake_quant(q, jnp.asarray(a[None, :])))
    with_zeros = np.asarray(quant.fake_quant(q, jnp.asarray(np.stack([a, np.zeros_like(a)]))))
    np.testing.assert_array_equal(with_zeros.view(np.uint32), np.stack([alone[0], np.zeros_like(a)]).view(np.uint32))
    np.testing.assert_allclose(np.abs(with_zeros[0]).max(), 0.01, rtol=1e-6)
