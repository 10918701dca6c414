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
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowbit import formats
from lowbit.ptq.config import SOURCES, PTQConfig
from lowbit.quant import (
    PTF,
    Channel,
    Fixed,
    Group,
    Log2,
    Percentile,
    QParams,
    Quantizer,
    Tensor,
    Twin,
    Uniform,
)
from lowbit.quant.granularity import Granularity
from lowbit.quant.sources import Scale

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


def _kind(name: str, operand: str, cfg: PTQConfig, after_layernorm: bool) -> dict[str, Any]:
    """Quantizer parts beyond a per-tensor uniform grid for this operand."""
    if operand != "lhs":
        return {}
    if re.fullmatch(cfg.softmax_ops, name):
        softmax: dict[str, dict[str, Any]] = {"log2": dict(kind=Log2()), "twin": dict(kind=Twin(split="magnitude"))}
        return softmax.get(cfg.softmax, {})
    if cfg.gelu == "twin" and re.fullmatch(cfg.gelu_ops, name):
        return dict(kind=Twin(split="sign"))
    if cfg.layernorm != "tensor" and after_layernorm:
        kind = dict(kind=PTF()) if cfg.layernorm == "ptf" else {}
        return dict(granularity=Channel(axis=-1), **kind)
    return {}


def source(name: str, cfg: PTQConfig, static: bool = False) -> Scale:
    """The scale source of a calibration method's name (``PTQConfig.calibration``)."""
    if name == "percentile":
        return Percentile(q=cfg.percentile, static=static)
    return SOURCES[name](static=static)


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
        and kw.get("kind") != Twin(split="sign")
        and "granularity" not in kw
    ):
        fmt = _unsigned(fmt)
    method = cfg.calibration
    if method == "kl" and kw:
        method = "mse"  # kl searches one magnitude clip of a uniform grid
    if isinstance(kw.get("kind"), PTF) and method not in ("absmax", "percentile"):
        method = "absmax"  # the factors already adapt to each channel's range
    return Quantizer(format=fmt, scale=source(method, cfg, static=not cfg.dynamic), **kw)


def weight_quantizer(cfg: PTQConfig) -> Quantizer:
    """The quantizer of an op's weight.

    Its axis is set per op when the op runs (``lowbit.recipes.op.retarget``):
    per ``channel`` one scale per output channel, per ``group`` groups along
    the contracting (input) axis. It computes its scale from the weight on every
    call, which for a fixed weight is a static scale (and costs nothing next to
    the activations).
    """
    granularity: Granularity = Group(size=cfg.group_size)
    if cfg.granularity == "tensor":
        granularity = Tensor()
    elif cfg.granularity == "channel":
        granularity = Channel()
    return Quantizer(format=cfg.weight_format, granularity=granularity, scale=source(cfg.weight_source, cfg))


def fixed_quantizer(q: Quantizer, params: QParams, step: float | None = None) -> Quantizer:
    """The calibrated, per-tensor quantizer: ``q`` with its step frozen.

    Args:
      q: the observer's quantizer (per tensor: uniform, log2 or twin).
      params: its calibrated parameters.
      step: overrides the step (a folded per-channel quantizer's common step).
    """
    if step is None:
        step = float(np.max(np.asarray(params.step())))
    kind = (
        Uniform(symmetric=q.kind.symmetric, zero_point_range=q.kind.zero_point_range)
        if isinstance(q.kind, PTF)
        else q.kind
    )
    if isinstance(kind, Twin) and kind.split == "sign":
        # The calibrated ratio of the positive (coarse) to the negative (fine) step.
        kind = Twin(split="sign", shift=int(np.clip(np.max(np.asarray(params.exponent)), 1, 30)))
    return dataclasses.replace(q, granularity=Tensor(), scale=Fixed(step=step), kind=kind)


def folding(q: Quantizer, params: QParams) -> tuple[np.ndarray, float]:
    """``(r, step)`` of a per-channel quantizer: channel divisors ``r_c`` and the common per-tensor step."""
    if isinstance(q.kind, PTF):
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
