"""Precision policy: the dtypes parameters are stored, computed and returned in.

Mixed-precision training keeps float32 master weights (``param_dtype``), runs the
forward and backward pass in a narrower ``compute_dtype`` and hands results such
as the loss back in ``output_dtype``. A policy only casts; the train step decides
where (parameters and inputs to compute on entry, the loss to output on exit).
Gradients come back in the parameter dtype because the cast is differentiable.

Policies are written as ``"params=float32,compute=bfloat16,output=float32"``
(keys also ``p``/``c``/``o``; dtypes also ``f32``/``bf16``/``f16``/``half``...),
and ``str(policy)`` gives that canonical form back.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_DTYPE_ALIASES: dict[str, np.dtype] = {
    **dict.fromkeys(("float64", "f64", "fp64", "double"), jnp.dtype(jnp.float64)),
    **dict.fromkeys(("float32", "f32", "fp32", "single"), jnp.dtype(jnp.float32)),
    **dict.fromkeys(("bfloat16", "bf16"), jnp.dtype(jnp.bfloat16)),
    **dict.fromkeys(("float16", "f16", "fp16", "half"), jnp.dtype(jnp.float16)),
}
_ALLOWED_DTYPES = frozenset(_DTYPE_ALIASES.values())
_ALLOWED_NAMES = ", ".join(
    "/".join(name for name, d in _DTYPE_ALIASES.items() if d == dtype)
    for dtype in dict.fromkeys(_DTYPE_ALIASES.values())
)
_KEYS = {
    "params": "param_dtype",
    "p": "param_dtype",
    "compute": "compute_dtype",
    "c": "compute_dtype",
    "output": "output_dtype",
    "o": "output_dtype",
}
_CANONICAL_KEYS = {"param_dtype": "params", "compute_dtype": "compute", "output_dtype": "output"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Policy:
    """Storage, compute and output dtypes for mixed-precision training.

    Hashable, so it can be a static ``jit`` argument. Each field accepts a dtype, a
    dtype name or an alias (``"bf16"``, ``"half"``...) and is stored as a numpy
    dtype; only float64, float32, bfloat16 and float16 are allowed.

    Attributes:
      param_dtype: Dtype parameters (and optimizer state) are stored in.
      compute_dtype: Dtype the forward and backward pass run in.
      output_dtype: Dtype of what the model returns, e.g. logits and the loss.
    """

    param_dtype: np.dtype = jnp.dtype(jnp.float32)
    compute_dtype: np.dtype = jnp.dtype(jnp.float32)
    output_dtype: np.dtype = jnp.dtype(jnp.float32)

    def __post_init__(self) -> None:
        for field in _CANONICAL_KEYS:
            object.__setattr__(self, field, _to_dtype(field, getattr(self, field)))

    @classmethod
    def parse(cls, spec: str) -> Policy:
        """Builds a policy from ``"params=float32,compute=bfloat16,output=float32"``.

        Keys are ``params``/``p``, ``compute``/``c`` and ``output``/``o``, each at
        most once, in any order; a missing key means float32. Dtype names are
        case-insensitive.

        Raises:
          ValueError: A part is not ``key=value``, a key is unknown or repeated,
            or a dtype name is unknown.
        """
        fields: dict[str, Any] = {}
        for part in spec.split(","):
            key, sep, value = (s.strip() for s in part.partition("="))
            if not sep:
                raise ValueError(f"policy {spec!r}: part {part!r} is not key=value (e.g. 'compute=bf16')")
            field = _KEYS.get(key.lower())
            if field is None:
                raise ValueError(f"policy {spec!r}: unknown key {key!r}; allowed: {', '.join(_KEYS)}")
            if field in fields:
                raise ValueError(f"policy {spec!r}: {_CANONICAL_KEYS[field]} given more than once")
            fields[field] = value
        return cls(**fields)

    def __str__(self) -> str:
        return ",".join(f"{key}={getattr(self, field).name}" for field, key in _CANONICAL_KEYS.items())

    def cast_to_param(self, tree: Any) -> Any:
        """Casts the floating array leaves of ``tree`` to ``param_dtype``."""
        return _cast_floating(tree, self.param_dtype)

    def cast_to_compute(self, tree: Any) -> Any:
        """Casts the floating array leaves of ``tree`` to ``compute_dtype``."""
        return _cast_floating(tree, self.compute_dtype)

    def cast_to_output(self, tree: Any) -> Any:
        """Casts the floating array leaves of ``tree`` to ``output_dtype``."""
        return _cast_floating(tree, self.output_dtype)


def _to_dtype(field: str, value: Any) -> np.dtype:
    dtype: np.dtype | None
    if isinstance(value, str):
        dtype = _DTYPE_ALIASES.get(value.strip().lower())
        if dtype is None:
            raise ValueError(f"{field}: unknown dtype {value!r}; allowed: {_ALLOWED_NAMES}")
        return dtype
    try:
        if value is None:  # jnp.dtype(None) would silently mean the default float.
            raise TypeError
        dtype = jnp.dtype(value)
    except TypeError:
        raise TypeError(f"{field}: expected a dtype or dtype name, got {value!r}; allowed: {_ALLOWED_NAMES}") from None
    if dtype not in _ALLOWED_DTYPES:
        raise ValueError(f"{field}: dtype {dtype.name} not allowed; allowed: {_ALLOWED_NAMES}")
    return dtype


def _cast_floating(tree: Any, dtype: np.dtype) -> Any:
    # Python scalars stay weakly typed (they adopt the array dtype they meet);
    # ints and bools are indices, masks and counters that must not become floats.
    def cast(x: Any) -> Any:
        if isinstance(x, (jax.Array, np.ndarray, np.generic)) and jnp.issubdtype(x.dtype, jnp.floating):
            return x.astype(dtype)
        return x

    return jax.tree.map(cast, tree)


_PRESETS = {
    "fp32": Policy(),
    "bf16": Policy(compute_dtype=jnp.bfloat16),
    "fp16": Policy(compute_dtype=jnp.float16),
}


def get_policy(name: str) -> Policy:
    """Returns a preset policy by name, or parses a ``key=value`` spec.

    Presets keep float32 parameters and outputs and compute in the named dtype:
    ``fp32``, ``bf16`` and ``fp16`` (which needs loss scaling to train).

    Args:
      name: A preset name, or a spec for :meth:`Policy.parse` (contains ``=``).

    Raises:
      ValueError: Unknown preset, or an invalid spec.
    """
    if "=" in name:
        return Policy.parse(name)
    try:
        return _PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown policy {name!r}; presets: {', '.join(_PRESETS)}, or a spec like "
            "'params=float32,compute=bfloat16,output=float32'"
        ) from None
