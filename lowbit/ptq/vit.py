"""ViT-specific choices: which quantizer each op operand gets, and LayerNorm folding.

Three activations of a ViT are far from the bell shape a uniform grid suits
(FQ-ViT, PTQ4ViT, RepQ-ViT):

* softmax probabilities (the lhs of ``PTQConfig.softmax_ops``): most mass near
  0, a few near 1; ``log2`` or ``twin`` (a fine step near zero) keep the small
  ones apart;
* GELU outputs (the lhs of ``gelu_ops``): a short negative tail down to -0.17
  and a long positive one; ``twin`` gives the negative side its own, finer step;
* LayerNorm outputs (the lhs of ``layernorm_ops``): a few channels are many
  times wider than the rest; ``channel`` / ``ptf`` give each channel its own step.

Where a model has these ops is said by regexes on op names (``path:key``), with
defaults that fit the built-in ViT; any model with such ops can name its own.
An activation that is never negative on the calibration images (pixels,
softmax probabilities, ReLU outputs) gets the unsigned integer grid: a signed
one would spend its sign bit on nothing.

Per-channel activation steps have no place in a per-tensor integer matmul, so
(as RepQ-ViT does) they are folded away: channel ``c`` of the LayerNorm output
is divided by ``r_c`` (the LayerNorm's scale and bias are divided by it) and
row ``c`` of the op's weight (along its contracting axis) is multiplied by it.
The product is unchanged and the activation is then quantized per tensor.
``ptf`` keeps FQ-ViT's power-of-two ``r_c``; the weights are quantized after
folding (FQ-ViT shifts the integer activations instead, which a fake-quantized
matmul cannot express).
"""

from __future__ import annotations

import dataclasses
import re

import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowbit import formats
from lowbit.ptq.config import PTQConfig
from lowbit.quant import QParams, Quantizer

__all__ = [
    "activation_quantizer",
    "fixed_quantizer",
    "fold_layernorm",
    "folding",
    "layernorm_of",
    "module_at",
    "weight_quantizer",
]


def _unsigned(fmt):
    name = f"uint{fmt.bits}"
    return formats.get(name) if name in formats.names() else formats.IntFormat(bits=fmt.bits, signed=False, name=name)


def layernorm_of(name: str, cfg: PTQConfig) -> str | None:
    """The path of the LayerNorm whose output op ``name`` takes as lhs (``cfg.layernorm_ops``), or None.

    A path that names no module of the model means the op is no LayerNorm
    reader there (the defaults fit the built-in ViT; the CNN's ``head`` reads
    no ``norm``): the caller checks (``module_at``).
    """
    for pattern, norm in cfg.layernorm_ops:
        m = re.fullmatch(pattern, name)
        if m is not None:
            return m.expand(norm)
    return None


def _kind(name: str, operand: str, cfg: PTQConfig, after_layernorm: bool) -> dict:
    """Quantizer fields beyond a per-tensor uniform grid for this operand."""
    if operand != "lhs":
        return {}
    if re.fullmatch(cfg.softmax_ops, name):
        return {"log2": dict(kind="log2"), "twin": dict(kind="twin_uniform", twin_split="magnitude"), "uniform": {}}[
            cfg.softmax
        ]
    if cfg.gelu == "twin" and re.fullmatch(cfg.gelu_ops, name):
        return dict(kind="twin_uniform", twin_split="sign")
    if cfg.layernorm != "tensor" and after_layernorm:
        kind = dict(kind="ptf") if cfg.layernorm == "ptf" else {}
        return dict(granularity="channel", axis=-1, **kind)
    return {}


def activation_quantizer(
    name: str, operand: str, cfg: PTQConfig, *, nonnegative: bool = False, after_layernorm: bool = False
) -> Quantizer:
    """The activation quantizer of one operand: an observer's (static) or the dynamic one.

    Args:
      name: the op's name (``blocks/0/attn:einsum1``).
      operand: ``lhs`` or ``rhs``.
      cfg: the PTQ setting.
      nonnegative: the operand was never negative on the calibration images:
        a signed integer format is replaced by its unsigned twin (not for
        ``twin`` GELU, whose sign picks the step).
      after_layernorm: the lhs is a LayerNorm's output (``layernorm_of`` names
        a module the model has): per-channel ``layernorm`` quantizers apply.
    """
    kw = _kind(name, operand, cfg, after_layernorm)
    fmt = cfg.activation_format
    if (
        nonnegative
        and isinstance(fmt, formats.IntFormat)
        and fmt.signed
        and kw.get("twin_split") != "sign"
        and kw.get("granularity") != "channel"
    ):
        fmt = _unsigned(fmt)
    source = cfg.calibration
    if source == "kl" and kw:
        source = "mse"  # kl searches one magnitude clip of a uniform grid
    if kw.get("kind") == "ptf" and source not in ("absmax", "percentile"):
        source = "absmax"  # the factors already adapt to each channel's range
    return Quantizer(format=fmt, scale=source, percentile=cfg.percentile, static=not cfg.dynamic, **kw)


