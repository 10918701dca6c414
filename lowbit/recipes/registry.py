"""The named recipes, written as rules that work on any model.

"First and last layer at 8 bits" (``fp4``, ``int4_lsq``, ``ternary``, ``binary``)
is ``position="edges"``: the first and last weighted op of the forward pass,
whatever the layers are called. Products of two activations (attention's
``QK^T`` and ``AV``) are ``operands="activation"``.
"""

from __future__ import annotations

import dataclasses

from lowbit import formats
from lowbit.formats import FloatFormat
from lowbit.quant import Block, Channel, Delayed, Fixed, Learned, Quantizer
from lowbit.quant.sources import DEFAULT_AMAX_HISTORY
from lowbit.recipes.rules import Recipe, Rule
from lowbit.training.hadamard import RHT
from lowbit.training.policy import get_policy
from lowbit.training.qdot import DotQuantConfig

__all__ = ["get", "names", "resolve"]


def _q(fmt: str, **kw) -> Quantizer:
    """A dynamic absmax quantizer (per tensor unless told otherwise)."""
    return Quantizer(format=fmt, **kw)


def _dot(fwd: Quantizer | None, grad: Quantizer | None, w: Quantizer | None = None) -> DotQuantConfig:
    """Forward quantizer on both operands (``w`` for the weight if given) and ``grad`` on the gradient."""
    return DotQuantConfig(lhs=fwd, rhs=w or fwd, dlhs_grad=grad, drhs_grad=grad)


EDGE = dict(operands="weight", position="edges")  # first and last weighted op
ACTIVATIONS = dict(operands="activation")  # products of two activations (attention QK^T, AV)


def _fp(name, fwd_fmt, grad_fmt, summary, **scaling) -> Recipe:
    """FP8/FP6: per-tensor scaling forward (per-channel weights), its own format for gradients.

    ``scaling`` (e.g. ``scale=Delayed()``) applies to the per-tensor activation and
    gradient quantizers; the default is current scaling (each tensor's own absmax).
    """
    act, grad = _q(fwd_fmt, **scaling), _q(grad_fmt, **scaling)
    weight = _q(fwd_fmt, granularity=Channel())
    return Recipe(
        name=name, rules=(Rule(**ACTIVATIONS, dot=_dot(act, grad)), Rule(dot=_dot(act, grad, weight))), summary=summary
    )


def _absmax_int(weight_bits: int) -> Recipe:
    """Dynamic absmax W8A8 / W4A8 (qwix's default QAT): per-channel weights, per-tensor int8 activations.

    Float gradients. Both operands are integers, so ``matmul="auto"`` runs the
    forward product on int8 operands with int32 accumulation on every backend
    (int4 codes ride in int8); convolutions stay fake-quantized.
    """
    act = _q("int8")
    weight = _q(f"int{weight_bits}", granularity=Channel())
    return Recipe(
        name=f"int{weight_bits}",
        rules=(Rule(**ACTIVATIONS, dot=_dot(act, None)), Rule(dot=_dot(act, None, weight))),
        summary=(
            ("weights", f"int{weight_bits} per-channel absmax"),
            ("activations", "int8 per-tensor absmax"),
            ("activation products (attention)", "int8 per-tensor absmax"),
            ("gradients", "float32 (int8 dots forward)"),
        ),
    )


def _bf16() -> DotQuantConfig:
    """BF16 GEMMs: every operand of the three products rounded to bfloat16, float32 sums."""
    q = _q(FloatFormat(name="bfloat16", ebits=8, mbits=7), scale=Fixed())
    return DotQuantConfig(lhs=q, rhs=q, dlhs_grad=q, drhs_grad=q)


