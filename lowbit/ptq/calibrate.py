"""Static post-training quantization of any NNX model: capture, calibrate, freeze, apply.

``quantize_model`` probes a copy of the float model (``lowbit.ptq.capture``),
runs it over the calibration images with every op recording its operands, and
folds each activation operand (an op's lhs, and the rhs of a product of two
activations such as attention's ``QK^T``) into a ``lowbit.quant`` observer.
Each op then gets its own frozen ``Rule``: activations per tensor at the
calibrated step (``Fixed(step)``), weights per channel (or group, or tensor)
at a scale computed from the fixed weight. The rules form one recipe, applied by
``lowbit.quantize`` with an explicit plan (op name -> its rule) — a rule's
selectors cannot tell apart two ops of one module (attention's two einsums),
and a calibrated step belongs to one op, so the plan names each op. The result
is an ordinary quantized model: ``lowbit.describe`` lists its frozen
quantizers, ``lowbit.nn.export`` exports its weights.

Per-channel LayerNorm quantization is folded into the LayerNorm and the op's
weight first (see ``lowbit.ptq.vit``); NoisyQuant's noisy bias is op state
(see ``lowbit.ptq.noise``).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowbit import quant
from lowbit.nn.export import weight
from lowbit.nn.quantize import Op, discover, op_name, ops, quantize
from lowbit.ptq import vit
from lowbit.ptq.capture import Operands, probe, record_traced
from lowbit.ptq.config import PTQConfig
from lowbit.ptq.noise import linear_like, noisy_bias_search, quantized_weight, set_noisy_bias, with_noisy_bias
from lowbit.quant.calibrate import init as observer_init
from lowbit.quant.calibrate import scale as observer_scale
from lowbit.quant.calibrate import update as observer_update
from lowbit.recipes import op as oprule
from lowbit.recipes.rules import Recipe, Rule
from lowbit.training.qdot import DotQuantConfig

__all__ = ["quantize_model"]

_TWIN_SHIFTS = range(1, 9)


def _batches(images: np.ndarray, batch_size: int) -> Iterator[jax.Array]:
    for i in range(0, len(images), batch_size):
        yield jnp.asarray(images[i : i + batch_size])


def _activations(op: Op) -> tuple[str, ...]:
    """The operands that are activations: both for a product of two activations, the lhs for a weighted op."""
    return ("lhs",) if op.call.weighted else ("lhs", "rhs")


class _Observed:
    """Running calibration statistics of one activation operand.

    Whether the operand is ever negative decides its grid (signed or unsigned)
    but is only known after the last batch, so the statistics of both
    quantizers are kept (one compiled update per batch covers every operand).
    """

    def __init__(self, name: str, operand: str, cfg: PTQConfig, after_layernorm: bool):
        self.quantizers = tuple(
            vit.activation_quantizer(name, operand, cfg, nonnegative=sign, after_layernorm=after_layernorm)
            for sign in (False, True)
        )
        self.static = not cfg.dynamic
        self.nonnegative = True
        self.states: tuple = ()

    def init(self, shape) -> dict:
        x = jax.ShapeDtypeStruct(shape, jnp.float32)  # the scales' shape does not depend on the batch size
        states = tuple(observer_init(qz, x) for qz in self.quantizers) if self.static else ()
        return dict(min=jnp.asarray(jnp.inf, jnp.float32), states=states)

    @property
    def quantizer(self) -> quant.Quantizer:
        return self.quantizers[self.nonnegative]

    def params(self):
        return observer_scale(self.quantizer, self.states[self.nonnegative])


@functools.partial(jax.jit, static_argnums=(0, 2))
def _observe_batch(graphdef, state, specs, stats, images):
    """One calibration batch: every op's operands recorded and folded into the running statistics."""
    calls = record_traced(nnx.merge(graphdef, state), images)[1]
    new = {}
    for key, quantizers in specs:
        x = getattr(calls[key[0]], key[1])
        old = stats[key]
        new[key] = dict(
            min=jnp.minimum(old["min"], jnp.min(x).astype(jnp.float32)),
            states=tuple(observer_update(qz, st, x) for qz, st in zip(quantizers, old["states"])),
        )
    return new, calls


