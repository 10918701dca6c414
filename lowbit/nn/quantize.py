"""``lowbit.quantize``: apply a recipe to an unmodified Flax model (NNX or linen).

NNX: ``quantize`` returns a copy whose root class is a subclass that runs every
public method with op interception (``lowbit.nn.intercept``). Every module of the
copy records its path (``_lowbit_path``), and Flax layers' ``dot_general`` /
``einsum_op`` / ``conv_general_dilated`` attributes point at lowbit's
interceptors. On the first call (or ``discover``) the ops are found and each
matched op gets an ``OpState`` child named ``lowbit_<kind><n>`` on the module
that runs it; float parameters keep their values and paths.

Linen: ``quantize`` returns a module of a subclass with the same fields, whose
``init``/``apply`` run with interception; linen's method interceptor tracks
module paths, and each matched op keeps its state on its module's scope in the
collections ``lowbit_params`` (LSQ steps, PACT clips), ``lowbit_overwrite``
(GradScale) and ``lowbit_rng`` (stochastic-rounding keys). ``apply`` accepts
the float model's ``params`` unchanged plus those collections.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen, nnx

from lowbit.nn import intercept
from lowbit.nn.variables import OpState, QuantKey
from lowbit.recipes import op as oprule
from lowbit.recipes import resolve
from lowbit.recipes.rules import Recipe

__all__ = [
    "LINEN_COLLECTIONS",
    "Op",
    "discover",
    "intercepting",
    "is_quantized",
    "op_name",
    "ops",
    "quantize",
    "recipe_of",
]

# Linen collections of the quantizer state, by state category (``lowbit.recipes.op.CATEGORIES``).
LINEN_COLLECTIONS = {"param": "lowbit_params", "overwrite": "lowbit_overwrite", "rng": "lowbit_rng"}
_STATE_PREFIX = "lowbit_"


def quantize(
    model,
    recipe: Recipe | str,
    *example_args,
    include: str | None = None,
    exclude: str | None = None,
    seed: int = 0,
    plan: Mapping[str, int] | None = None,
    strict: bool = True,
):
    """A quantized version of ``model``: its matmuls and convolutions run through ``recipe``.

    Args:
      model: a ``flax.nnx.Module`` or a ``flax.linen.Module``, written without lowbit.
      recipe: a ``lowbit.recipes.Recipe`` or a registered name (``lowbit.recipes.names()``).
      *example_args: optional inputs of one forward pass (a small batch): the
        ops are discovered now, by an abstract trace (nothing is computed),
        instead of on the first call.
      include, exclude: regexes searched in op paths (``blocks/0/attn``) that
        narrow the recipe: only ops whose path matches ``include`` and not
        ``exclude`` are quantized (``exclude="head"`` keeps the head in float).
      seed: where the ops' stochastic-rounding streams start (each op folds in its name).
      plan: an explicit rule per op instead of matching: ``{op name: rule
        index}`` with op names ``"path:key"`` (``op_name``, e.g.
        ``blocks/0/attn:einsum1``); ops it does not name stay float. For a
        recipe with one calibrated rule per op (``lowbit.ptq``), where two ops
        of one module (attention's two einsums) must differ. A name the forward
        pass does not run is a ``ValueError`` when the ops are discovered.
      strict: a forward pass in which an op the recipe quantizes did not run
        through its quantizer (or a product a rule wants could not be
        intercepted: a ``pure_callback``, a user ``custom_vjp``) raises
        ``lowbit.nn.intercept.NotQuantizedError`` naming the op and the reason;
        ``False`` warns instead.

    Returns:
      NNX: a new model (``model`` is untouched) with the same parameters; the
      ops' quantizer state is added on the first call (``lowbit.describe(qmodel,
      x)`` or ``qmodel(x)``; ``lowbit.train`` does it for you). Linen: a module
      with the same ``init``/``apply`` signature.

    Raises:
      ValueError: an unknown recipe name or a regex that does not compile.
      TypeError: ``model`` is neither an NNX nor a linen module, or ``recipe`` is
        neither a Recipe nor a name.
    """
    if not isinstance(model, (nnx.Module, linen.Module)):
        raise TypeError(f"model={type(model).__name__} is invalid; allowed: a flax.nnx.Module or a flax.linen.Module")
    if is_quantized(model):
        raise ValueError(f"model is already quantized (recipe {model._lowbit_recipe.name!r}); quantize the float model")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed={seed!r} is invalid; allowed: an integer")
    if not isinstance(strict, bool):
        raise TypeError(f"strict={strict!r} is invalid; allowed: True or False")
    recipe = resolve(recipe).narrowed(include, exclude)
    narrowed = include is not None or exclude is not None
    fixed = _check_plan(recipe, plan)
    if isinstance(model, nnx.Module):
        qmodel = _quantize_nnx(model, recipe, narrowed, seed, strict)
        qmodel._lowbit_fixed_plan = fixed
        if example_args:
            discover(qmodel, *example_args)
        return qmodel
    qmodel = _quantize_linen(model, recipe, narrowed, seed, strict)
    object.__setattr__(qmodel, "_lowbit_fixed_plan", fixed)
    if example_args:
        linen_ops(qmodel, example_args, {})
    return qmodel


def _check_plan(recipe: Recipe, plan) -> tuple | None:
    """``plan`` as sorted ``(name, index)`` pairs (hashable: it sits in the graph), checked."""
    if plan is None:
        return None
    if not isinstance(plan, Mapping):
        raise TypeError(f"plan={plan!r} is invalid; allowed: None or a mapping of op names to rule indices")
    for name, index in plan.items():
        if not isinstance(name, str) or ":" not in name:
            raise ValueError(f"plan: op name {name!r} is invalid; allowed: 'path:key' (e.g. 'blocks/0/attn:einsum1')")
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(recipe.rules):
            raise ValueError(
                f"plan[{name!r}]={index!r} is invalid; allowed: a rule index in "
                f"[0, {len(recipe.rules)}) of recipe {recipe.name!r}"
            )
    return tuple(sorted(plan.items()))


def op_name(path: str, key: str) -> str:
    """The name of one op: ``"path:key"`` (``blocks/0/attn:einsum1``; ``":dot_general0"`` at the root)."""
    return f"{path}:{key}"


def recipe_of(qmodel) -> Recipe:
    """The recipe a model from ``lowbit.quantize`` runs (after ``include``/``exclude``)."""
    if not is_quantized(qmodel):
        raise TypeError(f"model={type(qmodel).__name__} is invalid; allowed: a model from lowbit.quantize")
    return qmodel._lowbit_recipe


def _choose(qmodel, recorded: list[intercept.Recorded]) -> list[int | None]:
    """The rule index of every recorded op: the explicit plan if the model has one, else the recipe's matching."""
    fixed = getattr(qmodel, "_lowbit_fixed_plan", None)
    if fixed is None:
        return intercept.plan(qmodel._lowbit_recipe, recorded, narrowed=qmodel._lowbit_narrowed)
    fixed = dict(fixed)
    names = [op_name(r.path, r.key) for r in recorded]
    missing = sorted(set(fixed) - set(names))
    if missing:
        raise ValueError(
            f"plan names ops the forward pass does not run: {', '.join(missing)} (its ops: {', '.join(names)})"
        )
    return [fixed.get(n) for n in names]


