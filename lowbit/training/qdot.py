"""A quantized ``dot_general`` with independent forward and backward quantizers.

Forward: ``out = dot(Q_lhs(lhs), Q_rhs(rhs))``. Backward (straight-through for the
operands), with ``g`` the incoming gradient:

* ``dlhs = dot_transpose(Q_dlhs_grad(g), Q_dlhs_rhs(rhs))``
* ``drhs = dot_transpose(Q_drhs_lhs(lhs), Q_drhs_grad(g))``

like AQT's fwd / dlhs / drhs split, but as one frozen config. With
``reuse_fwd=True`` the backward products reuse the forward's quantized operands
(saved as residuals) instead of quantizing the raw operands again.

Radix-4 FP4 gradients (Sun et al. 2020) add two things:

* **GradScale**: pass ``grad_scale`` (a float32 scalar, the layer's state). The
  backward pass updates it from the current gradient (see ``gradscale``) and
  quantizes ``g * s_new``. The updated scale leaves the backward pass as the
  *cotangent* of ``grad_scale``: the caller replaces the state with its
  "gradient" instead of feeding it to the optimizer (flax's fp8
  overwrite-with-gradient trick; ``lowbit.nn`` does this for you).
* **Two-phase rounding** (``tpr=True``): ``g`` is quantized on the even grid for
  the dlhs product and on the odd grid (the same format at twice the scale) for
  the drhs product.

**Delayed scaling** (``Quantizer(scale="delayed")`` on ``lhs``, ``rhs``,
``dlhs_grad`` or ``drhs_grad``): pass ``amax_history``, one float32 ``(L,)``
history per delayed site (``lhs``, ``rhs``, ``grad``; see ``delayed``). The
updated histories leave the backward pass as their cotangents, like GradScale.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from lowbit import formats, quant
from lowbit.training import delayed
from lowbit.training.gradscale import gradscale_update

Quantizer = Any  # lowbit.quant.Quantizer or None (identity)
MATMULS = ("fake", "real", "auto")
# Storage dtypes of the real matmul path; 4- and 2-bit integers ride in int8
# containers, which every backend multiplies natively.
REAL_DTYPES = {"int8": jnp.int8, "int4": jnp.int8, "int2": jnp.int8,
               "float8_e4m3fn": jnp.float8_e4m3fn, "float8_e5m2": jnp.float8_e5m2}


def _name(q) -> str:
    return "None" if q is None else q.format.name


def real_ok(q) -> bool:
    """Whether quantizer ``q`` can feed the real matmul path (symmetric uniform int8/int4/int2/float8)."""
    return (q is not None and q.kind == "uniform" and q.symmetric and q.granularity in ("tensor", "channel")
            and getattr(q.format, "name", None) in REAL_DTYPES)


def uses_real_matmul(config: "DotQuantConfig") -> bool:
    """Whether ``config`` runs the forward product on integer/float8 operands (see ``matmul``)."""
    if config.matmul == "fake" or not (real_ok(config.lhs) and real_ok(config.rhs)):
        return False  # nothing quantizes an operand here (an LSQ layer supplies its own grid)
    ints = all(REAL_DTYPES[q.format.name] == jnp.int8 for q in (config.lhs, config.rhs))
    return config.matmul == "real" or ints or jax.default_backend() != "cpu"


@dataclasses.dataclass(frozen=True, kw_only=True)
class DotQuantConfig:
    """Which quantizer touches which operand of one matmul (``None`` = leave as is).

    Attributes:
      lhs, rhs: forward operands.
      dlhs_grad, dlhs_rhs: the incoming gradient and ``rhs`` in the input-gradient product.
      drhs_grad, drhs_lhs: the incoming gradient and ``lhs`` in the weight-gradient product.
      reuse_fwd: backward products use the forward's quantized lhs/rhs when the
        corresponding backward quantizer is ``None``.
      grad_scale: the gradient quantizers take their scale from the GradScale
        state (``1/s``) instead of their own scale source.
      tpr: two-phase rounding of the gradient (odd grid for the drhs product).
      Any of ``lhs``, ``rhs``, ``dlhs_grad``, ``drhs_grad`` may use delayed
      scaling (``scale="delayed"``); the two gradient quantizers then share one
      history (both quantize the incoming gradient).
      matmul: ``fake`` (dequantized operands in the compute dtype), ``real``
        (integer / float8 operands into ``lax.dot_general``, int32 or float32
        accumulation, scales applied to the result; with no operand quantizer
        there is nothing to feed it and the product stays float) or ``auto``: real when both
        forward quantizers are integer formats (every backend has fast int8
        dots), or float8 formats on a GPU/TPU backend (XLA's CPU backend
        converts float8 operands to float32 before the dot, so there it is fake).
    """

    lhs: Quantizer = None
    rhs: Quantizer = None
    dlhs_grad: Quantizer = None
    dlhs_rhs: Quantizer = None
    drhs_grad: Quantizer = None
    drhs_lhs: Quantizer = None
    reuse_fwd: bool = True
    grad_scale: bool = False
    tpr: bool = False
    matmul: str = "auto"

    def __post_init__(self):
        if self.grad_scale and (self.dlhs_grad is None or self.drhs_grad is None):
            raise ValueError("DotQuantConfig.grad_scale=True needs dlhs_grad and drhs_grad quantizers")
        if self.matmul not in MATMULS:
            raise ValueError(f"DotQuantConfig.matmul={self.matmul!r} is invalid; allowed: {', '.join(MATMULS)}")
        if self.matmul == "real" and not all(q is None or real_ok(q) for q in (self.lhs, self.rhs)):
            raise ValueError(
                "DotQuantConfig.matmul='real' needs symmetric uniform lhs and rhs quantizers of a format in "
                f"{', '.join(REAL_DTYPES)} (got lhs={_name(self.lhs)}, rhs={_name(self.rhs)})")
        if self.tpr and not self.grad_scale:
            raise ValueError("DotQuantConfig.tpr=True needs grad_scale=True (the odd grid is 2x the GradScale step)")
        for field in ("dlhs_rhs", "drhs_lhs"):
            if _delayed(getattr(self, field)):
                raise ValueError(f"DotQuantConfig.{field} has scale='delayed'; allowed: delayed scaling on lhs, rhs, "
                                 "dlhs_grad and drhs_grad only (they own the histories)")
        grads = [q for q in (self.dlhs_grad, self.drhs_grad) if _delayed(q)]
        if grads and self.grad_scale:
            raise ValueError("DotQuantConfig.grad_scale=True sets the gradient quantizers' scale; allowed: "
                             "dlhs_grad/drhs_grad without scale='delayed' when grad_scale=True")
        if len({q.amax_history for q in grads}) > 1:
            raise ValueError("DotQuantConfig.dlhs_grad and drhs_grad share one amax history (both quantize the "
                             f"gradient); allowed: equal amax_history (got {[q.amax_history for q in grads]})")

    @property
    def amax_histories(self) -> dict[str, int]:
        """The amax histories of the delayed sites: ``{"lhs" | "rhs" | "grad": length}``."""
        sites = dict(lhs=self.lhs, rhs=self.rhs, grad=self.dlhs_grad if _delayed(self.dlhs_grad) else self.drhs_grad)
        return {site: q.amax_history for site, q in sites.items() if _delayed(q)}

    @property
    def stochastic(self) -> bool:
        """Whether any quantizer rounds stochastically (then a key is required)."""
        qs = (self.lhs, self.rhs, self.dlhs_grad, self.dlhs_rhs, self.drhs_grad, self.drhs_lhs)
        return any(getattr(q, "rounding", None) == "stochastic" for q in qs)


def _delayed(q) -> bool:
    return q is not None and q.scale == "delayed"


def _histories(config: DotQuantConfig, amax_history) -> tuple:
    """``amax_history`` checked against ``config``'s delayed sites, as a ``(lhs, rhs, grad)`` tuple."""
    want = config.amax_histories
    given = {} if amax_history is None else amax_history
    if not isinstance(given, dict) or set(given) != set(want):
        raise ValueError(f"amax_history={None if amax_history is None else sorted(given)} does not match the "
                         f"config's delayed sites; allowed: a dict with keys {sorted(want)}"
                         + (" (or None)" if not want else ""))
    hists = []
    for site in ("lhs", "rhs", "grad"):
        h = given.get(site)
        if h is not None:
            h = jnp.asarray(h)
            if h.shape != (want[site],) or h.dtype != jnp.float32:
                raise ValueError(f"amax_history[{site!r}] has shape {h.shape} and dtype {h.dtype}; allowed: "
                                 f"float32 of shape ({want[site]},)")
        hists.append(h)
    return tuple(hists)