def _after_layernorm(model, name: str, cfg: PTQConfig) -> bool:
    """Whether op ``name``'s lhs is the output of a LayerNorm of ``model`` (``cfg.layernorm_ops``)."""
    path = vit.layernorm_of(name, cfg)
    return path is not None and vit.module_at(model, path) is not None


def _observe(probed, found, cfg: PTQConfig, images: np.ndarray) -> tuple[dict, dict[str, Operands]]:
    """Statistics of every activation operand, and the first batch's operands."""
    observed, stats = {}, {}
    for op in found:
        name = op_name(op.path, op.key)
        for operand in _activations(op):
            obs = _Observed(name, operand, cfg, operand == "lhs" and _after_layernorm(probed, name, cfg))
            observed[name, operand] = obs
            stats[name, operand] = obs.init(op.lhs_shape if operand == "lhs" else op.rhs_shape)
    specs = tuple((key, obs.quantizers if obs.static else ()) for key, obs in observed.items())
    graphdef, state = nnx.split(probed)
    sample = None
    for batch in _batches(images, cfg.batch_size):
        stats, calls = _observe_batch(graphdef, state, specs, stats, batch)
        sample = calls if sample is None else sample
    for key, obs in observed.items():
        obs.nonnegative = bool(stats[key]["min"] >= 0)
        obs.states = stats[key]["states"]
    return observed, sample


@functools.partial(jax.jit, static_argnums=0)
def _errors(candidates, x):
    return jnp.stack([jnp.sum(jnp.square(quant.fake_quant(c, x) - x)) for c in candidates])


def _best_twin_shift(qz, x) -> quant.Quantizer:
    """PTQ4ViT's search of the fine range: the shift with the least squared error on ``x``."""
    candidates = tuple(dataclasses.replace(qz, kind=dataclasses.replace(qz.kind, shift=s)) for s in _TWIN_SHIFTS)
    return candidates[int(np.argmin(_errors(candidates, jnp.asarray(x, jnp.float32))))]


def _fold(work, op: Op, name: str, cfg: PTQConfig, qz, params, sample: dict) -> tuple[float, dict[str, Any]]:
    """Fold a per-channel LayerNorm quantizer into the LayerNorm and the op's weight; the common step."""
    (lc, rc), (lb, _) = op.call.dn or ((None, ()), ((), ()))  # a convolution has no dot dimension numbers
    if not (op.call.weighted and op.call.kind != "conv" and not lb and lc == (len(op.lhs_shape) - 1,) and len(rc) == 1):
        raise ValueError(
            f"PTQConfig.layernorm_ops: op {name} cannot fold per-channel LayerNorm steps (allowed: "
            "an op with a weight and one contracting axis, the last of its lhs)"
        )
    r, step = vit.folding(qz, params)
    param = weight(vit.module_at(work, op.path), op)
    vit.fold_layernorm(vit.module_at(work, vit.layernorm_of(name, cfg)), param, r, rc[0])
    lhs = sample[name].lhs
    sample[name] = Operands(lhs / jnp.asarray(r, lhs.dtype), param[...], sample[name].out)
    return step, dict(fold_ratio_max=float(np.max(r) / np.min(r)))


def _freeze(
    work, op: Op, name: str, operand: str, cfg: PTQConfig, obs: _Observed, sample: dict
) -> tuple[quant.Quantizer, dict[str, Any]]:
    """The frozen quantizer of one activation operand (folding a per-channel one first)."""
    qz = obs.quantizer
    if cfg.dynamic:
        return qz, {}
    params = obs.params()
    info: dict[str, Any] = {}
    if isinstance(qz.granularity, quant.Channel):
        step, info = _fold(work, op, name, cfg, qz, params, sample)
        fixed = vit.fixed_quantizer(qz, params, step)
    else:
        fixed = vit.fixed_quantizer(qz, params)
    if isinstance(fixed.kind, quant.Twin) and fixed.kind.split == "magnitude":
        fixed = _best_twin_shift(fixed, getattr(sample[name], operand))
    if operand == "lhs":
        info["step"] = fixed.scale.step
    return fixed, info


def _describe(qz: quant.Quantizer | None) -> str:
    return "float" if qz is None else str(qz)


