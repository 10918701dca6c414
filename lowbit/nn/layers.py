"""Flax NNX layers whose matmuls go through a recipe's quantizers.

* ``QDotGeneral`` / ``QEinsumOp``: stateless drop-ins for the ``dot_general=``
  argument of ``nnx.Linear`` / ``linen.Dense`` and the ``einsum_op=`` argument of
  ``nnx.Einsum`` (deterministic quantizers only: they have nowhere to keep an
  RNG or a GradScale).
* ``QLinear``, ``QEinsum``, ``QConv``: layers that also hold the learned
  quantizer state — LSQ steps and PACT clips as ``nnx.Param`` (trained by the
  optimizer), GradScale as ``OverwriteWithGradient`` (replaced by its
  "gradient", which the backward pass sets to the updated scale), and an RNG
  stream for stochastic rounding.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from flax import nnx
from jax import lax

from lowbit.nn.einsum import einsum_dimension_numbers
from lowbit.training.ste import binary_weight, lsq, lsq_init_step, pact, sawb_quantize, ternary_weight
from lowbit.training.gradscale import gradscale_init
from lowbit.formats import IntFormat
from lowbit.quant import Quantizer
from lowbit.training.qdot import DotQuantConfig, quantized_dot_general, uses_real_matmul
from lowbit.recipes import LayerRecipe, Recipe
from lowbit.nn.variables import OverwriteWithGradient


@dataclasses.dataclass(frozen=True)
class QDotGeneral:
    """A quantized ``lax.dot_general`` with the signature Flax layers expect."""

    config: DotQuantConfig

    def __post_init__(self):
        if self.config.stochastic or self.config.grad_scale:
            raise ValueError(
                "QDotGeneral is stateless: stochastic rounding and GradScale need QLinear/QEinsum, "
                "which hold an RNG stream and the GradScale state"
            )

    def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **_):
        return quantized_dot_general(lhs, rhs, dimension_numbers, self.config, precision=precision,
                                     preferred_element_type=preferred_element_type)


@dataclasses.dataclass(frozen=True)
class QEinsumOp:
    """A quantized two-operand ``jnp.einsum`` for ``nnx.Einsum(einsum_op=...)``."""

    config: DotQuantConfig

    def __post_init__(self):
        QDotGeneral(self.config)  # same statelessness check

    def __call__(self, spec, lhs, rhs, precision=None, preferred_element_type=None, **_):
        return _einsum(spec, lhs, rhs, self.config, precision=precision,
                       preferred_element_type=preferred_element_type)


def _einsum(spec, lhs, rhs, config, **kw):
    dn, perm = einsum_dimension_numbers(spec)
    out = quantized_dot_general(lhs, rhs, dn, config, **kw)
    return out if perm is None else jnp.transpose(out, perm)


def _positive(step):
    """|s|: AdamW can push a learned LSQ step through zero; its magnitude is what quantizes.

    Without this, int8_lsq on digits collapsed to chance on one seed once a step
    went negative.
    """
    return jnp.abs(step[...])


class _Quantized(nnx.Module):
    """Shared state handling: the layer recipe, the RNG stream and GradScale."""

    def __init__(self, recipe: Recipe, role: str, rngs: nnx.Rngs):
        self.role = role
        self.layer: LayerRecipe = recipe.layer(role)
        self.compute_dtype = recipe.policy.compute_dtype
        cfg = self.layer.dot
        self.rngs = nnx.Rngs(quant=rngs.params()) if cfg.stochastic else None
        self.grad_scale = OverwriteWithGradient(gradscale_init()) if cfg.grad_scale else None

    def _dot(self, lhs, rhs, dn):
        cfg, scales = self._real_lsq()
        key = self.rngs.quant() if self.rngs is not None else None
        gs = self.grad_scale[...] if self.grad_scale is not None else None
        # PTQ calibration hook (lowbit.ptq): an optional sink for this matmul's raw operands.
        if getattr(self, "capture", None) is not None:
            self.capture.append((lhs, rhs, dn))
        return quantized_dot_general(lhs, rhs, dn, cfg, key=key, grad_scale=gs, **scales)

    def _real_lsq(self):
        """LSQ operands already sit on an integer grid: tell the dot their steps so it can run in int8.

        The LSQ rules (outside the dot) own the gradients of x, w and the
        steps; the dot only needs the steps to recover the integer codes.
        """
        a, cfg = self.layer, self.layer.dot
        # Only on request: with "auto", LSQ stays fake. On this CPU the real int8 forward
        # did not shorten the int8_lsq step (its backward stays float32).
        if not (a.act == "lsq" and a.weight == "lsq" and cfg.lhs is None and cfg.rhs is None
                and cfg.matmul == "real"):
            return cfg, {}
        grid = dict(lhs=Quantizer(format=IntFormat(bits=a.act_bits), scale="learned"),
                    rhs=Quantizer(format=IntFormat(bits=a.weight_bits), scale="learned"))
        real = dataclasses.replace(cfg, **grid)
        if not uses_real_matmul(real):
            return cfg, {}
        return real, dict(lhs_scale=_positive(self.act_step), rhs_scale=_positive(self.weight_step))

    def _act_state(self):
        """Learned clip/step for the input activation, initialised for unit-variance inputs."""
        a = self.layer
        if a.act == "pact":
            # PACT's clip starts where a unit-variance input has ~99.7% of its mass.
            self.act_alpha = nnx.Param(jnp.asarray(3.0, jnp.float32))
        elif a.act == "lsq":
            # LSQ's 2 E|x| / sqrt(Q_P) with E|x| = sqrt(2/pi) for unit-variance data.
            qp = 2 ** (a.act_bits - 1) - 1
            self.act_step = nnx.Param(jnp.asarray(2 * math.sqrt(2 / math.pi) / math.sqrt(qp), jnp.float32))

    def _quantize_act(self, x):
        a = self.layer
        if a.act == "pact":
            return pact(x, self.act_alpha[...], bits=a.act_bits, signed=True)
        if a.act == "lsq":
            return lsq(x, _positive(self.act_step), bits=a.act_bits, signed=True)
        return x

    def _weight_state(self, kernel):
        if self.layer.weight == "lsq":
            self.weight_step = nnx.Param(lsq_init_step(kernel, self.layer.weight_bits, True))

    def _quantize_weight(self, w):
        a = self.layer
        if a.weight == "sawb":
            return sawb_quantize(w, a.weight_bits)
        if a.weight == "lsq":
            return lsq(w, _positive(self.weight_step), bits=a.weight_bits, signed=True)
        if a.weight == "ternary":
            return ternary_weight(w, axis=-1)
        if a.weight == "binary":
            return binary_weight(w, axis=-1)
        return w


class QLinear(_Quantized):
    """``y = Q(x) @ Q(W) + b`` with the recipe's quantizers for ``role``.

    Args:
      in_features, out_features: sizes of the last axis in and out.
      recipe: the training recipe; ``recipe.layer(role)`` picks the quantizers.
      role: which matmul this is (e.g. ``"qkv"``, ``"head"``).
      rngs: parameter init and (when the recipe rounds stochastically) the
        quantization RNG stream.
      use_bias: add a float bias after the product.
    """

    def __init__(self, in_features: int, out_features: int, *, recipe: Recipe, role: str,
                 rngs: nnx.Rngs, use_bias: bool = True):
        super().__init__(recipe, role, rngs)
        init = nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), recipe.policy.param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), recipe.policy.param_dtype)) if use_bias else None
        self._act_state()
        self._weight_state(self.kernel[...])

    def __call__(self, x):
        x = self._quantize_act(x.astype(self.compute_dtype))
        w = self._quantize_weight(self.kernel[...].astype(self.compute_dtype))
        y = self._dot(x, w, (((x.ndim - 1,), (0,)), ((), ())))
        return y if self.bias is None else y + self.bias[...].astype(y.dtype)


class QEinsum(_Quantized):
    """A quantized product of two activations, e.g. attention's ``QK^T`` and ``AV``.

    Args:
      spec: a two-operand einsum with explicit output, e.g. ``"bhqd,bhkd->bhqk"``.
      recipe, role, rngs: as for ``QLinear``.
    """

    def __init__(self, spec: str, *, recipe: Recipe, role: str, rngs: nnx.Rngs):
        super().__init__(recipe, role, rngs)
        self.dn, self.perm = einsum_dimension_numbers(spec)

    def __call__(self, a, b):
        a, b = a.astype(self.compute_dtype), b.astype(self.compute_dtype)
        out = self._dot(a, b, self.dn)
        return out if self.perm is None else jnp.transpose(out, self.perm)


class QConv(_Quantized):
    """A quantized 2-D convolution (NHWC), computed as a matmul over image patches.

    Expressing the convolution as ``patches @ W`` routes it through the same
    quantized ``dot_general`` (forward, dlhs and drhs quantizers) as every other layer.

    Args:
      in_features, out_features: channels in and out.
      kernel_size: ``(kh, kw)``.
      strides: ``(sh, sw)``.
      padding: ``"SAME"``, ``"VALID"`` or explicit pairs, as ``lax.conv``.
      recipe, role, rngs, use_bias: as for ``QLinear``.
    """

    def __init__(self, in_features: int, out_features: int, kernel_size=(3, 3), strides=(1, 1),
                 padding="SAME", *, recipe: Recipe, role: str, rngs: nnx.Rngs, use_bias: bool = True):
        super().__init__(recipe, role, rngs)
        self.kernel_size, self.strides, self.padding = tuple(kernel_size), tuple(strides), padding
        fan_in = in_features * self.kernel_size[0] * self.kernel_size[1]
        init = nnx.initializers.lecun_normal()
        # Rows ordered (channel, kh, kw): the layout conv_general_dilated_patches produces.
        self.kernel = nnx.Param(init(rngs.params(), (fan_in, out_features), recipe.policy.param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), recipe.policy.param_dtype)) if use_bias else None
        self._act_state()
        self._weight_state(self.kernel[...])

    def __call__(self, x):
        x = x.astype(self.compute_dtype)
        patches = lax.conv_general_dilated_patches(
            x, self.kernel_size, self.strides, self.padding, dimension_numbers=("NHWC", "OIHW", "NHWC"))
        patches = self._quantize_act(patches)
        w = self._quantize_weight(self.kernel[...].astype(self.compute_dtype))
        y = self._dot(patches, w, (((patches.ndim - 1,), (0,)), ((), ())))
        return y if self.bias is None else y + self.bias[...].astype(y.dtype)

