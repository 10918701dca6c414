"""``PTQConfig`` and ``WeightPTQConfig``: what a post-training quantization pass does, as data.

``PTQ_METHODS`` names the passes (``lowbit ptq --method``): ``calibrate``
(``PTQConfig``: static activation scales calibrated on training images, weights
by round to nearest, the ViT quantizers) or a weight method of
``WEIGHT_METHODS`` (``WeightPTQConfig``: ``lowbit.ptq.weights.quantize_weights``).

Ops are named ``"path:key"`` (``lowbit.nn.quantize.op_name``): the module path
and the op's name in it, e.g. ``blocks/0/attn:einsum1`` for the second einsum
of the built-in ViT's attention (its ``AV`` product). The ViT-specific
quantizers apply to ops whose names match regexes (``re.fullmatch``); the
defaults fit the built-in ViT and match nothing in the built-in MLP and CNN.
"""

from __future__ import annotations

import dataclasses
import re

from lowbit import formats
from lowbit.formats._checks import check_int, require
from lowbit.ptq.awq import AWQ
from lowbit.ptq.gptq import GPTQ
from lowbit.ptq.rtn import RTN
from lowbit.ptq.smoothquant import SmoothQuant
from lowbit.quant import Channel, Group, Quantizer
from lowbit.quant.sources import KL, MSE, Absmax, Percentile
from lowbit.recipes.rules import compile_regex

__all__ = [
    "CALIBRATIONS",
    "GELU",
    "GELU_OPS",
    "LAYERNORM",
    "LAYERNORM_OPS",
    "METHODS",
    "PTQ_METHODS",
    "PTQConfig",
    "SOFTMAX",
    "SOFTMAX_OPS",
    "WEIGHT_CALIBRATIONS",
    "WEIGHT_METHODS",
    "WeightMethod",
    "WeightPTQConfig",
    "named_format",
    "resolve_format",
]

# The one list of calibration sources (the clip sources a static quantizer calibrates); the CLI uses it too.
# The data-driven scale sources by the names the CLI and PTQConfig take.
SOURCES = {"absmax": Absmax, "percentile": Percentile, "mse": MSE, "kl": KL}
CALIBRATIONS = tuple(SOURCES)
WEIGHT_CALIBRATIONS = tuple(c for c in CALIBRATIONS if c != "kl")  # kl is a per-tensor method; weights go per channel
SOFTMAX = ("uniform", "log2", "twin")
GELU = ("uniform", "twin")
LAYERNORM = ("tensor", "channel", "ptf")
GRANULARITIES = ("tensor", "channel", "group")
METHODS = ("noise", "outlier", "both", "plain")  # lowbit.ptq.finetune's
WeightMethod = RTN | GPTQ | AWQ | SmoothQuant
# The weight methods by the names the CLI takes (``lowbit ptq --method``), each with its reference settings (a
# composition, SmoothQuant then GPTQ, is one method by its own name); ``quantize_weights`` takes the same names.
WEIGHT_METHODS: dict[str, WeightMethod] = {
    m.name: m for m in (RTN(), GPTQ(), AWQ(), SmoothQuant(), SmoothQuant(then=GPTQ()))
}
CALIBRATE = "calibrate"  # PTQConfig's pass: calibrated static activations, round-to-nearest weights
# Every ``lowbit ptq --method``; the first is the default (what ``lowbit ptq`` did before it had methods).
PTQ_METHODS = (CALIBRATE, *WEIGHT_METHODS)
_OWN = "PTQConfig"
# Where the built-in ViT (lowbit.nn.vit) has the activations the ViT-specific quantizers are for.
SOFTMAX_OPS = r"(.*/)?attn:einsum1"  # lhs of AV: the attention probabilities
GELU_OPS = r"(.*/)?mlp_out:dot_general0"  # lhs of the MLP's output layer: GELU outputs
# (op regex, path of the LayerNorm whose output is the op's lhs; ``\1`` is the regex's first group)
LAYERNORM_OPS = (
    (r"(.*/)?attn/qkv:dot_general0", r"\1norm1"),
    (r"(.*/)?mlp_in:dot_general0", r"\1norm2"),
    (r"head:dot_general0", "norm"),
)
_INT = re.compile(r"(u?)int(\d+)")


