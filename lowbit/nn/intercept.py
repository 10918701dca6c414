"""Op interception: route a model's matmuls and convolutions through its recipe.

While a quantized model runs, ``jax.lax.dot_general``, ``jax.numpy.einsum``,
``jax.numpy.matmul``, the ``@`` operator and ``jax.lax.conv_general_dilated``
are replaced by interceptors (and the ``dot_general`` / ``einsum_op`` /
``conv_general_dilated`` attributes of Flax layers point at them for good).
An interceptor finds the module whose method runs the op (the innermost
``self`` on the Python stack that carries a lowbit path), names the op by its
kind and call order within that module (``dot_general0``, ``einsum1``...) and
asks the module's plan which rule, if any, quantizes it. Interception happens
while JAX traces; compiled code holds only the quantized ops.

The plan is made once, on the first call (``discover``): the model runs in
float on a copy while every op is recorded in forward order; then each op is
matched against the recipe (positions among weighted ops known, so
``position="edges"`` means the real first and last layer) and its quantizer
state is created. Patching is process-global while a quantized model runs:
do not run float and quantized models concurrently in threads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import string
import sys
import threading
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from lowbit.nn.einsum import einsum_dimension_numbers
from lowbit.recipes import op as oprule
from lowbit.recipes.rules import OpInfo, Recipe
from lowbit.training.qdot import conv_key

__all__ = ["LAYER_ATTRIBUTES", "ORIGINALS", "Recorded", "active", "assign_positions", "conv_general_dilated",
           "dispatch", "dot_general", "einsum", "float_operands", "matmul", "patched", "plan"]

# The functions lowbit replaces, as they were at import time.
ORIGINALS = dict(dot_general=lax.dot_general, einsum=jnp.einsum, matmul=jnp.matmul,
             conv_general_dilated=lax.conv_general_dilated)
_ARRAY_TYPES = (jax._src.array.ArrayImpl, jax._src.core.Tracer)
_ORIG_MATMUL = {t: (t.__matmul__, t.__rmatmul__) for t in _ARRAY_TYPES}


@dataclasses.dataclass
class Recorded:
    """One op seen while discovering or capturing: where it ran, what it is, its raw operands.

    Attributes:
      module, path, key: the module that ran it, its path and the op's name in it.
      call: the op.
      lhs, rhs: its operands as the op received them (before any quantizer);
        LSQ initialises its weight step from ``rhs``.
      shapes: ``(lhs.shape, rhs.shape)``.
      out: the op's result as the forward pass used it (``capture`` mode; float in ``record`` mode).
    """

    module: Any
    path: str
    key: str
    call: oprule.OpCall
    lhs: Any
    rhs: Any
    shapes: tuple
    out: Any = None


class _Frame:
    """The state of one quantized forward pass."""

    def __init__(self, recipe: Recipe, mode: str, runner: Callable | None, lookup: Callable | None):
        self.recipe, self.mode, self.runner, self.lookup = recipe, mode, runner, lookup
        self.counters: dict[tuple[int, str], int] = {}
        self.recorded: list[Recorded] = []
        self.busy = False


_LOCAL = threading.local()
_DEPTH = [0]
_LOCK = threading.Lock()


def _frames() -> list[_Frame]:
    if not hasattr(_LOCAL, "frames"):
        _LOCAL.frames = []
    return _LOCAL.frames


def active() -> _Frame | None:
    """The innermost quantized forward pass of this thread, if any."""
    frames = _frames()
    return frames[-1] if frames else None


@contextlib.contextmanager
def patched(recipe: Recipe, mode: str, runner: Callable | None = None, lookup: Callable | None = None):
    """Intercept ops for one forward pass of a quantized model.

    Args:
      recipe: the model's recipe.
      mode: ``record`` (ops run in float and are recorded), ``run``, or
        ``capture`` (ops run as in ``run`` and are recorded with their raw
        operands and result: calibration and per-op errors).
      runner: ``runner(module, key, rule, call, lhs, rhs)`` runs a matched op
        (``run`` mode): the framework side (NNX or linen) owns the state.
      lookup: ``lookup(module, key)``: the rule index of an op, or ``None`` (float).
    """
    frame = _Frame(recipe, mode, runner, lookup)
    _frames().append(frame)
    with _LOCK:
        if _DEPTH[0] == 0:
            _install()
        _DEPTH[0] += 1
    try:
        yield frame
    finally:
        _frames().pop()
        with _LOCK:
            _DEPTH[0] -= 1
            if _DEPTH[0] == 0:
                _uninstall()


def _install():
    lax.dot_general = dot_general
    jnp.einsum = einsum
    jnp.matmul = matmul
    lax.conv_general_dilated = conv_general_dilated
    for t in _ARRAY_TYPES:
        t.__matmul__ = lambda self, other: matmul(self, other)
        t.__rmatmul__ = lambda self, other: matmul(other, self)


def _uninstall():
    lax.dot_general = ORIGINALS["dot_general"]
    jnp.einsum = ORIGINALS["einsum"]
    jnp.matmul = ORIGINALS["matmul"]
    lax.conv_general_dilated = ORIGINALS["conv_general_dilated"]
    for t, (mm, rmm) in _ORIG_MATMUL.items():
        t.__matmul__, t.__rmatmul__ = mm, rmm


def _owner(depth: int = 3):
    """The innermost module on the Python stack that carries a lowbit path (``_lowbit_path``)."""
    f = sys._getframe(depth)
    while f is not None:
        code = f.f_code
        if code.co_argcount and code.co_varnames[0] == "self":
            obj = f.f_locals.get("self")
            if getattr(obj, "_lowbit_path", None) is not None:
                return obj
        f = f.f_back
    return None


def _is_float(*xs) -> bool:
    return all(hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) for x in xs)


def float_operands(frame: _Frame, lhs, rhs, fn: Callable):
    """The float op, its operands in the policy's compute dtype and its result in the dtype it had."""
    compute = frame.recipe.policy.compute_dtype
    if compute == jnp.float32 or not _is_float(lhs, rhs):
        return fn(lhs, rhs)
    out_dtype = jnp.result_type(lhs.dtype, rhs.dtype)
    return fn(lhs.astype(compute), rhs.astype(compute)).astype(out_dtype)


