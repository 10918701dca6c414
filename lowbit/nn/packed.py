"""Packed weight-only inference: models whose weights are stored as packed codes plus scales.

A packed model is an ordinary NNX model (the user's own class, unmodified)
whose weight parameters are ``PackedParam`` variables instead of ``nnx.Param``:
each holds a ``PackedWeight`` (a ``lowbit.quant.QTensor`` of packed codes and
stored scales, with an optional input permutation and per-input scales) and
reads as the dequantized float weight. ``self.kernel[...]``, ``x @ self.w``,
``nnx.Linear`` and ``jnp.einsum`` on it see the float weight, computed inside
the jitted forward pass, while the model's state (``nnx.split``, ``nnx.jit``,
``save``) holds only the packed arrays: ``uint8`` codes (two 4-bit codes a
byte), float32 / E8M0 / E4M3 scales.

Where the weights come from:

* ``lowbit.ptq.quantize_weights(model, batches, ..., pack=True)`` (RTN, GPTQ,
  AWQ, SmoothQuant weight-only): the packed weights dequantize bit for bit to
  the fake-quantized weights of ``pack=False``, so the logits are identical;
* ``from_export(qmodel, lowbit.nn.export.export(qmodel, fmt), model)``: the
  weights of a model trained with ``lowbit.quantize`` (QAT), exported;
* ``pack(model, {op name: PackedWeight})`` for weights packed by hand.

``memory`` reports the parameter bytes before (as float32) and after,
``save`` / ``load`` write and read a packed model's arrays (orbax) and a JSON
manifest of everything static (no pickle: loading runs no code from the file).

On a device mesh (``lowbit.trainer.sharding.make_mesh``), ``shard`` (or
``load(..., mesh=)``) places each packed weight's arrays where the weight's own
annotations put it, by the trainer's rules (``placements`` says where each
went): codes split along the axis they are stored along (a contiguous range of
the flat codes per device), scales along the same logical axes. A split the
flat codes cannot hold (e.g. Megatron's column split of a row-major weight) is
an error unless ``fallback="replicate"``, which keeps the weight whole along
that mesh axis and reports it.

Op names are ``"path:key"`` (``lowbit.nn.quantize.op_name``); an op's weight is
the one parameter of the module at ``path`` whose shape is the weight's, the
rule of ``lowbit.nn.export.weight``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, cast

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from lowbit import quant
from lowbit.nn.quantize import is_quantized
from lowbit.quant.qtensor import QTensor, codes_axis, mesh_axes, partition_specs, spec_shards

__all__ = [
    "PackedParam",
    "PackedWeight",
    "Placement",
    "dequantize",
    "from_export",
    "from_matrix",
    "load",
    "memory",
    "pack",
    "packed_weights",
    "placement",
    "placements",
    "save",
    "shard",
    "to_matrix",
]

_MISSING = object()


# ----- the (K, N) matrix view of a weight ------------------------------------------------------------------------
def to_matrix(w: jax.Array, contracted: tuple[int, ...]) -> jax.Array:
    """A weight as ``(K, N)``: its ``contracted`` axes (in that order) flattened first, the free axes after.

    Args:
      w: the weight in its own shape.
      contracted: the op's rhs contracted axes (non-negative), in the order they pair with the lhs's.

    Returns:
      ``(K, N)`` with ``K`` the product of the contracted sizes.
    """
    free = [d for d in range(w.ndim) if d not in contracted]
    k = math.prod(w.shape[d] for d in contracted)
    return jnp.transpose(w, list(contracted) + free).reshape(k, -1)


def from_matrix(m: jax.Array, shape: tuple[int, ...], contracted: tuple[int, ...]) -> jax.Array:
    """Inverse of ``to_matrix``: ``(K, N)`` back to the weight's ``shape``."""
    order = list(contracted) + [d for d in range(len(shape)) if d not in contracted]
    return jnp.transpose(m.reshape([shape[d] for d in order]), [int(i) for i in np.argsort(order)])


def _matrix_shape(shape: tuple[int, ...], contracted: tuple[int, ...]) -> tuple[int, int]:
    k = math.prod(shape[d] for d in contracted)
    return k, math.prod(shape) // max(k, 1)


# ----- PackedWeight ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PackedWeight:
    """One weight, stored packed (a pytree: ``qt``, ``perm`` and ``in_scale`` are its arrays, the rest is static).

    The effective weight, as a ``(K, N)`` matrix (``to_matrix``), is
    ``M[perm[i]] = dequantize(qt)[i]`` (``perm`` None: the identity), then
    ``M / in_scale[:, None]`` (``in_scale`` None: 1); ``from_matrix`` puts it
    back in the parameter's ``shape`` and ``dtype``. With ``contracted`` None
    ``qt`` holds the weight in its own shape (RTN on the weight as it lies, as
    ``lowbit.quantize`` places a quantizer; convolutions; exports).

    Attributes:
      qt: the packed codes and stored scales: shape ``(K, N)`` (rows possibly
        permuted), or ``shape`` when ``contracted`` is None.
      perm: int32 ``(K,)`` or None: row ``i`` of ``qt`` is input ``perm[i]``
        (GPTQ's act-order, stored so that each group's rows are contiguous).
      in_scale: float32 ``(K,)`` or None: per-input scales ``s`` (AWQ,
        weight-only SmoothQuant): ``qt`` holds ``Q(diag(s) w)``, the weight is
        ``Q(diag(s) w) / s``.
      shape: the parameter's own shape (static).
      contracted: the op's rhs contracted axes, in order (static), or None.
      dtype: the parameter's dtype (static), what ``dequantize`` returns.
    """

    qt: QTensor
    perm: jax.Array | None
    in_scale: jax.Array | None
    shape: tuple[int, ...]
    contracted: tuple[int, ...] | None
    dtype: np.dtype[Any]

    @property
    def nbytes(self) -> int:
        """True storage in bytes: packed codes, scales, and the permutation and input scales if any."""
        extra = (a.size * np.dtype(a.dtype).itemsize for a in (self.perm, self.in_scale) if a is not None)
        return self.qt.nbytes + int(sum(extra))

    @property
    def size(self) -> int:
        """Number of weight elements."""
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)


