"""``quantize_weights``: RTN, GPTQ, AWQ or SmoothQuant (then RTN or GPTQ) on every weighted op of any NNX model.

The ops are the ones ``lowbit.quantize`` finds (``lowbit.ptq.capture``): every
matmul / einsum / convolution of the forward pass whose rhs is a model
parameter, named ``path:key``. For each op the calibration inputs are its
recorded lhs operands, flattened to the ``(n, K)`` rows that meet the weight's
contracted axes, and the weight is viewed as ``(K, N)`` (``lowbit.ptq.rtn``);
the methods need only running sums of those rows (the Hessian ``2 xᵀx / n``,
the mean and the largest ``|x|`` per input channel), never the rows themselves.

With ``sequential=True`` (GPTQ's "true sequential" order) each op's statistics
are recorded after the ops before it were quantized, so it compensates the
error that reaches it; every op then costs one pass over the calibration
batches (one compiled function for them all).

The result is a copy of the float model with its weights replaced by their
dequantized values (weight-only, W4A16 and the like: an ordinary NNX model).
With ``activations`` the copy is quantized by ``lowbit.quantize`` with that
quantizer on the lhs of each selected op (W8A8, W4A8), the weights left as
they are; SmoothQuant's ``x / s`` is then applied to each op's input (op state
``input_scale``, divided in by the forward pass's op runner), where weight-only
SmoothQuant and AWQ fold ``1 / s`` back into the dequantized weight
(``Q(diag(s) w) / s``: the same product). With ``pack=True`` (weight-only)
the weights are stored packed instead (``lowbit.nn.packed``, built by
``lowbit.ptq.packed``): codes plus the scales each method computed, which
dequantize in the forward pass to exactly the weights above.

Convolutions and ops with batch dimensions have no ``(n, K)`` input rows here
(a convolution's would be its unfolded patches): they are quantized by RTN
whatever the method, and their report row says so.

With ``rotate=True`` (QuaRot / QuIP#-style incoherence processing,
``lowbit.ptq.rotate``) every selected op with ``(n, K)`` input rows and an
even ``K`` gets its own random orthogonal ``R`` (random signs, then Hadamard
blocks of up to ``rotate.MAX_BLOCK`` along its flattened contraction, drawn
from ``seed`` and the op's name): it computes ``(x R)(Rᵀ w) = x w``, the
weight that is quantized (by the method) and stored is ``Rᵀ w``, and the op
rotates its input online (op state ``input_rotation``, the signs ``d``, applied
by the forward pass's op runner like SmoothQuant's ``input_scale``). The
statistics are those of the rotated rows ``x R`` (recorded, then rotated: the
Hessian, mean and max that the op will see), so GPTQ, AWQ and SmoothQuant all
work in the rotated basis; SmoothQuant's scales are computed on rotated inputs
and the op runs ``(x R) / s`` (rotate, then scale), and with ``activations``
the quantizer sees that rotated, scaled input. The inverse is not folded into
a neighbouring op offline: that needs the model's graph (a norm without
affine weights feeding the op, a residual stream shared by several ops), which
an arbitrary NNX model does not expose, so every rotation is online. A rotated
result is therefore a lowbit-quantized model (as with ``activations``), not a
plain float one. Convolutions, batched ops and ops with an odd ``K`` are not
rotated (their rows say ``rotated: false`` and why).
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowbit import quant
from lowbit.formats._checks import check_int
from lowbit.nn import intercept
from lowbit.nn import packed as packing
from lowbit.nn.export import weight
from lowbit.nn.packed import PackedWeight, from_matrix, to_matrix
from lowbit.nn.quantize import Op, discover, intercepting, op_name, ops, quantize
from lowbit.ptq import awq, gptq, rotate, rtn, smoothquant
from lowbit.ptq.awq import AWQ
from lowbit.ptq.capture import probe, record_traced
from lowbit.ptq.config import WEIGHT_METHODS
from lowbit.ptq.config import WeightMethod as Method
from lowbit.ptq.gptq import GPTQ
from lowbit.ptq.packed import packed_op
from lowbit.ptq.rtn import RTN, check_group, check_weights, output_error
from lowbit.ptq.smoothquant import SmoothQuant
from lowbit.ptq.vit import module_at
from lowbit.quant import Group
from lowbit.recipes import op as oprule
from lowbit.recipes.rules import Recipe, Rule, compile_regex
from lowbit.training.qdot import DotQuantConfig

__all__ = ["WEIGHT_METHODS", "Method", "quantize_weights"]

_HIGHEST = jax.lax.Precision.HIGHEST


def _method(method: str | Method) -> Method:
    if isinstance(method, str):
        if method not in WEIGHT_METHODS:
            raise ValueError(f"method={method!r} is invalid; allowed: {', '.join(WEIGHT_METHODS)} or a method config")
        return WEIGHT_METHODS[method]
    if not isinstance(method, (RTN, GPTQ, AWQ, SmoothQuant)):
        raise TypeError(f"method has type {type(method).__name__}; allowed: a name or RTN, GPTQ, AWQ, SmoothQuant")
    return method


def _contracted(op: Op) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """``(lhs contracted axes, rhs contracted axes)`` of an op with a ``(n, K)`` input view, else None."""
    if op.call.kind == "conv" or op.call.dn is None:
        return None
    (lc, rc), (lb, rb) = op.call.dn
    return None if lb or rb else (tuple(lc), tuple(rc))


def _rows(x: jax.Array, lc: tuple[int, ...]) -> jax.Array:
    """The lhs ``x`` as ``(n, K)`` rows: free axes first, contracted axes (in ``lc`` order) flattened last."""
    free = [d for d in range(x.ndim) if d not in lc]
    k = int(np.prod([x.shape[d] for d in lc]))
    return jnp.transpose(x, free + list(lc)).reshape(-1, k)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _batch_stats(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    specs: tuple[tuple[str, tuple[int, ...]], ...],
    batch: jax.Array,
    rotations: dict[str, jax.Array] | None = None,
) -> dict[str, tuple[jax.Array, jax.Array, jax.Array, int]]:
    """Per op: ``(Σ xᵀx, Σ|x|, max|x|)`` of one batch's ``(n, K)`` input rows (``x R`` for ops in ``rotations``)."""
    calls = record_traced(nnx.merge(graphdef, state), batch)[1]
    out = {}
    for name, lc in specs:
        x = _rows(calls[name].lhs.astype(jnp.float32), lc)
        if rotations and name in rotations:  # what the rotated op will see: its rows times R
            x = rotate.rotate_rows(x, rotations[name])
        out[name] = (jnp.dot(x.T, x, precision=_HIGHEST), jnp.sum(jnp.abs(x), 0), jnp.max(jnp.abs(x), 0), x.shape[0])
    return out


