"""Rules and recipes: which quantizer touches which tensor of which op.

An *op* is one matmul or convolution that a model runs: an ``nnx.Linear`` /
``nnx.Einsum`` / ``nnx.Conv`` (or their linen twins), or a raw ``jnp.einsum``,
``@``, ``jnp.matmul``, ``lax.dot_general`` or ``lax.conv_general_dilated`` call
inside a module's method. ``lowbit.nn`` finds the ops; this module only decides,
from what is known about an op (``OpInfo``), which ``Rule`` quantizes it.

A ``Rule`` selects ops (a regex on the op's module path, op kinds, operand kind,
position among the weighted ops of the forward pass) and says how they are
quantized: the forward / input-gradient / weight-gradient quantizers
(``DotQuantConfig``) plus the learned weight and activation rules. A ``Recipe`` is
an ordered tuple of rules (first match wins; an op no rule matches stays in
float), a precision policy and a loss-scaling kind.

Nothing here knows a model or a layer name.
"""

from __future__ import annotations

import dataclasses
import functools
import re

from lowbit.formats._checks import check_int, require
from lowbit.training.loss_scale import DynamicLossScale, NoOpLossScale
from lowbit.training.policy import Policy, get_policy
from lowbit.training.qdot import MATMULS, DotQuantConfig, real_ok

__all__ = ["ACT_RULES", "KINDS", "OPERANDS", "POSITIONS", "WEIGHT_RULES", "OpInfo", "Recipe", "Rule", "compile_regex"]

KINDS = ("dot_general", "einsum", "conv")
OPERANDS = ("any", "weight", "activation")
POSITIONS = ("any", "first", "last", "edges", "inner")
WEIGHT_RULES = ("none", "sawb", "lsq", "ternary", "binary")
ACT_RULES = ("none", "pact", "lsq")
LOSS_SCALES = ("none", "dynamic")


def compile_regex(owner: str, field: str, pattern) -> re.Pattern:
    """``pattern`` compiled, or ``ValueError`` naming the field and the regex error."""
    if not isinstance(pattern, str):
        raise TypeError(f"{owner}.{field}={pattern!r} is invalid; allowed: a regular expression string")
    try:
        return _compile(pattern)
    except re.error as e:
        raise ValueError(f"{owner}.{field}={pattern!r} is not a valid regular expression: {e}") from None