jax.tree_util.register_dataclass(
    PackedWeight, data_fields=["qt", "perm", "in_scale"], meta_fields=["shape", "contracted", "dtype"]
)


def packed_weight(
    qt: QTensor,
    shape: tuple[int, ...],
    contracted: tuple[int, ...] | None,
    dtype: Any,
    *,
    perm: jax.Array | None = None,
    in_scale: jax.Array | None = None,
) -> PackedWeight:
    """A checked ``PackedWeight`` (see its attributes).

    Raises:
      TypeError: ``qt`` is not a ``QTensor``.
      ValueError: shapes that do not fit together, or a ``perm`` / ``in_scale`` without a matrix view.
    """
    if not isinstance(qt, QTensor):
        raise TypeError(f"qt has type {type(qt).__name__}; allowed: a lowbit.quant.QTensor")
    shape = tuple(int(n) for n in shape)
    dtype = np.dtype(dtype)
    if contracted is None:
        want = shape
        if perm is not None or in_scale is not None:
            raise ValueError("perm / in_scale need contracted axes (a (K, N) matrix view); got contracted=None")
    else:
        contracted = tuple(int(d) for d in contracted)
        if sorted(contracted) != sorted(set(contracted)) or not all(0 <= d < len(shape) for d in contracted):
            raise ValueError(f"contracted={contracted} is invalid; allowed: distinct axes of shape {shape}")
        want = _matrix_shape(shape, contracted)
    if tuple(qt.shape) != tuple(want):
        raise ValueError(f"qt.shape={tuple(qt.shape)} is invalid; allowed: {tuple(want)} for shape={shape}")
    k = want[0]
    if perm is not None and (tuple(perm.shape) != (k,) or not jnp.issubdtype(perm.dtype, jnp.integer)):
        raise ValueError(f"perm has shape {tuple(perm.shape)} and dtype {perm.dtype}; allowed: int32 ({k},)")
    if in_scale is not None and (tuple(in_scale.shape) != (k,) or in_scale.dtype != jnp.float32):
        raise ValueError(
            f"in_scale has shape {tuple(in_scale.shape)} and dtype {in_scale.dtype}; allowed: float32 ({k},)"
        )
    perm = None if perm is None else jnp.asarray(perm, jnp.int32)
    return PackedWeight(qt, perm, in_scale, shape, contracted, dtype)


def dequantize(pw: PackedWeight) -> jax.Array:
    """The weight ``pw`` stands for, in its own shape and dtype (jit-able: runs inside a jitted forward pass).

    The float operations are the PTQ method's own, in its order, so the result
    equals the method's fake-quantized weight bit for bit.
    """
    m = quant.dequantize(pw.qt)
    if pw.contracted is None:
        return m.astype(pw.dtype)
    if pw.perm is not None:
        m = jnp.zeros_like(m).at[pw.perm].set(m, unique_indices=True)
    if pw.in_scale is not None:
        m = m / pw.in_scale[:, None]
    return from_matrix(m, pw.shape, pw.contracted).astype(pw.dtype)


# ----- PackedParam ----------------------------------------------------------------------------------------------
class PackedParam(nnx.Variable):
    """A weight stored packed: its raw value is a ``PackedWeight``; reading it gives the dequantized array.

    Not an ``nnx.Param``: optimizers, ``nnx.grad`` and ``nnx.state(model, nnx.Param)``
    skip it (a packed weight is frozen). ``param[...]``, ``param.get_value()``,
    ``jnp.asarray(param)`` and the arithmetic operators dequantize (inside the
    caller's trace); ``param.shape`` / ``param.dtype`` are the weight's;
    ``param.get_raw_value()`` is the ``PackedWeight``. Writing is refused.
    """

    def get_value(self, *, index: Any = _MISSING) -> Any:  # type: ignore[override]
        w = dequantize(self.get_raw_value())
        return w if index is _MISSING or index is ... else w[index]

    def set_value(self, value: Any, *, index: Any = _MISSING) -> None:  # type: ignore[override]
        raise TypeError(
            f"a PackedParam (packed weight of shape {self.get_raw_value().shape}) is read-only; allowed: "
            "replace the whole variable (lowbit.nn.packed.pack) or write the float model's parameter"
        )


# ----- pack / from_export ---------------------------------------------------------------------------------------
def _modules(model: nnx.Module) -> dict[str, nnx.Module]:
    return {"/".join(map(str, path)): m for path, m in nnx.iter_modules(model)}


def _split_name(name: object) -> tuple[str, str]:
    if not isinstance(name, str) or ":" not in name:
        raise ValueError(f"op name {name!r} is invalid; allowed: 'path:key' (lowbit.nn.quantize.op_name)")
    path, key = name.rsplit(":", 1)
    return path, key


