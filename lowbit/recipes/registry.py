"""Named training recipes: which quantizer touches which tensor of which matmul.

A ``Recipe`` maps each matmul role of a model to a ``LayerRecipe`` (forward /
dlhs / drhs quantizers plus the learned weight and activation rules) and carries
the precision policy and the loss-scaling kind. ``get(name)`` returns a named
recipe; users build their own from ``Quantizer`` s the same way.

Roles used by ``lowbit.nn.ViT``: ``patch``, ``qkv``, ``attn_qk``, ``attn_av``,
``proj``, ``mlp_in``, ``mlp_out``, ``head``.
"""

from __future__ import annotations

import dataclasses

from lowbit.formats._checks import check_int, require
from lowbit.quant import Quantizer
from lowbit.training.loss_scale import DynamicLossScale, NoOpLossScale
from lowbit.training.policy import Policy, get_policy
from lowbit.training.qdot import MATMULS, DotQuantConfig, real_ok

WEIGHT_RULES = ("none", "sawb", "lsq", "ternary", "binary")
ACT_RULES = ("none", "pact", "lsq")
ROLES = ("patch", "qkv", "attn_qk", "attn_av", "proj", "mlp_in", "mlp_out", "head")
ATTENTION = ("attn_qk", "attn_av")
EDGES = ("patch", "head")  # first and last layer: kept at 8 bits by the 4-bit recipes


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerRecipe:
    """The quantization of one matmul.

    Attributes:
      dot: stateless forward / backward quantizers (``DotQuantConfig``).
      weight: learned-rule weight quantizer applied before the matmul
        (``sawb``, ``lsq``, ``ternary``, ``binary``; ``none`` leaves it to ``dot``).
      act: learned-rule activation quantizer (``pact``, ``lsq``).
      weight_bits, act_bits: bit widths of those rules.
    """

    dot: DotQuantConfig = DotQuantConfig()
    weight: str = "none"
    act: str = "none"
    weight_bits: int = 8
    act_bits: int = 8

    def __post_init__(self):
        require(self.weight in WEIGHT_RULES, "LayerRecipe", "weight", self.weight, ", ".join(WEIGHT_RULES))
        require(self.act in ACT_RULES, "LayerRecipe", "act", self.act, ", ".join(ACT_RULES))
        check_int("LayerRecipe", "weight_bits", self.weight_bits, 2, 16)
        check_int("LayerRecipe", "act_bits", self.act_bits, 2, 16)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Recipe:
    """A named mapping from matmul roles to layer recipes.

    Attributes:
      name: the recipe's name.
      policy: parameter / compute / output dtypes.
      loss_scale: ``none`` or ``dynamic``.
      default: the layer recipe of every role not in ``layers``.
      layers: ``(role, LayerRecipe)`` overrides.
      summary: ``(tensor, format)`` rows for the README's recipe table.
    """

    name: str
    policy: Policy = get_policy("fp32")
    loss_scale: str = "none"
    default: LayerRecipe = LayerRecipe()
    layers: tuple[tuple[str, LayerRecipe], ...] = ()
    summary: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        require(self.loss_scale in ("none", "dynamic"), "Recipe", "loss_scale", self.loss_scale, "none, dynamic")
        for role, _ in self.layers:
            require(role in ROLES, "Recipe", "layers", role, ", ".join(ROLES))

    def layer(self, role: str) -> LayerRecipe:
        """The layer recipe for ``role``."""
        require(role in ROLES, "Recipe", "role", role, ", ".join(ROLES))
        return dict(self.layers).get(role, self.default)

    def make_loss_scale(self):
        """A fresh loss-scale state for this recipe."""
        return DynamicLossScale() if self.loss_scale == "dynamic" else NoOpLossScale()

    def with_matmul(self, mode: str) -> "Recipe":
        """This recipe with its matmuls set to ``mode`` (``fake``, ``real`` or ``auto``).

        ``real`` applies where the operands allow it (integer or float8 forward
        quantizers, or LSQ layers, whose integer grid the layer knows); the
        other matmuls stay ``fake``.
        """
        require(mode in MATMULS, "Recipe", "matmul", mode, ", ".join(MATMULS))

        def swap(lr: LayerRecipe) -> LayerRecipe:
            here = mode
            if mode == "real" and not (real_ok(lr.dot.lhs) and real_ok(lr.dot.rhs)):
                here = "real" if lr.act == "lsq" and lr.weight == "lsq" else "fake"
            return dataclasses.replace(lr, dot=dataclasses.replace(lr.dot, matmul=here))

        return dataclasses.replace(self, default=swap(self.default),
                                   layers=tuple((role, swap(lr)) for role, lr in self.layers))

    @property
    def quantized(self) -> bool:
        """Whether any matmul is quantized."""
        return any(self.layer(r) != LayerRecipe() for r in ROLES)


