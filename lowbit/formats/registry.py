"""The format registry: every named format, by its public name."""

from __future__ import annotations

import math
import re

import numpy as np

from lowbit.formats.codebook import AF4, FP4_E2M1_CODEBOOK, NF4
from lowbit.formats.integer import BinaryFormat, IntFormat
from lowbit.formats.minifloat import FloatFormat
from lowbit.formats.protocol import AnyFormat, BuiltinFormat, Format, missing_members


def _is_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _f(
    name: str,
    ebits: int,
    mbits: int,
    bias: int,
    specials: str,
    *,
    signed: bool = True,
    zero: bool = True,
    radix: int = 2,
) -> FloatFormat:
    return FloatFormat(
        name=name, ebits=ebits, mbits=mbits, bias=bias, specials=specials, signed=signed, zero=zero, radix=radix
    )


def p3109(k: int, p: int) -> FloatFormat:
    """IEEE P3109 ``binary{K}p{P}``: signed, extended domain, bias 2^(K-P-1).

    NaN is code 2^(K-1) (the negative-zero code), +inf 2^(K-1)-1, -inf 2^K-1.

    Raises:
      ValueError: K outside 3..16 or P outside 1..K-1.
    """
    if not (_is_int(k) and 3 <= k <= 16):
        raise ValueError(f"p3109 K={k!r} is invalid; allowed: an integer in [3, 16]")
    if not (_is_int(p) and 1 <= p <= k - 1):
        raise ValueError(f"p3109 P={p!r} is invalid; allowed: an integer in [1, {k - 1}] for K={k}")
    k, p = int(k), int(p)  # NumPy integers pass on as Python ints
    return _f(f"p3109_k{k}p{p}", k - p, p - 1, 2 ** (k - p - 1), "p3109")


_ELEMENT: list[AnyFormat] = [
    _f("float8_e4m3fn", 4, 3, 7, "fn"),
    _f("float8_e5m2", 5, 2, 15, "ieee"),
    _f("float8_e4m3fnuz", 4, 3, 8, "fnuz"),
    _f("float8_e5m2fnuz", 5, 2, 16, "fnuz"),
    _f("float8_e4m3b11fnuz", 4, 3, 11, "fnuz"),
    _f("float8_e3m4", 3, 4, 3, "ieee"),
    _f("float8_e4m3", 4, 3, 7, "ieee"),
    _f("float8_e8m0fnu", 8, 0, 127, "fn", signed=False, zero=False),
    _f("float6_e2m3fn", 2, 3, 1, "finite"),
    _f("float6_e3m2fn", 3, 2, 3, "finite"),
    _f("float4_e2m1fn", 2, 1, 1, "finite"),
    IntFormat(name="int8", bits=8),
    IntFormat(name="int4", bits=4),
    IntFormat(name="int2", bits=2),
    IntFormat(name="uint8", bits=8, signed=False),
    IntFormat(name="uint4", bits=4, signed=False),
    IntFormat(name="uint2", bits=2, signed=False),
    # Sun et al. 2020: 4^-3 .. 4^3 and zero; the odd TPR grid is this format scaled by 2.
    _f("fp4_radix4", 3, 0, 4, "finite", radix=4),
    BinaryFormat(name="binary"),
    IntFormat(name="ternary", bits=2, narrow=True),
    *[p3109(k, p) for k in range(3, 9) for p in range(1, k)],
    NF4,
    AF4,
    FP4_E2M1_CODEBOOK,
]

_REGISTRY: dict[str, AnyFormat] = {f.name: f for f in _ELEMENT}
_P3109 = re.compile(r"p3109_k(\d+)p(\d+)")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")
# Registered formats' widest codes: what quant's packing, lowbit.testing and the CLI handle.
MAX_REGISTERED_BITS = 16


