"""Op interception: route a model's matmuls and convolutions through its recipe.

Two layers of hooks, installed once (``install``) and inert in every thread that
is not running a quantized model (so a float model in another thread computes
exactly what it would without lowbit):

* **API hooks** replace ``jax.lax.dot_general``, ``jax.numpy.einsum``,
  ``jax.numpy.matmul``, the ``@`` operator and ``jax.lax.conv_general_dilated``
  (and Flax layers' ``dot_general`` / ``einsum_op`` / ``conv_general_dilated``
  attributes point at them). They see the operands as the user wrote them, and
  name the op by its API (``einsum1``).
* **Primitive hooks** on ``dot_general_p`` / ``conv_general_dilated_p`` catch
  every other route to a product: a ``dot_general`` imported under another name
  before lowbit, ``jnp.dot``, ``jnp.tensordot``... (``dot_general<n>``). Hooks on
  the shape-only primitives (transpose, reshape, convert...) follow which arrays
  derive from a parameter, and a hook on ``pure_callback`` reports code lowbit
  cannot see into.

An interceptor finds the module whose method runs the op (the innermost
``self`` on the Python stack that carries a lowbit path), names the op by its
kind and call order within that module (``dot_general0``, ``einsum1``...) and
asks the module's plan which rule, if any, quantizes it. An operand is a
*weight* when it is (or is a reshaped / transposed / cast view of) a parameter of
a module on the stack, as qwix's ``find_param``; a product of two activations
(``q @ k.T``, vmapped or not) is an activation product.

Every JAX structure a method may use is traced through the hooks, never from a
cache (``patched``): inner ``jax.jit`` functions run inline (``jax.disable_jit``,
with ``lax.scan``/``while_loop`` kept as loops), and a per-pass cache context
makes ``lax.scan``, ``jax.checkpoint`` and ``cond`` bodies trace afresh. Each
pass records what happened to every op (``_Frame.seen``), so a planned op that
did not run through its quantizer, or a product lowbit cannot quantize where a
rule wants it, is reported (``never_silent``) instead of running in float.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import string
import sys
import threading
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen, nnx
from jax import lax
from jax._src import callback as _callback
from jax._src import core as _core
from jax._src.interpreters import partial_eval as _pe
from jax._src.lax import convolution as _conv
from jax._src.lax import lax as _lax
from jax._src.lax.control_flow import loops as _loops

from lowbit.nn.einsum import einsum_dimension_numbers
from lowbit.nn.variables import OverwriteWithGradient, QuantParam
from lowbit.recipes import op as oprule
from lowbit.recipes.rules import OpInfo, Recipe
from lowbit.training.qdot import conv_key

__all__ = [
    "LAYER_ATTRIBUTES",
    "ORIGINALS",
    "UNKNOWN",
    "NotQuantizedError",
    "Recorded",
    "active",
    "assign_positions",
    "conv_general_dilated",
    "dot_general",
    "einsum",
    "float_operands",
    "install",
    "matmul",
    "never_silent",
    "patched",
    "plan",
    "staged",
]

# The functions lowbit replaces, as they were at import time.
ORIGINALS = dict(
    dot_general=lax.dot_general, einsum=jnp.einsum, matmul=jnp.matmul, conv_general_dilated=lax.conv_general_dilated
)
_ARRAY_TYPES = (jax._src.array.ArrayImpl, jax._src.core.Tracer)
# Primitives whose output is the operand's values rearranged or cast: a weight stays a weight through them.
_VIEWS = (
    _lax.convert_element_type_p,
    _lax.transpose_p,
    _lax.reshape_p,
    _lax.squeeze_p,
    _lax.broadcast_in_dim_p,
    _lax.copy_p,
    _lax.reduce_precision_p,
)
# Frames of JAX re-evaluating a jaxpr it already traced (jvp/transpose/partial eval of scan, remat,
# custom_vjp bodies): products bound there were seen, or deliberately left alone, when first traced.
_EVALUATORS = frozenset({"eval_jaxpr", "jaxpr_as_fun", "backward_pass", "_eval_jaxpr_padded"})
_JAX_DIR = os.path.dirname(jax.__file__)
# lowbit's own numerics: a product issued there (a quantized op JAX re-traces for a scan's or remat's
# derivative, say) is never one of the model's ops.
_LOWBIT_NUMERICS = tuple(
    os.path.join(os.path.dirname(os.path.dirname(__file__)), d) + os.sep
    for d in ("formats", "quant", "training", "recipes")
)
_CUSTOM_AD = os.path.join(_JAX_DIR, "_src", "custom_derivatives.py")

UNKNOWN = object()  # a lookup's answer for an op the model's plan does not contain


class NotQuantizedError(RuntimeError):
    """A product a quantized model's recipe wants quantized ran in float, or could not be intercepted."""