def _find(modules: dict[str, nnx.Module], name: str, shape: tuple[int, ...]) -> tuple[nnx.Module, str]:
    """``(module, attribute)`` of op ``name``'s weight: the module's one parameter shaped ``shape``."""
    path, _ = _split_name(name)
    module = modules.get(path)
    if module is None:
        raise ValueError(
            f"op {name}: the model has no module at path {path!r}; its modules: "
            + ", ".join(repr(p) for p in sorted(modules))
        )
    params = {a: v for a, v in vars(module).items() if isinstance(v, nnx.Param) and not a.startswith("lowbit_")}
    found = [a for a, v in params.items() if tuple(v.get_value().shape) == tuple(shape)]
    if len(found) != 1:
        have = ", ".join(f"{a} {tuple(v.get_value().shape)}" for a, v in params.items()) or "none"
        what = "no float parameter" if not found else f"{len(found)} parameters"
        raise ValueError(
            f"op {name}: its module ({type(module).__name__}) has {what} of the packed weight's shape "
            f"{tuple(shape)} (its parameters: {have}); allowed: exactly one"
        )
    return module, found[0]


def pack(model: nnx.Module, weights: dict[str, PackedWeight]) -> nnx.Module:
    """A copy of ``model`` with each named op's weight parameter replaced by a ``PackedParam``.

    Args:
      model: an NNX model (the argument is not changed).
      weights: ``{op name ("path:key"): PackedWeight}``; the weight's ``shape``
        and ``dtype`` must be the parameter's.

    Returns:
      The packed copy (its other parameters and state as they were).

    Raises:
      TypeError: ``model`` is not an NNX module or a value is not a ``PackedWeight``.
      ValueError: an op name that is malformed or names no module, a module
        without exactly one parameter of the weight's shape, a dtype that
        differs, or two ops that name the same parameter.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model has type {type(model).__name__}; allowed: a flax.nnx.Module")
    if not isinstance(weights, dict):
        raise TypeError(f"weights has type {type(weights).__name__}; allowed: dict of op name -> PackedWeight")
    out = nnx.clone(model)
    modules = _modules(out)
    targets: dict[tuple[int, str], str] = {}
    plan = []
    for name, pw in weights.items():
        if not isinstance(pw, PackedWeight):
            raise TypeError(f"weights[{name!r}] has type {type(pw).__name__}; allowed: a PackedWeight")
        module, attr = _find(modules, name, pw.shape)
        dtype = getattr(module, attr).get_value().dtype
        if np.dtype(dtype) != pw.dtype:
            raise ValueError(f"op {name}: packed weight dtype {pw.dtype} != the parameter's dtype {np.dtype(dtype)}")
        key = (id(module), attr)
        if key in targets:
            raise ValueError(f"ops {targets[key]} and {name} name the same parameter ({attr}); allowed: one op each")
        targets[key] = name
        plan.append((module, attr, pw))
    for (module, attr, pw), name in zip(plan, weights):
        # The parameter's metadata travels with it: its sharding annotations are where ``shard`` reads the
        # weight's layout. Never eager: the value is a PackedWeight, which ``shard`` places array by array.
        meta = getattr(module, attr).get_metadata() | {"op": name, "eager_sharding": False}
        setattr(module, attr, PackedParam(pw, **meta))
    return out


def from_export(qmodel: nnx.Module, exported: dict, model: nnx.Module) -> nnx.Module:
    """A packed float model from the weights a quantization-aware-trained model exported.

    Args:
      qmodel: the NNX model from ``lowbit.quantize`` (trained) that ``exported`` came from.
      exported: ``lowbit.nn.export.export(qmodel, fmt)``: ``{op name: QTensor}``
        (``fp32`` exports, float arrays, stay float).
      model: a float model of the same architecture (e.g. the one that was
        quantized); it gives the structure only, unchanged.

    Returns:
      A copy of ``model`` with ``qmodel``'s trained parameters and the exported weights packed.

    Raises:
      TypeError: ``qmodel`` is not from ``lowbit.quantize``, or ``model`` is.
      ValueError: the models' parameters differ in path or shape, or an
        exported op does not fit (``pack``).
    """
    if not isinstance(qmodel, nnx.Module) or not is_quantized(qmodel):
        raise TypeError(f"qmodel has type {type(qmodel).__name__}; allowed: an NNX model from lowbit.quantize")
    if not isinstance(model, nnx.Module) or is_quantized(model):
        raise TypeError(f"model has type {type(model).__name__}; allowed: the float NNX model (not lowbit.quantize's)")
    trained = {
        path: v
        for path, v in nnx.to_flat_state(nnx.state(qmodel, nnx.Param))
        if not any(str(p).startswith("lowbit_") for p in path)
    }
    floats = nnx.clone(model)
    own = dict(nnx.to_flat_state(nnx.state(floats, nnx.Param)))
    if set(own) != set(trained):
        diff = sorted("/".join(map(str, p)) for p in set(own) ^ set(trained))
        raise ValueError(f"qmodel and model have different parameters: {', '.join(diff)}")
    for path, v in trained.items():
        if tuple(own[path].get_value().shape) != tuple(v.get_value().shape):
            raise ValueError(
                f"parameter {'/'.join(map(str, path))}: shape {v.get_value().shape} in qmodel, "
                f"{own[path].get_value().shape} in model"
            )
    nnx.update(floats, nnx.from_flat_state(trained))
    weights, modules = {}, _modules(floats)
    for name, qt in exported.items():
        param = getattr(*_find(modules, name, tuple(qt.shape)))
        dtype = param.get_value().dtype  # export quantizes in float32; the weight is read back in its own dtype
        if isinstance(qt, QTensor):
            weights[name] = packed_weight(qt, qt.shape, None, dtype)
        else:  # an fp32 export: the float weight itself
            param.set_value(jnp.asarray(qt).astype(dtype))
    return pack(floats, weights)


# ----- what a packed model holds --------------------------------------------------------------------------------
def packed_weights(model: nnx.Module) -> dict[str, PackedWeight]:
    """``{parameter path ("fc1/kernel"): PackedWeight}`` of every ``PackedParam`` of ``model``."""
    return {"/".join(map(str, path)): v.get_raw_value() for path, v in nnx.to_flat_state(nnx.state(model, PackedParam))}


def memory(model: nnx.Module) -> dict[str, Any]:
    """Parameter bytes of ``model``: as float32 before, as stored now.

    Counts ``nnx.Param`` and ``PackedParam`` variables (not optimizer or
    quantizer state, not batch statistics).

    Returns:
      ``float32_bytes``: every parameter at 4 bytes per element;
      ``bytes``: what the parameters take now (packed codes + scales for packed
      weights, their own dtype for the rest); ``ratio``: ``bytes /
      float32_bytes``; ``packed_ops``: the number of packed weights;
      ``packed_float32_bytes`` / ``packed_bytes``: the same two sums over the
      packed weights alone.
    """
    float32_bytes = stored = packed_f32 = packed_now = 0
    for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        a = v.get_value()
        float32_bytes += a.size * 4
        stored += a.size * np.dtype(a.dtype).itemsize
    count = 0
    for pw in packed_weights(model).values():
        count += 1
        packed_f32 += pw.size * 4
        packed_now += pw.nbytes
    float32_bytes += packed_f32
    stored += packed_now
    return dict(
        float32_bytes=float32_bytes,
        bytes=stored,
        ratio=stored / max(float32_bytes, 1),
        packed_ops=count,
        packed_float32_bytes=packed_f32,
        packed_bytes=packed_now,
    )


# ----- on a device mesh -----------------------------------------------------------------------------------------
Fallback = Literal["error", "replicate"]
"""What ``shard`` does with a split the flat codes cannot hold: raise, or keep the weight whole along it."""

_FALLBACKS = ("error", "replicate")


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where one packed weight's arrays lie on a mesh (``placement``, ``placements``).

    Attributes:
      spec: the weight's own spec, in its ``shape``: what its annotations give
        through the trainer's rules (``lowbit.trainer.sharding``), as for the float weight.
      stored: the part of ``spec`` the packed arrays hold, as a spec of
        ``qt.shape`` (the ``(K, N)`` view where the weight has one).
      arrays: a ``PackedWeight`` whose arrays are ``PartitionSpec``: the codes',
        scales' (``lowbit.quant.qtensor.partition_specs``), ``perm``'s and
        ``in_scale``'s (replicated).
      replicated: the mesh axes of ``spec`` that the packed arrays do not follow
        (only with ``fallback="replicate"``): the weight is whole along them.
    """

    spec: PartitionSpec
    stored: PartitionSpec
    arrays: PackedWeight
    replicated: tuple[str, ...]


