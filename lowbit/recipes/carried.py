"""Checks on gradient-carried quantizer state: trained like a weight, or never differentiated.

GradScale and delayed scaling's amax histories (the ``overwrite`` state of
``lowbit.recipes.op``) get their new value as their gradient, so an optimizer
must *replace* them by their gradient (``lowbit.optimizer``, or lowbit's own
train step), and a training step must differentiate them. Either mistake trains
on silently with a wrong or a frozen state (a user's fp4 ViT trained in a plain
optimizer loop: 28 % instead of 92 %), so ``lowbit.recipes.op.run`` passes the
product of every op that has such state through ``watch``, which reports both.

* In the backward pass (training only), ``watch`` checks the values the
  forward pass read: a GradScale that is not a positive power of two, or an
  amax history with a negative or non-finite entry, is never produced by the
  quantized backward pass (GradScale moves by factors of 2 between 2^-100 and
  2^100; an amax is >= 0 and finite) but is what a gradient step makes of
  them: the gradient of GradScale is its new value ``s``, ``2s`` or ``s/2``, and
  that of a history's newest entry the current amax >= 0, so Adam, SGD and
  their relatives move GradScale off the powers of two and the newest history
  entry below zero on their first step. A ``lax.cond`` reaches the host
  (``jax.debug.callback``) only then; under ``jax.vmap`` a batched condition
  makes JAX run the callback on every call, where the host sees valid flags and
  stays quiet. Inside ``managed()`` (lowbit's own train step, which sets the
  state itself) the check is left out of the program altogether.
* At trace time, ``watch`` warns when the op's output is differentiated but its
  state is not (a linen loop differentiating only ``params``, an NNX filter
  that leaves the state out): that gradient computation cannot update it.

What neither can see: a state that *is* differentiated but whose gradient is
then dropped (an optimizer ``wrt`` filter that leaves it out, a loop that
discards part of the gradients) keeps its initial value, and inside the forward
pass that value is indistinguishable from "no training step yet". ``watch``
also speaks for gradients taken only with respect to the inputs (saliency,
adversarial examples), which leave the state alone on purpose.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

__all__ = ["managed", "watch"]

# Set by ``managed``: the caller overwrites the state with its gradient itself.
_MANAGED = contextvars.ContextVar("lowbit_carried_managed", default=False)
_FIX = "wrap your optax transform with lowbit.optimizer: nnx.Optimizer(model, lowbit.optimizer(tx), wrt=nnx.Param)"


def _label(name: str) -> str:
    return f"op {name}" if name else "a quantized op"


def _valid(state_name: str, value: jax.Array) -> jax.Array:
    """Whether ``value`` can be what the quantized backward pass gave: a bool scalar."""
    if state_name == "grad_scale":
        mantissa, _ = jnp.frexp(value)
        return (value > 0) & (mantissa == 0.5)  # a finite positive power of two (frexp(inf) is (inf, 0))
    return jnp.all((value >= 0) & jnp.isfinite(value))


def _report_invalid(name: str, valid: dict) -> None:
    bad = [k for k, ok in valid.items() if not bool(ok)]
    if not bad:  # a callback that vmap ran although the condition held (see the module docstring)
        return
    # Stable text (no values): Python shows a warning once per message, not once per step.
    warnings.warn(
        f"lowbit: {_label(name)}: its gradient-carried quantizer state ({', '.join(bad)}) was trained like a weight "
        "(a GradScale off the powers of two, or an amax history with a negative entry). Its gradient is its new "
        f"value, which an optimizer must take, not step along: {_FIX}.",
        stacklevel=2,
    )


def _check_valid(name: str, carried: dict[str, jax.Array]) -> None:
    """Warn (once the program runs) if ``carried`` cannot have come from an overwrite."""
    valid = {k: _valid(k, v) for k, v in carried.items()}
    ok = functools.reduce(jnp.logical_and, valid.values())
    lax.cond(ok, lambda: None, lambda: jax.debug.callback(functools.partial(_report_invalid, name), valid))


@contextlib.contextmanager
def managed():
    """Within: the caller sets gradient-carried state to its gradient itself (lowbit's train step).

    ``watch`` then adds no run-time check to the backward pass, so that step's
    program is exactly what it would be without the checks.
    """
    token = _MANAGED.set(True)
    try:
        yield
    finally:
        _MANAGED.reset(token)


def watch(name: str, out: jax.Array, carried: dict[str, jax.Array]) -> jax.Array:
    """``out`` unchanged; its backward pass checks ``carried`` (see the module docstring).

    Differentiated without ``carried``, it warns at trace time that the state stays frozen.

    Args:
      name: the op's name, for the message (``""`` when unknown).
      out: the op's product.
      carried: the op's gradient-carried state by name (what the product read).
    """
    # The flag is a static argument, not read inside the rule: JAX caches traced custom_vjp rules.
    return _watch(name, not _MANAGED.get(), out, carried)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _watch(name, check, out, carried):
    return out


def _watch_fwd(name, check, out, carried):
    frozen = sorted(k for k, v in carried.items() if not v.perturbed)
    if out.perturbed and frozen:
        warnings.warn(
            f"lowbit: {_label(name)} is differentiated but its gradient-carried quantizer state ({', '.join(frozen)}) "
            "is not, so this gradient cannot update it and it keeps its value. In a training step, differentiate "
            "it too (it is an nnx.Param, which nnx.grad differentiates by default; in linen, the "
            f"'lowbit_overwrite' collection) and {_FIX}.",
            stacklevel=2,
        )
    return out.value, ({k: v.value for k, v in carried.items()} if check else None)


def _watch_bwd(name, check, values, g):
    if check:
        _check_valid(name, values)
    # The state's own cotangent (its new value) comes from the quantized product; add nothing to it.
    return (None if isinstance(g, SymbolicZero) else g), None


_watch.defvjp(_watch_fwd, _watch_bwd, symbolic_zeros=True)