def _statistics(
    probed: nnx.Module,
    specs: tuple[tuple[str, tuple[int, ...]], ...],
    batches: list[Any],
    rotations: dict[str, jax.Array] | None = None,
) -> dict[str, dict[str, jax.Array]]:
    """Per op: Hessian ``h`` ``(K, K)``, ``act_mean`` and ``act_max`` ``(K,)`` over all calibration batches.

    For an op in ``rotations`` (its signs ``d``) they are those of the rotated rows ``x R`` (``rotate``).
    """
    graphdef, state = nnx.split(probed)
    total: dict[str, list] = {}
    for batch in batches:
        for name, (xx, s, m, n) in _batch_stats(graphdef, state, specs, jnp.asarray(batch), rotations).items():
            if name not in total:
                total[name] = [xx, s, m, n]
            else:
                t = total[name]
                total[name] = [t[0] + xx, t[1] + s, jnp.maximum(t[2], m), t[3] + n]
    return {name: dict(h=2 * xx / n, act_mean=s / n, act_max=m) for name, (xx, s, m, n) in total.items()}


def _select(found: Sequence[Op], include: str | None, exclude: str | None) -> list[Op]:
    weighted = [op for op in found if op.call.weighted]
    if not weighted:
        raise ValueError(
            "model has no quantizable op: its forward pass runs no matmul, einsum or convolution with a "
            "weight parameter"
        )
    inc = compile_regex("quantize_weights", "include", include) if include is not None else None
    exc = compile_regex("quantize_weights", "exclude", exclude) if exclude is not None else None
    chosen = [
        op
        for op in weighted
        if (inc is None or inc.fullmatch(op_name(op.path, op.key)))
        and not (exc is not None and exc.fullmatch(op_name(op.path, op.key)))
    ]
    if not chosen:
        raise ValueError(
            f"include={include!r} / exclude={exclude!r} select none of the weighted ops "
            f"({', '.join(op_name(op.path, op.key) for op in weighted)})"
        )
    return chosen


