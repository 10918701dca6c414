"""Element formats as frozen dataclasses and pure, jit-able functions."""

from lowbit.formats._bits import random_bits, split_key
from lowbit.formats._checks import ROUNDINGS
from lowbit.formats.adaptive import AdaptiveFloat, choose_bias
from lowbit.formats.api import decode, encode, quantize, values
from lowbit.formats.block import MX_FORMATS, NVFP4, SCALE_MODES, BlockFormat, with_scale_mode
from lowbit.formats.codebook import CodebookFormat
from lowbit.formats.integer import BinaryFormat, IntFormat
from lowbit.formats.minifloat import SPECIALS, FloatFormat
from lowbit.formats.protocol import Format
from lowbit.formats.radix4 import two_phase
from lowbit.formats.registry import get, names, p3109, register
from lowbit.formats.scales import binary_scale, ternarize, ternary_threshold

__all__ = [
    "AdaptiveFloat",
    "BinaryFormat",
    "FloatFormat",
    "IntFormat",
    "ROUNDINGS",
    "SPECIALS",
    "binary_scale",
    "choose_bias",
    "decode",
    "encode",
    "get",
    "names",
    "p3109",
    "quantize",
    "random_bits",
    "register",
    "split_key",
    "ternarize",
    "ternary_threshold",
    "two_phase",
    "values",
    "BlockFormat",
    "MX_FORMATS",
    "NVFP4",
    "SCALE_MODES",
    "with_scale_mode",
    "CodebookFormat",
    "Format",
]
