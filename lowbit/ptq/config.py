"""``PTQConfig``: what a post-training quantization pass does, as data."""

from __future__ import annotations

import dataclasses
import re

from lowbit import formats
from lowbit.formats._checks import check_int, require

__all__ = ["CALIBRATIONS", "GELU", "LAYERNORM", "PTQConfig", "SOFTMAX", "resolve_format"]

CALIBRATIONS = ("absmax", "percentile", "mse", "kl")
WEIGHT_CALIBRATIONS = ("absmax", "percentile", "mse")  # kl is a per-tensor method; weights go per channel
SOFTMAX = ("uniform", "log2", "twin")
GELU = ("uniform", "twin")
LAYERNORM = ("tensor", "channel", "ptf")
GRANULARITIES = ("tensor", "channel", "group")
_OWN = "PTQConfig"
_INT = re.compile(r"(u?)int(\d+)")


def resolve_format(name: str):
    """A scalar element format by name: a registered one, or ``intN`` / ``uintN`` for any N in 2..16.

    Raises:
      ValueError: an unknown name or a block format (those scale themselves, dynamically).
    """
    m = _INT.fullmatch(name)
    if name not in formats.names() and m and 2 <= int(m.group(2)) <= 16:
        return formats.IntFormat(bits=int(m.group(2)), signed=not m.group(1), name=name)
    if name not in formats.names() and not name.startswith("p3109_"):
        raise ValueError(f"unknown format {name!r}; allowed: intN/uintN (N in 2..16) or one of "
                         + ", ".join(formats.names()))
    fmt = formats.get(name)
    if not isinstance(fmt, (formats.FloatFormat, formats.IntFormat)):
        raise ValueError(f"format {name!r} is not a scalar integer or float format (block and 1-2 bit formats "
                         "bring their own scales; PTQ needs one it can scale)")
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
      softmax: attention probabilities (``attn_av``'s lhs): ``uniform``,
        ``log2`` (FQ-ViT) or ``twin`` (PTQ4ViT twin uniform, fine step near 0).
      gelu: MLP hidden activations (``mlp_out``'s lhs): ``uniform`` or ``twin``
        (PTQ4ViT: a fine step for the small negative side).
      layernorm: LayerNorm outputs (lhs of ``qkv``, ``mlp_in``, ``head``):
        ``tensor``; ``channel`` (per-channel clips, folded into the LayerNorm
        and the next weight as in RepQ-ViT); ``ptf`` (FQ-ViT power-of-two
        factors, folded the same way).
      dynamic: activation scales from every batch instead of calibration.
      noisy_bias: NoisyQuant: a fixed uniform noise added to each linear
        layer's input before quantization, removed again through its bias.
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
    dynamic: bool = False
    noisy_bias: bool = False
    samples: int = 512
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self):
        resolve_format(self.weights)
        a = resolve_format(self.activations)
        require(self.calibration in CALIBRATIONS, _OWN, "calibration", self.calibration, ", ".join(CALIBRATIONS))
        require(self.weight_calibration is None or self.weight_calibration in WEIGHT_CALIBRATIONS, _OWN,
                "weight_calibration", self.weight_calibration, "None or " + ", ".join(WEIGHT_CALIBRATIONS))
        require(self.granularity in GRANULARITIES, _OWN, "granularity", self.granularity, ", ".join(GRANULARITIES))
        if self.granularity == "group":
            check_int(_OWN, "group_size", self.group_size, 1)
        else:
            require(self.group_size is None, _OWN, "group_size", self.group_size, "None unless granularity='group'")
        require(0 < self.percentile <= 100, _OWN, "percentile", self.percentile, "a number in (0, 100]")
        require(self.softmax in SOFTMAX, _OWN, "softmax", self.softmax, ", ".join(SOFTMAX))
        require(self.gelu in GELU, _OWN, "gelu", self.gelu, ", ".join(GELU))
        require(self.layernorm in LAYERNORM, _OWN, "layernorm", self.layernorm, ", ".join(LAYERNORM))
        check_int(_OWN, "samples", self.samples, 1)
        check_int(_OWN, "batch_size", self.batch_size, 1)
        integer = isinstance(a, formats.IntFormat) and a.signed
        for field, value, plain in (("softmax", self.softmax, "uniform"), ("gelu", self.gelu, "uniform"),
                                    ("layernorm", self.layernorm, "tensor")):
            if value not in (plain, "channel"):
                require(integer and a.bits >= 3, _OWN, field, value,
                        f"{plain!r} with activations {self.activations} ({value} needs a signed integer "
                        "format of at least 3 bits)")
        require(not (self.dynamic and self.noisy_bias), _OWN, "noisy_bias", True,
                "False with dynamic=True (the noise is sized by a calibrated, static step)")

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