def _check_dims(lhs, rhs, dimension_numbers):
    try:
        (lc, rc), (lb, rb) = dimension_numbers
    except (TypeError, ValueError):
        raise ValueError(
            f"dimension_numbers={dimension_numbers!r} is invalid; allowed: "
            "((lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch))"
        ) from None
    for name, dims, arr in (("lhs_contracting", lc, lhs), ("rhs_contracting", rc, rhs),
                            ("lhs_batch", lb, lhs), ("rhs_batch", rb, rhs)):
        if any(not (0 <= d < arr.ndim) for d in dims):
            raise ValueError(f"{name}={tuple(dims)} is out of range for an operand of rank {arr.ndim}")
    if len(lc) != len(rc) or len(lb) != len(rb):
        raise ValueError(f"dimension_numbers={dimension_numbers!r}: contracting/batch dims must pair up")
    for (a, b) in zip(list(lc) + list(lb), list(rc) + list(rb)):
        if lhs.shape[a] != rhs.shape[b]:
            raise ValueError(f"lhs dim {a} (size {lhs.shape[a]}) does not match rhs dim {b} (size {rhs.shape[b]})")
    return ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)))


def _fq(q, x, key, scale=None):
    return x if q is None else quant.fake_quant(q, x, key, scale=scale)