@dataclasses.dataclass
class Recorded:
    """One op seen while discovering or capturing: where it ran, what it is, its raw operands.

    Attributes:
      module, path, key: the module that ran it, its path and the op's name in it.
      call: the op.
      lhs, rhs: its operands as the op received them (before any quantizer).
      shapes: ``(lhs.shape, rhs.shape)``.
      out: the op's result as the forward pass used it (``capture`` mode; float in ``record`` mode).
      stack: for an op inside ``nnx.vmap``/``nnx.scan``: the leading axes its module's
        parameters have outside the transform (one state per stacked layer), else ``()``.
      weight: ``(module path, variable path in it)`` of the parameter the rhs is (a view of), else ``None``.
    """

    module: Any
    path: str
    key: str
    call: oprule.OpCall
    lhs: Any
    rhs: Any
    shapes: tuple
    out: Any = None
    stack: tuple = ()
    weight: Any = None


class _Frame:
    """The state of one quantized forward pass (one thread, one call of a model's method)."""

    def __init__(self, recipe: Recipe, mode: str, runner: Callable | None, lookup: Callable | None):
        self.recipe, self.mode, self.runner, self.lookup = recipe, mode, runner, lookup
        self.counters: dict[tuple[int, str], int] = {}
        self.recorded: list[Recorded] = []
        self.busy = False
        # op name -> "quantized", "float" (planned so), "unknown" (not in the plan) or why it cannot be quantized
        self.seen: dict[str, str] = {}
        self.infos: dict[str, OpInfo] = {}
        self._params: dict[int, tuple[Any, dict[int, Any]]] = {}  # id(module) -> (module, {id(value): variable})
        self._views: dict[int, tuple[Any, Any]] = {}  # id(view) -> (view, variable): kept alive so ids stay unique
        self.owners: dict[int, Any] = {}  # id(parameter variable) -> the module holding it

    def param_of(self, x, modules) -> Any:
        """The parameter variable ``x`` is (a view of), searched in ``modules``' own parameters, or ``None``."""
        if id(x) in self._views:
            return self._views[id(x)][1]
        for m in modules:
            entry = self._params.get(id(m))
            if entry is None or not isinstance(m, nnx.Module):  # linen creates parameters as it runs
                entry = self._params[id(m)] = (m, _parameters(m))
            if id(x) in entry[1]:
                self.owners.setdefault(id(entry[1][id(x)]), m)
                return entry[1][id(x)]
        if _inner_argument(x):
            # A parameter passed into jax.checkpoint / lax.scan / jax.vmap as an argument arrives as a new
            # tracer of the inner trace: recognise it by type (whole, or one slice of a stacked parameter).
            for m in modules:
                for variable in self._params[id(m)][1].values():
                    value = variable.get_value() if hasattr(variable, "get_value") else variable
                    if value.dtype == x.dtype and (value.shape == x.shape or value.shape[1:] == x.shape):
                        self.owners.setdefault(id(variable), m)
                        return variable
        return None

    def add_view(self, view, variable) -> None:
        self._views[id(view)] = (view, variable)


def _inner_argument(x) -> bool:
    """Whether ``x`` is an input of the innermost jaxpr being traced (not computed in it)."""
    frame = getattr(getattr(x, "_trace", None), "frame", None)
    var = getattr(x, "val", None)
    return frame is not None and var is not None and any(v is var for v in getattr(frame, "invars", ()))


