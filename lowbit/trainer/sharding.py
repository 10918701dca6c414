"""Where the train state and the batches live on a ``data`` × ``fsdp`` × ``tensor`` device mesh.

The train step is written for the global arrays and compiled with GSPMD
(``jax.jit`` with in/out shardings), so sharding changes where values live, not
what is computed: a per-tensor or per-channel amax, an amax history or a
GradScale is a reduction over the whole (global) tensor, whatever its layout,
and XLA inserts the collectives. Three axes:

* ``data``: the batch is split along it; the state is replicated over it.
* ``fsdp``: the batch is split along it too, and so are the weights (ZeRO-3 /
  FSDP: each weight is all-gathered for its products, its gradient
  reduce-scattered).
* ``tensor``: tensor parallel: the weight axes a model names (Megatron-style
  column and row splits) are split along it.

Which axis of a parameter goes where comes from the model's own annotations
(``nnx.with_partitioning`` / linen ``nn.with_partitioning``), read from the
variable's metadata: mesh axis names as they are, logical names through
``rules`` (``DEFAULT_RULES``: the names lowbit's own ViT and LM use). A
parameter without annotations is split along ``fsdp`` on its largest axis that
the ``fsdp`` size divides (matrices and larger only), or replicated. Optimizer
moments follow their parameter (optax keeps the variable and its metadata).

Quantizer state (``QuantParam`` LSQ steps and PACT clips, ``OverwriteWithGradient``
amax histories and GradScales, ``QuantKey`` stochastic-rounding keys) is
replicated: it is a handful of numbers per op, every device needs all of them
in every product, and the statistics it is computed from are global reductions
anyway, so splitting it would only add an all-gather per use.

Blocks of parameters never straddle shards: a block-scaled recipe (MX, NVFP4
and their 2-D tiles) or a grouped quantizer needs every shard of a split
parameter axis to hold whole blocks, so ``check_blocks`` refuses a mesh whose
shard boundary would fall inside one, before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lowbit.nn.variables import OverwriteWithGradient, QuantKey, QuantParam

__all__ = [
    "AXES",
    "BATCH_AXES",
    "DEFAULT_RULES",
    "axis_size",
    "batch_sharding",
    "batch_shards",
    "block_lengths",
    "check_blocks",
    "make_mesh",
    "parse_mesh",
    "place",
    "state_shardings",
]

AXES = ("data", "fsdp", "tensor")
"""The mesh axes, in the mesh's order (``data`` outermost: on real hardware the
innermost axis should map to the fastest links, which tensor parallelism needs most)."""

BATCH_AXES = ("data", "fsdp")
"""The batch is split over both: FSDP is data parallel with sharded weights."""

DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
)
"""Logical axis name → mesh axis (``None``: replicated); the names lowbit's ViT and LM use."""

_QUANTIZER_STATE = (QuantParam, OverwriteWithGradient, QuantKey)
_MESH_TEXT = re.compile(r"^\s*([a-z]+)\s*=\s*(\d+)\s*$")


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=2,fsdp=2,tensor=2"`` → ``{"data": 2, "fsdp": 2, "tensor": 2}``; axes left out have size 1.

    Raises:
      TypeError: ``text`` is not a string.
      ValueError: an axis not in ``AXES``, one named twice, or a size that is not
        a positive integer.
    """
    if not isinstance(text, str):
        raise TypeError(f"mesh must be a string like 'data=2,fsdp=2,tensor=2', got {text!r}")
    sizes: dict[str, int] = {}
    for part in text.split(","):
        m = _MESH_TEXT.match(part)
        if m is None:
            raise ValueError(f"mesh: {part.strip()!r} is not AXIS=SIZE; write e.g. 'data=2,fsdp=2,tensor=2'")
        axis, size = m.group(1), int(m.group(2))
        if axis not in AXES:
            raise ValueError(f"mesh: unknown axis {axis!r}; the axes are {', '.join(AXES)}")
        if axis in sizes:
            raise ValueError(f"mesh: axis {axis!r} given twice")
        if size < 1:
            raise ValueError(f"mesh: {axis} size must be >= 1, got {size}")
        sizes[axis] = size
    return {a: sizes.get(a, 1) for a in AXES}


def make_mesh(shape: str | Mapping[str, int] | Mesh, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``Mesh`` with the three axes of ``AXES``, over the first ``prod(sizes)`` devices.

    Args:
      shape: ``"data=2,fsdp=2,tensor=2"``, a mapping of axis → size (missing axes
        have size 1), or a ``Mesh`` (returned as is after checking its axis names).
      devices: The devices to use (default ``jax.devices()``).

    Raises:
      ValueError: an unknown axis, or more devices asked for than there are.
    """
    if isinstance(shape, Mesh):
        unknown = [a for a in shape.axis_names if a not in AXES]
        if unknown:
            raise ValueError(f"mesh: axis names {unknown} are not among {AXES}")
        return shape
    sizes = parse_mesh(shape) if isinstance(shape, str) else _sizes(shape)
    available = list(jax.devices() if devices is None else devices)
    need = math.prod(sizes.values())
    if need > len(available):
        raise ValueError(
            f"mesh: {_text(sizes)} needs {need} devices but jax sees {len(available)}; on CPU set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={need} before jax starts"
        )
    grid = np.array(available[:need], dtype=object).reshape([sizes[a] for a in AXES])
    return Mesh(grid, AXES)