def _quantize_op(
    op: Op,
    w: jax.Array,
    stats: dict[str, dict[str, jax.Array]],
    weights: quant.Quantizer,
    method: Method,
    scaled_input: bool,
    d: jax.Array | None = None,
    keep: dict[str, Any] | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array | None, dict[str, Any]]:
    """``(stored weight, effective weight, input scales or None, report row)`` of one op.

    ``keep``: where GPTQ / AWQ / SmoothQuant leave their result (``"result"``), for packing (``lowbit.ptq.packed``).

    ``d``: the op's rotation signs (``rotate``), or None. The stored weight is what the op holds
    (``Q(Rᵀ w)``, ``Q(diag(s) Rᵀ w)`` with scaled inputs); the effective one is its float equivalent on the
    op's raw input (``R Q(Rᵀ w)``, ``R Q(diag(s) Rᵀ w) / s``): what the probed model runs, so that the
    statistics of the ops after it see the outputs the result gives them.
    """
    name = op_name(op.path, op.key)
    axes = _contracted(op)
    row: dict[str, Any] = dict(name=name, kind=op.call.kind, shape=list(w.shape), rotated=d is not None)
    if axes is None or isinstance(method, RTN):
        if axes is None and not isinstance(method, RTN):
            row["reason"] = f"{op.call.kind} without (n, K) input rows: RTN instead of {method.name}"
            warnings.warn(f"quantize_weights: op {name}: {row['reason']}", stacklevel=3)
        # On the weight as it lies (rotated: Rᵀ w in its own layout), exactly as lowbit.quantize would quantize it.
        qz = oprule.retarget(DotQuantConfig(rhs=weights), op.call, len(op.lhs_shape), w.ndim).rhs
        assert qz is not None  # retarget keeps the given rhs quantizer
        if isinstance(qz.granularity, Group):
            check_group(qz, w.shape[qz.granularity.axis], name)
        w_r = w if d is None or axes is None else rotate.rotate_weight(w, axes[1], d)
        w_q = quant.fake_quant(qz, w_r)
        row["method"] = "rtn"
        if axes is None or d is None:
            if axes is not None:
                m, h = to_matrix(w, axes[1]), stats[name]["h"]
                row["error"] = row["rtn_error"] = _relative(m, to_matrix(w_q, axes[1]), h)
            return w_q, w_q, None, row
        # Statistics are of rotated rows: compare in the rotated basis; RTN's baseline is the unrotated weight's.
        m, h = to_matrix(w_r, axes[1]), stats[name]["h"]
        plain = rotate.rotate_weight(quant.fake_quant(qz, w), axes[1], d)
        row.update(error=_relative(m, to_matrix(w_q, axes[1]), h), rtn_error=_relative(m, to_matrix(plain, axes[1]), h))
        return w_q, rotate.unrotate_weight(w_q, axes[1], d).astype(w.dtype), None, row
    m_plain = to_matrix(w, axes[1])
    m = m_plain if d is None else rotate.rotate_weight(m_plain, (0,), d)  # Rᵀ w as (K, N)
    st = stats[name]
    scales = None
    if isinstance(method, GPTQ):
        res_g = gptq.quantize(m, st["h"], weights, method, name=name)
        m_q = res_g.weight
        if keep is not None:
            keep["result"] = res_g
    elif isinstance(method, AWQ):
        res = awq.quantize(m, st["h"], st["act_mean"], weights, method, name=name)
        m_q, row["alpha"] = res.weight, float(res.alpha)
        if keep is not None:
            keep["result"] = res
    else:
        res_s = smoothquant.quantize(m, st["act_max"], weights, method, h=st["h"], name=name)
        scales = res_s.scales
        if keep is not None:
            keep["result"] = res_s
        # Weight-only: 1 / s folds back into the weight; with activations the op divides its input.
        m_q = res_s.weight if scaled_input else res_s.weight / scales[:, None]
    # With scaled inputs the op computes (x / s) Q(diag(s) w): its effective weight is Q(diag(s) w) / s.
    effective = m_q / scales[:, None] if scaled_input and scales is not None else m_q
    rtn_q = rtn.quantize(m_plain, weights, name=name)  # RTN of the weight as it lies (unrotated)
    row.update(
        method=method.name,
        error=_relative(m, effective, st["h"]),
        rtn_error=_relative(m, rtn_q if d is None else rotate.rotate_weight(rtn_q, (0,), d), st["h"]),
    )
    if d is not None:
        effective = rotate.unrotate_weight(effective, (0,), d)  # R (...): on the raw input
    stored = from_matrix(m_q, w.shape, axes[1]).astype(w.dtype)
    return stored, from_matrix(effective, w.shape, axes[1]).astype(w.dtype), scales, row


