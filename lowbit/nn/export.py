"""Export the weights of a quantized model's ops as packed ``QTensor`` s, and load them back.

Works on any model from ``lowbit.quantize`` whose ops were discovered (it ran
once, or ``lowbit.describe`` / ``discover`` ran on it). The exported tensors are
the weights of its *weighted* ops (``lowbit.recipes.OpInfo.weighted``): the
kernel of an ``nnx.Linear`` / ``nnx.Conv`` / ``nnx.Einsum``, or the parameter a
raw ``x @ w`` / ``jnp.einsum`` reads. An op's weight is the parameter of the
module that runs it whose shape equals the op's rhs (``weight``); an op whose
rhs is no such parameter (a weight computed in the forward pass, or two
same-shaped parameters) cannot be exported and is named in a ``ValueError``.
Biases, norms, positions and the class token stay float32 (a few percent of
the parameters). ``nbytes`` reports the true storage: packed codes plus scales.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from lowbit import formats, quant
from lowbit.nn.quantize import Op, is_quantized, op_name, ops

__all__ = ["EXPORTS", "bytes_per_parameter", "export", "fake_quant_weights", "load", "nbytes", "weight", "weights"]

# Per-output-channel weight quantizers (the axis is set per op); ternary and
# binary take their scale from the TWN / XNOR rule (see ``_prepare``), so the
# exported values equal what the ternary / binary recipes compute in their
# forward pass. The block formats (MX: 32-blocks, E8M0 scales; NVFP4: 16-blocks,
# E4M3 scales under an FP32 tensor scale) block along the op's contracting axis
# (the weight's last contracted one, as ``lowbit.quantize`` places them; a last
# partial block has its own scale).
EXPORTS = {
    "fp32": None,
    "fp8": quant.Quantizer(format="float8_e4m3fn", granularity=quant.Channel()),
    "fp4": quant.Quantizer(format="float4_e2m1fn", granularity=quant.Channel()),
    "int8": quant.Quantizer(format="int8", granularity=quant.Channel()),
    "int4": quant.Quantizer(format="int4", granularity=quant.Channel()),
    "ternary": quant.Quantizer(format="ternary", granularity=quant.Channel(), scale=quant.Learned()),
    "binary": quant.Quantizer(format="binary", granularity=quant.Channel(), scale=quant.Learned()),
    "nf4": quant.Quantizer(format="nf4", granularity=quant.Channel()),
    "mxfp8": quant.Quantizer(format="mxfp8_e4m3"),
    "mxfp4": quant.Quantizer(format="mxfp4_e2m1"),
    "nvfp4": quant.Quantizer(format="nvfp4"),
}


def weight(module: nnx.Module, op: Op) -> nnx.Param:
    """The parameter of ``module`` that op ``op`` (run by ``module``) reads as its rhs.

    Raises:
      ValueError: not exactly one of the module's own parameters has the rhs's shape.
    """
    found = [
        v
        for name, v in vars(module).items()
        if isinstance(v, nnx.Param) and not name.startswith("lowbit_") and tuple(v[...].shape) == op.rhs_shape
    ]
    if len(found) != 1:
        what = "no parameter" if not found else f"{len(found)} parameters"
        raise ValueError(
            f"op {op_name(op.path, op.key)}: its module ({type(module).__name__}) has {what} shaped "
            f"like its rhs {op.rhs_shape}; allowed: exactly one (the weight it multiplies by)"
        )
    return found[0]


def _channel_axis(op: Op) -> int:
    """The weight's output-channel axis (where per-channel scales run), non-negative."""
    return op.call.axes(len(op.lhs_shape), len(op.rhs_shape))["rhs"][1] % len(op.rhs_shape)


def weights(qmodel: nnx.Module) -> list[tuple[str, Op, nnx.Param, bool]]:
    """``(op name, op, weight parameter, is_edge)`` of every weighted op, in forward order.

    ``is_edge``: the first or last weighted op. A parameter read by several ops
    (tied weights) is listed once, at its first op.

    Raises:
      TypeError: ``qmodel`` is not an NNX model from ``lowbit.quantize``.
      ValueError: its ops were not discovered, or a weight cannot be found (see ``weight``).
    """
    if not isinstance(qmodel, nnx.Module) or not is_quantized(qmodel):
        raise TypeError(f"model={type(qmodel).__name__} is invalid; allowed: an NNX model from lowbit.quantize")
    if not ops(qmodel):
        raise ValueError(
            "export: the model's ops are not discovered yet; call it once (or lowbit.describe(model, x)) first"
        )
    modules = {"/".join(map(str, path)): m for path, m in nnx.iter_modules(qmodel)}
    found = [op for op in ops(qmodel) if op.call.weighted]
    out, seen = [], set()
    for i, op in enumerate(found):
        param = weight(modules[op.path], op)
        if id(param) not in seen:
            seen.add(id(param))
            out.append((op_name(op.path, op.key), op, param, i in (0, len(found) - 1)))
    return out