def is_quantized(model) -> bool:
    """Whether ``model`` came from ``lowbit.quantize``."""
    return getattr(model, "_lowbit_recipe", None) is not None


# ----- NNX ---------------------------------------------------------------------------------


def _quantize_nnx(model: nnx.Module, recipe: Recipe, narrowed: bool, seed: int, strict: bool) -> nnx.Module:
    qmodel = nnx.clone(model)
    for path, module in nnx.iter_modules(qmodel):
        module._lowbit_path = "/".join(map(str, path))
        _point_layers_at_interceptors(module)
    qmodel.__class__ = _quantized_class(type(qmodel))
    qmodel._lowbit_recipe = recipe
    qmodel._lowbit_narrowed = narrowed
    qmodel._lowbit_seed = seed
    qmodel._lowbit_ops = ()  # set by discover
    qmodel._lowbit_calls = ()  # ((call signature, ((op name, rule), ...)), ...): set by discover
    qmodel._lowbit_strict = strict
    return qmodel


def _point_layers_at_interceptors(module) -> None:
    """Flax layers keep ``lax.dot_general`` & co. as attributes, bound at import: point them at lowbit's."""
    for attr, fn in intercept.LAYER_ATTRIBUTES.items():
        if getattr(module, attr, None) is intercept.ORIGINALS[attr]:
            object.__setattr__(module, attr, fn) if isinstance(module, linen.Module) else setattr(module, attr, fn)


