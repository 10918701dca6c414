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
import zlib
from collections.abc import Callable, Mapping

import jax
from flax import linen, nnx

from lowbit.nn import intercept
from lowbit.nn.variables import OpState
from lowbit.recipes import op as oprule
from lowbit.recipes import resolve
from lowbit.recipes.rules import Recipe

__all__ = ["LINEN_COLLECTIONS", "Op", "discover", "intercepting", "is_quantized", "op_name", "ops", "quantize",
           "recipe_of"]

# Linen collections of the quantizer state, by state category (``lowbit.recipes.op.CATEGORIES``).
LINEN_COLLECTIONS = {"param": "lowbit_params", "overwrite": "lowbit_overwrite", "rng": "lowbit_rng"}
_STATE_PREFIX = "lowbit_"


def quantize(model, recipe: Recipe | str, *, include: str | None = None, exclude: str | None = None, seed: int = 0,
             plan: Mapping[str, int] | None = None):
    """A quantized version of ``model``: its matmuls and convolutions run through ``recipe``.

    Args:
      model: a ``flax.nnx.Module`` or a ``flax.linen.Module``, written without lowbit.
      recipe: a ``lowbit.recipes.Recipe`` or a registered name (``lowbit.recipes.names()``).
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
    recipe = resolve(recipe).narrowed(include, exclude)
    narrowed = include is not None or exclude is not None
    fixed = _check_plan(recipe, plan)
    if isinstance(model, nnx.Module):
        qmodel = _quantize_nnx(model, recipe, narrowed, seed)
        qmodel._lowbit_fixed_plan = fixed
        return qmodel
    qmodel = _quantize_linen(model, recipe, narrowed, seed)
    object.__setattr__(qmodel, "_lowbit_fixed_plan", fixed)
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
            raise ValueError(f"plan[{name!r}]={index!r} is invalid; allowed: a rule index in "
                             f"[0, {len(recipe.rules)}) of recipe {recipe.name!r}")
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
        raise ValueError(f"plan names ops the forward pass does not run: {', '.join(missing)} "
                         f"(its ops: {', '.join(names)})")
    return [fixed.get(n) for n in names]


def is_quantized(model) -> bool:
    """Whether ``model`` came from ``lowbit.quantize``."""
    return getattr(model, "_lowbit_recipe", None) is not None


# ----- NNX ---------------------------------------------------------------------------------


def _quantize_nnx(model: nnx.Module, recipe: Recipe, narrowed: bool, seed: int) -> nnx.Module:
    qmodel = nnx.clone(model)
    for path, module in nnx.iter_modules(qmodel):
        module._lowbit_path = "/".join(map(str, path))
        _point_layers_at_interceptors(module)
    qmodel.__class__ = _quantized_class(type(qmodel))
    qmodel._lowbit_recipe = recipe
    qmodel._lowbit_narrowed = narrowed
    qmodel._lowbit_seed = seed
    qmodel._lowbit_ops = None  # set by discover
    return qmodel


def _point_layers_at_interceptors(module) -> None:
    """Flax layers keep ``lax.dot_general`` & co. as attributes, bound at import: point them at lowbit's."""
    for attr, fn in intercept.LAYER_ATTRIBUTES.items():
        if getattr(module, attr, None) is intercept.ORIGINALS[attr]:
            object.__setattr__(module, attr, fn) if isinstance(module, linen.Module) else setattr(module, attr, fn)


@functools.lru_cache(maxsize=None)
def _quantized_class(cls: type) -> type:
    """``cls`` with ``__call__`` and every public method of the user's classes run under interception.

    Cached, so two quantized copies of one class share a graph definition type.
    """
    names = {"__call__"} | {n for klass in cls.__mro__ if not klass.__module__.startswith(("flax.", "builtins"))
                            for n, v in vars(klass).items() if callable(v) and not n.startswith("_")}
    wrapped = {n: _intercepted_method(getattr(cls, n)) for n in names if hasattr(cls, n)}
    return type(cls.__name__, (cls,), {**wrapped, "__module__": cls.__module__,
                                       "__qualname__": f"lowbit.quantize({cls.__qualname__})"})


def _intercepted_method(method):
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        if intercept.active() is not None:  # an inner call of the same forward pass
            return method(self, *args, **kwargs)
        if self._lowbit_ops is None:
            discover(self, *args, method=method, **kwargs)
        with intercept.patched(self._lowbit_recipe, "run", _run_nnx_op, _nnx_lookup):
            return method(self, *args, **kwargs)

    return run


def _nnx_lookup(module, key: str):
    return dict(getattr(module, "_lowbit_plan", ())).get(key)


def _run_nnx_op(module, key, rule, call, lhs, rhs):
    state: OpState = getattr(module, _STATE_PREFIX + key)
    compute = intercept.active().recipe.policy.compute_dtype
    return oprule.run(rule, call, lhs, rhs, state.values(), state.next_key(), compute)