def dispatch(call: oprule.OpCall | None, lhs, rhs, fn: Callable):
    """Run one intercepted op: recorded, quantized by its rule, or in float.

    Args:
      call: the op, or ``None`` when lowbit cannot express it (it then runs in float).
      lhs, rhs: its operands.
      fn: ``fn(lhs, rhs)``, the float op.
    """
    frame = active()
    if frame is None or frame.busy:
        return fn(lhs, rhs)
    module = _owner()
    if module is None or call is None or not _is_float(lhs, rhs):
        return float_operands(frame, lhs, rhs, fn)
    n = frame.counters.get((id(module), call.kind), 0)
    frame.counters[(id(module), call.kind)] = n + 1
    key = f"{call.kind}{n}"
    rec = None
    if frame.mode != "run":
        rec = Recorded(module, module._lowbit_path, key, call, lhs, rhs, (lhs.shape, rhs.shape))
        frame.recorded.append(rec)
    if frame.mode == "record":
        out = fn(lhs, rhs)
    elif (rule_index := frame.lookup(module, key)) is None:
        out = float_operands(frame, lhs, rhs, fn)
    else:
        frame.busy = True  # the quantized op's own lax/jnp calls are not ops of the model
        try:
            out = frame.runner(module, key, frame.recipe.rules[rule_index], call, lhs, rhs)
        finally:
            frame.busy = False
    if rec is not None:
        rec.out = out
    return out


# ----- interceptors ----------------------------------------------------------------------


def _extra(kw: dict, *known: str) -> bool:
    """Whether ``kw`` sets an argument lowbit's ops do not take (``out_sharding=None`` and the like are fine)."""
    return any(v is not None for k, v in kw.items() if k not in known)


def _dn(dimension_numbers):
    (lc, rc), (lb, rb) = dimension_numbers
    return ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)))


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kw):
    """``lax.dot_general``, intercepted."""
    def fn(a, b):
        return ORIGINALS["dot_general"](a, b, dimension_numbers, precision=precision,
                                    preferred_element_type=preferred_element_type, **kw)
    call = None if _extra(kw) else oprule.OpCall(kind="dot_general", dn=_dn(dimension_numbers), precision=precision,
                                         preferred_element_type=preferred_element_type)
    return dispatch(call, lhs, rhs, fn)


def _explicit(spec: str, ndims: tuple[int, int]) -> str | None:
    """A two-operand einsum spec with ``...`` expanded and the output made explicit, or ``None``."""
    spec = spec.replace(" ", "")
    ins, arrow, out = spec.partition("->")
    parts = ins.split(",")
    if len(parts) != 2:
        return None
    free = [c for c in string.ascii_uppercase if c not in spec]
    ns = [nd - len(p.replace("...", "")) if "..." in p else 0 for p, nd in zip(parts, ndims)]
    if min(ns) < 0:
        return None
    ell = "".join(free[:max(ns)])  # numpy aligns ellipsis dims from the right
    parts = [p.replace("...", ell[len(ell) - n:]) for p, n in zip(parts, ns)]
    if arrow:
        out = out.replace("...", ell)
    else:  # numpy's implicit output: the ellipsis, then the labels seen once, sorted
        labels = parts[0] + parts[1]
        out = ell + "".join(sorted(c for c in set(labels) if labels.count(c) == 1 and c not in ell))
    return f"{parts[0]},{parts[1]}->{out}"