@functools.cache
def _compile(pattern: str) -> re.Pattern:
    return re.compile(pattern)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OpInfo:
    """What rules match on: one op of a model's forward pass.

    Attributes:
      path: the module path, ``/``-joined (``blocks/0/attn``; ``""`` for the root).
      kind: ``dot_general`` (``Linear``, ``@``, ``matmul``, ``lax.dot_general``),
        ``einsum`` or ``conv``.
      weighted: the rhs operand is a weight (it has no batch dimension: ``Linear``,
        ``Conv``, ``x @ w``, ``einsum("...d,dk->...k")``); products of two
        activations (attention's ``QK^T`` and ``AV``) have batch dimensions.
      position: index among the weighted ops in forward order (``None`` for
        activation products), and ``count`` the number of weighted ops.
    """

    path: str
    kind: str
    weighted: bool
    position: int | None = None
    count: int = 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rule:
    """Selects ops and says how they are quantized.

    Selection (all must hold):
      path: regex that must match the op's whole module path (``re.fullmatch``);
        default every path.
      kinds: op kinds (subset of ``dot_general``, ``einsum``, ``conv``); ``None``
        matches every kind.
      operands: ``weight`` (the rhs is a weight), ``activation`` (a product of two
        activations) or ``any``.
      position: among the weighted ops of the forward pass: ``first``, ``last``,
        ``edges`` (first or last: the "first and last layer at 8 bits" of low-bit
        recipes, on any model), ``inner`` (neither) or ``any``.

    Quantization:
      dot: stateless forward / backward quantizers (``DotQuantConfig``). Their
        ``axis`` is set per op: a block or group quantizer runs along the
        operand's (last) contracting dimension, a per-channel one along the
        rhs's output channels, so one rule fits any layer shape.
      weight: learned-rule weight quantizer applied before the product
        (``sawb``, ``lsq``, ``ternary``, ``binary``; ``none`` leaves it to ``dot``).
        Weighted ops only.
      act: learned-rule activation quantizer (``pact``, ``lsq``). Weighted ops only.
      weight_bits, act_bits: bit widths of those rules.
    """

    path: str = ".*"
    kinds: tuple[str, ...] | None = None
    operands: str = "any"
    position: str = "any"
    dot: DotQuantConfig = DotQuantConfig()
    weight: str = "none"
    act: str = "none"
    weight_bits: int = 8
    act_bits: int = 8

    def __post_init__(self):
        compile_regex("Rule", "path", self.path)
        if self.kinds is not None:
            if isinstance(self.kinds, str) or not isinstance(self.kinds, tuple):
                raise TypeError(f"Rule.kinds={self.kinds!r} is invalid; allowed: None or a tuple of {', '.join(KINDS)}")
            for k in self.kinds:
                require(k in KINDS, "Rule", "kinds", k, ", ".join(KINDS))
        require(self.operands in OPERANDS, "Rule", "operands", self.operands, ", ".join(OPERANDS))
        require(self.position in POSITIONS, "Rule", "position", self.position, ", ".join(POSITIONS))
        if not isinstance(self.dot, DotQuantConfig):
            raise TypeError(f"Rule.dot={self.dot!r} is invalid; allowed: a DotQuantConfig")
        require(self.weight in WEIGHT_RULES, "Rule", "weight", self.weight, ", ".join(WEIGHT_RULES))
        require(self.act in ACT_RULES, "Rule", "act", self.act, ", ".join(ACT_RULES))
        check_int("Rule", "weight_bits", self.weight_bits, 2, 16)
        check_int("Rule", "act_bits", self.act_bits, 2, 16)

    def matches(self, op: OpInfo) -> bool:
        """Whether this rule selects ``op``."""
        if self.kinds is not None and op.kind not in self.kinds:
            return False
        if self.operands != "any" and (self.operands == "weight") != op.weighted:
            return False
        if self.position != "any":
            if op.position is None:
                return False
            first, last = op.position == 0, op.position == op.count - 1
            if not {"first": first, "last": last, "edges": first or last, "inner": not (first or last)}[self.position]:
                return False
        return _compile(self.path).fullmatch(op.path) is not None

    @property
    def quantizes(self) -> bool:
        """Whether an op under this rule differs from the float op."""
        return self.dot != DotQuantConfig() or self.weight != "none" or self.act != "none"

    def selects_all(self) -> bool:
        """Whether this rule has no selector (every path, kind, operand and position): a catch-all."""
        return self.kinds is None and self.operands == "any" and self.position == "any" and self.path == ".*"

    def selector(self) -> str:
        """The selection part, readable: what ``describe`` and warnings print."""
        parts = [f"path={self.path!r}"]
        parts += [f"kinds={self.kinds}"] if self.kinds is not None else []
        parts += [f"operands={self.operands}"] if self.operands != "any" else []
        parts += [f"position={self.position}"] if self.position != "any" else []
        return "Rule(" + ", ".join(parts) + ")"

    def with_matmul(self, mode: str) -> Rule:
        """This rule with its product set to ``mode`` where the operands allow it.

        ``real`` applies where both forward quantizers are integer or float8
        formats, or where LSQ supplies both operands' integer grid; otherwise
        the product stays ``fake``.
        """
        require(mode in MATMULS, "Rule", "matmul", mode, ", ".join(MATMULS))
        here = mode
        if mode == "real" and not (real_ok(self.dot.lhs) and real_ok(self.dot.rhs)):
            here = "real" if self.act == "lsq" and self.weight == "lsq" else "fake"
        return dataclasses.replace(self, dot=dataclasses.replace(self.dot, matmul=here))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Recipe:
    """An ordered tuple of rules plus the precision policy and the loss-scaling kind.

    Attributes:
      name: the recipe's name (metrics, checkpoints and the CLI use it).
      rules: first match wins; an op no rule matches stays in float.
      policy: parameter / compute / output dtypes. Matmul and convolution operands
        of a quantized model run in ``policy.compute_dtype``.
      loss_scale: ``none`` or ``dynamic``.
      summary: ``(tensor, format)`` rows for the README's recipe table.
    """

    name: str
    rules: tuple[Rule, ...] = ()
    policy: Policy = get_policy("fp32")
    loss_scale: str = "none"
    summary: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Recipe.name={self.name!r} is invalid; allowed: a non-empty string")
        if not isinstance(self.rules, tuple) or not all(isinstance(r, Rule) for r in self.rules):
            raise TypeError(f"Recipe.rules={self.rules!r} is invalid; allowed: a tuple of Rule")
        if not isinstance(self.policy, Policy):
            raise TypeError(f"Recipe.policy={self.policy!r} is invalid; allowed: a Policy")
        require(self.loss_scale in LOSS_SCALES, "Recipe", "loss_scale", self.loss_scale, ", ".join(LOSS_SCALES))

    def match(self, op: OpInfo) -> int | None:
        """Index of the first rule that selects ``op``, or ``None`` (the op stays float)."""
        return next((i for i, r in enumerate(self.rules) if r.matches(op)), None)

    def make_loss_scale(self):
        """A fresh loss-scale state for this recipe."""
        return DynamicLossScale() if self.loss_scale == "dynamic" else NoOpLossScale()

    def with_matmul(self, mode: str) -> Recipe:
        """This recipe with every rule's product set to ``mode`` (``fake``, ``real`` or ``auto``)."""
        require(mode in MATMULS, "Recipe", "matmul", mode, ", ".join(MATMULS))
        return dataclasses.replace(self, rules=tuple(r.with_matmul(mode) for r in self.rules))

    def narrowed(self, include: str | None = None, exclude: str | None = None) -> Recipe:
        """This recipe restricted to op paths that match ``include`` and not ``exclude``.

        Both are regexes searched (``re.search``) in the op's module path, the
        everyday "skip the head" need: ``exclude="head"``.
        """
        if include is None and exclude is None:
            return self
        inc = compile_regex("quantize", "include", include) if include is not None else None
        exc = compile_regex("quantize", "exclude", exclude) if exclude is not None else None
        return dataclasses.replace(
            self, rules=tuple(dataclasses.replace(r, path=_narrow(r.path, inc, exc)) for r in self.rules)
        )

    @property
    def quantized(self) -> bool:
        """Whether any rule quantizes anything."""
        return any(r.quantizes for r in self.rules)


def _narrow(path: str, inc: re.Pattern | None, exc: re.Pattern | None) -> str:
    """One regex: ``path`` (fullmatch) and, as lookaheads, ``include`` found and ``exclude`` absent."""
    look = (f"(?=.*(?:{inc.pattern}))" if inc is not None else "") + (
        f"(?!.*(?:{exc.pattern}))" if exc is not None else ""
    )
    return f"{look}(?:{path})"