@functools.cache
def _quantized_class(cls: type) -> type:
    """``cls`` with ``__call__`` and every public method of the user's classes run under interception.

    Cached, so two quantized copies of one class share a graph definition type.
    """
    names = {"__call__"} | {
        n
        for klass in cls.__mro__
        if not klass.__module__.startswith(("flax.", "builtins"))
        for n, v in vars(klass).items()
        if callable(v) and not n.startswith("_")
    }
    wrapped = {n: _intercepted_method(getattr(cls, n)) for n in names if hasattr(cls, n)}
    return type(
        cls.__name__,
        (cls,),
        {**wrapped, "__module__": cls.__module__, "__qualname__": f"lowbit.quantize({cls.__qualname__})"},
    )


def _intercepted_method(method):
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        if intercept.active() is not None:  # an inner call of the same forward pass
            return method(self, *args, **kwargs)
        planned = _planned(self, method, args, kwargs)
        if not intercept.staged():
            return _compiled(self, method, planned, args, kwargs)
        return _run_pass(self, method, planned, args, kwargs)

    return run


def _run_pass(qmodel, method, planned, args, kwargs):
    """One forward pass under interception, checked: every planned op ran through its quantizer."""
    with intercept.patched(qmodel._lowbit_recipe, "run", _run_nnx_op, _nnx_lookup) as frame:
        out = method(qmodel, *args, **kwargs)
    intercept.never_silent(frame, dict(planned), strict=qmodel._lowbit_strict)
    _advance_keys(qmodel, frame)
    return out


def _advance_keys(qmodel, frame) -> None:
    """Advance the stochastic-rounding key of every op that ran, once per pass, at the model's own level.

    Inside the pass an op only reads its key: an op inside ``lax.scan``,
    ``jax.checkpoint``, ``cond`` or ``jax.vmap`` runs in a nested trace, and
    writing that trace's value into the model would leak it. Stacked states
    (``nnx.vmap``/``nnx.scan`` layers) advance every layer's key.
    """
    for path, module in nnx.iter_modules(qmodel):
        if not isinstance(module, OpState) or not isinstance(getattr(module, "sr_key", None), QuantKey):
            continue
        name = op_name("/".join(map(str, path[:-1])), str(path[-1])[len(_STATE_PREFIX) :])
        if frame.seen.get(name) != "quantized":
            continue
        data = module.sr_key[...]
        module.sr_key[...] = _next_keys(data.reshape(-1, data.shape[-1])).reshape(data.shape)


# Traced once per key shape (a fresh vmap per op and pass re-traced it every time: seconds per model trace).
_next_keys = jax.jit(jax.vmap(lambda d: oprule.next_key(d)[1]))


def _partition(args, kwargs) -> tuple[list, Any, tuple]:
    """``(arrays, treedef, static)``: array leaves traced, every other leaf (flags, sizes) static."""
    leaves, treedef = jax.tree.flatten((args, kwargs))
    arrays = [x if isinstance(x, (jax.Array, np.ndarray, np.generic)) else None for x in leaves]
    static = tuple(None if a is not None else x for a, x in zip(arrays, leaves))
    return arrays, treedef, static


def _unpartition(arrays, treedef, static):
    return jax.tree.unflatten(treedef, [a if a is not None else s for a, s in zip(arrays, static)])


@functools.partial(nnx.jit, static_argnames=("method", "planned", "treedef", "static"))
def _jitted(qmodel, arrays, *, method, planned, treedef, static):
    args, kwargs = _unpartition(arrays, treedef, static)
    return _run_pass(qmodel, method, planned, args, kwargs)