def named_format(name: str):
    """An element format by name: a registered one, or ``intN`` / ``uintN`` for any N in 2..16.

    Raises:
      ValueError: an unknown name.
    """
    m = _INT.fullmatch(name)
    if name not in formats.names() and m and 2 <= int(m.group(2)) <= 16:
        return formats.IntFormat(bits=int(m.group(2)), signed=not m.group(1), name=name)
    if name not in formats.names() and not name.startswith("p3109_"):
        raise ValueError(
            f"unknown format {name!r}; allowed: intN/uintN (N in 2..16) or one of " + ", ".join(formats.names())
        )
    return formats.get(name)


def resolve_format(name: str):
    """A scalar element format by name (``named_format``): an integer or float one, which PTQ can scale.

    Raises:
      ValueError: an unknown name or a block format (those scale themselves, dynamically).
    """
    fmt = named_format(name)
    if not isinstance(fmt, (formats.FloatFormat, formats.IntFormat)):
        raise ValueError(
            f"format {name!r} is not a scalar integer or float format (block and 1-2 bit formats "
            "bring their own scales; PTQ needs one it can scale)"
        )
    return fmt


@dataclasses.dataclass(frozen=True, kw_only=True)
class PTQConfig:
    """One post-training quantization setting of a ViT.

    Attributes:
      weights, activations: element format names (``int8``, ``int6``,
        ``float8_e4m3fn``, ``float4_e2m1fn``, ...).
      calibration: where activation clips come from: ``absmax``,
        ``percentile``, ``mse`` or ``kl``. ``kl`` only fits per-tensor uniform
        quantizers; the ViT-specific kinds fall back to ``mse`` (``ptf`` to
        ``absmax``, whose factors already adapt per channel).
      weight_calibration: clip source of the weights (``absmax``,
        ``percentile``, ``mse``); None follows ``calibration`` (``kl`` -> ``mse``).
      granularity: weight scales per ``tensor``, per output ``channel`` or per
        ``group`` of ``group_size`` inputs of each output channel.
      group_size: inputs per weight group (``granularity="group"``).
      percentile: the percentile of ``calibration="percentile"``.
      softmax: attention probabilities (the lhs of ``softmax_ops``):
        ``uniform``, ``log2`` (FQ-ViT) or ``twin`` (PTQ4ViT twin uniform, fine
        step near 0).
      gelu: GELU outputs (the lhs of ``gelu_ops``): ``uniform`` or ``twin``
        (PTQ4ViT: a fine step for the small negative side).
      layernorm: LayerNorm outputs (the lhs of ``layernorm_ops``): ``tensor``;
        ``channel`` (per-channel clips, folded into the LayerNorm and the op's
        weight as in RepQ-ViT); ``ptf`` (FQ-ViT power-of-two factors, folded
        the same way). Folding needs static calibration.
      softmax_ops, gelu_ops: regexes on op names (``path:key``) whose lhs is a
        softmax / GELU output. Defaults: the built-in ViT's.
      layernorm_ops: ``(op regex, LayerNorm path)`` pairs: ops whose lhs is the
        output of that LayerNorm (the path may use the regex's groups, ``\1``).
        A matched op must have a weight (a parameter of its module shaped like
        its rhs) with one contracting axis, the last axis of its lhs.
      dynamic: activation scales from every batch instead of calibration.
      noisy_bias: NoisyQuant: a fixed uniform noise added to the input of
        every op of the form ``x @ W`` (``nnx.Linear``, raw ``@``) before
        quantization, its product with the quantized weight subtracted from
        the result (a bias at deployment).
      samples: calibration images.
      batch_size: calibration batch size.
      seed: which training images calibrate, and the noisy bias's draws.
    """

    weights: str = "int8"
    activations: str = "int8"
    calibration: str = "absmax"
    weight_calibration: str | None = None
    granularity: str = "channel"
    group_size: int | None = None
    percentile: float = 99.99
    softmax: str = "uniform"
    gelu: str = "uniform"
    layernorm: str = "tensor"
    softmax_ops: str = SOFTMAX_OPS
    gelu_ops: str = GELU_OPS
    layernorm_ops: tuple[tuple[str, str], ...] = LAYERNORM_OPS
    dynamic: bool = False
    noisy_bias: bool = False
    samples: int = 512
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self):
        resolve_format(self.weights)
        a = resolve_format(self.activations)
        require(self.calibration in CALIBRATIONS, _OWN, "calibration", self.calibration, ", ".join(CALIBRATIONS))
        require(
            self.weight_calibration is None or self.weight_calibration in WEIGHT_CALIBRATIONS,
            _OWN,
            "weight_calibration",
            self.weight_calibration,
            "None or " + ", ".join(WEIGHT_CALIBRATIONS),
        )
        require(self.granularity in GRANULARITIES, _OWN, "granularity", self.granularity, ", ".join(GRANULARITIES))
        if self.granularity == "group":
            check_int(_OWN, "group_size", self.group_size, 1)
        else:
            require(self.group_size is None, _OWN, "group_size", self.group_size, "None unless granularity='group'")
        require(0 < self.percentile <= 100, _OWN, "percentile", self.percentile, "a number in (0, 100]")
        require(self.softmax in SOFTMAX, _OWN, "softmax", self.softmax, ", ".join(SOFTMAX))
        require(self.gelu in GELU, _OWN, "gelu", self.gelu, ", ".join(GELU))
        require(self.layernorm in LAYERNORM, _OWN, "layernorm", self.layernorm, ", ".join(LAYERNORM))
        compile_regex(_OWN, "softmax_ops", self.softmax_ops)
        compile_regex(_OWN, "gelu_ops", self.gelu_ops)
        if not (
            isinstance(self.layernorm_ops, tuple)
            and all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[1], str) for p in self.layernorm_ops)
        ):
            raise TypeError(
                f"{_OWN}.layernorm_ops={self.layernorm_ops!r} is invalid; allowed: a tuple of "
                "(op regex, LayerNorm path) pairs"
            )
        for pattern, _ in self.layernorm_ops:
            compile_regex(_OWN, "layernorm_ops", pattern)
        for field in ("dynamic", "noisy_bias"):
            require(isinstance(getattr(self, field), bool), _OWN, field, getattr(self, field), "True or False")
        check_int(_OWN, "seed", self.seed, 0)
        check_int(_OWN, "samples", self.samples, 1)
        check_int(_OWN, "batch_size", self.batch_size, 1)
        integer = isinstance(a, formats.IntFormat) and a.signed
        for field, value, plain in (
            ("softmax", self.softmax, "uniform"),
            ("gelu", self.gelu, "uniform"),
            ("layernorm", self.layernorm, "tensor"),
        ):
            if value not in (plain, "channel"):
                require(
                    integer and a.bits >= 3,
                    _OWN,
                    field,
                    value,
                    f"{plain!r} with activations {self.activations} ({value} needs a signed integer "
                    "format of at least 3 bits)",
                )
        require(
            not (self.dynamic and self.noisy_bias),
            _OWN,
            "noisy_bias",
            True,
            "False with dynamic=True (the noise is sized by a calibrated, static step)",
        )
        require(
            not (self.dynamic and self.layernorm != "tensor"),
            _OWN,
            "layernorm",
            self.layernorm,
            "'tensor' with dynamic=True (folding uses calibrated per-channel ranges)",
        )

    @property
    def weight_format(self):
        """The weights' element format object."""
        return resolve_format(self.weights)

    @property
    def activation_format(self):
        """The activations' element format object."""
        return resolve_format(self.activations)

    @property
    def weight_source(self) -> str:
        """The clip source of the weights."""
        if self.weight_calibration is not None:
            return self.weight_calibration
        return "mse" if self.calibration == "kl" else self.calibration

    @property
    def label(self) -> str:
        """A short name such as ``W4A8``."""
        return f"W{self.weight_format.bits}A{self.activation_format.bits}"

    def to_json(self) -> dict:
        """The fields, JSON-serialisable."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class WeightPTQConfig:
    """One weight-method PTQ setting (``lowbit.ptq.weights.quantize_weights``) of any model.

    Attributes:
      method: the method with its settings: ``RTN()``, ``GPTQ(damping,
        block_size, act_order)``, ``AWQ(grid)`` or ``SmoothQuant(alpha, then)``.
      weights: weight format name: ``intN`` / ``uintN`` (N in 2..16) or any
        registered format (``nf4``, ``float8_e4m3fn``, ...).
      group_size: inputs per weight scale group of each output channel (the
        usual W4A16 ``g128``); None for one scale per output channel.
      activations: format of a dynamic per-tensor quantizer on every quantized
        op's input (``int8``: W8A8, W4A8); None keeps activations float (weight-only).
      include, exclude: regexes on op names (``path:key``, ``re.fullmatch``):
        the ops to quantize (None: every weighted op); the others stay float.
      rotate: random-Hadamard rotation of every op's inputs before its method
        (QuaRot / QuIP#-style incoherence processing, ``lowbit.ptq.rotate``): the
        op stores ``Q(Rᵀ w)`` and rotates its input online; with any method.
      samples: calibration images.
      batch_size: calibration batch size.
      seed: which training images calibrate, and the rotations' random signs.
    """

    method: WeightMethod = dataclasses.field(default_factory=GPTQ)
    weights: str = "int4"
    group_size: int | None = 128
    activations: str | None = None
    include: str | None = None
    exclude: str | None = None
    rotate: bool = False
    samples: int = 512
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        kinds = tuple(dict.fromkeys(type(m) for m in WEIGHT_METHODS.values()))
        require(
            isinstance(self.method, kinds),
            "WeightPTQConfig",
            "method",
            self.method,
            " | ".join(f"{c.__name__}()" for c in kinds),
        )
        self.weight_quantizer  # noqa: B018  (raises ValueError on a bad format or group size)
        if self.activations is not None:
            resolve_format(self.activations)  # dynamic activations need a format with a scale
        for field in ("include", "exclude"):
            if getattr(self, field) is not None:
                compile_regex("WeightPTQConfig", field, getattr(self, field))
        require(isinstance(self.rotate, bool), "WeightPTQConfig", "rotate", self.rotate, "True or False")
        for field in ("samples", "batch_size"):
            check_int("WeightPTQConfig", field, getattr(self, field), 1)
        check_int("WeightPTQConfig", "seed", self.seed, 0, 2**63 - 1)

    @property
    def weight_quantizer(self) -> Quantizer:
        """The weight quantizer: per group of ``group_size`` inputs, else per output channel."""
        if self.group_size is not None:
            check_int("WeightPTQConfig", "group_size", self.group_size, 1)
        granularity = Channel() if self.group_size is None else Group(size=self.group_size)
        return Quantizer(format=named_format(self.weights), granularity=granularity)

    @property
    def activation_quantizer(self) -> Quantizer | None:
        """The dynamic per-tensor input quantizer, or None (weight-only)."""
        return None if self.activations is None else Quantizer(format=resolve_format(self.activations))

    @property
    def label(self) -> str:
        """A short name such as ``W4A16`` (float activations: the weight-only convention) or ``W4A8``."""
        a = 16 if self.activations is None else resolve_format(self.activations).bits
        return f"W{named_format(self.weights).bits}A{a}"

    def to_json(self) -> dict:
        """The fields, JSON-serialisable: ``method`` by name, its settings beside it."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "method"}
        return dict(method=self.method.name, **dataclasses.asdict(self.method), **fields)