def _parameters(module) -> dict[int, Any]:
    """``{id(value): variable}`` of a module's parameters (its own and its children's)."""
    if isinstance(module, nnx.Module):
        found = {}
        for _, v in nnx.iter_graph(module):
            if isinstance(v, nnx.Param) and not isinstance(v, (QuantParam, OverwriteWithGradient)):
                value = v.get_value()
                found[id(value)] = v
        return found
    if isinstance(module, linen.Module) and module.scope is not None:
        leaves = jax.tree.leaves(module.variables.get("params", {}))
        return {id(v): v for v in leaves}
    return {}


_LOCAL = threading.local()
_IDS = itertools.count(1)
# Tracing-cache context: a fresh value per traced pass, so no jit/scan/remat body traced for another
# pass (a float one, or one whose quantizer state were other tracers) is reused.
_PASS = jax.make_user_context(None)
_INSTALL_LOCK = threading.Lock()
_INSTALLED = [False]


def _frames() -> list[_Frame]:
    if not hasattr(_LOCAL, "frames"):
        _LOCAL.frames = []
    return _LOCAL.frames


def active() -> _Frame | None:
    """The innermost quantized forward pass of this thread, if any."""
    frames = _frames()
    return frames[-1] if frames else None


def _live() -> _Frame | None:
    """The active pass, unless none is running or it is running lowbit's own code (a quantized op)."""
    frame = active()
    return None if frame is None or frame.busy else frame


def staged() -> bool:
    """Whether this thread is tracing into a jaxpr (inside ``jit``, ``eval_shape``...), not running eagerly."""
    trace = _core.trace_ctx.trace
    while trace is not None:
        if isinstance(trace, _pe.DynamicJaxprTrace):
            return True
        trace = getattr(trace, "parent_trace", None)
    return False


@contextlib.contextmanager
def patched(recipe: Recipe, mode: str, runner: Callable | None = None, lookup: Callable | None = None):
    """Intercept ops for one forward pass of a quantized model in this thread.

    Inner ``jax.jit`` functions run inline (their operands stay the model's own
    arrays, so weights are recognised and nothing comes from a jit cache);
    scans and loops stay loops. When tracing, a fresh cache context makes every
    scan, remat and cond body trace again through the hooks.

    Args:
      recipe: the model's recipe.
      mode: ``record`` (ops run in float and are recorded), ``run``, or
        ``capture`` (ops run as in ``run`` and are recorded with their raw
        operands and result: calibration and per-op errors).
      runner: ``runner(module, key, rule, call, lhs, rhs)`` runs a matched op
        (``run`` mode): the framework side (NNX or linen) owns the state.
      lookup: ``lookup(module, key)``: the rule index of an op, ``None`` (float)
        or ``UNKNOWN`` (not in the plan).
    """
    install()
    frame = _Frame(recipe, mode, runner, lookup)
    with contextlib.ExitStack() as stack:
        if staged():
            stack.enter_context(_PASS(next(_IDS)))
        stack.enter_context(jax.disable_jit())
        _frames().append(frame)
        try:
            yield frame
        finally:
            _frames().pop()


class _LoopConfig:
    """``jax._src.config`` as ``lax.scan``/``while_loop`` read it: ``disable_jit`` is off inside a quantized pass.

    A pass disables jit to inline inner jits; a scan must stay a scan (an unrolled
    12-layer scan is not what the user compiled), so the loops module reads this.
    """

    def __init__(self, config):
        self._config = config

    def __getattr__(self, name):
        value = getattr(self._config, name)
        return _NoDisable(value) if name == "disable_jit" else value


class _NoDisable:
    def __init__(self, state):
        self._state = state

    @property
    def value(self):
        return self._state.value and active() is None

    def __getattr__(self, name):
        return getattr(self._state, name)


