"""The quantized matmuls of a ViT, by name and role, and a recorder of their operands.

Recording uses the ``capture`` hook of ``lowbit.nn`` layers: while a layer's
``capture`` is a list, every call appends its raw ``(lhs, rhs,
dimension_numbers)``. Inside a traced function (``jit``, ``grad``) the recorded
operands are tracers of that trace, so they may only be used there; ``record``
runs the whole forward pass as one compiled function and returns them as arrays
(an eager forward pass would compile every operation on its own).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from lowbit.nn.layers import QEinsum, QLinear
from lowbit.training.qdot import DotQuantConfig, quantized_dot_general

__all__ = ["ROLES", "Operands", "layer_output", "quantized_layers", "record", "recording", "role_of",
           "set_child"]

# Attribute name in the ViT -> matmul role (lowbit.recipes.ROLES), in forward order.
ROLES = {"patch_embed": "patch", "qkv": "qkv", "qk": "attn_qk", "av": "attn_av", "proj": "proj",
         "mlp_in": "mlp_in", "mlp_out": "mlp_out", "head": "head"}
WRAPPED = "inner"  # attribute under which lowbit.ptq wrappers keep the layer they wrap

Operands = tuple  # (lhs, rhs, dimension_numbers) of one call


def role_of(name: str) -> str:
    """The matmul role of a layer called ``name`` (e.g. ``blocks.0.attn.qkv`` -> ``qkv``)."""
    return ROLES[name.split(".")[-1]]


def _order(name: str) -> tuple:
    parts = name.split(".")
    block = int(parts[1]) if parts[0] == "blocks" else (-1 if parts[0] == "patch_embed" else 1 << 30)
    return block, list(ROLES).index(parts[-1])


def quantized_layers(model: nnx.Module) -> dict[str, QLinear | QEinsum]:
    """Every ``QLinear`` / ``QEinsum`` of a ViT by dotted name, in the order the forward pass calls them."""
    found = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, (QLinear, QEinsum)):
            found[".".join(str(p) for p in path if p != WRAPPED)] = node
    return {name: found[name] for name in sorted(found, key=_order)}


def set_child(model: nnx.Module, name: str, child) -> nnx.Module:
    """Put ``child`` where the layer called ``name`` sits; returns what was there."""
    parent = model
    *path, last = name.split(".")
    for part in path:
        parent = parent[int(part)] if part.isdigit() else getattr(parent, part)
    old = getattr(parent, last)
    setattr(parent, last, child)
    return old


@contextlib.contextmanager
def recording(layers: dict[str, nnx.Module]) -> Iterator[dict[str, list[Operands]]]:
    """Record the operands of ``layers`` while the block runs.

    Yields:
      ``{name: [(lhs, rhs, dimension_numbers), ...]}``, one entry per call.
    """
    sinks = {name: [] for name in layers}
    for name, layer in layers.items():
        layer.capture = sinks[name]
    try:
        yield sinks
    finally:
        for layer in layers.values():
            del layer.capture


def _dimension_numbers(layer, lhs):
    if isinstance(layer, QEinsum):
        return layer.dn
    return (((lhs.ndim - 1,), (0,)), ((), ()))


@functools.partial(jax.jit, static_argnums=0)
def _operands(graphdef, state, images):
    model = nnx.merge(graphdef, state)
    layers = quantized_layers(model)
    with recording(layers) as calls:
        model(images)
    return {name: recorded[0][:2] for name, recorded in calls.items()}


def record(model: nnx.Module, images) -> dict[str, Operands]:
    """The operands of every quantized layer's (first) call on ``images``, as arrays.

    Returns:
      ``{name: (lhs, rhs, dimension_numbers)}`` in forward order.
    """
    layers = quantized_layers(model)
    got = _operands(*nnx.split(model), jnp.asarray(images))
    return {name: (*got[name], _dimension_numbers(layer, got[name][0])) for name, layer in layers.items()}


def layer_output(layer: QLinear | QEinsum, lhs, rhs, dn, config: DotQuantConfig | None = None):
    """What ``layer`` computes from operands it recorded: the product (plus the bias of a ``QLinear``).

    Args:
      layer: the layer the operands came from.
      lhs, rhs, dn: one recorded call.
      config: the quantizers to apply; None multiplies in float32.
    """
    if config is None:
        out = lax.dot_general(lhs.astype(jnp.float32), rhs.astype(jnp.float32), dn)
    else:
        out = quantized_dot_general(lhs, rhs, dn, config).astype(jnp.float32)
    bias = getattr(layer, "bias", None)
    return out if bias is None else out + bias[...].astype(jnp.float32)
