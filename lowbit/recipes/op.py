"""Apply one rule to one op: its learned-quantizer state and its quantized product.

Flax-free: ``lowbit.nn`` keeps the state (as NNX variables or linen
collections) and calls ``run`` with its current values. An op is described by an
``OpCall`` (its kind and the static arguments of its product); the rule's
quantizer axes are set per op (``retarget``), so one rule fits every layer shape.

State of one op (``state_init``), by category:

* ``param`` — trained by the optimizer: ``act_alpha`` (PACT clip),
  ``act_step`` / ``weight_step`` (LSQ steps);
* ``overwrite`` — replaced by its gradient: ``grad_scale`` (GradScale; the
  quantized backward pass returns the updated scale as its cotangent) and
  ``amax_lhs`` / ``amax_rhs`` / ``amax_grad`` (delayed scaling's amax
  histories, returned the same way; see ``lowbit.training.delayed``);
* ``rng`` — ``sr_key``: the op's stochastic-rounding key, advanced by ``next_key``
  on every call (the one random source of quantized training).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from lowbit import formats
from lowbit.formats import IntFormat
from lowbit.quant import Channel, Learned, Quantizer
from lowbit.recipes import carried as carried_checks
from lowbit.recipes.rules import Rule
from lowbit.training import delayed
from lowbit.training.gradscale import gradscale_init
from lowbit.training.qdot import DotQuantConfig, quantized_conv, quantized_dot_general, uses_real_matmul
from lowbit.training.ste import binary_weight, lsq, lsq_init_step, pact, sawb_quantize, ternary_weight

__all__ = ["CATEGORIES", "OpCall", "next_key", "run", "state_init"]

CATEGORIES = ("param", "overwrite", "rng")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OpCall:
    """The static part of one op call: hashable, so it can key caches and jit.

    Attributes:
      kind: ``dot_general``, ``einsum`` or ``conv``.
      dn: ``lax.dot_general`` dimension numbers (dot_general and einsum).
      perm: output permutation after the dot (einsum), or ``None``.
      conv: ``lax.conv_general_dilated`` keyword arguments as sorted ``(name, value)`` pairs.
      precision, preferred_element_type: passed through to the product.
      weighted: the rhs is a weight: a parameter of the model (or a reshaped,
        transposed or cast view of one), not an activation.
    """

    kind: str
    dn: Any = None
    perm: tuple[int, ...] | None = None
    conv: tuple = ()
    precision: Any = None
    preferred_element_type: Any = None
    weighted: bool = False

    def axes(self, lhs_ndim: int, rhs_ndim: int) -> dict[str, tuple[int, int]]:
        """Per operand ``(contracting axis, channel axis)``: where blocks and channel scales run.

        The contracting axis is the operand's last contracted dimension; the
        channel axis its last free one (a weight's output channels).
        """
        if self.kind == "conv":
            dn = lax.conv_dimension_numbers((1,) * lhs_ndim, (1,) * rhs_ndim, dict(self.conv).get("dimension_numbers"))
            # lhs_spec = (batch, feature, spatial...), rhs_spec = (out feature, in feature, spatial...)
            return dict(lhs=(dn.lhs_spec[1], dn.lhs_spec[0]), rhs=(dn.rhs_spec[1], dn.rhs_spec[0]))
        (lc, rc), (lb, rb) = self.dn
        lf = [d for d in range(lhs_ndim) if d not in lc and d not in lb] or [lc[-1]]
        rf = [d for d in range(rhs_ndim) if d not in rc and d not in rb] or [rc[-1]]
        return dict(lhs=(lc[-1], lf[-1]), rhs=(rc[-1], rf[-1]))


@functools.cache
def _retarget(q: Quantizer | None, contract: int, channel: int) -> Quantizer | None:
    """``q`` with its axis on the operand's contracting (blocks, groups) or channel axis.

    Per-tensor scales and 2-D blocks (tiles of the last two axes) have no axis to set.
    """
    if q is None:
        return q
    return q.along(channel if isinstance(q.granularity, Channel) else contract)


def retarget(config: DotQuantConfig, call: OpCall, lhs_ndim: int, rhs_ndim: int) -> DotQuantConfig:
    """``config`` with its forward quantizers on this op's forward axes (``OpCall.axes``).

    What code that quantizes an operand outside the product reads (``describe``,
    calibration, PTQ); the product itself places every quantizer on each of its
    three GEMMs' axes (``DotQuantConfig.placement="gemm"``). With
    ``placement="quantizer"`` the backward's operand quantizers (``drhs_lhs``,
    ``dlhs_rhs``) go on the forward axes too: the numerics before per-GEMM placement.
    """
    ax = call.axes(lhs_ndim, rhs_ndim)
    config = dataclasses.replace(config, lhs=_retarget(config.lhs, *ax["lhs"]), rhs=_retarget(config.rhs, *ax["rhs"]))
    if config.placement == "gemm":
        return config
    return dataclasses.replace(
        config, drhs_lhs=_retarget(config.drhs_lhs, *ax["lhs"]), dlhs_rhs=_retarget(config.dlhs_rhs, *ax["rhs"])
    )


def _learned(rule: Rule, call: OpCall) -> bool:
    """Learned weight/activation rules apply to weighted ops only."""
    return call.weighted and (rule.weight != "none" or rule.act != "none")


def state_init(rule: Rule, call: OpCall, rhs: jax.Array, key: jax.Array) -> dict[str, tuple[str, jax.Array]]:
    """The op's quantizer state: ``name -> (category, initial value)``.

    Args:
      rule: the rule that quantizes the op.
      call: the op.
      rhs: the op's rhs operand on its first call (LSQ initialises the weight step from it).
      key: where the op's stochastic-rounding key comes from.
    """
    state: dict[str, tuple[str, jax.Array]] = {}
    if _learned(rule, call):
        if rule.act == "pact":
            # PACT's clip starts where a unit-variance input has ~99.7% of its mass.
            state["act_alpha"] = ("param", jnp.asarray(3.0, jnp.float32))
        elif rule.act == "lsq":
            # LSQ's 2 E|x| / sqrt(Q_P) with E|x| = sqrt(2/pi) for unit-variance data.
            qp = 2 ** (rule.act_bits - 1) - 1
            state["act_step"] = ("param", jnp.asarray(2 * math.sqrt(2 / math.pi) / math.sqrt(qp), jnp.float32))
        if rule.weight == "lsq":
            state["weight_step"] = ("param", lsq_init_step(jnp.asarray(rhs, jnp.float32), rule.weight_bits, True))
    if rule.dot.grad_scale:
        state["grad_scale"] = ("overwrite", gradscale_init())
    for site, length in rule.dot.amax_histories.items():
        state[f"amax_{site}"] = ("overwrite", delayed.history_init(length))
    if rule.dot.stochastic:
        state["sr_key"] = ("rng", jax.random.key_data(key))
    return state


def next_key(key_data: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(key for this call, key data for the next)`` from an op's ``sr_key`` state."""
    this, nxt = formats.split_key(jax.random.wrap_key_data(key_data), 2)
    return this, jax.random.key_data(nxt)