def install() -> None:
    """Install the hooks once per process; they do nothing outside a quantized pass of this thread."""
    with _INSTALL_LOCK:
        if _INSTALLED[0]:
            return
        lax.dot_general = dot_general
        jnp.einsum = einsum
        jnp.matmul = matmul
        lax.conv_general_dilated = conv_general_dilated
        for t in _ARRAY_TYPES:
            mm, rmm = t.__matmul__, t.__rmatmul__
            t.__matmul__ = _operator(mm, lambda self, other: matmul(self, other))
            t.__rmatmul__ = _operator(rmm, lambda self, other: matmul(other, self))
        _hook_product(_lax.dot_general_p, "dot_general")
        _hook_product(_conv.conv_general_dilated_p, "conv")
        for prim in _VIEWS:
            _hook_view(prim)
        _hook_callback(_callback.pure_callback_p)
        _loops.config = _LoopConfig(_loops.config)
        _INSTALLED[0] = True


def _operator(original, intercepted):
    def op(self, other):
        return original(self, other) if _live() is None else intercepted(self, other)

    return op


# ----- where an op runs ------------------------------------------------------------------


def _walk(depth: int) -> tuple[list, str | None]:
    """``(modules, barrier)``: the lowbit modules on the stack (innermost first) and what lies between.

    ``barrier`` is ``"internal"`` when JAX is re-evaluating a traced jaxpr below
    the innermost module, ``"custom"`` inside a user ``custom_vjp``/``custom_jvp``
    function, else ``None``.
    """
    f = sys._getframe(depth)
    modules, barrier = [], None
    while f is not None:
        code = f.f_code
        if not modules and barrier != "internal":
            if code.co_filename.startswith(_LOWBIT_NUMERICS):
                barrier = "internal"
            elif barrier is None and code.co_filename.startswith(_JAX_DIR):
                if code.co_name in _EVALUATORS:
                    barrier = "internal"
                elif code.co_filename == _CUSTOM_AD:
                    barrier = "custom"
        if code.co_argcount and code.co_varnames[0] == "self":
            obj = f.f_locals.get("self")
            if getattr(obj, "_lowbit_path", None) is not None and all(obj is not m for m in modules):
                modules.append(obj)
        f = f.f_back
    return modules, barrier


def _is_float(*xs) -> bool:
    return all(hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) for x in xs)


def float_operands(frame: _Frame, lhs, rhs, fn: Callable):
    """The float op, its operands in the policy's compute dtype and its result in the dtype it had."""
    compute = frame.recipe.policy.compute_dtype
    if compute == jnp.float32 or not _is_float(lhs, rhs):
        return fn(lhs, rhs)
    out_dtype = jnp.result_type(lhs.dtype, rhs.dtype)
    return fn(lhs.astype(compute), rhs.astype(compute)).astype(out_dtype)


def _quiet(frame: _Frame, fn: Callable, *args):
    """Run lowbit's own code (a quantized op, a float product): its products are not the model's ops.

    With jit back on: the pass disabled it to inline the model's inner ``jax.jit``
    functions, but lowbit's kernels are jitted so that an eager pass runs each as
    one compiled program, not op by op (an eager forward and init of a linen MLP in
    nvfp4 compiled 314 programs, now 90).
    """
    frame.busy = True
    try:
        with jax.disable_jit(False):
            return fn(*args)
    finally:
        frame.busy = False


def _stack_shape(module, weight, frame: _Frame) -> tuple:
    """Leading axes a module's parameters have outside ``nnx.vmap``/``nnx.scan``: one state per stacked layer.

    Compares a parameter as this module copy sees it (the op's weight, else any
    parameter of the module) with the same parameter of the model being
    discovered (``frame.root_params``).
    """
    root = getattr(frame, "root_params", None)
    if weight is None:
        owner, weight = module, next(iter(_parameters(module).values()), None)
    else:
        owner = frame.owners.get(id(weight), module)
    if not root or weight is None:
        return ()
    outer = root.get((owner._lowbit_path, _variable_name(owner, weight)))
    value = weight.get_value() if hasattr(weight, "get_value") else weight
    if outer is None or outer.ndim <= value.ndim:
        return ()
    return tuple(outer.shape[: outer.ndim - value.ndim])


def _variable_name(module, variable) -> str | None:
    if not isinstance(module, nnx.Module):
        return None
    for path, v in nnx.iter_graph(module):
        if v is variable:
            return "/".join(map(str, path))
    return None