def quantized_dot_general(lhs, rhs, dimension_numbers, config: DotQuantConfig, *, key=None,
                          grad_scale=None, amax_history=None, lhs_scale=None, rhs_scale=None, precision=None,
                          preferred_element_type=None):
    """``lax.dot_general`` with quantized operands and gradients.

    Args:
      lhs, rhs: float operands (float32, bfloat16 or float16).
      dimension_numbers: as ``lax.dot_general`` (batch dims supported, so
        attention's QK and AV products work).
      config: the quantizers (a frozen ``DotQuantConfig``).
      key: ``jax.random`` key for stochastic rounding (split once between the six
        quantizer sites); required when any quantizer rounds stochastically.
      grad_scale: float32 scalar GradScale state, required iff ``config.grad_scale``.
      amax_history: ``{site: float32 (L,) history}`` for the delayed sites of
        ``config`` (``config.amax_histories``), else ``None``. The updated
        histories are their cotangents (see ``delayed``).
      lhs_scale, rhs_scale: steps of ``scale="learned"`` forward quantizers
        (e.g. LSQ steps; no gradient flows to them through this function).
      precision: passed to ``lax.dot_general``.
      preferred_element_type: result dtype (default: the operands' result type).

    Returns:
      The product, of dtype ``preferred_element_type`` or the operands' dtype.
    """
    dn = _check_dims(lhs, rhs, dimension_numbers)
    key, gs, hists = _state_args(config, key, grad_scale, amax_history)
    scales = tuple(None if s is None else lax.stop_gradient(jnp.asarray(s, jnp.float32))
                   for s in (lhs_scale, rhs_scale))
    product = _Dot(dn, precision, preferred_element_type)
    return _qprod(product, config, uses_real_matmul(config), lhs, rhs, key, gs, scales, hists)


def _state_args(config: DotQuantConfig, key, grad_scale, amax_history):
    """``(key, grad_scale, histories)`` as ``_qprod`` takes them, after checking they fit ``config``."""
    hists = _histories(config, amax_history)
    if config.grad_scale != (grad_scale is not None):
        raise ValueError("grad_scale must be given exactly when config.grad_scale is True")
    if key is None:
        if config.stochastic:
            raise ValueError("config rounds stochastically: pass key=jax.random.key(...)")
        key = jax.random.key(0)  # never drawn from: every quantizer rounds deterministically
    gs = jnp.zeros((), jnp.float32) if grad_scale is None else grad_scale
    return key, gs, hists