def _compiled(qmodel, method, planned, args, kwargs):
    """An eager call, compiled: every pass is traced, so nothing reaches a quantizer from a stale trace.

    Arguments that are not arrays (flags, sizes) are static; an unhashable one
    runs the pass eagerly instead.
    """
    arrays, treedef, static = _partition(args, kwargs)
    try:
        hash(static)
    except TypeError:
        return _run_pass(qmodel, method, planned, args, kwargs)
    return _jitted(qmodel, arrays, method=method, planned=planned, treedef=treedef, static=static)


def _signature(method, args, kwargs):
    """What selects a plan: the method, the arguments' structure and their non-array values."""
    _, treedef, static = _partition(args, kwargs)
    try:
        hash(static)
    except TypeError:
        static = None
    return (method.__name__, treedef, static)


def _planned(qmodel, method, args, kwargs) -> tuple:
    """``((op name, rule), ...)`` of one call's ops, discovering them the first time such a call runs."""
    sig = _signature(method, args, kwargs)
    for known, planned in qmodel._lowbit_calls:
        if known == sig:
            return planned
    discover(qmodel, *args, method=method, **kwargs)
    return qmodel._lowbit_calls[-1][1]


def _nnx_lookup(module, key: str):
    return dict(getattr(module, "_lowbit_plan", ())).get(key, intercept.UNKNOWN)


def _run_nnx_op(module, key, rule, call, lhs, rhs):
    state: OpState = getattr(module, _STATE_PREFIX + key)
    compute = intercept.active().recipe.policy.compute_dtype
    sr = getattr(state, "sr_key", None)
    this = oprule.next_key(sr[...])[0] if isinstance(sr, QuantKey) else None  # advanced after the pass
    return oprule.run(rule, call, lhs, rhs, state.values(), this, compute, name=op_name(module._lowbit_path, key))


def _op_key(seed: int, path: str, key: str) -> jax.Array:
    """The first stochastic-rounding key of one op: the seed and the op's name, nothing else."""
    return jax.random.fold_in(jax.random.key(seed), zlib.crc32(f"{path}:{key}".encode()))


def _root_params(qmodel: nnx.Module) -> dict:
    """``{(module path, variable path in it): value}`` of every parameter, as the model holds it."""
    found = {}
    for path, module in nnx.iter_modules(qmodel):
        prefix = "/".join(map(str, path))
        for sub, v in nnx.iter_graph(module):
            if isinstance(v, nnx.Param):
                found[(prefix, "/".join(map(str, sub)))] = v.get_value()
    return found


def _record(qmodel: nnx.Module, method, args, kwargs) -> list[intercept.Recorded]:
    """The ops of one forward pass, found by an abstract trace (``jax.eval_shape``: nothing is computed)."""
    graphdef, state = nnx.split(qmodel)
    root = _root_params(qmodel)
    arrays, treedef, static = _partition(args, kwargs)
    found: list[intercept.Recorded] = []

    def trace(state, arrays):
        model = nnx.merge(graphdef, state)
        a, k = _unpartition(arrays, treedef, static)
        with intercept.patched(qmodel._lowbit_recipe, "record") as frame:
            frame.root_params = root
            method(model, *a, **k)
        found.extend(frame.recorded)
        return 0

    try:
        jax.eval_shape(trace, state, arrays)
    except Exception as e:
        raise _prefixed(
            e,
            f"lowbit.quantize: while discovering the ops of {type(qmodel).__name__}."
            f"{method.__name__} (an abstract forward pass)",
        ) from e
    return found


def _prefixed(error: Exception, doing: str) -> Exception:
    """``error`` of the same type, its message prefixed with what lowbit was doing."""
    try:
        return type(error)(f"{doing}: {error}")
    except Exception:  # an exception type whose constructor takes other arguments
        return RuntimeError(f"{doing}: {type(error).__name__}: {error}")