def _positive(step):
    """|s|: AdamW can push a learned LSQ step through zero; its magnitude is what quantizes.

    Without this, int8_lsq on digits collapsed to chance on one seed once a step
    went negative.
    """
    return jnp.abs(step)


def _quantize_act(rule: Rule, x, state):
    if rule.act == "pact":
        return pact(x, state["act_alpha"], bits=rule.act_bits, signed=True)
    if rule.act == "lsq":
        return lsq(x, _positive(state["act_step"]), bits=rule.act_bits, signed=True)
    return x


def _quantize_weight(rule: Rule, w, state, channel: int):
    if rule.weight == "sawb":
        return sawb_quantize(w, rule.weight_bits)
    if rule.weight == "lsq":
        return lsq(w, _positive(state["weight_step"]), bits=rule.weight_bits, signed=True)
    if rule.weight == "ternary":
        return ternary_weight(w, axis=channel)
    if rule.weight == "binary":
        return binary_weight(w, axis=channel)
    return w


def _real_lsq(rule: Rule, cfg: DotQuantConfig, state):
    """LSQ operands already sit on an integer grid: tell the dot their steps so it can run in int8.

    The LSQ rules (outside the dot) own the gradients of x, w and the steps; the
    dot only needs the steps to recover the integer codes. Only on request
    (``matmul="real"``): on this CPU the real int8 forward did not shorten the
    int8_lsq step (its backward stays float32).
    """
    if not (
        rule.act == "lsq" and rule.weight == "lsq" and cfg.lhs is None and cfg.rhs is None and cfg.matmul == "real"
    ):
        return cfg, {}
    real = dataclasses.replace(
        cfg,
        lhs=Quantizer(format=IntFormat(bits=rule.act_bits), scale=Learned()),
        rhs=Quantizer(format=IntFormat(bits=rule.weight_bits), scale=Learned()),
    )
    if not uses_real_matmul(real):
        return cfg, {}
    return real, dict(lhs_scale=_positive(state["act_step"]), rhs_scale=_positive(state["weight_step"]))


