"""GPTQ (Frantar et al., ICLR 2023): weights quantized one input at a time, the error pushed onto the rest.

For a weight ``w`` of shape ``(K, N)`` (``y = x @ w``, see ``lowbit.ptq.rtn``)
and the Hessian ``H = 2 xᵀx / n`` of its calibration inputs, GPTQ quantizes the
inputs (rows of ``w``; the reference's columns) in order and after each one
adds ``-(w_i - q_i) / U_ii * U_i,j`` to every later row ``j``, where ``U`` is
the upper Cholesky factor of ``H⁻¹``: the optimal (OBQ) compensation of the
output error. As in the reference implementation (IST-DASLab/gptq):

* inputs with ``H_ii = 0`` (never active on the calibration data) are *dead*:
  ``H_ii = 1`` and their weights are 0;
* ``damping`` adds ``damping * mean(diag H)`` to the diagonal before the
  Cholesky factorisations;
* ``act_order`` processes inputs by descending ``H_ii`` and permutes back;
* updates are *lazy*: within a block of ``block_size`` inputs they are applied
  at once, the rest of the matrix is updated once per block;
* with a ``Group(size)`` quantizer a group's scale is computed when the group
  starts, from the weights as they are then (updated by the earlier blocks;
  the reference reads the matrix, not the block's running copy, so updates made
  inside the current block are not seen). Groups run in processing order: with
  ``act_order`` a group is ``size`` consecutive inputs of the permuted order
  (``GPTQResult.group`` maps each input to its group, the reference's
  ``g_idx``). ``Channel`` / ``Tensor`` scales come from the float weight.

The quantization itself is lowbit's (``lowbit.quant.fake_quant``): any
``Uniform`` grid of an element format (``int4``, ``int3``, ``int8``, ``nf4``,
float formats), symmetric or with a zero point, absmax / percentile / MSE
scales. The loop is one compiled function per weight shape.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lowbit import quant
from lowbit.formats._checks import check_bool, check_int, require
from lowbit.ptq.rtn import check_weights, oriented
from lowbit.quant import Absmax, Channel, Group, QParams, Quantizer, Tensor, Uniform
from lowbit.quant.granularity import is_block

__all__ = ["GPTQ", "GPTQResult", "hessian", "inverse_cholesky", "quantize"]

_OWN = "GPTQ"
# A pivot below this fraction of the largest diagonal entry means H is singular in float32 arithmetic
# (its condition number is past 1e12): the Cholesky "succeeds" on rounding noise, and the updates explode.
_PIVOT_FLOOR = 1e-12


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTQ:
    """The GPTQ settings (the reference implementation's defaults).

    Attributes:
      damping: added to the Hessian's diagonal, as a fraction of its mean
        diagonal (the reference's ``percdamp``), in [0, 1].
      block_size: inputs per lazy-update block.
      act_order: process inputs by descending Hessian diagonal (the
        reference's ``--act-order``). Off by default, as in the reference:
        with groups it makes a group a set of scattered inputs (``GPTQResult.group``).
    """

    damping: float = 0.01
    block_size: int = 128
    act_order: bool = False
    name = "gptq"

    def __post_init__(self) -> None:
        d = self.damping
        require(
            isinstance(d, (int, float)) and not isinstance(d, bool) and 0 <= d <= 1,
            _OWN,
            "damping",
            d,
            "a number in [0, 1] (a fraction of the mean Hessian diagonal)",
        )
        check_int(_OWN, "block_size", self.block_size, 1)
        check_bool(_OWN, "act_order", self.act_order)


class GPTQResult(NamedTuple):
    """A weight quantized by GPTQ.

    Attributes:
      weight: float32 ``(K, N)``, the dequantized weight (inputs in their original order).
      params: the ``QParams`` of the grid: per group ``(K / size, 1, N)`` leaves
        (in processing order), per channel ``(1, N)``, per tensor ``(1, 1)``.
      group: int32 ``(K,)``, the index into ``params`` of each input's scales
        (all 0 without groups).
    """

    weight: jax.Array
    params: QParams
    group: jax.Array


@jax.jit
def hessian(x: jax.Array) -> jax.Array:
    """``H = 2 xᵀx / n`` of calibration inputs ``x`` ``(n, K)``: float32 ``(K, K)``."""
    x = jnp.asarray(x, jnp.float32)
    return 2 * jnp.dot(x.T, x, precision=jax.lax.Precision.HIGHEST) / x.shape[0]


def _check_quantizer(q: Quantizer) -> None:
    check_weights(q)
    require(
        not is_block(q.format) and isinstance(q.kind, Uniform),
        "weights",
        "format" if is_block(q.format) else "kind",
        q.format.name if is_block(q.format) else q.kind,
        "an element format on a Uniform() grid for GPTQ (a block format scales inside its own encode; use RTN)",
    )
    require(
        isinstance(q.granularity, (Tensor, Channel, Group)),
        "weights",
        "granularity",
        q.granularity,
        "Tensor(), Channel() or Group(size) for GPTQ",
    )
    require(
        q.scale_format != "e4m3" and q.rounding == "nearest",
        "weights",
        "scale_format" if q.scale_format == "e4m3" else "rounding",
        q.scale_format if q.scale_format == "e4m3" else q.rounding,
        "float32/e8m0 scales and nearest rounding for GPTQ (an e4m3 scale's tensor scale spans "
        "groups GPTQ fixes one at a time)",
    )


def inverse_cholesky(h: np.ndarray | jax.Array, damping: float, name: str = "weight") -> np.ndarray:
    """The upper Cholesky factor ``U`` of ``(H + damping * mean(diag H) * I)⁻¹`` (``UᵀU = H⁻¹``), float64.

    Args:
      h: ``(K, K)`` Hessian (dead inputs already given ``H_ii = 1``).
      damping: fraction of the mean diagonal added to the diagonal.
      name: the weight's name (an op's), for the error.

    Raises:
      ValueError: ``H`` is singular even after damping.
    """
    h = np.array(h, np.float64)
    diag = np.arange(len(h))
    h[diag, diag] += damping * np.mean(np.diag(h))
    try:
        lower = np.linalg.cholesky(h)
        if not np.all(np.isfinite(lower)) or np.min(np.diag(lower)) ** 2 <= _PIVOT_FLOOR * np.max(np.diag(h)):
            raise np.linalg.LinAlgError("singular")
        inv = np.linalg.inv(lower)
        upper = np.linalg.cholesky(inv.T @ inv).T
    except np.linalg.LinAlgError:
        upper = None
    if upper is None or not np.all(np.isfinite(upper)):
        raise ValueError(
            f"{name}: GPTQ's Hessian (K={len(h)} inputs) is singular even with damping={damping}: the "
            "calibration inputs span too few directions; pass more calibration samples or a larger "
            "GPTQ(damping=...)"
        )
    return upper


def _row_quantizer(q: Quantizer) -> Quantizer:
    """``q`` for one input row ``(1, N)`` under given parameters: per output channel (or tensor), static."""
    g = Tensor() if isinstance(q.granularity, Tensor) else Channel(axis=-1)
    return dataclasses.replace(q, granularity=g, scale=Absmax(static=True))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _loop(
    q: Quantizer, block: int, k: int, w: jax.Array, upper: jax.Array, fixed: QParams | None
) -> tuple[jax.Array, QParams]:
    """The GPTQ sweep over ``w`` (``(Kp, N)``, padded to whole blocks with zero rows; ``upper`` with identity).

    ``fixed``: the channel/tensor parameters, or None when ``q`` has groups (then computed per group here).
    """
    kp, n = w.shape
    row_q = _row_quantizer(q)
    size = q.granularity.size if isinstance(q.granularity, Group) else None
    rows = jnp.arange(kp)

    def group_params(w_now: jax.Array) -> QParams:
        # Every group's parameters from the weights as they are now (the real K rows only).
        return quant.qparams(q, w_now[:k])

    params = fixed if size is None else jax.tree.map(jnp.zeros_like, group_params(w))

    def one_block(b: jax.Array, carry: tuple[jax.Array, jax.Array, QParams]) -> tuple[jax.Array, jax.Array, QParams]:
        w, out, params = carry
        i1 = b * block
        if size is not None:
            # The groups that start in this block take their scales from the block-start weights.
            start = jnp.arange(k // size) * size
            starts = (start >= i1) & (start < i1 + block)
            params = jax.tree.map(
                lambda new, old: jnp.where(starts.reshape((-1,) + (1,) * (old.ndim - 1)), new, old),
                group_params(w),
                params,
            )
        w1 = jax.lax.dynamic_slice(w, (i1, 0), (block, n))
        u1 = jax.lax.dynamic_slice(upper, (i1, i1), (block, block))

        def one_row(i: jax.Array, c: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
            w1, q1, e1 = c
            r = i1 + i
            p = params if size is None else jax.tree.map(lambda a: a[jnp.minimum(r // size, k // size - 1)], params)
            wr = w1[i][None]
            qr = quant.fake_quant(row_q, wr, state=p)[0]
            err = (w1[i] - qr) / u1[i, i]
            # u1 is upper triangular: rows before i are untouched (u1[i, j < i] == 0).
            w1 = w1 - u1[i][:, None] * err[None, :]
            return w1, q1.at[i].set(qr), e1.at[i].set(err)

        zeros = jnp.zeros((block, n), jnp.float32)
        _, q1, e1 = jax.lax.fori_loop(0, block, one_row, (w1, zeros, zeros))
        # The lazy update of everything after the block, at once.
        u_rows = jax.lax.dynamic_slice(upper, (i1, 0), (block, kp))
        update = jnp.dot(u_rows.T, e1, precision=jax.lax.Precision.HIGHEST)
        w = jnp.where((rows >= i1 + block)[:, None], w - update, w)
        return w, jax.lax.dynamic_update_slice(out, q1, (i1, 0)), params

    _, out, params = jax.lax.fori_loop(0, kp // block, one_block, (w, jnp.zeros_like(w), params))
    return out, params


def quantize(
    w: jax.Array, h: np.ndarray | jax.Array, quantizer: Quantizer, config: GPTQ = GPTQ(), *, name: str = "weight"
) -> GPTQResult:
    """Quantize one weight with GPTQ.

    Args:
      w: float32 ``(K, N)`` weight, ``y = x @ w``.
      h: ``(K, K)`` Hessian ``2 xᵀx / n`` of the calibration inputs (``hessian``).
      quantizer: the weight quantizer: an element format on a ``Uniform()``
        grid, ``Tensor()`` / ``Channel()`` / ``Group(size)`` granularity (placed
        by ``lowbit.ptq.rtn.oriented``: groups along the inputs).
      config: the GPTQ settings.
      name: what the weight is (an op's name), for errors.

    Returns:
      A ``GPTQResult``: the dequantized weight, its grid parameters, each input's group.

    Raises:
      ValueError: a quantizer GPTQ cannot fix one input at a time, a group size
        that does not divide ``K``, mismatched shapes, or a Hessian that is
        singular even after damping.
    """
    _check_quantizer(quantizer)
    wn = np.array(w, np.float32)
    hn = np.array(h, np.float64)
    k, n = wn.shape
    if hn.shape != (k, k):
        raise ValueError(f"{name}: Hessian has shape {hn.shape}; allowed: ({k}, {k}) for a weight of shape {wn.shape}")
    q = oriented(quantizer, k, name)
    fixed = None if isinstance(q.granularity, Group) else quant.qparams(q, jnp.asarray(wn))
    dead = np.diag(hn) == 0
    hn[dead, dead] = 1
    wn[dead] = 0
    perm = np.argsort(-np.diag(hn), kind="stable") if config.act_order else np.arange(k)
    wn, hn = wn[perm], hn[perm][:, perm]
    upper = inverse_cholesky(hn, config.damping, name)
    block = min(config.block_size, k)
    kp = -(-k // block) * block
    # Padding rows: zero weights whose identity factor couples them to nothing.
    w_pad = np.zeros((kp, n), np.float32)
    w_pad[:k] = wn
    u_pad = np.eye(kp, dtype=np.float32)
    u_pad[:k, :k] = upper
    out, params = _loop(q, block, k, jnp.asarray(w_pad), jnp.asarray(u_pad), fixed)
    inverse = np.argsort(perm)
    size = q.granularity.size if isinstance(q.granularity, Group) else None
    group = (inverse // size) if size is not None else np.zeros(k, np.int64)
    return GPTQResult(out[:k][inverse], params, jnp.asarray(group, jnp.int32))