def _q(fmt: str, **kw) -> Quantizer:
    """A dynamic absmax quantizer (per tensor unless told otherwise)."""
    return Quantizer(format=fmt, **kw)


def _dot(fwd: Quantizer | None, grad: Quantizer | None, w: Quantizer | None = None) -> DotQuantConfig:
    """Forward quantizer on both operands (``w`` for the weight if given) and ``grad`` on the gradient."""
    return DotQuantConfig(lhs=fwd, rhs=w or fwd, dlhs_grad=grad, drhs_grad=grad)


def _fp(name, fwd_fmt, grad_fmt, summary) -> Recipe:
    """FP8/FP6: per-tensor current scaling forward, its own format for gradients."""
    act = _q(fwd_fmt)
    weight = _q(fwd_fmt, granularity="channel", axis=-1)
    grad = _q(grad_fmt)
    attn = LayerRecipe(dot=_dot(act, grad))
    return Recipe(name=name, default=LayerRecipe(dot=_dot(act, grad, weight)),
                  layers=tuple((r, attn) for r in ATTENTION), summary=summary)


def _block(name, fmt, summary) -> Recipe:
    """MX / NVFP4: blocks along the contraction axis forward, stochastic rounding on gradients."""
    act = _q(fmt)
    weight = _q(fmt, axis=0)  # the kernel is (in, out): its contraction axis is 0
    grad = _q(fmt, rounding="stochastic")
    av = LayerRecipe(dot=DotQuantConfig(lhs=act, rhs=_q(fmt, axis=-2), dlhs_grad=grad, drhs_grad=grad))
    return Recipe(name=name, default=LayerRecipe(dot=_dot(act, grad, weight)),
                  layers=(("attn_qk", LayerRecipe(dot=_dot(act, grad))), ("attn_av", av)), summary=summary)


def _fp4() -> Recipe:
    """Sun et al. 2020: INT4 SAWB weights, INT4 PACT activations, radix-4 FP4 gradients with GradScale + TPR."""
    r4 = _q("fp4_radix4", scale="learned")
    grads = DotQuantConfig(dlhs_grad=r4, drhs_grad=r4, grad_scale=True, tpr=True)
    # Softmax probabilities on 7 int4 levels cost ~3 points on digits; 8-bit attention products keep the gap < 1.5.
    int8 = _q("int8")
    attn = LayerRecipe(dot=dataclasses.replace(grads, lhs=int8, rhs=int8))
    edge = LayerRecipe(dot=_dot(None, _q("float8_e5m2")), weight="sawb", weight_bits=8, act="pact", act_bits=8)
    return Recipe(
        name="fp4",
        default=LayerRecipe(dot=grads, weight="sawb", weight_bits=4, act="pact", act_bits=4),
        layers=(("attn_qk", attn), ("attn_av", attn), ("patch", edge), ("head", edge)),
        summary=(("weights", "4-bit SAWB (16 levels on [-a, a], a from SAWB; patch/head: 8-bit)"),
                 ("activations", "4-bit PACT, learned clip a, signed (patch/head: 8-bit)"),
                 ("attention QK/AV", "int8 per-tensor absmax"),
                 ("gradients", "fp4_radix4, GradScale + two-phase rounding (patch/head: e5m2)")),
    )


