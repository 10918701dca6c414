"""Explicit quantized layers, for users who write their models with lowbit layers.

``lowbit.quantize`` reaches stock Flax layers and raw ops without any of these;
they remain for those who want the quantization visible in the model code.

* ``QDotGeneral`` / ``QEinsumOp``: stateless drop-ins for the ``dot_general=``
  argument of ``nnx.Linear`` / ``linen.Dense`` and the ``einsum_op=`` argument of
  ``nnx.Einsum`` (deterministic quantizers only: they have nowhere to keep an
  RNG or a GradScale).
* ``QLinear``, ``QEinsum``, ``QConv``: NNX layers quantized by one ``Rule`` (its
  selection fields are ignored), holding the op's quantizer state (``OpState``:
  LSQ steps and PACT clips as ``nnx.Param``, GradScale, the stochastic-rounding key).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from lowbit.nn.einsum import einsum_dimension_numbers
from lowbit.nn.variables import OpState
from lowbit.recipes import op as oprule
from lowbit.recipes.rules import Rule
from lowbit.training.qdot import DotQuantConfig, conv_key, quantized_dot_general

__all__ = ["QConv", "QDotGeneral", "QEinsum", "QEinsumOp", "QLinear"]


@dataclasses.dataclass(frozen=True)
class QDotGeneral:
    """A quantized ``lax.dot_general`` with the signature Flax layers expect."""

    config: DotQuantConfig

    def __post_init__(self):
        if self.config.stochastic or self.config.grad_scale:
            raise ValueError(
                "QDotGeneral is stateless: stochastic rounding and GradScale need QLinear/QEinsum or "
                "lowbit.quantize, which hold an RNG stream and the GradScale state"
            )

    def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **_):
        return quantized_dot_general(
            lhs, rhs, dimension_numbers, self.config, precision=precision, preferred_element_type=preferred_element_type
        )


@dataclasses.dataclass(frozen=True)
class QEinsumOp:
    """A quantized two-operand ``jnp.einsum`` for ``nnx.Einsum(einsum_op=...)``."""

    config: DotQuantConfig

    def __post_init__(self):
        QDotGeneral(self.config)  # same statelessness check

    def __call__(self, spec, lhs, rhs, precision=None, preferred_element_type=None, **_):
        dn, perm = einsum_dimension_numbers(spec)
        out = quantized_dot_general(
            lhs, rhs, dn, self.config, precision=precision, preferred_element_type=preferred_element_type
        )
        return out if perm is None else jnp.transpose(out, perm)


class _Quantized(nnx.Module):
    """One quantized op: its rule, compute dtype and ``OpState``."""

    def __init__(self, rule: Rule, call: oprule.OpCall, rhs_init, compute_dtype, rngs: nnx.Rngs):
        if not isinstance(rule, Rule):
            raise TypeError(f"rule={rule!r} is invalid; allowed: a lowbit.recipes.Rule")
        self.rule, self.call, self.compute_dtype = rule, call, jnp.dtype(compute_dtype)
        self.quant = OpState(oprule.state_init(rule, call, rhs_init, rngs.params()))

    def _run(self, lhs, rhs, **call):
        op = dataclasses.replace(self.call, **call) if call else self.call
        return oprule.run(self.rule, op, lhs, rhs, self.quant.values(), self.quant.next_key(), self.compute_dtype)


class QLinear(_Quantized):
    """``y = x @ W + b`` with ``rule``'s quantizers.

    Args:
      in_features, out_features: sizes of the last axis in and out.
      rule: how the product is quantized (``Rule``; its selection fields are ignored).
      rngs: parameter init and the op's stochastic-rounding key.
      use_bias: add a float bias after the product.
      param_dtype, compute_dtype: storage and product dtypes.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rule: Rule,
        rngs: nnx.Rngs,
        use_bias: bool = True,
        param_dtype=jnp.float32,
        compute_dtype=jnp.float32,
    ):
        kernel = nnx.initializers.lecun_normal()(rngs.params(), (in_features, out_features), param_dtype)
        super().__init__(
            rule,
            oprule.OpCall(kind="dot_general", dn=(((1,), (0,)), ((), ())), weighted=True),
            kernel,
            compute_dtype,
            rngs,
        )
        self.kernel = nnx.Param(kernel)
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None

    def __call__(self, x):
        y = self._run(x, self.kernel[...], dn=(((x.ndim - 1,), (0,)), ((), ())))
        return y if self.bias is None else y + self.bias[...].astype(y.dtype)


class QEinsum(_Quantized):
    """A quantized two-operand einsum, e.g. attention's ``QK^T`` and ``AV``.

    Args:
      spec: a two-operand einsum with explicit output, e.g. ``"bhqd,bhkd->bhqk"``.
      rule, rngs, compute_dtype: as for ``QLinear``.
    """

    def __init__(self, spec: str, *, rule: Rule, rngs: nnx.Rngs, compute_dtype=jnp.float32):
        dn, perm = einsum_dimension_numbers(spec)
        super().__init__(rule, oprule.OpCall(kind="einsum", dn=dn, perm=perm), jnp.zeros(()), compute_dtype, rngs)

    def __call__(self, a, b):
        return self._run(a, b)


class QConv(_Quantized):
    """A quantized 2-D convolution (NHWC input, HWIO kernel).

    Args:
      in_features, out_features: channels in and out.
      kernel_size: ``(kh, kw)``.
      strides: ``(sh, sw)``.
      padding: ``"SAME"``, ``"VALID"`` or explicit pairs, as ``lax.conv_general_dilated``.
      rule, rngs, use_bias, param_dtype, compute_dtype: as for ``QLinear``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size=(3, 3),
        strides=(1, 1),
        padding="SAME",
        *,
        rule: Rule,
        rngs: nnx.Rngs,
        use_bias: bool = True,
        param_dtype=jnp.float32,
        compute_dtype=jnp.float32,
    ):
        kernel = nnx.initializers.lecun_normal()(rngs.params(), (*kernel_size, in_features, out_features), param_dtype)
        call = oprule.OpCall(
            kind="conv",
            conv=conv_key(
                dict(window_strides=tuple(strides), padding=padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
            ),
            weighted=True,
        )
        super().__init__(rule, call, kernel, compute_dtype, rngs)
        self.kernel = nnx.Param(kernel)
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None

    def __call__(self, x):
        y = self._run(x, self.kernel[...])
        return y if self.bias is None else y + self.bias[...].astype(y.dtype)