def _relative(m: jax.Array, m_q: jax.Array, h: jax.Array) -> float:
    """``||x m - x m_q||² / ||x m||²`` on the calibration inputs (through their Hessian ``h``)."""
    return float(output_error(m, m_q, h)) / max(float(output_error(m, jnp.zeros_like(m), h)), 1e-30)


def _param(model: nnx.Module, op: Op) -> nnx.Param:
    """The weight parameter op ``op`` of ``model`` reads."""
    module = module_at(model, op.path)
    assert module is not None  # op paths are module paths of the model they were discovered in
    return weight(module, op)


def _check_pack(pack: object, activations: quant.Quantizer | None, rotate: bool) -> None:
    if not isinstance(pack, bool):
        raise TypeError(f"quantize_weights: pack={pack!r} is invalid; allowed: True or False")
    if pack and (activations is not None or rotate):
        raise ValueError(
            f"quantize_weights: pack=True with {'activations' if activations is not None else 'rotate=True'} is "
            "invalid; allowed: weight-only, unrotated packing (activations=None, rotate=False): a packed model is "
            "a plain float model whose weights are stored packed, with no op runner to quantize, scale or rotate "
            "its inputs"
        )


def _packed_op(op: Op, w: jax.Array, w_q: jax.Array, weights: quant.Quantizer, result: Any) -> PackedWeight:
    """The packed form of op ``op``'s quantized weight ``w_q`` (``lowbit.ptq.packed.packed_op``)."""
    axes = _contracted(op)
    rtn_q = oprule.retarget(DotQuantConfig(rhs=weights), op.call, len(op.lhs_shape), w.ndim).rhs
    assert rtn_q is not None  # retarget keeps the given rhs quantizer
    rc = None if axes is None else axes[1]
    return packed_op(op_name(op.path, op.key), w, w_q, rtn_q, weights, rc, result)