def _check_fallback(fallback: object) -> None:
    if fallback not in _FALLBACKS:
        raise ValueError(f"fallback={fallback!r} is invalid; allowed: {' or '.join(map(repr, _FALLBACKS))}")


def placement(
    pw: PackedWeight,
    spec: PartitionSpec,
    mesh: Mesh | AbstractMesh,
    *,
    fallback: Fallback = "error",
    name: str = "packed weight",
) -> Placement:
    """Where ``pw``'s arrays go when the weight it stands for is laid out as ``spec`` on ``mesh``.

    With a ``(K, N)`` view (``contracted``), a split of the weight's first
    contracted axis (longer than 1) splits ``K``, one of its first free axis
    ``N``; a split of a later one is no range of the flattened axis. Then the
    codes follow only the axis they are stored along (``codes_axis``: ``K``,
    the weight's first axis, for every element format), the scales every
    split axis.

    Args:
      pw: the packed weight.
      spec: the weight's spec, one entry per axis of ``pw.shape`` (fewer: the rest None).
      mesh: a ``Mesh`` or ``AbstractMesh``.
      fallback: ``"error"``: a split the packed arrays cannot hold raises;
        ``"replicate"``: the weight stays whole along its mesh axes (in ``Placement.replicated``).
      name: the weight's name, for errors.

    Raises:
      ValueError: a split the packed arrays cannot hold (with ``fallback="error"``),
        one that cuts a scale block or leaves partial bytes of codes, or a bad
        ``spec`` / ``fallback``; each naming the weight and its axis.
    """
    _check_fallback(fallback)
    if not isinstance(spec, PartitionSpec) or len(spec) > len(pw.shape):
        raise ValueError(f"{name}: spec {spec!r} is invalid; allowed: a PartitionSpec of at most {len(pw.shape)} axes")
    try:
        shards = spec_shards(spec, mesh)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None
    # Mesh axes of size 1 split nothing.
    splits = [e if n > 1 else None for e, n in zip(spec, shards, strict=True)] + [None] * (len(pw.shape) - len(spec))
    # (weight axis, spec entry, why the packed arrays cannot follow it)
    problems: list[tuple[int | None, Any, str]] = []
    view: list[Any]
    origin: list[int | None]
    if pw.contracted is None:
        view, origin = list(splits), list(range(len(splits)))
    else:
        view, origin = [], []  # origin: the weight axis each view axis comes from
        free = tuple(d for d in range(len(pw.shape)) if d not in pw.contracted)
        for group, axis in ((pw.contracted, "K"), (free, "N")):
            first = next((d for d in group if pw.shape[d] > 1), None)
            view.append(None if first is None else splits[first])
            origin.append(first)
            problems += [
                (d, splits[d], f"the (K, N) view flattens it behind axis {first}, so its split is no range of {axis}")
                for d in group
                if d != first and splits[d] is not None
            ]
    lead = codes_axis(pw.qt)
    for v, e in enumerate(view):
        if e is not None and v != lead:
            view[v] = None
            problems.append(
                (
                    origin[v],
                    e,
                    "the packed codes are one flat array stored row-major with "
                    + ("no axis" if lead is None else f"axis {origin[lead]}")
                    + " outermost, so a split of this axis is no range of them",
                )
            )
    if problems and fallback == "error":
        d, e, why = problems[0]
        raise ValueError(
            f"{name}: weight axis {d} (of shape {pw.shape}) is split over {e!r}, but {why}; pass "
            f"fallback='replicate' to keep the weight whole along {e!r}, or map its logical name to None in the rules"
        )
    stored = PartitionSpec(*view)
    try:
        qt_specs = partition_specs(pw.qt, stored, mesh)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None
    # perm and in_scale stay whole on every device: dequantize scatters row i of the codes to input perm[i],
    # which may lie on any device, and divides by in_scale per input after that scatter (so in_scale's
    # rows are not the stored rows'); both are K numbers, small beside the K x N codes.
    extra = [PartitionSpec() for a in (pw.perm, pw.in_scale) if a is not None]  # PackedWeight's leaves: qt's first
    arrays = jax.tree_util.tree_unflatten(jax.tree.structure(pw), [*jax.tree.leaves(qt_specs), *extra])
    replicated = tuple(a for _, e, _ in problems for a in mesh_axes(e))
    return Placement(spec, stored, arrays, replicated)