def _new_state(qmodel, rec: intercept.Recorded, rule_index: int, root: dict) -> OpState:
    """An op's quantizer state: one per stacked layer when its module runs under ``nnx.vmap``/``nnx.scan``."""
    rule = qmodel._lowbit_recipe.rules[rule_index]
    key = _op_key(qmodel._lowbit_seed, rec.path, rec.key)
    weight = root.get(rec.weight) if rec.weight is not None else None
    if weight is None:
        weight = jnp.zeros((*rec.stack, *rec.shapes[1]), jnp.float32)
    if not rec.stack:
        return OpState(oprule.state_init(rule, rec.call, weight, key))
    n = math.prod(rec.stack)
    layers = weight.reshape(n, *weight.shape[len(rec.stack) :])
    spec = oprule.state_init(rule, rec.call, layers[0], key)  # names and categories
    # Layer i's key is the one the same op of an unrolled copy (``blocks/i/...``) would get.
    prefix = _stack_root(qmodel, rec.path, rec.stack)
    rest = rec.path[len(prefix) :]
    keys = jnp.stack([_op_key(qmodel._lowbit_seed, f"{prefix}/{i}{rest}".lstrip("/"), rec.key) for i in range(n)])
    values = jax.vmap(lambda w, k: {name: v for name, (_, v) in oprule.state_init(rule, rec.call, w, k).items()})(
        layers, keys
    )
    return OpState(
        {
            name: (category, values[name].reshape(*rec.stack, *values[name].shape[1:]))
            for name, (category, _) in spec.items()
        }
    )


def _stack_root(qmodel, path: str, stack: tuple) -> str:
    """The outermost module on ``path`` whose parameters all carry the layer axes ``stack`` (the stacked layers)."""
    parts = path.split("/") if path else []
    modules = {"/".join(map(str, p)): m for p, m in nnx.iter_modules(qmodel)}
    for i in range(len(parts) + 1):
        prefix = "/".join(parts[:i])
        leaves = [v.get_value() for _, v in nnx.iter_graph(modules[prefix]) if isinstance(v, nnx.Param)]
        if leaves and all(x.shape[: len(stack)] == stack for x in leaves):
            return prefix
    return path


def discover(qmodel: nnx.Module, *args, method=None, **kwargs) -> list[intercept.Recorded]:
    """Find the ops of one forward pass, match them to the recipe and create their state.

    An abstract trace of the method (``jax.eval_shape``: nothing is computed and
    the model's own state does not move) records every op in forward order; each
    is matched against the recipe and each matched op gets an ``OpState`` child
    named ``lowbit_<kind><n>`` on the module that runs it (stacked along the
    layer axes for modules run by ``nnx.vmap``/``nnx.scan``). The model's first
    call does this by itself (and every call with new non-array arguments);
    call it (or ``lowbit.describe``) before ``nnx.split`` so the state exists
    outside any trace.

    Args:
      qmodel: a model from ``lowbit.quantize``.
      *args, **kwargs: example inputs (one small batch is enough).
      method: the unbound method to run (default the model's ``__call__``).

    Returns:
      The recorded ops in forward order (operands are abstract).

    Raises:
      ValueError: new ops need quantizer state while the model is being traced
        (call the model once outside ``jit`` with such arguments first).
    """
    if not is_quantized(qmodel) or not isinstance(qmodel, nnx.Module):
        raise TypeError(f"model={type(qmodel).__name__} is invalid; allowed: an NNX model from lowbit.quantize")
    method = getattr(method, "__wrapped__", method) or type(qmodel).__mro__[1].__call__
    recorded = _record(qmodel, method, args, kwargs)
    chosen = _choose(qmodel, recorded)
    modules = {m._lowbit_path: m for _, m in nnx.iter_modules(qmodel) if not isinstance(m, OpState)}
    root = _root_params(qmodel)
    plans = {path: dict(getattr(m, "_lowbit_plan", ())) for path, m in modules.items()}
    new = [
        (rec, index)
        for rec, index in zip(recorded, chosen)
        if index is not None and not hasattr(modules[rec.path], _STATE_PREFIX + rec.key)
    ]
    if new and intercept.staged():
        raise ValueError(
            f"lowbit: {', '.join(op_name(r.path, r.key) for r, _ in new)} need quantizer state that "
            "cannot be created inside a trace; call the model once outside jit with such arguments "
            "(or lowbit.describe(model, *example_args)) first"
        )
    for rec, index in new:
        setattr(modules[rec.path], _STATE_PREFIX + rec.key, _new_state(qmodel, rec, index, root))
    for rec, index in zip(recorded, chosen):
        plans[rec.path][rec.key] = index
    for path, module in modules.items():
        module._lowbit_plan = tuple(plans[path].items())
    known = {(op.path, op.key) for op in ops(qmodel)}
    qmodel._lowbit_ops = ops(qmodel) + tuple(
        Op.of(rec, index) for rec, index in zip(recorded, chosen) if (rec.path, rec.key) not in known
    )
    planned = tuple((op_name(rec.path, rec.key), index) for rec, index in zip(recorded, chosen))
    qmodel._lowbit_calls = qmodel._lowbit_calls + ((_signature(method, args, kwargs), planned),)
    return recorded