def _block(
    name,
    fmt,
    summary,
    *,
    grad_rounding="stochastic",
    placement="gemm",
    weight_tile=None,
    rht_block=None,
    bf16_edges=False,
    bf16_attention=False,
) -> Recipe:
    """MX / NVFP4 on both operands of every GEMM (forward, input gradient, weight gradient) of every op
    (but those the ``bf16_*`` flags keep in BF16).

    With ``placement="gemm"`` each GEMM blocks both of its operands along its own
    contraction, from the unquantized tensors (see ``lowbit.training.qdot``);
    ``"quantizer"`` is lowbit's earlier numerics (the backward reusing the
    forward's copies, gradient blocks along the last axis).

    Args:
      weight_tile: ``(rows, cols)`` 2-D blocks for weights (one quantized weight
        in the forward and the input gradient), else 1-D blocks like the rest.
      rht_block: a random Hadamard transform of this size on the weight-gradient
        GEMM's inputs of dot products with a weight. Not on convolutions: their
        weight gradient pairs shifted windows, where no rotation cancels.
      bf16_edges: the first and last weighted op (``position="edges"``) run as
        BF16 GEMMs.
      bf16_attention: the products of two activations (attention's QK^T and AV)
        run as BF16 GEMMs.
    """
    fwd, grad = _q(fmt), _q(fmt, rounding=grad_rounding)
    weight = fwd if weight_tile is None else _q(fmt, granularity=Block(shape=weight_tile))
    dot = DotQuantConfig(lhs=fwd, rhs=weight, dlhs_grad=grad, drhs_grad=grad, placement=placement)
    rules = (Rule(dot=dot),)
    if rht_block is not None:
        rotated = dataclasses.replace(dot, rht=RHT(products=("drhs",), block=rht_block))
        rules = (Rule(kinds=("dot_general", "einsum"), operands="weight", dot=rotated),) + rules
    if bf16_attention:
        rules = (Rule(**ACTIVATIONS, dot=_bf16()),) + rules
    if bf16_edges:
        rules = (Rule(**EDGE, dot=_bf16()),) + rules
    return Recipe(name=name, rules=rules, summary=summary)


def _fp4() -> Recipe:
    """Sun et al. 2020: INT4 SAWB weights, INT4 PACT activations, radix-4 FP4 gradients with GradScale + TPR.

    The paper's FP4 gradients are for the GEMMs of weighted layers; its CNNs have
    no product of two activations. Attention's QK^T and AV take the edges' e5m2
    gradients: radix-4 FP4 there cost 0.43 points on Fashion-MNIST (3 seeds,
    ``benchmarks/ablate_fp4.py``).
    """
    r4 = _q("fp4_radix4", scale=Learned())
    e5m2 = _q("float8_e5m2")
    # Softmax probabilities on 7 int4 levels cost ~3 points on digits; 8-bit attention products keep the gap < 1.5.
    int8 = _q("int8")
    return Recipe(
        name="fp4",
        rules=(
            Rule(**EDGE, dot=_dot(None, e5m2), weight="sawb", weight_bits=8, act="pact", act_bits=8),
            Rule(**ACTIVATIONS, dot=_dot(int8, e5m2)),
            Rule(
                dot=DotQuantConfig(dlhs_grad=r4, drhs_grad=r4, grad_scale=True, tpr=True),
                weight="sawb",
                weight_bits=4,
                act="pact",
                act_bits=4,
            ),
        ),
        summary=(
            ("weights", "4-bit SAWB (16 levels on [-a, a], a from SAWB; first/last layer: 8-bit)"),
            ("activations", "4-bit PACT, learned clip a, signed (first/last layer: 8-bit)"),
            ("activation products (attention)", "int8 per-tensor absmax, e5m2 gradients"),
            ("gradients", "fp4_radix4, GradScale + two-phase rounding (first/last layer: e5m2)"),
        ),
    )