def dispatch(frame: _Frame, call: oprule.OpCall | None, reason: str, kind: str, lhs, rhs, fn: Callable, depth: int = 3):
    """Run one intercepted op: recorded, quantized by its rule, or in float, and note what happened.

    Args:
      frame: the active pass.
      call: the op, or ``None`` when lowbit cannot express it (``reason`` says why).
      kind: the op kind (names the op when ``call`` is ``None``).
      lhs, rhs: its operands.
      fn: ``fn(lhs, rhs)``, the float op.
      depth: stack frames between ``_walk`` and the interceptor's caller.
    """
    modules, barrier = _walk(depth)
    if not modules or barrier == "internal":
        return _quiet(frame, fn, lhs, rhs)
    module = modules[0]
    n = frame.counters.get((id(module), kind), 0)
    frame.counters[(id(module), kind)] = n + 1
    key = f"{kind}{n}"
    name = f"{module._lowbit_path}:{key}"
    weight = frame.param_of(rhs, modules)
    if call is not None:
        call = dataclasses.replace(call, weighted=weight is not None)
    if barrier == "custom":
        call, reason = None, "it runs inside a custom_vjp/custom_jvp function (lowbit would quantize its forward only)"
    elif call is not None and not _is_float(lhs, rhs):
        call, reason = None, f"its operands are {lhs.dtype} and {rhs.dtype}, not floating point"
    frame.infos[name] = OpInfo(path=module._lowbit_path, kind=kind, weighted=weight is not None)
    if call is None:
        frame.seen[name] = reason
        return _quiet(frame, float_operands, frame, lhs, rhs, fn)
    rec = None
    if frame.mode != "run":
        owner = frame.owners.get(id(weight))
        rec = Recorded(
            module,
            module._lowbit_path,
            key,
            call,
            lhs,
            rhs,
            (lhs.shape, rhs.shape),
            weight=None if owner is None else (owner._lowbit_path, _variable_name(owner, weight)),
            stack=_stack_shape(module, weight, frame) if frame.mode == "record" else (),
        )
        frame.recorded.append(rec)
    if frame.mode == "record":
        frame.seen[name] = "float"
        out = _quiet(frame, fn, lhs, rhs)
    else:
        index = frame.lookup(module, key)
        if index is UNKNOWN or index is None:
            frame.seen[name] = "unknown" if index is UNKNOWN else "float"
            out = _quiet(frame, float_operands, frame, lhs, rhs, fn)
        else:
            frame.seen[name] = "quantized"
            out = _quiet(frame, frame.runner, module, key, frame.recipe.rules[index], call, lhs, rhs)
    if rec is not None:
        rec.out = out
    return out


def never_silent(frame: _Frame, planned: dict[str, int | None], *, strict: bool) -> None:
    """Check one finished pass: every planned op ran through its quantizer, nothing a rule wants ran in float.

    Args:
      frame: the finished pass (``run`` or ``capture`` mode).
      planned: ``{op name: rule index or None}`` of the ops discovered for this call.
      strict: raise ``NotQuantizedError``; else warn.
    """
    problems = []
    for name, rule in planned.items():
        if rule is not None and frame.seen.get(name) != "quantized":
            why = frame.seen.get(name)
            problems.append(
                f"{name} (rule {rule}) did not run through its quantizer: "
                + ("this pass never ran it" if why is None else why)
            )
    for name, status in frame.seen.items():
        if status in ("quantized", "float") or name in planned and status != "unknown":
            continue
        info = frame.infos[name]
        rule = frame.recipe.match(info)
        if rule is None and frame.recipe.match(dataclasses.replace(info, weighted=not info.weighted)) is None:
            continue  # no rule wants an op like it: float is what the recipe says
        if status == "unknown":
            problems.append(f"{name} was not seen when the model's ops were discovered, so it ran in float")
        else:
            problems.append(f"{name} cannot be quantized: {status}")
    if not problems:
        return
    message = (
        "lowbit: the quantized model did not compute what its recipe "
        f"{frame.recipe.name!r} says:\n  "
        + "\n  ".join(problems)
        + "\n(lowbit.quantize(..., strict=False) turns this into a warning)"
    )
    if strict:
        raise NotQuantizedError(message)
    warnings.warn(message, stacklevel=4)