def quantized_conv(lhs, rhs, config: DotQuantConfig, *, key=None, grad_scale=None, amax_history=None,
                   **conv_kwargs):
    """``lax.conv_general_dilated`` with quantized operands and gradients.

    The same forward / dlhs / drhs quantizers, GradScale and two-phase rounding as
    ``quantized_dot_general``; the product is always fake-quantized (XLA has no
    integer or float8 convolution on the backends lowbit targets).

    Args:
      lhs, rhs: the input and the kernel, float.
      config: the quantizers; ``config.matmul`` is ignored.
      key, grad_scale, amax_history: as ``quantized_dot_general``.
      **conv_kwargs: ``lax.conv_general_dilated``'s arguments after the operands
        (``window_strides``, ``padding``, ``dimension_numbers``...).

    Returns:
      The convolution, as ``lax.conv_general_dilated`` returns it.
    """
    key, gs, hists = _state_args(config, key, grad_scale, amax_history)
    product = _Conv(conv_key(conv_kwargs))
    return _qprod(product, config, False, lhs, rhs, key, gs, (None, None), hists)


def conv_key(conv_kwargs: dict) -> tuple:
    """``lax.conv_general_dilated`` keyword arguments as sorted, hashable ``(name, value)`` pairs.

    Lists (as users pass paddings and strides) become tuples: the product is a
    static jit argument. Raises ``TypeError`` for an unhashable value.
    """
    key = tuple(sorted((k, _hashable(v)) for k, v in conv_kwargs.items()))
    hash(key)
    return key


def _hashable(v):
    if isinstance(v, tuple) and hasattr(v, "_fields"):  # ConvDimensionNumbers and other named tuples
        return type(v)(*(_hashable(x) for x in v))
    return tuple(_hashable(x) for x in v) if isinstance(v, (list, tuple)) else v


class _Dot(NamedTuple):
    """A ``lax.dot_general`` with fixed dimension numbers, precision and result type."""

    dn: Any
    precision: Any
    pet: Any

    def __call__(self, a, b):
        return lax.dot_general(a, b, self.dn, precision=self.precision, preferred_element_type=self.pet)


class _Conv(NamedTuple):
    """A ``lax.conv_general_dilated`` with fixed keyword arguments."""

    kwargs: tuple

    def __call__(self, a, b):
        return lax.conv_general_dilated(a, b, **dict(self.kwargs))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _qprod(product, config, real, lhs, rhs, key, gs, scales, hists):
    out, _ = _qprod_fwd(product, config, real, lhs, rhs, key, gs, scales, hists)
    return out


def _delayed_operand(q, x, history, scale):
    """``(step, new history)`` of a delayed forward operand, or ``(scale, None)`` for any other quantizer."""
    if not _delayed(q):
        return scale, None
    return delayed.step(q, history), delayed.update(history, delayed.amax(q, x))


def _real_operand(q, x, key, scale):
    """``(values, step)``: ``x`` on ``q``'s grid in its narrow storage dtype, and its kept-dims step."""
    step = quant.qparams(q, x, scale=scale).step()
    v = formats.quantize(q.format, x.astype(jnp.float32) / step, rounding=q.rounding, key=key)
    return v.astype(REAL_DTYPES[q.format.name]), step


def _out_scale(step, ndim_out, own_batch, own_free, own_contract, lhs_side, n_other_free):
    """Reshape an operand's kept-dims step to broadcast against the dot_general output."""
    if any(step.shape[d] != 1 for d in own_contract):
        raise ValueError("matmul='real' needs scales that are constant along the contracting dims "
                         f"(scale shape {step.shape}, contracting dims {own_contract})")
    dims = [step.shape[d] for d in own_batch]
    free = [step.shape[d] for d in own_free]
    dims += free + [1] * n_other_free if lhs_side else [1] * n_other_free + free
    assert len(dims) == ndim_out
    return step.reshape(dims)


def _real_dot(product, config, lhs, rhs, k_lhs, k_rhs, scales):
    dn, precision, pet = product
    (lc, rc), (lb, rb) = dn
    cl, sl = _real_operand(config.lhs, lhs, k_lhs, scales[0])
    cr, sr = _real_operand(config.rhs, rhs, k_rhs, scales[1])
    acc = jnp.int32 if cl.dtype == jnp.int8 and cr.dtype == jnp.int8 else jnp.float32
    out = lax.dot_general(cl, cr, dn, precision=precision, preferred_element_type=acc)
    lf = [d for d in range(lhs.ndim) if d not in lc and d not in lb]
    rf = [d for d in range(rhs.ndim) if d not in rc and d not in rb]
    out = (out.astype(jnp.float32) * _out_scale(sl, out.ndim, lb, lf, lc, True, len(rf))
           * _out_scale(sr, out.ndim, rb, rf, rc, False, len(lf)))
    return out.astype(pet or jnp.result_type(lhs.dtype, rhs.dtype)), _Narrow(cl, sl, jnp.zeros((), lhs.dtype)), _Narrow(cr, sr, jnp.zeros((), rhs.dtype))