def _lsq(bits: int) -> Recipe:
    """LSQ (Esser et al. 2019): learned steps for weights and activations; float gradients."""
    edge = "" if bits == 8 else " (first/last layer: 8-bit)"
    rules = (Rule(**EDGE, weight="lsq", weight_bits=8, act="lsq", act_bits=8),) if bits < 8 else ()
    return Recipe(
        name=f"int{bits}_lsq",
        # Activation products at 8 bits, as in fp4.
        rules=rules
        + (
            Rule(**ACTIVATIONS, dot=_dot(_q("int8"), None)),
            Rule(weight="lsq", weight_bits=bits, act="lsq", act_bits=bits),
        ),
        summary=(
            ("weights", f"int{bits}, LSQ learned step{edge}"),
            ("activations", f"int{bits}, LSQ learned step{edge}"),
            ("activation products (attention)", "int8 per-tensor absmax"),
            ("gradients", "float32"),
        ),
    )


def _low_bit_weights(name: str, rule: str, label: str) -> Recipe:
    """Ternary / binary weights (per output channel scale) with int8 activations."""
    int8 = _q("int8")
    return Recipe(
        name=name,
        rules=(
            Rule(**EDGE, dot=_dot(int8, None, _q("int8", granularity=Channel()))),
            Rule(**ACTIVATIONS, dot=_dot(int8, None)),
            Rule(dot=DotQuantConfig(lhs=int8), weight=rule),
        ),
        summary=(
            ("weights", f"{label} (first/last layer: int8 per channel)"),
            ("activations", "int8 per-tensor absmax"),
            ("activation products (attention)", "int8 per-tensor absmax"),
            ("gradients", "float32"),
        ),
    )