def einsum(subscripts, *operands, **kw):
    """``jnp.einsum``, intercepted (two operands; anything else runs in float)."""
    if len(operands) != 2 or not isinstance(subscripts, str):
        return ORIGINALS["einsum"](subscripts, *operands, **kw)
    a, b = operands

    def fn(x, y):
        return ORIGINALS["einsum"](subscripts, x, y, **kw)

    call = None
    if not _extra(kw, "precision", "preferred_element_type", "optimize") and hasattr(a, "ndim") and hasattr(b, "ndim"):
        spec = _explicit(subscripts, (a.ndim, b.ndim))
        try:
            dn, perm = einsum_dimension_numbers(spec) if spec else (None, None)
        except ValueError:
            dn = None
        # Broadcasting labels (size 1 against n) are einsum's, not dot_general's: leave them in float.
        if dn is not None and all(a.shape[i] == b.shape[j] for i, j in zip(dn[0][0] + dn[1][0], dn[0][1] + dn[1][1])):
            call = oprule.OpCall(kind="einsum", dn=dn, perm=perm, precision=kw.get("precision"),
                                 preferred_element_type=kw.get("preferred_element_type"))
    return dispatch(call, a, b, fn)


def matmul(a, b, *, precision=None, preferred_element_type=None, **kw):
    """``jnp.matmul`` and ``@``, intercepted (2-D weights and equal batch shapes; others in float)."""
    def fn(x, y):
        return ORIGINALS["matmul"](x, y, precision=precision, preferred_element_type=preferred_element_type, **kw)

    call = None
    a_nd, b_nd = getattr(a, "ndim", 0), getattr(b, "ndim", 0)
    if not _extra(kw) and a_nd >= 2 and b_nd == 2:
        dn = (((a_nd - 1,), (0,)), ((), ()))
    elif not _extra(kw) and a_nd == b_nd >= 3 and a.shape[:-2] == b.shape[:-2]:
        batch = tuple(range(a_nd - 2))
        dn = (((a_nd - 1,), (a_nd - 2,)), (batch, batch))
    else:
        dn = None
    if dn is not None:
        call = oprule.OpCall(kind="dot_general", dn=dn, precision=precision,
                             preferred_element_type=preferred_element_type)
    return dispatch(call, a, b, fn)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                         preferred_element_type=None, **kw):
    """``lax.conv_general_dilated``, intercepted."""
    kwargs = dict(window_strides=window_strides, padding=padding, lhs_dilation=lhs_dilation,
                  rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                  feature_group_count=feature_group_count, batch_group_count=batch_group_count,
                  precision=precision, preferred_element_type=preferred_element_type)

    def fn(x, y):
        return ORIGINALS["conv_general_dilated"](x, y, **kwargs, **kw)

    call = None
    try:
        conv = conv_key(kwargs)
        if not _extra(kw):
            call = oprule.OpCall(kind="conv", conv=conv, preferred_element_type=preferred_element_type)
    except TypeError:  # e.g. a ConvDimensionNumbers of lists: run it in float
        pass
    return dispatch(call, lhs, rhs, fn)


# What Flax layers keep as attributes, by the original function: replaced on quantized models.
LAYER_ATTRIBUTES = {"dot_general": dot_general, "einsum_op": einsum, "conv_general_dilated": conv_general_dilated}
ORIGINALS["einsum_op"] = ORIGINALS["einsum"]


def assign_positions(recorded: list[Recorded]) -> list[OpInfo]:
    """``OpInfo`` of every recorded op: positions among the weighted ops in forward order."""
    count = sum(r.call.weighted for r in recorded)
    infos, pos = [], 0
    for r in recorded:
        position = None
        if r.call.weighted:
            position, pos = pos, pos + 1
        infos.append(OpInfo(path=r.path, kind=r.call.kind, weighted=r.call.weighted, position=position, count=count))
    return infos


def plan(recipe: Recipe, recorded: list[Recorded], *, narrowed: bool) -> list[int | None]:
    """The rule index of every recorded op, with warnings for rules that match nothing.

    Raises:
      ValueError: ``narrowed`` (include/exclude given) and no op is quantized.
    """
    infos = assign_positions(recorded)
    chosen = [recipe.match(info) for info in infos]
    kinds = {i.kind for i in infos}
    for i, rule in enumerate(recipe.rules):
        if i in chosen:
            continue
        missing = [k for k in (rule.kinds or ()) if k not in kinds]
        why = (f"the model runs no {', '.join(missing)} op" if missing else "it matches no op")
        warnings.warn(f"recipe {recipe.name!r}: rule {i} {rule.selector()} is unused: {why}", stacklevel=4)
    if narrowed and recipe.rules and all(c is None for c in chosen):
        raise ValueError(f"quantize: include/exclude leave no op of the model to quantize (recipe {recipe.name!r}; "
                         f"op paths: {', '.join(sorted({i.path or '<root>' for i in infos}))})")
    return chosen