def placements(
    model: nnx.Module,
    mesh: Mesh | AbstractMesh,
    rules: Sequence[tuple[str, str | None]] | None = None,
    *,
    fallback: Fallback = "error",
) -> dict[str, Placement]:
    """``{parameter path: Placement}`` of every packed weight of ``model`` on ``mesh``.

    Each weight's spec is the one the trainer gives the float parameter
    (``lowbit.trainer.sharding.state_shardings``): its ``nnx.with_partitioning``
    annotations (kept by ``pack``) through ``rules``, or, unannotated, a split
    over ``fsdp`` of its largest divisible axis.

    Args:
      model: a packed model.
      mesh: a ``Mesh`` or ``AbstractMesh`` with axes among ``data``, ``fsdp``, ``tensor``.
      rules: logical axis name -> mesh axis (default ``lowbit.trainer.sharding.DEFAULT_RULES``).
      fallback: as ``placement``.

    Raises:
      ValueError: as ``placement`` and ``state_shardings`` (each naming the parameter).
    """
    from lowbit.trainer import sharding  # noqa: PLC0415  (lowbit.trainer imports lowbit.nn)

    _check_fallback(fallback)
    params = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model, PackedParam))}
    # Stand-ins of the weights' shape with their annotations: the trainer reads them as a float parameter's.
    standins = {
        name: nnx.Variable(
            jax.ShapeDtypeStruct(v.get_raw_value().shape, v.get_raw_value().dtype),
            **(v.get_metadata() | {"eager_sharding": False}),
        )
        for name, v in params.items()
    }
    # state_shardings reads only the mesh's axis sizes, which an AbstractMesh has too.
    specs = sharding.state_shardings(standins, cast(Mesh, mesh), sharding.DEFAULT_RULES if rules is None else rules)
    return {
        name: placement(v.get_raw_value(), specs[name].get_value().spec, mesh, fallback=fallback, name=name)
        for name, v in params.items()
    }


def shard(
    model: nnx.Module,
    mesh: Mesh,
    rules: Sequence[tuple[str, str | None]] | None = None,
    *,
    fallback: Fallback = "error",
) -> nnx.Module:
    """A copy of a packed model with every array placed on ``mesh``: the packed weights per ``placements``.

    The other parameters and state (biases, norms, embeddings, RNG keys) are
    placed as the trainer places them (``lowbit.trainer.sharding.state_shardings``),
    so a jitted forward pass (``nnx.jit``) runs on the mesh; it dequantizes
    each weight from its local codes and scales and XLA moves what a product
    needs. The values are those of ``model``.

    Args:
      model: a packed model (``pack``, ``quantize_weights(..., pack=True)``, ``load``); not changed.
      mesh: the device ``Mesh`` (``lowbit.trainer.sharding.make_mesh``).
      rules: logical axis name -> mesh axis (default ``lowbit.trainer.sharding.DEFAULT_RULES``).
      fallback: as ``placement``: ``"error"`` (default) refuses a split the
        flat codes cannot hold; ``"replicate"`` keeps those weights whole along
        that mesh axis (``placements(model, mesh, rules, fallback="replicate")``
        lists which, in ``Placement.replicated``).

    Raises:
      TypeError: ``model`` is not an NNX module or ``mesh`` is not a ``Mesh``.
      ValueError: as ``placements``.
    """
    from lowbit.trainer import sharding  # noqa: PLC0415

    if not isinstance(model, nnx.Module):
        raise TypeError(f"model has type {type(model).__name__}; allowed: a flax.nnx.Module")
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh has type {type(mesh).__name__}; allowed: a jax.sharding.Mesh (make_mesh)")
    where = placements(model, mesh, rules, fallback=fallback)
    graphdef, *states = nnx.split(model, PackedParam, ...)
    weights, rest = states

    def named(path: tuple[Any, ...], v: nnx.Variable) -> nnx.Variable:
        specs = where["/".join(map(str, path))].arrays
        return v.replace(jax.tree.map(lambda s: NamedSharding(mesh, s), specs))

    rest_shardings = sharding.state_shardings(rest, mesh, sharding.DEFAULT_RULES if rules is None else rules)
    return nnx.merge(
        graphdef,
        jax.device_put(weights, nnx.map_state(named, weights)),
        jax.device_put(rest, rest_shardings),
    )