class _Narrow(NamedTuple):
    """A residual kept in its narrow storage dtype plus its step (4x less memory than float32)."""

    codes: jax.Array
    step: jax.Array
    proto: jax.Array  # a scalar of the operand's dtype

    def value(self):
        return (self.codes.astype(jnp.float32) * self.step).astype(self.proto.dtype)


def _split(config: DotQuantConfig, key, n: int) -> tuple:
    """``n`` keys from ``key``; a config that rounds nothing stochastically reads none, so it splits nothing."""
    return formats.split_key(key, n) if config.stochastic else (key,) * n


def _qprod_fwd(product, config, real, lhs, rhs, key, gs, scales, hists):
    # One split for the forward's and the backward's sites (a hash, not Threefry: see split_key).
    k_lhs, k_rhs, *k_bwd = _split(config, key, 6)
    s_lhs, h_lhs = _delayed_operand(config.lhs, lhs, hists[0], scales[0])
    s_rhs, h_rhs = _delayed_operand(config.rhs, rhs, hists[1], scales[1])
    scales = (s_lhs, s_rhs)
    if real:
        out, lhs_q, rhs_q = _real_dot(product, config, lhs, rhs, k_lhs, k_rhs, scales)
    else:
        lhs_q = _fq(config.lhs, lhs, k_lhs, scales[0])
        rhs_q = _fq(config.rhs, rhs, k_rhs, scales[1])
        out = product(lhs_q, rhs_q)
    # Only what the backward pass reads is saved: the quantized operands when reused.
    res_lhs = lhs_q if config.reuse_fwd and config.drhs_lhs is None else lhs
    res_rhs = rhs_q if config.reuse_fwd and config.dlhs_rhs is None else rhs
    return out, (res_lhs, res_rhs, tuple(k_bwd), gs, (h_lhs, h_rhs, hists[2]))


def _qprod_bwd(product, config, real, res, g):
    lhs, rhs = (r.value() if isinstance(r, _Narrow) else r for r in res[:2])
    (k1, k2, k3, k4), gs, (h_lhs, h_rhs, h_grad) = res[2:]
    new_gs = gs
    if h_grad is not None:  # delayed gradient scaling: one history for g, each quantizer its own reduction
        current = delayed.amax(config.dlhs_grad if _delayed(config.dlhs_grad) else config.drhs_grad, g)
        g_dlhs, g_drhs = (_fq(q, g, k, scale=delayed.step(q, h_grad) if _delayed(q) else None)
                          for q, k in ((config.dlhs_grad, k1), (config.drhs_grad, k2)))
        h_grad = delayed.update(h_grad, current)
    elif config.grad_scale:
        new_gs = gradscale_update(gs, jnp.max(jnp.abs(g)), config.dlhs_grad.format.max_value)
        inv = (1.0 / new_gs).astype(jnp.float32)  # s is a power of two: exact
        g_dlhs = _fq(config.dlhs_grad, g, k1, scale=inv)
        g_drhs = _fq(config.drhs_grad, g, k2, scale=inv * 2.0 if config.tpr else inv)
    else:
        g_dlhs = _fq(config.dlhs_grad, g, k1)
        g_drhs = _fq(config.drhs_grad, g, k2)
    rhs_b = _fq(config.dlhs_rhs, rhs, k3)
    lhs_b = _fq(config.drhs_lhs, lhs, k4)
    # The product is linear in each operand: its VJP is the transposed product.
    _, vjp_l = jax.vjp(lambda a: product(a, rhs_b), lhs_b)
    _, vjp_r = jax.vjp(lambda b: product(lhs_b, b), rhs_b)
    (dlhs,) = vjp_l(g_dlhs.astype(g.dtype))
    (drhs,) = vjp_r(g_drhs.astype(g.dtype))
    return dlhs.astype(lhs.dtype), drhs.astype(rhs.dtype), None, new_gs, (None, None), (h_lhs, h_rhs, h_grad)


_qprod.defvjp(_qprod_fwd, _qprod_bwd)