def _registry() -> dict[str, Recipe]:
    e4m3, e5m2 = "float8_e4m3fn", "float8_e5m2"
    return {
        "fp32": Recipe(name="fp32", summary=(("everything", "float32"),)),
        "bf16": Recipe(
            name="bf16",
            policy=get_policy("bf16"),
            summary=(("params", "float32"), ("compute", "bfloat16"), ("output", "float32")),
        ),
        "fp16": Recipe(
            name="fp16",
            policy=get_policy("fp16"),
            loss_scale="dynamic",
            summary=(("params", "float32"), ("compute", "float16, dynamic loss scaling"), ("output", "float32")),
        ),
        "fp8": _fp(
            "fp8",
            e4m3,
            e5m2,
            (
                ("weights", "e4m3, per-channel current scaling"),
                ("activations", "e4m3, per-tensor current scaling"),
                ("gradients", "e5m2, per-tensor current scaling"),
            ),
        ),
        "fp8_delayed": _fp(
            "fp8_delayed",
            e4m3,
            e5m2,
            (
                ("weights", "e4m3, per-channel current scaling"),
                (
                    "activations",
                    f"e4m3, per-tensor delayed scaling (max of a {DEFAULT_AMAX_HISTORY}-step amax history)",
                ),
                ("gradients", f"e5m2, per-tensor delayed scaling (max of a {DEFAULT_AMAX_HISTORY}-step amax history)"),
            ),
            scale=Delayed(),
        ),
        "fp6": _fp(
            "fp6",
            "float6_e2m3fn",
            "float6_e3m2fn",
            (("weights", "e2m3, per-channel"), ("activations", "e2m3, per-tensor"), ("gradients", "e3m2, per-tensor")),
        ),
        "fp4": _fp4(),
        # TransformerEngine's MXFP8BlockScaling: E4M3 everywhere, scales amax/448 rounded up (cuBLAS, JAX), in the
        # GEMMs of TE's linear layers. Its attention runs in BF16 (fp8_dpa=False, the default; TE's opt-in MXFP8
        # attention of 2026 scales softmax probabilities by a fixed factor, not by block maxima). Fashion-MNIST: with
        # attention's products in MXFP8 too, the gap to fp32 was -0.33 (5 seeds).
        "mxfp8": _block(
            "mxfp8",
            formats.with_scale_mode("mxfp8_e4m3", "rceil"),
            (
                (
                    "weights, activations, gradients",
                    "MXFP8 (E4M3, 32-blocks, E8M0 scale rounded up: rceil), round to nearest",
                ),
                ("GEMMs", "all three of every weighted op, each blocked along its own contraction"),
                ("activation products (attention)", "BF16"),
            ),
            grad_rounding="nearest",
            bf16_attention=True,
        ),
        # Tseng et al. 2025 (MXFP4 training): stochastic rounding and an RHT in the backward pass.
        "mxfp4": _block(
            "mxfp4",
            formats.with_scale_mode("mxfp4_e2m1", "rceil"),
            (
                ("weights, activations", "MXFP4 (E2M1, 32-blocks, E8M0 scale rounded up: rceil)"),
                ("gradients", "MXFP4, stochastic rounding"),
                (
                    "GEMMs",
                    (
                        "each blocked along its own contraction; weight gradient of dot products: 32-point random "
                        "Hadamard transform on both inputs"
                    ),
                ),
            ),
            rht_block=32,
        ),
        # NVIDIA's NVFP4 pretraining recipe (2025): linear layers in NVFP4; embeddings, the output head and attention's
        # two batched GEMMs in BF16, and ~15% of the block linears, most of them at the end. lowbit's positions know
        # no blocks: the first and last weighted op in BF16 (a ViT's patch embedding and head; in a language model
        # whose embedding is a lookup, the first block's first projection and the head). Fashion-MNIST: with the
        # first weighted op in BF16 too, the gap to fp32 went from -0.85 (3 seeds) to -0.58 (5 seeds).
        "nvfp4": _block(
            "nvfp4",
            "nvfp4",
            (
                ("activations", "NVFP4 (E2M1, 1x16 blocks, E4M3 + FP32 scale)"),
                ("weights", "NVFP4 in 16x16 blocks (one quantized weight in forward and input gradient)"),
                ("gradients", "NVFP4 1x16, stochastic rounding"),
                (
                    "GEMMs",
                    (
                        "each blocked along its own contraction; weight gradient of dot products: 16-point random "
                        "Hadamard transform on both inputs"
                    ),
                ),
                ("first and last layer, activation products (attention)", "BF16"),
            ),
            weight_tile=(16, 16),
            rht_block=16,
            bf16_edges=True,
            bf16_attention=True,
        ),
        "nvfp4_v0": _block(
            "nvfp4_v0",
            "nvfp4",
            (
                ("weights, activations", "NVFP4 (E2M1, 16-blocks, E4M3 + FP32 scale)"),
                ("gradients", "NVFP4, stochastic rounding, blocks along the last axis"),
                ("GEMMs", "backward reuses the forward's quantized operands (lowbit before issue 19)"),
            ),
            placement="quantizer",
        ),
        "int8": _absmax_int(8),
        "int4": _absmax_int(4),
        "int8_lsq": _lsq(8),
        "int4_lsq": _lsq(4),
        "ternary": _low_bit_weights("ternary", "ternary", "ternary {-a, 0, a}, TWN threshold, per channel a"),
        "binary": _low_bit_weights("binary", "binary", "binary {-a, a}, a = mean|w| per channel"),
    }


_RECIPES: dict[str, Recipe] | None = None


def names() -> list[str]:
    """Every named recipe."""
    return list(_all())


def resolve(recipe: Recipe | str) -> Recipe:
    """``recipe`` itself, or the named recipe.

    Raises:
      ValueError: an unknown name. TypeError: neither a Recipe nor a string.
    """
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, str):
        return get(recipe)
    raise TypeError(f"recipe={recipe!r} is invalid; allowed: a lowbit.recipes.Recipe or a name in {', '.join(names())}")


def get(name: str) -> Recipe:
    """The recipe called ``name``.

    Raises:
      ValueError: an unknown name; the message lists the known ones.
    """
    recipes = _all()
    if name not in recipes:
        raise ValueError(f"recipe={name!r} is unknown; allowed: {', '.join(recipes)}")
    return recipes[name]


def _all() -> dict[str, Recipe]:
    global _RECIPES
    if _RECIPES is None:  # built on first use: importing lowbit stays cheap
        _RECIPES = _registry()
    return _RECIPES