# ----- save / load ----------------------------------------------------------------------------------------------
MANIFEST = "manifest.json"
_ARRAYS = "arrays"
_KIND = "lowbit.packed"
_VERSION = 1
_QT_FIELDS = ("codes", "scale", "zero_point", "tensor_scale", "exponent")
_PW_FIELDS = ("perm", "in_scale")
_OP_KEYS = {"op", "param", "shape", "contracted", "dtype", "quantizer", "qt_shape", "qt_dtype", "arrays"}


def _floats(model: nnx.Module) -> dict[str, jax.Array]:
    """``{path: value}`` of the model's float parameters and batch statistics (what ``save`` keeps beside)."""
    return {
        "/".join(map(str, path)): v.get_value()
        for path, v in nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))
    }


def _spec(a: jax.Array | np.ndarray) -> list[Any]:
    return [list(a.shape), np.dtype(a.dtype).name]


def _digest(manifest: dict[str, Any], arrays: dict[str, dict[str, np.ndarray]]) -> str:
    h = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode())
    for group in sorted(arrays):
        for name in sorted(arrays[group]):
            h.update(f"{group}/{name}".encode())
            h.update(np.ascontiguousarray(arrays[group][name]).tobytes())
    return h.hexdigest()


def save(model: nnx.Module, directory: str | Path) -> Path:
    """Write a packed model: its packed arrays and float parameters (orbax) and a JSON manifest.

    ``directory`` gets ``arrays/`` (every packed array: codes, scales, zero
    points, ``perm``, ``in_scale``; and every float parameter and batch
    statistic) and ``manifest.json``: per packed weight its op name, parameter
    path, shape, contracted axes, dtype and quantizer as data
    (``lowbit.quant.serialize``), the name, shape and dtype of each array, and a
    SHA-256 of the manifest and the arrays.

    Args:
      model: an NNX model with ``PackedParam`` weights (``pack``, ``quantize_weights(..., pack=True)``).
      directory: a path that does not exist yet (or an empty directory).

    Returns:
      The directory's absolute path.

    Raises:
      TypeError: ``model`` is not an NNX module.
      ValueError: ``model`` has no packed weight, ``directory`` is not empty, or
        a quantizer that cannot be written as data (``serialize.to_dict``).
    """
    from lowbit.quant import serialize  # noqa: PLC0415  (only save / load need it)

    if not isinstance(model, nnx.Module):
        raise TypeError(f"model has type {type(model).__name__}; allowed: a flax.nnx.Module")
    directory = Path(directory).resolve()  # orbax needs an absolute path
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise ValueError(f"directory {directory} is not empty; allowed: a new or empty directory")
    entries, arrays = [], {}
    for i, (path, v) in enumerate(nnx.to_flat_state(nnx.state(model, PackedParam))):
        pw: PackedWeight = v.get_raw_value()
        fields = {f: getattr(pw.qt, f) for f in _QT_FIELDS} | {f: getattr(pw, f) for f in _PW_FIELDS}
        group = {f: np.asarray(a) for f, a in fields.items() if a is not None}
        arrays[f"w{i}"] = group
        entries.append(
            dict(
                op=v.get_metadata().get("op"),
                param="/".join(map(str, path)),
                shape=list(pw.shape),
                contracted=None if pw.contracted is None else list(pw.contracted),
                dtype=pw.dtype.name,
                quantizer=serialize.to_dict(pw.qt.quantizer),
                qt_shape=list(pw.qt.shape),
                qt_dtype=np.dtype(pw.qt.dtype).name,
                arrays={f: _spec(a) for f, a in group.items()},
            )
        )
    if not entries:
        raise ValueError(
            "model has no packed weight (PackedParam); allowed: a model from pack / quantize_weights(pack=True)"
        )
    floats = {k: np.asarray(a) for k, a in _floats(model).items()}
    names = sorted(floats)
    arrays["floats"] = {f"f{i}": floats[n] for i, n in enumerate(names)}
    manifest: dict[str, Any] = dict(
        kind=_KIND,
        version=_VERSION,
        weights=entries,
        floats=[[n, *_spec(floats[n])] for n in names],
    )
    manifest["sha256"] = _digest(manifest, arrays)
    import orbax.checkpoint as ocp  # noqa: PLC0415  (deferred, as lowbit.trainer.checkpoint)

    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / _ARRAYS, arrays)
        checkpointer.wait_until_finished()
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1, allow_nan=False))
    return directory


def _bad(directory: Path, what: str) -> ValueError:
    return ValueError(f"packed model {directory}: {MANIFEST}: {what}")


def _check_spec(directory: Path, where: str, spec: object) -> tuple[tuple[int, ...], np.dtype[Any]]:
    ok = (
        isinstance(spec, list)
        and len(spec) == 2
        and isinstance(spec[0], list)
        and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in spec[0])
        and isinstance(spec[1], str)
    )
    if not ok:
        raise _bad(directory, f"{where}={spec!r} is invalid; allowed: [shape (list of ints), dtype name]")
    try:
        dtype = np.dtype(spec[1])  # type: ignore[index]
    except TypeError:
        raise _bad(directory, f"{where} dtype {spec[1]!r} is unknown") from None  # type: ignore[index]
    return tuple(spec[0]), dtype  # type: ignore[index]