def _op_key(seed: int, path: str, key: str) -> jax.Array:
    """The first stochastic-rounding key of one op: the seed and the op's name, nothing else."""
    return jax.random.fold_in(jax.random.key(seed), zlib.crc32(f"{path}:{key}".encode()))


def discover(qmodel: nnx.Module, *args, method=None, **kwargs) -> list[intercept.Recorded]:
    """Find the ops of one forward pass, match them to the recipe and create their state.

    Runs the model once in float on a copy (the model's own state, e.g. dropout
    RNG counters or batch statistics, does not move); every op is recorded in
    forward order, matched against the recipe, and each matched op gets an
    ``OpState`` child named ``lowbit_<kind><n>`` on the module that runs it.
    The model's first call does this by itself; call it (or ``lowbit.describe``)
    before ``nnx.split`` so the state exists outside any trace.

    Args:
      qmodel: a model from ``lowbit.quantize``.
      *args, **kwargs: example inputs (one small batch is enough).
      method: the unbound method to run (default the model's ``__call__``).

    Returns:
      The recorded ops in forward order.
    """
    if not is_quantized(qmodel) or not isinstance(qmodel, nnx.Module):
        raise TypeError(f"model={type(qmodel).__name__} is invalid; allowed: an NNX model from lowbit.quantize")
    recipe = qmodel._lowbit_recipe
    shadow = nnx.clone(qmodel)
    method = getattr(method, "__wrapped__", method) or type(qmodel).__mro__[1].__call__
    with intercept.patched(recipe, "record") as frame:
        method(shadow, *args, **kwargs)
    chosen = _choose(qmodel, frame.recorded)
    modules = {m._lowbit_path: m for _, m in nnx.iter_modules(qmodel)}
    plans: dict[str, list] = {}
    for rec, index in zip(frame.recorded, chosen):
        module = modules[rec.path]
        plans.setdefault(rec.path, []).append((rec.key, index))
        if index is not None and not hasattr(module, _STATE_PREFIX + rec.key):
            state = oprule.state_init(recipe.rules[index], rec.call, rec.rhs,
                                      _op_key(qmodel._lowbit_seed, rec.path, rec.key))
            setattr(module, _STATE_PREFIX + rec.key, OpState(state))
    for path, module in modules.items():
        module._lowbit_plan = tuple(plans.get(path, ()))
    qmodel._lowbit_ops = tuple(Op.of(rec, index) for rec, index in zip(frame.recorded, chosen))
    return frame.recorded


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
    def of(cls, rec: intercept.Recorded, rule: int | None) -> "Op":
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
        raise ValueError("intercepting: the model's ops are not discovered yet; call it once (or "
                         "lowbit.nn.discover / lowbit.describe with an example input) first")
    runner = _run_nnx_op
    if wrap is not None:
        def runner(module, key, rule, call, lhs, rhs):
            state = getattr(module, _STATE_PREFIX + key)
            return wrap(functools.partial(_run_nnx_op, module, key, rule, call),
                        op_name(module._lowbit_path, key), state, call, lhs, rhs)
    with intercept.patched(qmodel._lowbit_recipe, "capture" if capture else "run", runner, _nnx_lookup) as frame:
        yield frame.recorded


# ----- linen -------------------------------------------------------------------------------


def _quantize_linen(model: linen.Module, recipe: Recipe, narrowed: bool, seed: int) -> linen.Module:
    cls = _linen_class(type(model), recipe, narrowed, seed)
    return cls(**_linen_fields(model))


def _linen_fields(module: linen.Module) -> dict:
    """A linen module's own dataclass fields (not ``parent``/``name``): what re-creates it."""
    return {f: getattr(module, f) for f in module.__dataclass_fields__ if f not in ("parent", "name")}


@functools.lru_cache(maxsize=None)
def _linen_class(cls: type, recipe: Recipe, narrowed: bool, seed: int) -> type:
    """A subclass of linen module ``cls`` whose root ``__call__`` runs under interception.

    The recipe lives on the class: linen clones module instances on every ``init``/``apply``.
    """

    def __call__(self, *args, **kwargs):
        if self.scope is None or self.scope.path or intercept.active() is not None:
            return cls.__call__(self, *args, **kwargs)
        return _linen_forward(self, cls, args, kwargs)

    return type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                       "__qualname__": f"lowbit.quantize({cls.__qualname__})",
                                       "_lowbit_recipe": recipe, "_lowbit_narrowed": narrowed,
                                       "_lowbit_seed": seed})


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

    with intercept.patched(recipe, "run", runner, lambda m, k: plan.get((m._lowbit_path, k))), \
            linen.intercept_methods(_track):
        object.__setattr__(root, "_lowbit_path", "")
        return cls.__call__(root, *args, **kwargs)


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
    return oprule.run(rule, call, lhs, rhs, values, sr, recipe.policy.compute_dtype)