def _lsq(bits: int) -> Recipe:
    """LSQ (Esser et al. 2019): learned steps for weights and activations; float gradients."""
    attn = LayerRecipe(dot=_dot(_q("int8"), None))  # attention products at 8 bits, as in fp4
    edge = LayerRecipe(weight="lsq", weight_bits=8, act="lsq", act_bits=8)
    layers = [("attn_qk", attn), ("attn_av", attn)] + ([("patch", edge), ("head", edge)] if bits < 8 else [])
    return Recipe(
        name=f"int{bits}_lsq",
        default=LayerRecipe(weight="lsq", weight_bits=bits, act="lsq", act_bits=bits),
        layers=tuple(layers),
        summary=(("weights", f"int{bits}, LSQ learned step" + (" (patch/head: 8-bit)" if bits < 8 else "")),
                 ("activations", f"int{bits}, LSQ learned step" + (" (patch/head: 8-bit)" if bits < 8 else "")),
                 ("attention QK/AV", "int8 per-tensor absmax"), ("gradients", "float32")),
    )


def _low_bit_weights(name: str, rule: str, label: str) -> Recipe:
    """Ternary / binary weights (per output channel scale) with int8 activations."""
    int8 = _q("int8")
    edge = LayerRecipe(dot=_dot(int8, None, _q("int8", granularity="channel", axis=-1)))
    return Recipe(
        name=name,
        default=LayerRecipe(dot=DotQuantConfig(lhs=int8), weight=rule),
        layers=(("attn_qk", LayerRecipe(dot=_dot(int8, None))), ("attn_av", LayerRecipe(dot=_dot(int8, None))),
                ("patch", edge), ("head", edge)),
        summary=(("weights", f"{label} (patch/head: int8 per channel)"), ("activations", "int8 per-tensor absmax"),
                 ("attention QK/AV", "int8 per-tensor absmax"), ("gradients", "float32")),
    )


def _registry() -> dict[str, Recipe]:
    e4m3, e5m2 = "float8_e4m3fn", "float8_e5m2"
    return {
        "fp32": Recipe(name="fp32", summary=(("everything", "float32"),)),
        "bf16": Recipe(name="bf16", policy=get_policy("bf16"),
                       summary=(("params", "float32"), ("compute", "bfloat16"), ("output", "float32"))),
        "fp16": Recipe(name="fp16", policy=get_policy("fp16"), loss_scale="dynamic",
                       summary=(("params", "float32"), ("compute", "float16, dynamic loss scaling"),
                                ("output", "float32"))),
        "fp8": _fp("fp8", e4m3, e5m2, (("weights", "e4m3, per-channel current scaling"),
                                       ("activations", "e4m3, per-tensor current scaling"),
                                       ("gradients", "e5m2, per-tensor current scaling"))),
        "fp6": _fp("fp6", "float6_e2m3fn", "float6_e3m2fn",
                   (("weights", "e2m3, per-channel"), ("activations", "e2m3, per-tensor"),
                    ("gradients", "e3m2, per-tensor"))),
        "fp4": _fp4(),
        "mxfp4": _block("mxfp4", "mxfp4_e2m1", (("weights, activations", "MXFP4 (E2M1, 32-blocks, E8M0 scale)"),
                                                ("gradients", "MXFP4, stochastic rounding"))),
        "nvfp4": _block("nvfp4", "nvfp4", (("weights, activations", "NVFP4 (E2M1, 16-blocks, E4M3 + FP32 scale)"),
                                           ("gradients", "NVFP4, stochastic rounding"))),
        "int8_lsq": _lsq(8),
        "int4_lsq": _lsq(4),
        "ternary": _low_bit_weights("ternary", "ternary", "ternary {-a, 0, a}, TWN threshold, per channel a"),
        "binary": _low_bit_weights("binary", "binary", "binary {-a, a}, a = mean|w| per channel"),
    }


_RECIPES: dict[str, Recipe] | None = None


def names() -> list[str]:
    """Every named recipe."""
    return list(_all())


def get(name: str) -> Recipe:
    """The recipe called ``name``.

    Raises:
      ValueError: an unknown name; the message lists the known ones.
    """
    recipes = _all()
    if name not in recipes:
        raise ValueError(f"unknown recipe {name!r}; known recipes: {', '.join(recipes)}")
    return recipes[name]


def _all() -> dict[str, Recipe]:
    global _RECIPES
    if _RECIPES is None:  # built on first use: importing lowbit stays cheap
        _RECIPES = _registry()
    return _RECIPES