def _quantizer(fmt: str, op: Op) -> quant.Quantizer | None:
    """The export quantizer of ``fmt`` placed on ``op``'s weight: channels on its outputs, blocks along its inputs."""
    qz = EXPORTS[fmt]
    if qz is None:
        return None
    if isinstance(qz.granularity, quant.Channel):
        return qz.along(_channel_axis(op))
    contract = op.call.axes(len(op.lhs_shape), len(op.rhs_shape))["rhs"][0] % len(op.rhs_shape)
    return qz.along(contract)


def _prepare(fmt: str, w, axis: int):
    """``(values, scale)`` to quantize: rule-based exports first apply their rule.

    TWN's threshold (0.7 mean|w|) is not the ternary grid's rounding midpoint
    (alpha/2), so the weights are ternarized by the rule and then stored exactly.
    """
    if fmt == "ternary":
        return formats.ternarize(w, axis=axis), formats.ternary_threshold(w, axis=axis)[1]
    if fmt == "binary":
        return w, formats.binary_scale(w, axis=axis)
    return w, None


def _format_of(is_edge: bool, weights_fmt: str, edges: str | None) -> str:
    """The export format of one weight: ``edges`` for the first and last weighted op if given."""
    return edges if edges is not None and is_edge else weights_fmt


def _check(weights_fmt: str, edges: str | None) -> None:
    for field, value in (("weights", weights_fmt), ("edges", edges)):
        if value is not None and value not in EXPORTS:
            raise ValueError(f"{field}={value!r} is invalid; allowed: {', '.join(EXPORTS)}")


def export(qmodel: nnx.Module, weights_fmt: str, *, edges: str | None = None) -> dict:
    """The weight of every weighted op in format ``weights_fmt`` (see ``EXPORTS``), per output channel.

    Args:
      qmodel: an NNX model from ``lowbit.quantize``, its ops discovered.
      weights_fmt: the export format of the weights.
      edges: another format for the first and last weighted op of the forward
        pass, e.g. ``int8`` for models trained by the ternary / binary recipes,
        which keep those ops at 8 bits.

    Returns:
      ``{op name ("path:key"): QTensor}`` (``fp32``: the float32 weights themselves).

    Raises:
      ValueError: an unknown export format, undiscovered ops, or an op whose weight cannot be found.
    """
    _check(weights_fmt, edges)
    out = {}
    for name, op, param, is_edge in weights(qmodel):
        fmt = _format_of(is_edge, weights_fmt, edges)
        w = param[...].astype(jnp.float32)
        qz = _quantizer(fmt, op)
        values, scale = _prepare(fmt, w, _channel_axis(op))
        out[name] = w if qz is None else quant.quantize(qz, values, scale=scale)
    return out


def fake_quant_weights(qmodel: nnx.Module, weights_fmt: str, *, edges: str | None = None) -> None:
    """Replace every exported weight by its fake-quantized value, in place (the reference for ``load``)."""
    _check(weights_fmt, edges)
    for _, op, param, is_edge in weights(qmodel):
        fmt = _format_of(is_edge, weights_fmt, edges)
        qz = _quantizer(fmt, op)
        if qz is not None:
            values, scale = _prepare(fmt, param[...].astype(jnp.float32), _channel_axis(op))
            param[...] = quant.fake_quant(qz, values, scale=scale).astype(param[...].dtype)


def load(qmodel: nnx.Module, exported: dict) -> None:
    """Write the dequantized weights of ``exported`` into ``qmodel``, in place.

    Raises:
      ValueError: ``exported`` does not match the model's weighted ops.
    """
    params = {name: param for name, _, param, _ in weights(qmodel)}
    if set(params) != set(exported):
        raise ValueError(f"export has ops {sorted(exported)}, the model has {sorted(params)}")
    for name, value in exported.items():
        w = value if isinstance(value, jax.Array) else quant.dequantize(value)
        if w.shape != params[name][...].shape:
            raise ValueError(f"op {name}: exported shape {w.shape} != model shape {params[name][...].shape}")
        params[name][...] = w.astype(params[name][...].dtype)


def nbytes(exported: dict) -> int:
    """True storage of the exported weights in bytes (codes + scales + zero points)."""
    return sum(v.nbytes for v in exported.values())


def bytes_per_parameter(exported: dict) -> float:
    """Storage bytes per weight parameter."""
    count = sum(math.prod(v.shape) for v in exported.values())
    return nbytes(exported) / count