def quantize_weights(
    model: nnx.Module,
    batches: Sequence[Any],
    *,
    weights: quant.Quantizer,
    method: str | Method = "gptq",
    activations: quant.Quantizer | None = None,
    include: str | None = None,
    exclude: str | None = None,
    sequential: bool = True,
    rotate: bool = False,
    seed: int = 0,
    pack: bool = False,
) -> tuple[nnx.Module, list[dict[str, Any]]]:
    """Quantize the weights of every (selected) weighted op of a float NNX model with a PTQ method.

    Args:
      model: a float NNX model (any: written without lowbit, or a built-in one); unchanged.
      batches: calibration inputs: a sequence of arrays, each one input of
        ``model`` (a batch of images, of token ids, ...). Read once per op with
        ``sequential``.
      weights: the weight quantizer, e.g. ``Quantizer(format="int4",
        granularity=Group(size=128))`` (W4A16 g128): groups run along each op's
        inputs, channels on its outputs.
      method: a name of ``WEIGHT_METHODS`` (``"rtn"``, ``"gptq"``, ``"awq"``, ``"smoothquant"``,
        ``"smoothquant+gptq"``; default settings) or a config: ``RTN()``, ``GPTQ(...)``, ``AWQ(...)``,
        ``SmoothQuant(alpha)``, ``SmoothQuant(alpha, then=GPTQ(...))`` (GPTQ on the smoothed weight).
      activations: a quantizer for each selected op's input (lhs), e.g.
        ``Quantizer(format="int8")`` (dynamic, per tensor) for W8A8; None keeps them float.
      include, exclude: regexes on op names (``path:key``, ``re.fullmatch``):
        the ops to quantize; the others stay float.
      sequential: record each op's inputs after the ops before it were quantized.
      rotate: random-Hadamard rotation of each op's contracted dimension
        (module docstring, ``lowbit.ptq.rotate``): the op stores ``Q(Rᵀ w)`` and
        rotates its input online; with any method and with ``activations``
        (quantized after the rotation). Not folded into neighbouring ops.
      seed: the rotations' random signs (with the op's name; unused without ``rotate``).
      pack: return a packed model (``lowbit.nn.packed``): each quantized op's
        weight stored as codes plus scales (``PackedParam``), dequantized in the
        forward pass to exactly the weight ``pack=False`` gives (bit for bit);
        ops left float stay float. Weight-only and unrotated: not with
        ``activations`` or ``rotate``.

    Returns:
      ``(quantized, rows)``: a copy of ``model`` (eval mode) with quantized
      weights (and with ``activations`` or ``rotate``, quantized by
      ``lowbit.quantize``: its rotated / scaled ops run through lowbit's op
      runner, whose ``lhs`` quantizer is ``activations`` or none), and
      one dict per selected op in forward order: ``name``, ``kind``, ``shape``,
      ``method`` (``rtn`` where the method does not apply, ``float`` for an op
      whose weight is no parameter as it lies, e.g. a tied embedding's
      transpose; both with a ``reason``);
      for ops with input rows (not convolutions) the relative output error on
      the calibration inputs (as they reached the op) ``error`` =
      ``||x w - x ŵ||² / ||x w||²`` (``ŵ`` the op's effective weight: ``R Q(Rᵀ
      w)`` when rotated) and RTN's on the same inputs, ``rtn_error`` (RTN of
      the unrotated weight, rotated or not); ``rotated`` (bool; a ``reason``
      where ``rotate`` asked but the op has no ``(n, K)`` rows or an odd ``K``);
      AWQ adds its ``alpha``.

    Raises:
      ValueError: no batches, a model with no weighted op (or none selected), a
        group size that does not divide an op's inputs, a Hessian that is
        singular even with damping (too few calibration samples).
      TypeError: a quantizer or method of the wrong type, ``rotate`` or ``pack`` not a bool.
      ValueError: ``seed`` not an integer in ``[0, 2**63 - 1]``; ``pack`` with ``activations`` or ``rotate``.
    """
    method = _method(method)
    if not isinstance(rotate, bool):
        raise TypeError(f"quantize_weights.rotate={rotate!r} is invalid; allowed: True or False")
    _check_pack(pack, activations, rotate)
    check_int("quantize_weights", "seed", seed, 0, 2**63 - 1)
    check_weights(weights)
    if activations is not None:
        check_weights(activations, "activations")
    batches = list(batches)
    if not batches:
        raise ValueError("quantize_weights: batches is empty; allowed: at least one calibration batch")
    work = nnx.clone(model)
    work.eval()
    probed = probe(work, batches[0])
    chosen = _select(ops(probed), include, exclude)
    specs = tuple((op_name(op.path, op.key), ax[0]) for op in chosen if (ax := _contracted(op)) is not None)
    needs_stats = bool(specs)  # RTN's too: every row reports its output error
    scaled_input = isinstance(method, SmoothQuant) and activations is not None
    rotations, not_rotated = _rotations(chosen, seed) if rotate else ({}, {})
    stats: dict = {}
    rows, input_scales, done = [], {}, []
    packs: dict[str, PackedWeight] = {}
    for i, op in enumerate(chosen):
        if needs_stats and (i == 0 or (sequential and not isinstance(method, RTN))):
            stats = _statistics(probed, specs, batches, rotations)
        try:
            w = jnp.asarray(_param(probed, op)[...])
        except ValueError as e:
            # A weight computed in the forward pass (a tied embedding's transpose) has no parameter to
            # update here: the op stays float, and says so.
            rows.append(dict(name=op_name(op.path, op.key), kind=op.call.kind, method="float", reason=str(e)))
            warnings.warn(f"quantize_weights: {e}; it stays float", stacklevel=2)
            continue
        name = op_name(op.path, op.key)
        keep: dict[str, Any] = {}
        w_q, effective, scales, row = _quantize_op(
            op, w, stats, weights, method, scaled_input, rotations.get(name), keep
        )
        if pack:
            packs[name] = _packed_op(op, w, w_q, weights, keep.get("result"))
        if name in not_rotated:
            row["reason"] = "; ".join(filter(None, [row.get("reason"), not_rotated[name]]))
            warnings.warn(f"quantize_weights: op {name}: {not_rotated[name]}", stacklevel=2)
        done.append(op)
        _param(probed, op)[...] = effective  # the float equivalent: later ops' statistics see the result's outputs
        _param(work, op)[...] = w_q
        if scales is not None and scaled_input:
            input_scales[row["name"]] = scales
        rows.append(row)
    if activations is None and not rotations:
        return (packing.pack(work, packs) if pack else work), rows
    input_rotations = {n: d for n, d in rotations.items() if n in {r["name"] for r in rows if r.get("rotated")}}
    return _with_activations(work, done, activations, input_scales, batches[0], input_rotations), rows


