"""The packed form of one op's PTQ result (``quantize_weights(..., pack=True)``): codes that dequantize exactly.

Each method hands over what its fake-quantized weight was made of, so that
``lowbit.nn.packed.dequantize`` of the packed weight equals it bit for bit:

* RTN (and every op that stays RTN: convolutions, batched ops): the weight as
  it lies, quantized by the same quantizer (``quant.dequantize(quant.quantize(q, w))``
  equals ``quant.fake_quant(q, w)``); ``contracted`` None.
* GPTQ: its ``(K, N)`` result re-encoded on the grid GPTQ fixed during its
  loop (``GPTQResult.params``: per-group scales of the weights as they were
  then, which the dequantized weights do not determine). With ``act_order`` a
  group is a scattered set of inputs: the rows are stored sorted by group
  (``perm``), so that each group's scales cover contiguous rows.
* AWQ and weight-only SmoothQuant: the codes of ``Q(diag(s) w)`` (AWQ's clipped per group where its
  clip search chose to, ``AWQResult.scaled``) and ``in_scale = s``.
* SmoothQuant with ``then=GPTQ(...)`` (weight-only): both, GPTQ's codes of ``diag(s) w`` on its
  own grid (``SmoothResult.gptq``), with its ``perm``, and ``in_scale = s``.

Every packed weight is checked against the method's weight (byte for byte)
before it is returned.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lowbit import quant
from lowbit.nn.packed import PackedWeight, dequantize, packed_weight, to_matrix
from lowbit.ptq.awq import AWQResult
from lowbit.ptq.gptq import GPTQResult
from lowbit.ptq.rtn import oriented
from lowbit.ptq.smoothquant import SmoothResult
from lowbit.quant.layout import layout
from lowbit.quant.qtensor import QTensor, pack_codes, store

__all__ = ["gptq_qtensor", "packed_op"]


def gptq_qtensor(res: GPTQResult, quantizer: quant.Quantizer) -> tuple[QTensor, np.ndarray | None]:
    """``(QTensor of the rows sorted by group, perm or None)`` of a GPTQ result.

    Args:
      res: ``gptq.quantize``'s result for a ``(K, N)`` weight.
      quantizer: the weight quantizer it was given (placed here with ``rtn.oriented``).

    Returns:
      The codes of ``res.weight[perm]`` on ``res.params`` (row ``i`` is input
      ``perm[i]``), and ``perm`` (None where it is the identity: no act-order
      with groups).
    """
    k, n = res.weight.shape
    q = oriented(quantizer, k)
    group = np.asarray(res.group)
    perm = np.argsort(group, kind="stable")
    rows = jnp.asarray(res.weight, jnp.float32)[perm]
    lay = layout(q, (k, n))
    codes = q.kind.encode(q, rows.reshape(lay.work), res.params, q.rounding, None)
    qt = QTensor(pack_codes(q, codes), quantizer=q, shape=(k, n), dtype=np.dtype(np.float32), **store(q, res.params))
    return qt, None if np.array_equal(perm, np.arange(k)) else perm


def packed_op(
    name: str,
    w: jax.Array,
    w_q: jax.Array,
    rtn_quantizer: quant.Quantizer,
    weights: quant.Quantizer,
    contracted: tuple[int, ...] | None,
    result: Any,
) -> PackedWeight:
    """The packed form of one op's quantized weight ``w_q`` (what ``quantize_weights`` stores).

    Args:
      name: the op's name (for errors).
      w: the float weight in its own shape.
      w_q: the method's fake-quantized weight (same shape and dtype).
      rtn_quantizer: the quantizer placed on ``w`` as it lies (RTN's).
      weights: the weight quantizer the methods place on the ``(K, N)`` view.
      contracted: the op's rhs contracted axes; None where the op stayed RTN.
      result: the method's ``GPTQResult`` / ``AWQResult`` / ``SmoothResult`` (weight-only), or None (RTN).

    Raises:
      RuntimeError: the packed weight does not dequantize to ``w_q`` (a bug, never silently wrong).
    """
    smoothed = isinstance(result, SmoothResult)
    if contracted is None or result is None:
        pw = packed_weight(quant.quantize(rtn_quantizer, w), w.shape, None, w.dtype)
    elif isinstance(result, GPTQResult) or (smoothed and result.gptq is not None):
        qt, perm = gptq_qtensor(result.gptq if smoothed else result, weights)
        pw = packed_weight(
            qt,
            w.shape,
            contracted,
            w.dtype,
            perm=None if perm is None else jnp.asarray(perm),
            in_scale=result.scales if smoothed else None,
        )
    else:
        assert isinstance(result, (AWQResult, SmoothResult))
        m = jnp.asarray(to_matrix(w, contracted), jnp.float32)
        q = oriented(weights, m.shape[0], name)
        c = result.scaled if isinstance(result, AWQResult) else m * result.scales[:, None]  # AWQ's may be clipped
        pw = packed_weight(quant.quantize(q, c), w.shape, contracted, w.dtype, in_scale=result.scales)
    got = np.asarray(dequantize(pw))
    if got.tobytes() != np.asarray(w_q).tobytes():
        raise RuntimeError(f"quantize_weights: op {name}: the packed weight differs from the fake-quantized one")
    return pw
