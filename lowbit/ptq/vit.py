"""ViT-specific choices: which quantizer each matmul operand gets, and LayerNorm folding.

Three activations of a ViT are far from the bell shape a uniform grid suits
(FQ-ViT, PTQ4ViT, RepQ-ViT):

* softmax probabilities (``attn_av``'s lhs): most mass near 0, a few near 1;
  ``log2`` or ``twin`` (a fine step near zero) keep the small ones apart;
* GELU outputs (``mlp_out``'s lhs): a short negative tail down to -0.17 and a
  long positive one; ``twin`` gives the negative side its own, finer step;
* LayerNorm outputs (lhs of ``qkv``, ``mlp_in``, ``head``): a few channels
  are many times wider than the rest; ``channel`` / ``ptf`` give each channel
  its own step.

Per-channel activation steps have no place in a per-tensor integer matmul, so
(as RepQ-ViT does) they are folded away: channel ``c`` of the LayerNorm output
is divided by ``r_c`` (the LayerNorm's scale and bias are divided by it) and row
``c`` of the next weight is multiplied by it. The product is unchanged and the
activation is then quantized per tensor. ``ptf`` keeps FQ-ViT's power-of-two
``r_c``; the weights are quantized after folding (FQ-ViT shifts the integer
activations instead, which a fake-quantized matmul cannot express).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowbit import formats
from lowbit.quant import QParams, Quantizer
from lowbit.ptq.config import PTQConfig

__all__ = ["activation_quantizer", "fixed_quantizer", "fold_layernorm", "folding", "input_norm", "weight_quantizer"]

# Operands that are never negative: pixels in [0, 1] and softmax probabilities.
# An integer grid spends its sign bit on them for nothing, so they get the unsigned one.
_NONNEGATIVE = {("patch", "lhs"), ("attn_av", "lhs")}
_AFTER_LAYERNORM = ("qkv", "mlp_in", "head")


def _unsigned(fmt):
    name = f"uint{fmt.bits}"
    return formats.get(name) if name in formats.names() else formats.IntFormat(bits=fmt.bits, signed=False, name=name)


def _kind(role: str, operand: str, cfg: PTQConfig) -> dict:
    """Quantizer fields beyond a per-tensor uniform grid for this operand."""
    if operand != "lhs":
        return {}
    if role == "attn_av":
        return {"log2": dict(kind="log2"), "twin": dict(kind="twin_uniform", twin_split="magnitude"),
                "uniform": {}}[cfg.softmax]
    if role == "mlp_out" and cfg.gelu == "twin":
        return dict(kind="twin_uniform", twin_split="sign")
    if role in _AFTER_LAYERNORM and cfg.layernorm != "tensor":
        kind = dict(kind="ptf") if cfg.layernorm == "ptf" else {}
        return dict(granularity="channel", axis=-1, **kind)
    return {}


def activation_quantizer(role: str, operand: str, cfg: PTQConfig) -> Quantizer:
    """The activation quantizer of one operand: an observer's (static) or the dynamic one.

    Args:
      role: the matmul's role (``qkv``, ``attn_av``, ...).
      operand: ``lhs`` or ``rhs``.
      cfg: the PTQ setting.
    """
    kw = _kind(role, operand, cfg)
    fmt = cfg.activation_format
    if (role, operand) in _NONNEGATIVE and isinstance(fmt, formats.IntFormat) and fmt.signed:
        fmt = _unsigned(fmt)
    source = cfg.calibration
    if source == "kl" and kw:
        source = "mse"  # kl searches one magnitude clip of a uniform grid
    if kw.get("kind") == "ptf" and source not in ("absmax", "percentile"):
        source = "absmax"  # the factors already adapt to each channel's range
    return Quantizer(format=fmt, scale=source, percentile=cfg.percentile, static=not cfg.dynamic, **kw)


def weight_quantizer(cfg: PTQConfig) -> Quantizer:
    """The quantizer of a ``(in, out)`` kernel.

    It computes its scale from the weight on every call, which for a fixed
    weight is a static scale (and costs nothing next to the activations).
    """
    if cfg.granularity == "tensor":
        kw = {}
    elif cfg.granularity == "channel":
        kw = dict(granularity="channel", axis=-1)  # one scale per output unit
    else:
        kw = dict(granularity="group", axis=0, group_size=cfg.group_size)  # groups run along the inputs
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


def input_norm(model: nnx.Module, name: str) -> nnx.LayerNorm:
    """The LayerNorm whose output layer ``name`` (a ``qkv``, ``mlp_in`` or ``head``) takes."""
    parts = name.split(".")
    if parts[-1] == "head":
        return model.norm
    block = model.blocks[int(parts[1])]
    return block.norm1 if parts[-1] == "qkv" else block.norm2


def fold_layernorm(norm: nnx.LayerNorm, kernel: nnx.Param, r) -> None:
    """Divide LayerNorm output channel ``c`` by ``r[c]`` and multiply row ``c`` of ``kernel`` by it."""
    r = jnp.asarray(r, jnp.float32)
    norm.scale[...] = norm.scale[...] / r.astype(norm.scale[...].dtype)
    norm.bias[...] = norm.bias[...] / r.astype(norm.bias[...].dtype)
    kernel[...] = kernel[...] * r[:, None].astype(kernel[...].dtype)