def _rotations(chosen: list[Op], seed: int) -> tuple[dict[str, jax.Array], dict[str, str]]:
    """``({op name: rotation signs d}, {op name: why it is not rotated})`` of the chosen ops."""
    signs, why = {}, {}
    for op in chosen:
        name, axes = op_name(op.path, op.key), _contracted(op)
        if axes is None:
            why[name] = f"{op.call.kind} without (n, K) input rows: not rotated"
            continue
        k = int(np.prod([op.lhs_shape[d] for d in axes[0]]))
        if rotate.block_size(k) < 2:
            why[name] = f"odd contraction K={k} has no Hadamard block: not rotated"
            continue
        signs[name] = rotate.signs(seed, name, k)
    return signs, why


def _with_activations(
    work: nnx.Module,
    chosen: list[Op],
    activations: quant.Quantizer | None,
    input_scales: dict[str, jax.Array],
    example: Any,
    input_rotations: dict[str, jax.Array] | None = None,
) -> nnx.Module:
    """``work`` quantized with ``activations`` (or none) on each chosen op's lhs (weights as they are).

    Inputs rotated (``input_rotations``: signs ``d`` per op) and scaled (``input_scales``), in that order.
    """
    input_rotations = input_rotations or {}
    rules: list[Rule] = []
    plan: dict[str, int] = {}
    for op in chosen:
        plan[op_name(op.path, op.key)] = len(rules)
        rules.append(
            Rule(
                path=re.escape(op.path),
                kinds=(op.call.kind,),
                operands="weight",
                dot=DotQuantConfig(lhs=activations, rhs=None),
            )
        )
    quantized = quantize(work, Recipe(name="ptq-weights", rules=tuple(rules)), plan=plan)
    discover(quantized, jnp.asarray(example))
    if not input_scales and not input_rotations:
        return quantized
    for op in chosen:
        s = input_scales.get(op_name(op.path, op.key))
        d = input_rotations.get(op_name(op.path, op.key))
        state = getattr(module_at(quantized, op.path), f"lowbit_{op.key}")
        if s is not None:
            lc = _contracted(op)[0]  # type: ignore[index]  # ops with input scales have (n, K) rows
            state.input_scale = nnx.Variable(_on_lhs(s, lc, len(op.lhs_shape), op.lhs_shape))
        if d is not None:  # (K,) signs, the contracted axes flattened in the op's order (rotate.rotate_lhs)
            state.input_rotation = nnx.Variable(jnp.asarray(d, jnp.float32))
    quantized.__class__ = _scaled_class(type(quantized))
    return quantized