@dataclasses.dataclass(frozen=True)
class Op:
    """One op of a quantized model's forward pass, as discovered (hashable: kept in the graph)."""

    path: str
    key: str
    call: oprule.OpCall
    lhs_shape: tuple
    rhs_shape: tuple
    rule: int | None

    @classmethod
    def of(cls, rec: intercept.Recorded, rule: int | None) -> Op:
        return cls(rec.path, rec.key, rec.call, tuple(rec.shapes[0]), tuple(rec.shapes[1]), rule)


def ops(qmodel) -> tuple[Op, ...]:
    """The discovered ops of an NNX model from ``lowbit.quantize`` (empty before its first call)."""
    return getattr(qmodel, "_lowbit_ops", None) or ()


@contextlib.contextmanager
def intercepting(qmodel: nnx.Module, *, capture: bool = False, wrap: Callable | None = None):
    """Run the forward passes of ``qmodel`` inside this block with its ops recorded and/or wrapped.

    Calls of ``qmodel`` in the block (inside ``jit`` too) run its plan as usual;
    only what this asks for is added. Post-training quantization calibrates
    from the recorded operands, compares per-op outputs, and adds its noisy
    bias through ``wrap``.

    Args:
      qmodel: an NNX model from ``lowbit.quantize`` whose ops were discovered
        (it ran once, or ``discover``/``lowbit.describe`` ran on it).
      capture: record every op of every forward pass: the yielded list fills
        with ``intercept.Recorded`` entries (``path``, ``key``, ``call``, raw
        ``lhs``/``rhs`` before any quantizer, and ``out``, the op's result). In a
        traced function they are tracers of that trace.
      wrap: ``wrap(run, name, state, call, lhs, rhs)`` runs each op that has a
        rule instead of the standard runner: ``run(lhs, rhs)`` is that op under
        its rule, ``name`` its ``op_name``, ``state`` its ``OpState``.

    Yields:
      The list of recorded ops (empty unless ``capture``).

    Raises:
      ValueError: the ops of ``qmodel`` were not discovered yet.
    """
    if not isinstance(qmodel, nnx.Module) or not is_quantized(qmodel):
        raise TypeError(f"model={type(qmodel).__name__} is invalid; allowed: an NNX model from lowbit.quantize")
    if not ops(qmodel):
        raise ValueError(
            "intercepting: the model's ops are not discovered yet; call it once (or "
            "lowbit.nn.discover / lowbit.describe with an example input) first"
        )
    runner = _run_nnx_op
    if wrap is not None:

        def runner(module, key, rule, call, lhs, rhs):
            state = getattr(module, _STATE_PREFIX + key)
            return wrap(
                functools.partial(_run_nnx_op, module, key, rule, call),
                op_name(module._lowbit_path, key),
                state,
                call,
                lhs,
                rhs,
            )

    with intercept.patched(qmodel._lowbit_recipe, "capture" if capture else "run", runner, _nnx_lookup) as frame:
        yield frame.recorded
    _advance_keys(qmodel, frame)


# ----- linen -------------------------------------------------------------------------------


def _quantize_linen(model: linen.Module, recipe: Recipe, narrowed: bool, seed: int, strict: bool) -> linen.Module:
    cls = _linen_class(type(model), recipe, narrowed, seed, strict)
    return cls(**_linen_fields(model))


