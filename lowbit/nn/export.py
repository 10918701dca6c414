"""Export a trained model's matmul weights as packed ``QTensor`` s, and load them back.

Only the kernels of quantized layers (``QLinear``, ``QConv``) are exported in the
low-precision format; biases, LayerNorms, positions and the class token stay
float32 (they are a few percent of the parameters). ``nbytes`` reports the true
storage: packed codes plus scales.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from lowbit import formats, quant
from lowbit.nn.layers import QConv, QLinear

# Per-output-channel weight quantizers; ternary and binary take their scale from
# the TWN / XNOR rule (see ``_rule``), so the exported values equal what the
# ternary / binary recipes compute in their forward pass.
EXPORTS = {
    "fp32": None,
    "fp8": quant.Quantizer(format="float8_e4m3fn", granularity="channel", axis=-1),
    "fp4": quant.Quantizer(format="float4_e2m1fn", granularity="channel", axis=-1),
    "int8": quant.Quantizer(format="int8", granularity="channel", axis=-1),
    "int4": quant.Quantizer(format="int4", granularity="channel", axis=-1),
    "ternary": quant.Quantizer(format="ternary", granularity="channel", axis=-1, scale="learned"),
    "binary": quant.Quantizer(format="binary", granularity="channel", axis=-1, scale="learned"),
}


def _prepare(name: str, w):
    """``(values, scale)`` to quantize: rule-based exports first apply their rule.

    TWN's threshold (0.7 mean|w|) is not the ternary grid's rounding midpoint
    (alpha/2), so the weights are ternarized by the rule and then stored exactly.
    """
    if name == "ternary":
        return formats.ternarize(w, axis=-1), formats.ternary_threshold(w, axis=-1)[1]
    if name == "binary":
        return w, formats.binary_scale(w, axis=-1)
    return w, None


def _kernels(model: nnx.Module):
    """``(path, layer, is_edge)``: edges are the first and last kernel."""
    layers = [("/".join(map(str, path)), m) for path, m in nnx.iter_modules(model) if isinstance(m, (QLinear, QConv))]
    for i, (path, m) in enumerate(layers):
        yield path, m, i in (0, len(layers) - 1)


def _format_of(is_edge: bool, weights: str, edges: str | None) -> str:
    """The export format of one layer: ``edges`` for the first and last layer if given."""
    return edges if edges is not None and is_edge else weights


def _check(weights: str, edges: str | None) -> None:
    for field, value in (("weights", weights), ("edges", edges)):
        if value is not None and value not in EXPORTS:
            raise ValueError(f"{field}={value!r} is invalid; allowed: {', '.join(EXPORTS)}")


def export(model: nnx.Module, weights: str, *, edges: str | None = None) -> dict:
    """Every quantized layer's kernel in format ``weights`` (see ``EXPORTS``).

    Args:
      model: a model built from ``QLinear`` / ``QConv`` layers.
      weights: the export format of the kernels.
      edges: another format for the first and last layer (roles ``patch`` and
        ``head``), e.g. ``int8`` for models trained by the ternary / binary
        recipes, which keep those layers at 8 bits.

    Returns:
      ``{layer path: QTensor}`` (``fp32``: the float32 kernels themselves).

    Raises:
      ValueError: an unknown export format.
    """
    _check(weights, edges)
    out = {}
    for path, layer, is_edge in _kernels(model):
        fmt = _format_of(is_edge, weights, edges)
        w = layer.kernel[...].astype(jnp.float32)
        values, scale = _prepare(fmt, w)
        out[path] = w if EXPORTS[fmt] is None else quant.quantize(EXPORTS[fmt], values, scale=scale)
    return out


def fake_quant_weights(model: nnx.Module, weights: str, *, edges: str | None = None) -> None:
    """Replace every exported kernel by its fake-quantized value, in place (the reference for ``load``)."""
    _check(weights, edges)
    for _, layer, is_edge in _kernels(model):
        fmt = _format_of(is_edge, weights, edges)
        w = layer.kernel[...].astype(jnp.float32)
        if EXPORTS[fmt] is not None:
            values, scale = _prepare(fmt, w)
            layer.kernel[...] = quant.fake_quant(EXPORTS[fmt], values, scale=scale)


def load(model: nnx.Module, exported: dict) -> None:
    """Write the dequantized kernels of ``exported`` into ``model``, in place.

    Raises:
      ValueError: ``exported`` does not match the model's quantized layers.
    """
    layers = {path: layer for path, layer, _ in _kernels(model)}
    if set(layers) != set(exported):
        raise ValueError(f"export has layers {sorted(exported)}, the model has {sorted(layers)}")
    for path, value in exported.items():
        w = value if isinstance(value, jax.Array) else quant.dequantize(value)
        if w.shape != layers[path].kernel[...].shape:
            raise ValueError(f"layer {path}: exported shape {w.shape} != model shape {layers[path].kernel[...].shape}")
        layers[path].kernel[...] = w.astype(layers[path].kernel[...].dtype)


def nbytes(exported: dict) -> int:
    """True storage of the exported kernels in bytes (codes + scales + zero points)."""
    return sum(v.nbytes for v in exported.values())


def bytes_per_parameter(exported: dict) -> float:
    """Storage bytes per kernel parameter."""
    count = sum(math.prod(v.shape) for v in exported.values())
    return nbytes(exported) / count
