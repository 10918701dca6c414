"""``lowbit.optimizer``: any optax optimizer, made to handle gradient-carried quantizer state.

GradScale and delayed scaling's amax histories (``OverwriteWithGradient``, an
``nnx.Param``) get their new value as their gradient. In a user's own loop::

    optimizer = nnx.Optimizer(model, lowbit.optimizer(optax.adamw(1e-3)), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
        optimizer.update(model, grads)

the wrapped transform gives each such leaf the update ``g - p`` (so ``p + update``
is its new value ``g``) and hands every other leaf to ``tx``, which never sees
the state: gradient clipping, weight decay and Adam's moments are those of the
real parameters. The same works in a ``jax.grad`` loop over
``nnx.split(model, nnx.Param, ...)`` state, and over a linen variables dict
holding the ``lowbit_overwrite`` collection.

The state leaves are found when the optimizer state is created: ``tx.init``
gets ``nnx.Variable`` leaves from ``nnx.Optimizer`` and ``nnx.split``, and
``update`` (which ``nnx.Optimizer`` calls with bare arrays) reuses that
finding, kept as static data in the optimizer state.

``p + (g - p) == g`` exactly when ``g - p`` is exact in floating point: always for
GradScale (a power of two, moving by factors of 2), and for an amax history
entry whose new value is within a factor of 2 of its old one or where either is
0 (the history filling up). Otherwise (an amax that jumped or fell by more than
2x between steps) the entry is off by at most about ``2**-23 * max(|g|, |p|)``;
lowbit's own train step assigns the value directly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lowbit.nn.quantize import LINEN_COLLECTIONS
from lowbit.nn.variables import OverwriteWithGradient
from lowbit.training.loss_scale import all_finite

__all__ = ["OverwriteState", "optimizer"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class OverwriteState:
    """State of :func:`optimizer`.

    Attributes:
      inner: The wrapped transform's state, over the parameters without the state leaves.
      carried: Per leaf of the parameter tree (in ``jax.tree`` order, Variables as
        leaves): whether it is gradient-carried state. Static, so ``update`` can
        partition bare arrays the same way.
    """

    inner: Any
    carried: tuple[bool, ...] = dataclasses.field(metadata=dict(static=True))


def _is_leaf(x) -> bool:
    # Variables (nnx.split state) and MaskedNode (the dropped leaves) are leaves, so every tree the
    # optimizer sees, with Variables or bare arrays, flattens to one leaf per parameter in the same order.
    return isinstance(x, (nnx.Variable, optax.MaskedNode))


def _is_carried(path, leaf) -> bool:
    """An ``OverwriteWithGradient`` variable, or a leaf of the linen ``lowbit_overwrite`` collection."""
    return isinstance(leaf, OverwriteWithGradient) or any(
        getattr(k, "key", None) == LINEN_COLLECTIONS["overwrite"] for k in path
    )


def _without(tree, carried: tuple[bool, ...]):
    """``tree`` with its gradient-carried leaves replaced by ``optax.MaskedNode`` (which has no leaves)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=_is_leaf)
    if len(leaves) != len(carried):
        raise ValueError(
            f"lowbit.optimizer: got a tree of {len(leaves)} leaves, but the optimizer state was created for "
            f"{len(carried)}. Create the optimizer after the model's first call (lowbit.quantize adds the quantizer "
            "state then), with the same filter as the gradients (wrt=nnx.Param)."
        )
    return treedef.unflatten([optax.MaskedNode() if c else x for x, c in zip(leaves, carried)])


def optimizer(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """``tx``, with gradient-carried quantizer state (GradScale, amax histories) set to its gradient.

    Args:
      tx: Any optax transformation (``optax.adamw(1e-3)``, a chain with clipping...).

    Returns:
      A transformation for ``nnx.Optimizer(model, lowbit.optimizer(tx), wrt=nnx.Param)``
      or a loop over ``nnx.split`` state. Gradient-carried leaves get ``g - p``
      (``update`` needs ``params``); all others get ``tx``'s updates, computed
      without those leaves. A step whose other gradients are not all finite
      leaves the state as it is, as lowbit's own train step does (a ``tx`` that
      skips such steps, like ``optax.apply_if_finite``, then skips them whole).

    Raises:
      TypeError: ``tx`` is not an optax ``GradientTransformation``.
    """
    if not isinstance(tx, optax.GradientTransformation):
        raise TypeError(f"tx={tx!r} is invalid; allowed: an optax.GradientTransformation (e.g. optax.adamw(1e-3))")
    tx = optax.with_extra_args_support(tx)

    def init(params) -> OverwriteState:
        paths = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_leaf)[0]
        carried = tuple(_is_carried(path, leaf) for path, leaf in paths)
        return OverwriteState(tx.init(_without(params, carried)), carried)

    def update(updates, state: OverwriteState, params=None, **extra_args):
        carried = state.carried
        if any(carried) and params is None:
            raise ValueError(
                "lowbit.optimizer: update(grads, state, params) needs params (the state's update is "
                "its gradient minus its value); nnx.Optimizer passes them"
            )
        grads = _without(updates, carried)
        inner_updates, inner = tx.update(
            grads, state.inner, None if params is None else _without(params, carried), **extra_args
        )
        if not any(carried):
            return inner_updates, OverwriteState(inner, carried)
        finite = all_finite(grads)

        def overwrite(g, p):
            return jax.tree.map(lambda g, p: jnp.where(finite, g - p, jnp.zeros_like(p)), g, p)

        new, treedef = jax.tree_util.tree_flatten(updates, is_leaf=_is_leaf)
        old = jax.tree_util.tree_leaves(params, is_leaf=_is_leaf)
        stepped = jax.tree_util.tree_leaves(inner_updates, is_leaf=_is_leaf)
        leaves = [overwrite(g, p) if c else u for c, g, p, u in zip(carried, new, old, stepped)]
        return treedef.unflatten(leaves), OverwriteState(inner, carried)

    return optax.GradientTransformationExtraArgs(init, update)