# ----- interceptors ----------------------------------------------------------------------


def _extra(kw: dict, *known: str) -> bool:
    """Whether ``kw`` sets an argument lowbit's ops do not take (``out_sharding=None`` and the like are fine)."""
    return any(v is not None for k, v in kw.items() if k not in known)


def _dn(dimension_numbers):
    (lc, rc), (lb, rb) = dimension_numbers
    return ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)))


_EXTRA = "it sets arguments lowbit's quantized product does not take"


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kw):
    """``lax.dot_general``, intercepted."""

    def fn(a, b):
        return ORIGINALS["dot_general"](
            a, b, dimension_numbers, precision=precision, preferred_element_type=preferred_element_type, **kw
        )

    frame = _live()
    if frame is None:
        return fn(lhs, rhs)
    call = (
        None
        if _extra(kw)
        else oprule.OpCall(
            kind="dot_general",
            dn=_dn(dimension_numbers),
            precision=precision,
            preferred_element_type=preferred_element_type,
        )
    )
    return dispatch(frame, call, _EXTRA, "dot_general", lhs, rhs, fn)


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
    ell = "".join(free[: max(ns)])  # numpy aligns ellipsis dims from the right
    parts = [p.replace("...", ell[len(ell) - n :]) for p, n in zip(parts, ns)]
    if arrow:
        out = out.replace("...", ell)
    else:  # numpy's implicit output: the ellipsis, then the labels seen once, sorted
        labels = parts[0] + parts[1]
        out = ell + "".join(sorted(c for c in set(labels) if labels.count(c) == 1 and c not in ell))
    return f"{parts[0]},{parts[1]}->{out}"


def einsum(subscripts, *operands, **kw):
    """``jnp.einsum``, intercepted (two operands; others go through the primitive hook)."""
    frame = _live()
    if frame is None or len(operands) != 2 or not isinstance(subscripts, str):
        return ORIGINALS["einsum"](subscripts, *operands, **kw)
    a, b = operands

    def fn(x, y):
        return ORIGINALS["einsum"](subscripts, x, y, **kw)

    call, reason = None, _EXTRA
    if not _extra(kw, "precision", "preferred_element_type", "optimize") and hasattr(a, "ndim") and hasattr(b, "ndim"):
        spec = _explicit(subscripts, (a.ndim, b.ndim))
        try:
            dn, perm = einsum_dimension_numbers(spec) if spec else (None, None)
        except ValueError:
            dn = None
        reason = f"its spec {subscripts!r} is not a product lowbit can express"
        # Broadcasting labels (size 1 against n) are einsum's, not dot_general's.
        if dn is not None and all(a.shape[i] == b.shape[j] for i, j in zip(dn[0][0] + dn[1][0], dn[0][1] + dn[1][1])):
            call = oprule.OpCall(
                kind="einsum",
                dn=dn,
                perm=perm,
                precision=kw.get("precision"),
                preferred_element_type=kw.get("preferred_element_type"),
            )
    return dispatch(frame, call, reason, "einsum", a, b, fn)


def matmul(a, b, *, precision=None, preferred_element_type=None, **kw):
    """``jnp.matmul`` and ``@``, intercepted (shapes lowbit cannot express go through the primitive hook)."""

    def fn(x, y):
        return ORIGINALS["matmul"](x, y, precision=precision, preferred_element_type=preferred_element_type, **kw)

    frame = _live()
    a_nd, b_nd = getattr(a, "ndim", 0), getattr(b, "ndim", 0)
    if not _extra(kw) and a_nd >= 2 and b_nd == 2:
        dn = (((a_nd - 1,), (0,)), ((), ()))
    elif not _extra(kw) and a_nd == b_nd >= 3 and a.shape[:-2] == b.shape[:-2]:
        batch = tuple(range(a_nd - 2))
        dn = (((a_nd - 1,), (a_nd - 2,)), (batch, batch))
    else:
        dn = None
    if frame is None or dn is None:  # vectors and broadcast batches: the product primitive's hook sees them
        return fn(a, b)
    call = oprule.OpCall(kind="dot_general", dn=dn, precision=precision, preferred_element_type=preferred_element_type)
    return dispatch(frame, call, _EXTRA, "dot_general", a, b, fn)


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    batch_group_count=1,
    precision=None,
    preferred_element_type=None,
    **kw,
):
    """``lax.conv_general_dilated``, intercepted."""
    kwargs = dict(
        window_strides=window_strides,
        padding=padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )

    def fn(x, y):
        return ORIGINALS["conv_general_dilated"](x, y, **kwargs, **kw)

    frame = _live()
    if frame is None:
        return fn(lhs, rhs)
    return dispatch(frame, *_conv_call(kwargs, kw), lhs, rhs, fn)


