"""The ops of any quantized NNX model, by name, and a recorder of their operands.

PTQ works on the ops ``lowbit.quantize`` finds (``lowbit.nn.ops``): every matmul
and convolution of the forward pass, named ``"path:key"`` (``op_name``). A float
model is *probed* by quantizing it with ``FLOAT``, a recipe without rules: every
op stays float (the output is bit-identical), but the ops are discovered and can
be recorded. Recording uses ``lowbit.nn.quantize.intercepting(capture=True)``:
each op's raw ``lhs``/``rhs`` (before any quantizer) and its result. Inside a
traced function the recorded values are tracers of that trace, so ``record``
runs the whole forward pass as one compiled function and returns arrays (an
eager forward pass would compile every operation on its own).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lowbit.nn.quantize import discover, intercepting, is_quantized, op_name, ops, quantize, recipe_of
from lowbit.recipes.rules import Recipe

__all__ = ["FLOAT", "Operands", "names", "probe", "record", "record_traced"]

FLOAT = Recipe(name="float")  # no rules: every op stays float


class Operands(NamedTuple):
    """One recorded op call: its raw operands and its result."""

    lhs: jax.Array
    rhs: jax.Array
    out: jax.Array


def probe(model: nnx.Module, example) -> nnx.Module:
    """``model`` (float, unchanged) quantized with ``FLOAT`` and its ops discovered on ``example`` inputs."""
    if is_quantized(model):
        raise ValueError(
            f"model is already quantized (recipe {recipe_of(model).name!r}); PTQ starts from the float model"
        )
    probed = quantize(model, FLOAT)
    discover(probed, jnp.asarray(example))
    return probed


def names(qmodel: nnx.Module) -> list[str]:
    """The names of the discovered ops of ``qmodel``, in forward order."""
    return [op_name(op.path, op.key) for op in ops(qmodel)]


def record_traced(qmodel: nnx.Module, *args) -> tuple[jax.Array, dict[str, Operands]]:
    """``(output, {op name: Operands})`` of one forward pass (traced or eager); one entry per op (first call)."""
    with intercepting(qmodel, capture=True) as recorded:
        out = qmodel(*args)
    calls: dict[str, Operands] = {}
    for r in recorded:
        calls.setdefault(op_name(r.path, r.key), Operands(r.lhs, r.rhs, r.out))
    return out, calls


@functools.partial(jax.jit, static_argnums=0)
def _record(graphdef, state, images):
    return record_traced(nnx.merge(graphdef, state), images)[1]


def record(qmodel: nnx.Module, images) -> dict[str, Operands]:
    """The operands and result of every op of ``qmodel`` on ``images``, as arrays, in forward order.

    Args:
      qmodel: a discovered model from ``lowbit.quantize`` (``probe`` for a float one).
      images: one batch of inputs.
    """
    return _record(*nnx.split(qmodel), jnp.asarray(images))