def run(
    rule: Rule,
    call: OpCall,
    lhs: jax.Array,
    rhs: jax.Array,
    state: dict[str, jax.Array],
    key: jax.Array | None,
    compute_dtype,
    *,
    name: str = "",
) -> jax.Array:
    """The op's product under ``rule``.

    Args:
      rule: how to quantize.
      call: the op.
      lhs, rhs: its operands (input and weight, or two activations).
      state: current values of the op's state (``state_init`` names); ``sr_key``
        is not read here: pass the call's key as ``key``.
      key: stochastic-rounding key of this call (``None`` when nothing rounds stochastically).
      compute_dtype: the operands are cast to it (the recipe's policy); the result
        comes back in the dtype the float op would have returned.
      name: the op's name (``lowbit.nn.op_name``), for the warnings of
        ``lowbit.recipes.carried`` about its GradScale / amax histories.

    Returns:
      The product, as the float op would return it (shape, and dtype).
    """
    out_dtype = call.preferred_element_type or jnp.result_type(lhs.dtype, rhs.dtype)
    lhs, rhs = lhs.astype(compute_dtype), rhs.astype(compute_dtype)
    lc, rc = call.axes(lhs.ndim, rhs.ndim).values()
    if _learned(rule, call):
        lhs = _quantize_act(rule, lhs, state)
        rhs = _quantize_weight(rule, rhs, state, rc[1])
    cfg, scales = _real_lsq(rule, retarget(rule.dot, call, lhs.ndim, rhs.ndim), state)
    gs = state.get("grad_scale")
    hists = {site: state[f"amax_{site}"] for site in cfg.amax_histories} or None
    carried = ({"grad_scale": gs} if gs is not None else {}) | {f"amax_{s}": h for s, h in (hists or {}).items()}
    if call.kind == "conv":
        out = quantized_conv(lhs, rhs, cfg, key=key, grad_scale=gs, amax_history=hists, **dict(call.conv))
    else:
        out = quantized_dot_general(
            lhs,
            rhs,
            call.dn,
            cfg,
            key=key,
            grad_scale=gs,
            amax_history=hists,
            precision=call.precision,
            preferred_element_type=call.preferred_element_type,
            **scales,
        )
        if call.perm is not None:
            out = jnp.transpose(out, call.perm)
    if carried:
        out = carried_checks.watch(name, out, carried)
    return out.astype(out_dtype)