def _conv_call(kwargs: dict, kw: dict) -> tuple:
    """``(call or None, reason, "conv")`` of a convolution with ``lax.conv_general_dilated``'s arguments."""
    if _extra(kw):
        return None, _EXTRA, "conv"
    try:
        conv = conv_key(kwargs)
    except TypeError:  # e.g. a ConvDimensionNumbers of lists
        return None, "its arguments are not hashable", "conv"
    return oprule.OpCall(kind="conv", conv=conv, preferred_element_type=kwargs["preferred_element_type"]), "", "conv"


def _hook_product(prim, kind: str) -> None:
    """Intercept a product primitive reached by any other route (aliased imports, ``jnp.dot``...)."""
    original = prim.bind

    def bind(*args, **params):
        frame = _live()
        if frame is None or len(args) != 2:
            return original(*args, **params)

        def fn(a, b):
            return original(a, b, **params)

        extra = {k: v for k, v in params.items() if k == "out_sharding"}
        if kind == "conv":
            known = {k: v for k, v in params.items() if k != "out_sharding"}
            call, reason, _ = _conv_call(known, extra)
        else:
            call, reason = None, _EXTRA
            if not _extra(extra):
                call = oprule.OpCall(
                    kind=kind,
                    dn=_dn(params["dimension_numbers"]),
                    precision=params["precision"],
                    preferred_element_type=params["preferred_element_type"],
                )
        return dispatch(frame, call, reason, kind, *args, fn)

    prim.bind = bind


def _hook_view(prim) -> None:
    """Follow parameters through reshapes, transposes and casts (``x @ w.T`` multiplies by a weight)."""
    original = prim.bind

    def bind(*args, **params):
        out = original(*args, **params)
        frame = _live()
        if frame is not None and len(args) == 1:
            variable = frame.param_of(args[0], _walk(2)[0])
            if variable is not None:
                frame.add_view(out, variable)
        return out

    prim.bind = bind


def _hook_callback(prim) -> None:
    """A ``pure_callback`` inside a quantized module runs code no hook sees: note it (never silent)."""
    original = prim.bind

    def bind(*args, **params):
        frame = _live()
        if frame is not None:
            modules, barrier = _walk(2)
            if modules and barrier != "internal":
                module = modules[0]
                n = frame.counters.get((id(module), "pure_callback"), 0)
                frame.counters[(id(module), "pure_callback")] = n + 1
                name = f"{module._lowbit_path}:pure_callback{n}"
                frame.seen[name] = "it is a pure_callback (lowbit cannot see the products it runs)"
                frame.infos[name] = OpInfo(path=module._lowbit_path, kind="dot_general", weighted=True)
        return original(*args, **params)

    prim.bind = bind


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
        if i in chosen or rule.selects_all():  # an unused catch-all: earlier rules took every op
            continue
        missing = [k for k in (rule.kinds or ()) if k not in kinds]
        why = f"the model runs no {', '.join(missing)} op" if missing else "it matches no op"
        warnings.warn(f"recipe {recipe.name!r}: rule {i} {rule.selector()} is unused: {why}", stacklevel=4)
    if narrowed and recipe.rules and all(c is None for c in chosen):
        raise ValueError(
            f"quantize: include/exclude leave no op of the model to quantize (recipe {recipe.name!r}; "
            f"op paths: {', '.join(sorted({i.path or '<root>' for i in infos}))})"
        )
    return chosen
