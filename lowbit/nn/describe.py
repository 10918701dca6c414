"""``lowbit.describe``: what a quantized model's forward pass quantizes, op by op."""

from __future__ import annotations

import dataclasses
import io

import jax
from flax import nnx

from lowbit.nn import quantize as q
from lowbit.recipes import op as oprule
from lowbit.recipes.rules import Recipe

__all__ = ["Description", "OpDescription", "describe"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class OpDescription:
    """One op of the forward pass.

    Attributes:
      path: module path of the op (``""`` is the root).
      key: the op's name within its module (``dot_general0``, ``einsum1``...).
      kind: ``dot_general``, ``einsum`` or ``conv``.
      weighted: the rhs is a weight (see ``lowbit.recipes.OpInfo``).
      lhs_shape, rhs_shape: operand shapes on the described call.
      rule: index of the recipe rule that quantizes it, ``None`` if it stays float.
      selector: that rule's selection, readable.
      lhs, rhs: forward operand quantizers (learned rule first, then the format).
      dlhs, drhs: gradient quantizers of the input- and weight-gradient products.
    """

    path: str
    key: str
    kind: str
    weighted: bool
    lhs_shape: tuple
    rhs_shape: tuple
    rule: int | None
    selector: str = ""
    lhs: str = "float"
    rhs: str = "float"
    dlhs: str = "float"
    drhs: str = "float"

    def as_dict(self) -> dict:
        """A JSON-serialisable dict."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclasses.dataclass(frozen=True)
class Description:
    """Every op of one forward pass: ``quantized`` (iteration yields these) and ``unmatched`` (float)."""

    recipe: str
    quantized: tuple[OpDescription, ...]
    unmatched: tuple[OpDescription, ...]

    def __iter__(self):
        return iter(self.quantized)

    def __len__(self):
        return len(self.quantized)

    def table(self):
        """A ``rich.table.Table`` of every op, float ones included."""
        from rich.table import Table

        t = Table(
            title=f"lowbit.quantize: recipe {self.recipe!r} ({len(self.quantized)} quantized ops, "
            f"{len(self.unmatched)} float)"
        )
        for col in ("op", "kind", "lhs", "rhs", "dlhs", "drhs", "rule"):
            t.add_column(col)
        for d in sorted(self.quantized + self.unmatched, key=lambda d: _order(self, d)):
            t.add_row(
                f"{d.path or '<root>'}:{d.key}",
                d.kind,
                d.lhs,
                d.rhs,
                d.dlhs,
                d.drhs,
                "float" if d.rule is None else f"{d.rule} {d.selector}",
            )
        return t

    def summary(self, width: int = 100) -> str:
        """One short block per rule (the ops it quantizes and their quantizers), lines at most ``width`` wide."""
        ordered = sorted(self.quantized + self.unmatched, key=lambda d: _order(self, d))
        lines = [
            f"lowbit.quantize: recipe {self.recipe!r}: {len(self.quantized)} ops quantized, "
            f"{len(self.unmatched)} float (.table() lists every op)"
        ]
        rules = sorted({d.rule for d in self.quantized})
        for rule in rules:
            ops = [d for d in ordered if d.rule == rule]
            first = ops[0]
            lines.append(f"  rule {rule} {first.selector}: {len(ops)} op{'s' * (len(ops) != 1)}")
            for site in ("lhs", "rhs", "dlhs", "drhs"):
                lines.append(_clip(f"    {site:<5}{getattr(first, site)}", width))
            lines.append(_names("    ops  ", ops, width))
        floats = [d for d in ordered if d.rule is None]
        if floats:
            lines.append(_names("  float: ", floats, width))
        return "\n".join(lines)

    def __rich__(self):
        return self.summary()

    def __str__(self):
        return self.summary()

    def full(self) -> str:
        """The full table as text (160 columns)."""
        from rich.console import Console

        console = Console(width=160, file=io.StringIO())
        console.print(self.table())
        return console.file.getvalue()


def _clip(line: str, width: int) -> str:
    return line if len(line) <= width else line[: width - 1] + "…"


def _names(prefix: str, ops, width: int) -> str:
    """``prefix`` and op names, as many as fit in ``width``, then how many more."""
    names = [f"{d.path or '<root>'}:{d.key}" for d in ops]
    line = prefix
    for i, name in enumerate(names):
        more = f" (+{len(names) - i} more)"
        if len(line) + len(name) + 2 + len(more) > width and i:
            return line + more
        line += ("" if i == 0 else ", ") + name
    return line


def _order(desc: Description, d: OpDescription) -> int:
    return getattr(desc, "_order", {}).get((d.path, d.key), 0)


def _quantizer(qz) -> str:
    return "float" if qz is None else str(qz)


def _entry(recipe: Recipe, op: q.Op) -> OpDescription:
    base = dict(
        path=op.path,
        key=op.key,
        kind=op.call.kind,
        weighted=op.call.weighted,
        lhs_shape=op.lhs_shape,
        rhs_shape=op.rhs_shape,
        rule=op.rule,
    )
    if op.rule is None:
        return OpDescription(**base)
    rule = recipe.rules[op.rule]
    cfg = oprule.retarget(rule.dot, op.call, len(op.lhs_shape), len(op.rhs_shape))
    learned = op.call.weighted
    lhs = ([f"{rule.act} {rule.act_bits}-bit"] if learned and rule.act != "none" else []) + (
        [_quantizer(cfg.lhs)] if cfg.lhs is not None or not (learned and rule.act != "none") else []
    )
    rhs = ([f"{rule.weight} {rule.weight_bits}-bit"] if learned and rule.weight != "none" else []) + (
        [_quantizer(cfg.rhs)] if cfg.rhs is not None or not (learned and rule.weight != "none") else []
    )
    grad = " GradScale" + (" TPR" if cfg.tpr else "") if cfg.grad_scale else ""
    return OpDescription(
        **base,
        selector=rule.selector(),
        lhs=" + ".join(lhs),
        rhs=" + ".join(rhs),
        dlhs=_quantizer(cfg.dlhs_grad) + (grad if cfg.dlhs_grad is not None else ""),
        drhs=_quantizer(cfg.drhs_grad) + (grad if cfg.drhs_grad is not None else ""),
    )


def describe(model, *example_args, **example_kwargs) -> Description:
    """Every op that one forward pass of a quantized model runs, with its quantizers.

    Args:
      model: a model from ``lowbit.quantize`` (NNX or linen).
      *example_args, **example_kwargs: inputs of one forward pass (a small batch).
        For NNX this is the model's first call if it has not run yet: the ops'
        quantizer state is created now. Without inputs, an NNX model whose ops
        were discovered is described as planned, without a checked pass.

    Returns:
      A ``Description`` of the ops that ran (an abstract pass checks that each
      planned op ran through its quantizer): ``quantized`` ops (path, kind,
      lhs/rhs/dlhs/drhs quantizers, the rule), ``unmatched`` float ops; printed,
      a short summary per rule; ``table()`` (rich) and ``full()`` list every op.

    Raises:
      TypeError: ``model`` did not come from ``lowbit.quantize``.
    """
    if not q.is_quantized(model):
        raise TypeError(f"model={type(model).__name__} is invalid; allowed: a model from lowbit.quantize")
    recipe = model._lowbit_recipe
    if isinstance(model, nnx.Module) and not (example_args or example_kwargs) and q.ops(model):
        ops = q.ops(model)  # no inputs: the ops discovered so far, as planned
    elif isinstance(model, nnx.Module):
        call = type(model).__mro__[1].__call__
        planned = dict(q._planned(model, call, example_args, example_kwargs))
        graphdef, state = nnx.split(model)
        arrays, treedef, static = q._partition(example_args, example_kwargs)

        def checked_pass(state, arrays):  # abstract: raises if a planned op did not run through its quantizer
            args, kwargs = q._unpartition(arrays, treedef, static)
            return nnx.merge(graphdef, state)(*args, **kwargs)

        jax.eval_shape(checked_pass, state, arrays)
        ops = [op for op in q.ops(model) if q.op_name(op.path, op.key) in planned]
    else:
        ops = q.linen_ops(model, example_args, example_kwargs)
    entries = [_entry(recipe, op) for op in ops]
    desc = Description(
        recipe.name, tuple(e for e in entries if e.rule is not None), tuple(e for e in entries if e.rule is None)
    )
    object.__setattr__(desc, "_order", {(e.path, e.key): i for i, e in enumerate(entries)})
    return desc