def _linen_fields(module: linen.Module) -> dict:
    """A linen module's own dataclass fields (not ``parent``/``name``): what re-creates it."""
    return {f: getattr(module, f) for f in module.__dataclass_fields__ if f not in ("parent", "name")}


@functools.cache
def _linen_class(cls: type, recipe: Recipe, narrowed: bool, seed: int, strict: bool) -> type:
    """A subclass of linen module ``cls`` whose root ``__call__`` runs under interception.

    The recipe lives on the class: linen clones module instances on every ``init``/``apply``.
    """

    def __call__(self, *args, **kwargs):
        if self.scope is None or self.scope.path or intercept.active() is not None:
            return cls.__call__(self, *args, **kwargs)
        return _linen_forward(self, cls, args, kwargs)

    return type(
        cls.__name__,
        (cls,),
        {
            "__call__": __call__,
            "__module__": cls.__module__,
            "__qualname__": f"lowbit.quantize({cls.__qualname__})",
            "_lowbit_recipe": recipe,
            "_lowbit_narrowed": narrowed,
            "_lowbit_seed": seed,
            "_lowbit_strict": strict,
        },
    )


def _track(next_fun, args, kwargs, context):
    """linen method interceptor: every module learns its path before its method runs."""
    module = context.module
    if module.scope is not None:
        object.__setattr__(module, "_lowbit_path", "/".join(map(str, module.scope.path)))
        _point_layers_at_interceptors(module)
    return next_fun(*args, **kwargs)


def linen_ops(qmodel: linen.Module, args, kwargs) -> tuple[Op, ...]:
    """The ops of one forward pass of a quantized linen model, matched to its recipe.

    Linen re-creates modules on every ``init``/``apply``, so the plan is made on
    every trace from an abstract float pass (``jax.eval_shape``: nothing is
    computed or stored).
    """
    recipe = qmodel._lowbit_recipe
    float_cls = type(qmodel).__mro__[1]
    fields = _linen_fields(qmodel)
    recorded = []

    def record(*a, **kw):
        with intercept.patched(recipe, "record") as frame, linen.intercept_methods(_track):
            float_cls(**fields, parent=None).init(jax.random.key(0), *a, **kw)
        recorded.extend(frame.recorded)
        return 0

    jax.eval_shape(record, *args, **kwargs)
    chosen = _choose(qmodel, recorded)
    return tuple(Op.of(r, i) for r, i in zip(recorded, chosen))


def _linen_forward(root, cls, args, kwargs):
    """One forward pass of a quantized linen model: discover (abstractly), then run."""
    recipe = root._lowbit_recipe
    plan = {(op.path, op.key): op.rule for op in linen_ops(root, args, kwargs)}

    def runner(module, key, rule, call, lhs, rhs):
        return _run_linen_op(module, key, rule, call, lhs, rhs, recipe, root._lowbit_seed)

    with (
        intercept.patched(
            recipe, "run", runner, lambda m, k: plan.get((m._lowbit_path, k), intercept.UNKNOWN)
        ) as frame,
        linen.intercept_methods(_track),
    ):
        object.__setattr__(root, "_lowbit_path", "")
        out = cls.__call__(root, *args, **kwargs)
    intercept.never_silent(frame, {op_name(*k): v for k, v in plan.items()}, strict=root._lowbit_strict)
    return out


def _run_linen_op(module, key, rule, call, lhs, rhs, recipe: Recipe, seed: int):
    """The op under ``rule``, its state in ``LINEN_COLLECTIONS`` on the module's scope."""
    spec = oprule.state_init(rule, call, rhs, _op_key(seed, module._lowbit_path, key))
    values, sr = {}, None
    for name, (category, init) in spec.items():
        var = module.scope.variable(LINEN_COLLECTIONS[category], f"{key}_{name}", lambda v=init: v)
        if name == "sr_key":
            sr, nxt = oprule.next_key(var.value)
            if module.scope.is_mutable_collection(LINEN_COLLECTIONS["rng"]):
                var.value = nxt
        else:
            values[name] = var.value
    return oprule.run(
        rule, call, lhs, rhs, values, sr, recipe.policy.compute_dtype, name=op_name(module._lowbit_path, key)
    )