def _fixed_step(qz: quant.Quantizer) -> float | None:
    """The frozen step of a calibrated quantizer; None for a dynamic one."""
    return qz.scale.step if isinstance(qz.scale, quant.Fixed) else None


def _module_state(qmodel, op: Op):
    """The ``OpState`` of one op of a quantized model (the ``lowbit_<key>`` child of its module)."""
    return getattr(vit.module_at(qmodel, op.path), f"lowbit_{op.key}")


def quantize_model(model: nnx.Module, images: np.ndarray, cfg: PTQConfig) -> tuple[nnx.Module, list[dict[str, Any]]]:
    """Post-training quantization of a float NNX model.

    Args:
      model: a float NNX model (written without lowbit, or the built-in ones);
        unchanged. Every matmul and convolution its forward pass runs is
        quantized.
      images: calibration images ``(N, ...)``, the model's input (with
        ``dynamic`` only the first finds the ops and the signs of the activations).
      cfg: the setting.

    Returns:
      ``(quantized, rows)``: the quantized model (from ``lowbit.quantize``, eval
      mode; LayerNorms and weights folded where ``layernorm`` is ``channel`` /
      ``ptf``) and one dict per op in forward order: ``name`` (``path:key``),
      ``kind``, the ``lhs`` / ``rhs`` quantizers (as text), the activation
      ``step`` and, where applied, the fold's ``fold_ratio_max`` and the
      ``noisy_bias`` amplitude (in input steps).

    Raises:
      ValueError: no images; a model that is already quantized; a
        ``layernorm_ops`` entry that names no LayerNorm or an op that cannot fold.
    """
    if len(images) == 0:
        raise ValueError("quantize_model: calibration needs at least one image; images is empty")
    work = nnx.clone(model)
    work.eval()
    probed = probe(work, images[:1])
    found = ops(probed)
    observed, sample = _observe(probed, found, cfg, images)
    rules, plan, rows = [], {}, []
    for op in found:
        name = op_name(op.path, op.key)
        row: dict[str, Any] = dict(name=name, kind=op.call.kind)
        lhs, info = _freeze(work, op, name, "lhs", cfg, observed[name, "lhs"], sample)
        row.update(info)
        if op.call.weighted:
            rhs = vit.weight_quantizer(cfg)
        else:
            rhs, _ = _freeze(work, op, name, "rhs", cfg, observed[name, "rhs"], sample)
        plan[name] = len(rules)
        rules.append(
            Rule(
                path=re.escape(op.path),
                kinds=(op.call.kind,),
                operands="weight" if op.call.weighted else "activation",
                dot=DotQuantConfig(lhs=lhs, rhs=rhs),
            )
        )
        rows.append(dict(row, lhs=_describe(lhs), rhs=_describe(rhs)))
    recipe = Recipe(name=f"ptq-{cfg.label}", rules=tuple(rules))
    quantized = quantize(work, recipe, plan=plan)
    discover(quantized, jnp.asarray(images[:1]))
    if cfg.noisy_bias and _add_noisy_biases(quantized, found, rules, plan, rows, sample, cfg):
        with_noisy_bias(quantized)
    return quantized, rows


def _add_noisy_biases(quantized, found, rules, plan, rows, sample, cfg: PTQConfig) -> bool:
    """NoisyQuant on every ``x @ W`` op with a uniform input quantizer; whether any op kept a noise."""
    key, added = jax.random.key(cfg.seed), False
    for i, (op, row) in enumerate(zip(found, rows)):
        name = row["name"]
        x, w = sample[name].lhs, sample[name].rhs
        rule = rules[plan[name]]
        if not (linear_like(op.call, x.ndim, w.ndim) and isinstance(rule.dot.lhs.kind, quant.Uniform)):
            continue
        config = oprule.retarget(rule.dot, op.call, x.ndim, w.ndim)
        noise, amplitude = noisy_bias_search(
            config, x, w, op.call.dn, _fixed_step(rule.dot.lhs), jax.random.fold_in(key, i)
        )
        row["noisy_bias"] = amplitude
        if noise is not None:
            set_noisy_bias(_module_state(quantized, op), noise, quantized_weight(config, jnp.asarray(w, jnp.float32)))
            added = True
    return added