def _check_entry(directory: Path, i: int, e: object) -> dict[str, Any]:
    where = f"weights[{i}]"
    if not isinstance(e, dict) or set(e) != _OP_KEYS:
        keys = sorted(e) if isinstance(e, dict) else e
        raise _bad(directory, f"{where} has keys {keys}; allowed: {sorted(_OP_KEYS)}")
    ints = lambda v: isinstance(v, list) and all(isinstance(n, int) and not isinstance(n, bool) for n in v)  # noqa: E731
    checks = (
        ("op", isinstance(e["op"], str) and ":" in e["op"], "an op name 'path:key'"),
        ("param", isinstance(e["param"], str), "a parameter path"),
        ("shape", ints(e["shape"]), "a list of ints"),
        ("qt_shape", ints(e["qt_shape"]), "a list of ints"),
        ("contracted", e["contracted"] is None or ints(e["contracted"]), "null or a list of ints"),
        ("dtype", isinstance(e["dtype"], str), "a dtype name"),
        ("qt_dtype", isinstance(e["qt_dtype"], str), "a dtype name"),
        ("arrays", isinstance(e["arrays"], dict) and set(e["arrays"]) <= {*_QT_FIELDS, *_PW_FIELDS}, "array specs"),
    )
    for key, ok, allowed in checks:
        if not ok:
            raise _bad(directory, f"{where}.{key}={e[key]!r} is invalid; allowed: {allowed}")
    for key in ("dtype", "qt_dtype"):
        try:
            np.dtype(e[key])
        except TypeError:
            raise _bad(directory, f"{where}.{key}={e[key]!r} is not a dtype") from None
    for f in ("codes", "scale"):
        if f not in e["arrays"]:
            raise _bad(directory, f"{where}.arrays has no {f!r}")
    return e


def _expected(qt_quantizer: quant.Quantizer, shape: tuple[int, ...], dtype: np.dtype[Any]) -> dict[str, Any]:
    """Shape and dtype of each array ``quant.quantize`` gives for ``shape`` (the manifest must agree)."""
    from lowbit.quant.layout import layout  # noqa: PLC0415

    q = qt_quantizer

    def run(x: jax.Array) -> QTensor:
        scale = jnp.ones(layout(q, shape).scale_shape, jnp.float32) if q.scale.given else None
        return quant.quantize(q, x, scale=scale)

    out = jax.eval_shape(run, jax.ShapeDtypeStruct(shape, dtype))
    return {f: (tuple(a.shape), np.dtype(a.dtype)) for f in _QT_FIELDS if (a := getattr(out, f)) is not None}