def weight_quantizer(cfg: PTQConfig) -> Quantizer:
    """The quantizer of an op's weight.

    Its axis is set per op when the op runs (``lowbit.recipes.op.retarget``):
    per ``channel`` one scale per output channel, per ``group`` groups along
    the contracting (input) axis. It computes its scale from the weight on every
    call, which for a fixed weight is a static scale (and costs nothing next to
    the activations).
    """
    if cfg.granularity == "tensor":
        kw = {}
    elif cfg.granularity == "channel":
        kw = dict(granularity="channel")
    else:
        kw = dict(granularity="group", group_size=cfg.group_size)
    return Quantizer(format=cfg.weight_format, scale=cfg.weight_source, percentile=cfg.percentile, **kw)


def fixed_quantizer(q: Quantizer, params: QParams, step: float | None = None) -> Quantizer:
    """The calibrated, per-tensor quantizer: ``q`` with its step frozen.

    Args:
      q: the observer's quantizer (per tensor: uniform, log2 or twin).
      params: its calibrated parameters.
      step: overrides the step (a folded per-channel quantizer's common step).
    """
    if step is None:
        step = float(np.max(np.asarray(params.step())))
    kw = dict(granularity="tensor", axis=-1, kind="uniform" if q.kind == "ptf" else q.kind)
    if q.kind == "twin_uniform" and q.twin_split == "sign":
        # The calibrated ratio of the positive (coarse) to the negative (fine) step.
        kw["twin_shift"] = int(np.clip(np.max(np.asarray(params.exponent)), 1, 30))
    return dataclasses.replace(q, scale="fixed", fixed_scale=step, static=False, **kw)


def folding(q: Quantizer, params: QParams) -> tuple[np.ndarray, float]:
    """``(r, step)`` of a per-channel quantizer: channel divisors ``r_c`` and the common per-tensor step."""
    if q.kind == "ptf":
        r = np.exp2(np.asarray(params.exponent, np.float64)).ravel()
        return r.astype(np.float32), float(np.max(np.asarray(params.step())))
    steps = np.asarray(params.step(), np.float64).ravel()
    common = float(np.mean(steps))
    return (steps / common).astype(np.float32), common


def module_at(model: nnx.Module, path: str) -> nnx.Module | None:
    """The module of ``model`` at ``path`` (``blocks/0/norm1``), or None."""
    for p, m in nnx.iter_modules(model):
        if "/".join(map(str, p)) == path:
            return m
    return None


def fold_layernorm(norm: nnx.Module, weight: nnx.Param, r, axis: int) -> None:
    """Divide LayerNorm output channel ``c`` by ``r[c]`` and multiply index ``c`` of ``weight``'s ``axis`` by it.

    Args:
      norm: a LayerNorm-like module: ``scale`` and (optionally) ``bias`` parameters of shape ``(C,)``.
      weight: the weight of the op that reads the LayerNorm's output.
      r: ``(C,)`` positive divisors.
      axis: the weight's contracting axis (the one that meets the LayerNorm's channels).

    Raises:
      ValueError: ``norm`` has no ``(C,)`` scale.
    """
    r = jnp.asarray(r, jnp.float32)
    scale = getattr(norm, "scale", None)
    if not isinstance(scale, nnx.Param) or scale[...].shape != r.shape:
        raise ValueError(f"{type(norm).__name__} has no scale parameter of shape {r.shape} to fold into")
    scale[...] = scale[...] / r.astype(scale[...].dtype)
    bias = getattr(norm, "bias", None)
    if isinstance(bias, nnx.Param):
        bias[...] = bias[...] / r.astype(bias[...].dtype)
    shape = [1] * weight[...].ndim
    shape[axis] = -1
    weight[...] = weight[...] * r.reshape(shape).astype(weight[...].dtype)