def _on_lhs(s: jax.Array, lc: tuple[int, ...], ndim: int, shape: tuple[int, ...]) -> jax.Array:
    """``(K,)`` scales (contracted axes flattened in ``lc`` order) shaped to broadcast on the lhs."""
    s = jnp.asarray(s, jnp.float32).reshape([shape[d] for d in lc])
    s = jnp.transpose(s, sorted(range(len(lc)), key=lambda i: lc[i]))  # the lhs's own axis order
    return s.reshape([shape[d] if d in lc else 1 for d in range(ndim)])


def _scaling(runner: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """A pass's op runner whose ops run on ``(x R) / s``: rotated (``input_rotation``), then SmoothQuant-scaled.

    Either is optional; ``R`` and ``s`` act along the op's contracted axes. The op's own quantizers (its
    ``lhs`` quantizer: activations) see the rotated, scaled input.
    """

    def scaled(module: nnx.Module, key: str, rule: Any, call: Any, lhs: jax.Array, rhs: jax.Array) -> jax.Array:
        state = getattr(module, f"lowbit_{key}", None)
        d = getattr(state, "input_rotation", None)
        if d is not None:
            lhs = rotate.rotate_lhs(lhs, call.dn[0][0], d[...])
        s = getattr(state, "input_scale", None)
        return runner(module, key, rule, call, lhs if s is None else lhs / s[...].astype(lhs.dtype), rhs)

    scaled.smoothquant = True  # type: ignore[attr-defined]  # marks a runner that already scales
    return scaled


_SCALED_CLASSES: dict[type, type] = {}


def _scaled_class(cls: type) -> type:
    """``cls`` (a quantized model class) whose calls rotate / divide each op's input (``_scaling``).

    The scaling goes into the runner of the forward pass the call runs in: its own, or one that a caller
    opened on the model (``intercepting(capture=True)``: per-op errors, calibration), which runs the ops too.
    """
    if cls in _SCALED_CLASSES:
        return _SCALED_CLASSES[cls]

    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        frame = intercept.active()
        if frame is None:  # the model's own pass: opened here, so that its runner can be wrapped below
            with intercepting(self):
                return __call__(self, *args, **kwargs)
        if frame.runner is None or getattr(frame.runner, "smoothquant", False):  # ops not run, or already scaled
            return cls.__call__(self, *args, **kwargs)
        runner, frame.runner = frame.runner, _scaling(frame.runner)
        try:
            return cls.__call__(self, *args, **kwargs)
        finally:
            frame.runner = runner

    _SCALED_CLASSES[cls] = type(
        cls.__name__,
        (cls,),
        {"__call__": __call__, "__module__": cls.__module__, "__qualname__": f"{cls.__qualname__}+smoothquant"},
    )
    return _SCALED_CLASSES[cls]