def load(
    model: nnx.Module,
    directory: str | Path,
    mesh: Mesh | None = None,
    *,
    rules: Sequence[tuple[str, str | None]] | None = None,
    fallback: Fallback = "error",
) -> nnx.Module:
    """Read a packed model that ``save`` wrote, into a copy of a float model of the same architecture.

    Checks, in order: the manifest's structure and every field (a ``ValueError``
    naming it), that each quantizer rebuilds (``serialize.from_dict``) and its
    stored arrays have the shapes and dtypes it gives, the SHA-256 of manifest
    and arrays (any other edit), and that ``model`` has the saved float
    parameters and, for each op, the parameter it names (shape and dtype).

    With ``mesh``, the arrays are read to the host (the SHA-256 check reads
    every byte anyway) and then placed on the mesh by ``shard``.

    Args:
      model: a float NNX model of the architecture that was saved (its values
        are not used; its annotations place the weights on ``mesh``).
      directory: what ``save`` wrote.
      mesh: a device ``Mesh`` to place the model on (``shard``), or None.
      rules: with ``mesh``: as ``shard``.
      fallback: with ``mesh``: as ``shard``.

    Returns:
      A packed copy of ``model`` with the saved float parameters and packed weights (on ``mesh`` if given).

    Raises:
      TypeError: ``model`` is not an NNX module.
      ValueError: missing, malformed, tampered or mismatched files, or a model of another architecture.
    """
    from lowbit.quant import serialize  # noqa: PLC0415

    if not isinstance(model, nnx.Module):
        raise TypeError(f"model has type {type(model).__name__}; allowed: a flax.nnx.Module")
    _check_fallback(fallback)
    if mesh is not None and not isinstance(mesh, Mesh):
        raise TypeError(f"mesh has type {type(mesh).__name__}; allowed: a jax.sharding.Mesh (make_mesh) or None")
    directory = Path(directory).resolve()
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"packed model {directory}: cannot read {MANIFEST} ({err})") from None
    want_keys = {"kind", "version", "weights", "floats", "sha256"}
    if not isinstance(manifest, dict) or set(manifest) != want_keys:
        keys = sorted(manifest) if isinstance(manifest, dict) else type(manifest).__name__
        raise _bad(directory, f"has keys {keys}; allowed: {sorted(want_keys)}")
    if manifest["kind"] != _KIND or manifest["version"] != _VERSION:
        raise _bad(
            directory, f"kind/version {manifest['kind']!r}/{manifest['version']!r}; allowed: {_KIND!r}/{_VERSION}"
        )
    if not isinstance(manifest["weights"], list) or not manifest["weights"]:
        raise _bad(directory, "weights is invalid; allowed: a non-empty list")
    if not isinstance(manifest["floats"], list) or not all(
        isinstance(f, list) and len(f) == 3 for f in manifest["floats"]
    ):
        raise _bad(directory, "floats is invalid; allowed: a list of [path, shape, dtype]")
    entries = [_check_entry(directory, i, e) for i, e in enumerate(manifest["weights"])]
    abstract: dict[str, dict[str, jax.ShapeDtypeStruct]] = {}
    quantizers = []
    for i, e in enumerate(entries):
        try:
            q = serialize.from_dict(e["quantizer"])
        except ValueError as err:
            raise _bad(directory, f"weights[{i}].{err}") from None
        quantizers.append(q)
        shape, contracted = tuple(e["shape"]), e["contracted"]
        if (
            contracted is not None
            and sorted(set(contracted)) != sorted(contracted)
            or not all(0 <= d < len(shape) for d in contracted or ())
        ):
            raise _bad(directory, f"weights[{i}].contracted={contracted} is invalid; allowed: distinct axes of {shape}")
        want = shape if contracted is None else _matrix_shape(shape, tuple(contracted))
        if tuple(e["qt_shape"]) != tuple(want):
            raise _bad(
                directory,
                f"weights[{i}].shape={list(shape)} does not fit qt_shape={e['qt_shape']} "
                f"(contracted={contracted}); allowed: qt_shape {list(want)}",
            )
        specs = {f: _check_spec(directory, f"weights[{i}].arrays.{f}", s) for f, s in e["arrays"].items()}
        try:
            expected = _expected(q, tuple(e["qt_shape"]), np.dtype(e["qt_dtype"]))
        except (TypeError, ValueError) as err:
            raise _bad(directory, f"weights[{i}].quantizer does not fit qt_shape {e['qt_shape']}: {err}") from None
        for f in _QT_FIELDS:
            if expected.get(f) != specs.get(f):
                raise _bad(
                    directory,
                    f"weights[{i}].arrays.{f} is {specs.get(f)}; allowed: {expected.get(f)} "
                    f"(weights[{i}].quantizer on qt_shape {e['qt_shape']})",
                )
        abstract[f"w{i}"] = {f: jax.ShapeDtypeStruct(s, d) for f, (s, d) in specs.items()}
    float_specs = []
    for j, f in enumerate(manifest["floats"]):
        if not isinstance(f[0], str):
            raise _bad(directory, f"floats[{j}] path {f[0]!r} is invalid; allowed: a string")
        float_specs.append((f[0], *_check_spec(directory, f"floats[{j}]", [f[1], f[2]])))
    abstract["floats"] = {f"f{j}": jax.ShapeDtypeStruct(s, d) for j, (_, s, d) in enumerate(float_specs)}
    try:
        import orbax.checkpoint as ocp  # noqa: PLC0415

        with ocp.StandardCheckpointer() as checkpointer:
            restored = checkpointer.restore(directory / _ARRAYS, abstract)
    except Exception as err:  # orbax / tensorstore raise many types for missing or damaged files
        raise ValueError(f"packed model {directory}: cannot read the arrays ({type(err).__name__}: {err})") from None
    arrays = {g: {n: np.asarray(a) for n, a in group.items()} for g, group in restored.items()}
    if _digest({k: v for k, v in manifest.items() if k != "sha256"}, arrays) != manifest["sha256"]:
        raise ValueError(
            f"packed model {directory}: {MANIFEST} or the arrays do not match the recorded sha256 (edited or corrupt)"
        )
    # The model: the saved float parameters, then the packed weights.
    out = nnx.clone(model)
    have = {p: v for p, v in nnx.to_flat_state(nnx.state(out, nnx.Any(nnx.Param, nnx.BatchStat)))}
    by_name = {"/".join(map(str, p)): p for p in have}
    packed_params = {e["param"] for e in entries}
    saved = {name: arrays["floats"][f"f{j}"] for j, (name, _, _) in enumerate(float_specs)}
    if set(by_name) != set(saved) | packed_params:
        diff = sorted(set(by_name) ^ (set(saved) | packed_params))
        raise ValueError(f"packed model {directory} does not fit the model: parameters {diff} differ")
    for name, value in saved.items():
        var = have[by_name[name]]
        cur = var.get_value()
        if tuple(cur.shape) != value.shape or np.dtype(cur.dtype) != value.dtype:
            raise ValueError(
                f"packed model {directory} does not fit the model: parameter {name} is {value.shape} {value.dtype} "
                f"there, {tuple(cur.shape)} {np.dtype(cur.dtype)} in the model"
            )
        var.set_value(jnp.asarray(value))
    weights: dict[str, PackedWeight] = {}
    for i, (e, q) in enumerate(zip(entries, quantizers)):
        a = arrays[f"w{i}"]
        stored = {f: (jnp.asarray(a[f]) if f in a else None) for f in _QT_FIELDS}
        qt = QTensor(
            **stored,  # type: ignore[arg-type]  # codes and scale are always there (checked above)
            quantizer=q,
            shape=tuple(e["qt_shape"]),
            dtype=np.dtype(e["qt_dtype"]),
        )
        try:
            perm = a.get("perm")
            if perm is not None and not np.array_equal(np.sort(perm), np.arange(perm.size)):
                raise ValueError("perm is not a permutation")
            pw = packed_weight(
                qt,
                tuple(e["shape"]),
                None if e["contracted"] is None else tuple(e["contracted"]),
                e["dtype"],
                perm=None if perm is None else jnp.asarray(perm),
                in_scale=None if "in_scale" not in a else jnp.asarray(a["in_scale"]),
            )
        except ValueError as err:
            raise _bad(directory, f"weights[{i}] ({e['op']}): {err}") from None
        if e["op"] in weights:
            raise _bad(directory, f"weights[{i}].op {e['op']!r} is repeated")
        weights[e["op"]] = pw
    out = pack(out, weights)
    got = set(packed_weights(out))
    if got != packed_params:
        raise ValueError(
            f"packed model {directory} does not fit the model: its ops name parameters {sorted(packed_params)}, "
            f"the model's are {sorted(got)}"
        )
    return out if mesh is None else shard(out, mesh, rules, fallback=fallback)