def _sizes(shape: Mapping[str, int]) -> dict[str, int]:
    if not isinstance(shape, Mapping):
        raise TypeError(f"mesh must be a string, a mapping of axis to size or a jax Mesh, got {shape!r}")
    return parse_mesh(",".join(f"{k}={v}" for k, v in shape.items()) or "data=1")


def _text(sizes: Mapping[str, int]) -> str:
    return ",".join(f"{a}={n}" for a, n in sizes.items())


def axis_size(mesh: Mesh, axis: str) -> int:
    """The size of ``axis`` in ``mesh`` (1 when the mesh lacks it)."""
    return dict(mesh.shape).get(axis, 1)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches split along their first axis over the mesh's batch axes (``data`` and ``fsdp``)."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    return NamedSharding(mesh, PartitionSpec(axes or None))


def batch_shards(mesh: Mesh) -> int:
    """How many pieces a batch is split into."""
    return math.prod(axis_size(mesh, a) for a in BATCH_AXES)


def state_shardings(state: Any, mesh: Mesh, rules: Sequence[tuple[str, str | None]] = DEFAULT_RULES) -> Any:
    """A ``NamedSharding`` for every leaf of ``state`` (a pytree of nnx variables and arrays).

    Args:
      state: e.g. a ``lowbit.trainer.TrainState``.
      mesh: The device mesh (``make_mesh``).
      rules: Logical axis name → mesh axis, for annotations that are not mesh axes.

    Returns:
      A pytree with the structure of ``state``: a ``NamedSharding`` in place of
      each array (jit's in/out shardings, ``place``'s target).

    Raises:
      ValueError: an annotation with a name neither a mesh axis nor in ``rules``,
        one with a different rank from its value, or a split axis that the mesh
        axis size does not divide; each naming the parameter.
    """
    specs = jax.tree_util.tree_map_with_path(
        lambda path, v: _spec(jax.tree_util.keystr(path), v, mesh, dict(rules)),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def _spec(path: str, leaf: Any, mesh: Mesh, rules: dict[str, str | None]) -> Any:
    """The partition spec of one leaf; a Variable keeps its wrapper so the tree matches ``state``."""
    if not isinstance(leaf, nnx.Variable):
        return PartitionSpec()
    value = leaf.get_value()
    shape = tuple(getattr(value, "shape", ()))
    if isinstance(leaf, _QUANTIZER_STATE):
        spec = PartitionSpec()
    else:
        names = _annotation(leaf)
        spec = _annotated(path, names, shape, mesh, rules) if names is not None else _fsdp(shape, mesh)
    return leaf.replace(spec)


def _annotation(leaf: nnx.Variable) -> tuple[str | None, ...] | None:
    """The axis names a model gave a variable (flax 0.12 ``out_sharding``; older ``sharding_names``/``sharding``)."""
    meta = leaf.get_metadata()
    for key in ("out_sharding", "sharding_names", "sharding"):
        names = meta.get(key)
        if names:
            return tuple(names)
    return None


def _annotated(
    path: str, names: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh, rules: dict[str, str | None]
) -> PartitionSpec:
    if len(names) != len(shape):
        raise ValueError(f"sharding of {path}: annotation {names} has {len(names)} axes, the value has shape {shape}")
    axes: list[str | None] = []
    for name, n in zip(names, shape, strict=True):
        axis = name if name is None or name in AXES else rules.get(name, _UNKNOWN)
        if axis is _UNKNOWN:
            raise ValueError(
                f"sharding of {path}: axis name {name!r} is neither a mesh axis ({', '.join(AXES)}) nor a "
                f"logical name in the rules ({', '.join(rules) or 'none'})"
            )
        if axis is not None and axis_size(mesh, axis) == 1:
            axis = None  # a mesh without this axis (or of size 1): replicated along it
        if axis is not None and n % axis_size(mesh, axis):
            raise ValueError(
                f"sharding of {path}: axis of size {n} is split over mesh axis {axis!r} of size "
                f"{axis_size(mesh, axis)}, which does not divide it"
            )
        axes.append(axis)
    used = [a for a in axes if a is not None]
    if len(used) != len(set(used)):
        raise ValueError(f"sharding of {path}: mesh axis used twice in {tuple(axes)} (from {names})")
    return PartitionSpec(*axes)


_UNKNOWN: Any = object()


def _fsdp(shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Unannotated: split the largest axis ``fsdp`` divides, for matrices and larger; else replicate."""
    n = axis_size(mesh, "fsdp")
    if n == 1 or len(shape) < 2:
        return PartitionSpec()
    candidates = [d for d in range(len(shape)) if shape[d] % n == 0]
    if not candidates:
        return PartitionSpec()
    d = max(candidates, key=lambda i: (shape[i], -i))
    return PartitionSpec(*(("fsdp" if i == d else None) for i in range(len(shape))))


def place(tree: Any, shardings: Any) -> Any:
    """``jax.device_put(tree, shardings)`` that also works across processes (``jax.distributed``).

    Every process holds the same host values (the same seed, the same
    checkpoint); each builds the shards its own devices hold from them.
    ``jax.device_put`` cannot move an array already on one local device to a
    sharding that spans other processes' devices.
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def one(x: Any, s: NamedSharding) -> jax.Array:
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # typed keys travel as their raw data
            return jax.random.wrap_key_data(one(jax.random.key_data(x), s), impl=jax.random.key_impl(x))
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, s, lambda index: host[index])

    return jax.tree.map(one, tree, shardings)


def block_lengths(recipe: Any) -> list[int]:
    """Every block, tile and group length a recipe's quantizers use (empty: none blocked)."""
    found: set[int] = set()
    for obj in _walk(recipe):
        size = getattr(obj, "block_size", None)
        if isinstance(size, int):
            found.add(size)
        shape = getattr(obj, "shape", None)
        if type(obj).__name__ == "Block" and isinstance(shape, tuple):
            found.update(int(s) for s in shape)
        if type(obj).__name__ == "Group" and isinstance(getattr(obj, "size", None), int):
            found.add(obj.size)
    return sorted(found - {1})


def _walk(obj: Any, seen: set[int] | None = None) -> Iterator[Any]:
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    yield obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _walk(getattr(obj, f.name), seen)
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _walk(item, seen)


def check_blocks(shardings: Any, state: Any, recipe: Any, *, mesh: Mesh) -> None:
    """Refuses a layout whose shard boundaries would fall inside a quantization block of a parameter.

    Each split axis of a parameter must hold a whole number of blocks per
    shard, for every block, tile or group length of the recipe, so block
    scales are computed from one device's values. (The batch axis is not
    checked: weight-gradient products block along the flattened batch × token
    rows, which a shard boundary may cut; XLA then moves the straddling rows
    and the result is still the single-device one.)

    Args:
      shardings: ``state_shardings(state, mesh)``.
      state: The train state.
      recipe: The recipe (``lowbit.recipes.Recipe``).
      mesh: The mesh.

    Raises:
      ValueError: naming the parameter, its shard length and the block.
    """
    lengths = block_lengths(recipe)
    if not lengths:
        return
    name = getattr(recipe, "name", "the recipe")
    leaves = jax.tree_util.tree_leaves_with_path(state)
    for (path, value), sh in zip(leaves, jax.tree.leaves(shardings), strict=True):
        for d, axis in enumerate(sh.spec):
            if axis is None:
                continue
            local = value.shape[d] // axis_size(mesh, axis)
            for b in lengths:
                if local % b:
                    raise ValueError(
                        f"mesh: {jax.tree_util.keystr(path)} (shape {tuple(value.shape)}) split over {axis!r} "
                        f"leaves {local} elements per shard on axis {d}, not a multiple of {name}'s "
                        f"{b}-element blocks: a shard boundary would fall inside a block"
                    )