def register(name: str, fmt: AnyFormat) -> None:
    """Make ``fmt`` available by ``name``: ``get(name)``, ``formats.quantize(name, x)``,
    ``quant.Quantizer(format=name)``, and so recipes and the CLI.

    Args:
      name: a letter, then letters, digits, ``_``, ``.`` or ``-``; not a
        registered name (registering an equal format again is a no-op) and not
        of the reserved form ``p3109_k{K}p{P}``.
      fmt: an object implementing ``lowbit.formats.Format`` (or a block format).

    Raises:
      ValueError: a malformed, reserved or taken name; ``fmt.bits`` outside
        1..16 (lowbit's ``FloatFormat`` goes to 32 bits, but registered names
        reach code that handles at most 16) or ``fmt.max_value`` not positive
        and finite.
      TypeError: ``name`` is not a string; ``fmt`` is a class, not an
        instance, or lacks members of the protocol (the message lists them);
        ``fmt.bits`` not an integer, ``fmt.max_value`` not a number,
        ``fmt.has_nan`` not a bool or ``fmt.name`` not a string.
    """
    if not isinstance(name, str):
        raise TypeError(f"register name={name!r} is invalid; allowed: a string")
    if not _NAME.fullmatch(name):
        raise ValueError(f"register name={name!r} is invalid; allowed: a letter, then letters, digits, '_', '.' or '-'")
    if _P3109.fullmatch(name):
        raise ValueError(
            f"register name={name!r} is invalid; allowed: any name but p3109_k{{K}}p{{P}} (reserved for formats.p3109)"
        )
    if isinstance(fmt, type):
        raise TypeError(
            f"register fmt={fmt!r} is a class; allowed: an instance of a class implementing "
            f"lowbit.formats.Format (e.g. {fmt.__name__}(...))"
        )
    missing = [] if isinstance(fmt, BuiltinFormat) else missing_members(fmt)
    if missing:
        raise TypeError(
            f"register fmt={fmt!r} is not a format (it lacks {', '.join(missing)}); allowed: an "
            "object implementing lowbit.formats.Format"
        )
    if not isinstance(fmt, BuiltinFormat):  # lowbit's own formats check their fields when built
        check_members(fmt, f"register fmt={fmt!r}:")
    elif fmt.bits > MAX_REGISTERED_BITS:  # a FloatFormat (or one built on it) past 16 bits
        raise ValueError(
            f"register fmt={fmt!r}: bits={fmt.bits} is invalid; allowed: an integer in [1, {MAX_REGISTERED_BITS}] "
            "(wider FloatFormats work unregistered: formats.encode/decode/quantize and Accumulator take the object)"
        )
    if name in _REGISTRY and _REGISTRY[name] != fmt:
        raise ValueError(
            f"register name={name!r} is invalid; allowed: a new name ({name!r} is already "
            f"registered to {_REGISTRY[name]!r})"
        )
    _REGISTRY[name] = fmt


def check_members(fmt: Format, where: str) -> None:
    """The values of a user format's data members: ``bits`` an integer in 1..16,
    ``max_value`` a positive finite number, ``has_nan`` a bool, ``name`` a string.

    Registered formats stay at 16 bits although ``FloatFormat`` goes to 32: what a
    registered name reaches (``quant`` packing and ``QTensor`` codes, the
    ``lowbit.testing`` strategies and ``check_format``, which enumerate every code
    or list ``values()``, the CLI's code tables) handles codes of at most 16 bits.
    ``register`` refuses wider lowbit formats with the same message.

    Raises:
      TypeError: a member of the wrong type (a bool given as 0/1 or "yes" included).
      ValueError: ``bits`` or ``max_value`` out of range.
    """
    name, bits, max_value, has_nan = fmt.name, fmt.bits, fmt.max_value, fmt.has_nan
    if not isinstance(name, str):
        raise TypeError(f"{where} name={name!r} is invalid; allowed: a string")
    if not _is_int(bits):
        raise TypeError(f"{where} bits={bits!r} is invalid; allowed: an integer in [1, 16]")
    if not 1 <= bits <= MAX_REGISTERED_BITS:
        raise ValueError(f"{where} bits={bits!r} is invalid; allowed: an integer in [1, 16]")
    if isinstance(max_value, (bool, np.bool_)) or not isinstance(max_value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{where} max_value={max_value!r} is invalid; allowed: a positive finite float")
    if not (math.isfinite(max_value) and max_value > 0):
        raise ValueError(f"{where} max_value={max_value!r} is invalid; allowed: a positive finite float")
    if not isinstance(has_nan, bool):
        raise TypeError(f"{where} has_nan={has_nan!r} is invalid; allowed: True or False (a bool)")


def names() -> list[str]:
    """Every registered name (P3109 widths above 8 are also accepted by ``get``)."""
    return list(_REGISTRY)


def get(name: str) -> AnyFormat:
    """The format registered as ``name``.

    Raises:
      ValueError: an unknown name; the message lists the known ones.
    """
    if isinstance(name, str) and name in _REGISTRY:
        return _REGISTRY[name]
    match = _P3109.fullmatch(name) if isinstance(name, str) else None
    if match:
        return p3109(int(match.group(1)), int(match.group(2)))
    raise ValueError(f"unknown format {name!r}; known formats: {', '.join(_REGISTRY)}")
