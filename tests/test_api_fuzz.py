"""Fuzz table of the public numerics API: every malformed call is a clear error or a documented result.

Each case is ``(id, call, expected)``. ``Err(type, field)``: the call raises
``type`` (TypeError or ValueError) from inside lowbit, before JAX sees the
input, and the message names the offending argument or field (``field`` is a
regex). ``Ok(check)``: a documented result, ``check(result)`` is true.
``Py(type, field)``: Python's own signature error (keyword-only dataclasses),
listed so the table covers it.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lowbit import formats, quant
from lowbit.formats import AdaptiveFloat, BinaryFormat, BlockFormat, FloatFormat, IntFormat
from lowbit.quant import PTF, Absmax, Channel, Fixed, Group, Learned, Percentile, Quantizer, Twin, Uniform


@dataclasses.dataclass(frozen=True)
class Err:
    type: type
    field: str


@dataclasses.dataclass(frozen=True)
class Ok:
    check: Callable[[Any], bool]


@dataclasses.dataclass(frozen=True)
class Py:
    type: type
    field: str


E4 = "float8_e4m3fn"
X = np.linspace(-2, 2, 8, dtype=np.float32)
X64 = X.astype(np.float64)
M = np.linspace(-2, 2, 32, dtype=np.float32).reshape(8, 4)
KEY = jax.random.key(0)
LEGACY = jax.random.PRNGKey(0)
AF = AdaptiveFloat(base=formats.get(E4))
INT8 = Quantizer(format="int8")
STOCH = Quantizer(format="int8", rounding="stochastic")
LEARNED = Quantizer(format="int8", granularity=Channel(axis=-1), scale=Learned())
STATIC = Quantizer(format="int8", scale=Absmax(static=True))


def _same(ref):
    return Ok(lambda y: y.shape == np.shape(ref) and y.dtype == jnp.float32)


def _shape(shape, dtype=jnp.float32):
    return Ok(lambda y: y.shape == shape and y.dtype == dtype)


def _u(*codes, dtype=np.uint8):
    return np.array(codes, dtype)


def _mx_codes():
    return formats.encode("mxfp4_e2m1", M.T)


def _nv_codes():
    return formats.encode("nvfp4", M.T)


def _bool_cases(owner, make, fields):
    return [
        (f"{owner}.{f}={v!r}", (lambda f=f, v=v: make(**{f: v})), Err(TypeError, rf"\b{f}\b"))
        for f in fields
        for v in ("no", 0, 1, None)
    ]


# ----- formats: encode / decode / quantize / values / get ------------------------------------
FORMAT_CALLS = [
    ("quantize fmt=42", lambda: formats.quantize(42, X), Err(TypeError, r"\bfmt\b")),
    ("quantize fmt=None", lambda: formats.quantize(None, X), Err(TypeError, r"\bfmt\b")),
    ("encode fmt=object", lambda: formats.encode(object(), X), Err(TypeError, r"\bfmt\b")),
    ("decode fmt=3.5", lambda: formats.decode(3.5, _u(1)), Err(TypeError, r"\bfmt\b")),
    ("values fmt=42", lambda: formats.values(42), Err(TypeError, r"\bfmt\b")),
    ("quantize unknown name", lambda: formats.quantize("nope", X), Err(ValueError, r"format 'nope'")),
    ("quantize x=str", lambda: formats.quantize(E4, "abc"), Err(TypeError, r"\bx\b")),
    ("quantize x=None", lambda: formats.quantize(E4, None), Err(TypeError, r"\bx\b")),
    ("quantize x=object", lambda: formats.quantize(E4, object()), Err(TypeError, r"\bx\b")),
    ("quantize x=list of floats", lambda: formats.quantize(E4, [0.1, 0.2]), Err(TypeError, r"\bx\b.*float64")),
    ("quantize x=python float", lambda: formats.quantize(E4, 1.5), Err(TypeError, r"\bx\b.*float64")),
    ("quantize x=float64 array", lambda: formats.quantize(E4, X64), Err(TypeError, r"\bx\b.*float64")),
    ("quantize x=float64 scalar", lambda: formats.quantize(E4, np.float64(1.5)), Err(TypeError, r"\bx\b.*float64")),
    ("encode x=float64 array", lambda: formats.encode(E4, X64), Err(TypeError, r"\bx\b.*float64")),
    ("quantize int4 x=float64", lambda: formats.quantize("int4", X64), Err(TypeError, r"\bx\b.*float64")),
    (
        "quantize mxfp4 x=float64",
        lambda: formats.quantize("mxfp4_e2m1", M.astype(np.float64)),
        Err(TypeError, r"\bx\b.*float64"),
    ),
    ("quantize adaptive x=float64", lambda: formats.quantize(AF, X64), Err(TypeError, r"\bx\b.*float64")),
    ("quantize x=int array", lambda: formats.quantize(E4, jnp.arange(4)), Err(TypeError, r"\bx\b")),
    ("quantize x=bool array", lambda: formats.quantize(E4, np.array([True])), Err(TypeError, r"\bx\b")),
    ("quantize x=complex", lambda: formats.quantize(E4, np.ones(2, np.complex64)), Err(TypeError, r"\bx\b")),
    ("quantize saturate='no'", lambda: formats.quantize(E4, X, saturate="no"), Err(TypeError, r"\bsaturate\b")),
    ("quantize saturate=0", lambda: formats.quantize(E4, X, saturate=0), Err(TypeError, r"\bsaturate\b")),
    ("encode saturate=1", lambda: formats.encode(E4, X, saturate=1), Err(TypeError, r"\bsaturate\b")),
    ("encode saturate=None", lambda: formats.encode(E4, X, saturate=None), Err(TypeError, r"\bsaturate\b")),
    ("quantize rounding='up'", lambda: formats.quantize(E4, X, rounding="up"), Err(ValueError, r"\brounding\b")),
    ("quantize rounding=None", lambda: formats.quantize(E4, X, rounding=None), Err(ValueError, r"\brounding\b")),
    ("quantize stochastic no key", lambda: formats.quantize(E4, X, rounding="stochastic"), Err(ValueError, r"\bkey\b")),
    ("quantize key=0", lambda: formats.quantize(E4, X, rounding="stochastic", key=0), Err(TypeError, r"\bkey\b")),
    ("quantize key=1.5", lambda: formats.quantize(E4, X, rounding="stochastic", key=1.5), Err(TypeError, r"\bkey\b")),
    (
        "quantize key='seed'",
        lambda: formats.quantize(E4, X, rounding="stochastic", key="seed"),
        Err(TypeError, r"\bkey\b"),
    ),
    (
        "quantize key=float array",
        lambda: formats.quantize(E4, X, rounding="stochastic", key=jnp.zeros(2)),
        Err(TypeError, r"\bkey\b"),
    ),
    (
        "quantize key=int32[2]",
        lambda: formats.quantize(E4, X, rounding="stochastic", key=np.zeros(2, np.int32)),
        Err(TypeError, r"\bkey\b"),
    ),
    (
        "quantize key=uint32[3]",
        lambda: formats.quantize(E4, X, rounding="stochastic", key=np.zeros(3, np.uint32)),
        Err(ValueError, r"\bkey\b"),
    ),
    (
        "quantize key batch (new)",
        lambda: formats.quantize(E4, X, rounding="stochastic", key=jax.random.split(KEY, 3)),
        Err(ValueError, r"\bkey\b"),
    ),
    (
        "quantize key batch (legacy)",
        lambda: formats.quantize(E4, X, rounding="stochastic", key=jax.random.split(LEGACY, 3)),
        Err(ValueError, r"\bkey\b"),
    ),
    ("quantize key=0 with nearest", lambda: formats.quantize(E4, X, key=0), Err(TypeError, r"\bkey\b")),
    (
        "encode key batch",
        lambda: formats.encode(E4, X, rounding="stochastic", key=jax.random.split(KEY, 2)),
        Err(ValueError, r"\bkey\b"),
    ),
    ("quantize legacy key", lambda: formats.quantize(E4, X, rounding="stochastic", key=LEGACY), _same(X)),
    ("quantize new-style key", lambda: formats.quantize(E4, X, rounding="stochastic", key=KEY), _same(X)),
    ("quantize x=0-d", lambda: formats.quantize(E4, np.float32(1.5)), _shape(())),
    ("quantize x=empty", lambda: formats.quantize(E4, np.zeros((0, 3), np.float32)), _shape((0, 3))),
    (
        "quantize x=bfloat16 keeps dtype",
        lambda: formats.quantize(E4, jnp.asarray(X, jnp.bfloat16)),
        _shape((8,), jnp.bfloat16),
    ),
    ("decode e4m3 code 0xFFFF", lambda: formats.decode(E4, _u(0xFFFF, dtype=np.uint16)), Err(ValueError, r"\bcodes\b")),
    ("decode e4m3 int32 -1", lambda: formats.decode(E4, _u(-1, dtype=np.int32)), Err(ValueError, r"\bcodes\b")),
    ("decode fp4 0xFF", lambda: formats.decode("float4_e2m1fn", _u(0xFF)), Err(ValueError, r"\bcodes\b")),
    ("decode fp4 0x10", lambda: formats.decode("float4_e2m1fn", _u(0x10)), Err(ValueError, r"\bcodes\b")),
    ("decode int4 16", lambda: formats.decode("int4", _u(16)), Err(ValueError, r"\bcodes\b")),
    ("decode binary 2", lambda: formats.decode("binary", _u(2)), Err(ValueError, r"\bcodes\b")),
    ("decode p3109 k6 code 64", lambda: formats.decode("p3109_k6p3", _u(64)), Err(ValueError, r"\bcodes\b")),
    ("decode codes=float", lambda: formats.decode(E4, np.ones(3, np.float32)), Err(TypeError, r"\bcodes\b")),
    ("decode codes=str", lambda: formats.decode(E4, "abc"), Err(TypeError, r"\bcodes\b")),
    ("decode codes=None", lambda: formats.decode(E4, None), Err(TypeError, r"\bcodes\b")),
    ("decode codes=bool", lambda: formats.decode(E4, np.array([True])), Err(TypeError, r"\bcodes\b")),
    ("decode e4m3 codes=tuple", lambda: formats.decode(E4, (_u(1), _u(1))), Err(ValueError, r"\bcodes\b")),
    ("decode int4 codes=tuple", lambda: formats.decode("int4", (_u(1),)), Err(ValueError, r"\bcodes\b")),
    ("decode codes=list of ints", lambda: formats.decode(E4, [0, 56]), Ok(lambda y: list(np.asarray(y)) == [0, 1])),
    (
        "decode codes=int32 in range",
        lambda: formats.decode(E4, _u(0x38, dtype=np.int32)),
        Ok(lambda y: float(y[0]) == 1.0),
    ),
    ("decode dtype=int32", lambda: formats.decode(E4, _u(1), dtype=jnp.int32), Err(TypeError, r"\bdtype\b")),
    ("decode dtype='banana'", lambda: formats.decode(E4, _u(1), dtype="banana"), Err(TypeError, r"\bdtype\b")),
    ("decode dtype=float64", lambda: formats.decode(E4, _u(1), dtype=np.float64), Err(TypeError, r"\bdtype\b")),
    ("decode dtype=bfloat16", lambda: formats.decode(E4, _u(0x38), dtype=jnp.bfloat16), _shape((1,), jnp.bfloat16)),
    ("decode mx without scales", lambda: formats.decode("mxfp4_e2m1", _mx_codes()[0]), Err(ValueError, r"\bcodes\b")),
    (
        "decode mx scales wrong shape",
        lambda: formats.decode("mxfp4_e2m1", (_mx_codes()[0], _u(127, 127))),
        Err(ValueError, r"\bscales\b"),
    ),
    (
        "decode mx scales float",
        lambda: formats.decode("mxfp4_e2m1", (_mx_codes()[0], np.ones((4, 1), np.float32))),
        Err(TypeError, r"\bscales\b"),
    ),
    (
        "decode mx element code 0xFF",
        lambda: formats.decode("mxfp4_e2m1", (np.full((4, 8), 0xFF, np.uint8), _mx_codes()[1])),
        Err(ValueError, r"\bcodes\b"),
    ),
    (
        "decode mx scale code 300",
        lambda: formats.decode("mxfp4_e2m1", (_mx_codes()[0], np.full((4, 1), 300, np.int32))),
        Err(ValueError, r"\bscales\b"),
    ),
    (
        "decode nvfp4 missing tensor scale",
        lambda: formats.decode("nvfp4", _nv_codes()[:2]),
        Err(ValueError, r"tensor_scale"),
    ),
    ("decode adaptive without bias", lambda: formats.decode(AF, _u(1, 2)), Err(ValueError, r"\bbias\b")),
    ("decode adaptive float bias", lambda: formats.decode(AF, (_u(1, 2), np.float32(7))), Err(TypeError, r"\bbias\b")),
    (
        "decode adaptive bias 10**6",
        lambda: formats.decode(AF, (_u(1, 2), np.int32(10**6))),
        Err(ValueError, r"\bbias\b"),
    ),
    ("values unknown name", lambda: formats.values("nope"), Err(ValueError, r"format 'nope'")),
    ("values int4", lambda: formats.values("int4"), Ok(lambda v: v.size == 16 and v.dtype == np.float32)),
    ("get 42", lambda: formats.get(42), Err(ValueError, r"unknown format 42")),
    ("get None", lambda: formats.get(None), Err(ValueError, r"unknown format None")),
    ("get p3109 K=99", lambda: formats.get("p3109_k99p3"), Err(ValueError, r"\bK\b")),
    ("get trailing space", lambda: formats.get(E4 + " "), Err(ValueError, r"format 'float8_e4m3fn '")),
    ("block quantize 0-d", lambda: formats.quantize("mxfp4_e2m1", np.float32(1)), Err(ValueError, r"\bx\b")),
    (
        "block quantize empty last axis",
        lambda: formats.quantize("mxfp4_e2m1", np.zeros((2, 0), np.float32)),
        _shape((2, 0)),
    ),
    ("adaptive quantize empty", lambda: formats.quantize(AF, np.zeros((0,), np.float32)), _shape((0,))),
    (
        "adaptive encode empty",
        lambda: formats.encode(AF, np.zeros((0, 2), np.float32)),
        Ok(lambda r: r[0].shape == (0, 2) and int(r[1].ravel()[0]) == AF.base.bias),
    ),
    (
        "adaptive per-channel empty",
        lambda: formats.quantize(AdaptiveFloat(base=AF.base, axis=0, rule="sqnr"), np.zeros((3, 0), np.float32)),
        _shape((3, 0)),
    ),
    (
        "adaptive axis out of range",
        lambda: formats.quantize(AdaptiveFloat(base=AF.base, axis=3), X),
        Err(ValueError, r"\baxis\b"),
    ),
    ("choose_bias x=str", lambda: formats.choose_bias(AF, "x"), Err(TypeError, r"\bx\b")),
    ("choose_bias x=float64", lambda: formats.choose_bias(AF, X64), Err(TypeError, r"\bx\b")),
    ("choose_bias fmt=FloatFormat", lambda: formats.choose_bias(AF.base, X), Err(TypeError, r"\bfmt\b")),
]

# ----- format constructors ---------------------------------------------------------------------
CONSTRUCTORS = [
    *[
        (f"FloatFormat ebits={v!r}", (lambda v=v: FloatFormat(ebits=v, mbits=3)), Err(ValueError, r"\bebits\b"))
        for v in (10**6, 10**8, 64, 9, 0, -1, 4.0, "4", None)
    ],
    ("FloatFormat ebits=True", lambda: FloatFormat(ebits=True, mbits=3), Err(ValueError, r"\bebits\b")),
    *[
        (f"FloatFormat mbits={v!r}", (lambda v=v: FloatFormat(ebits=4, mbits=v)), Err(ValueError, r"\bmbits\b"))
        for v in (-1, 24, 10**9, 2.0, None)  # up to 23: every value exact in float32
    ],
    *[
        (f"FloatFormat bias={v!r}", (lambda v=v: FloatFormat(ebits=5, mbits=2, bias=v)), Err(ValueError, r"\bbias\b"))
        for v in (10**30, -(10**6), -2000, 2000, 300, -200, 2.5, "7")
    ],
    *[
        (
            f"FloatFormat radix={v!r}",
            (lambda v=v: FloatFormat(ebits=4, mbits=3, radix=v)),
            Err(ValueError, r"\bradix\b"),
        )
        for v in (3, 2.0, "2", 8, True)
    ],
    *[
        (
            f"FloatFormat specials={v!r}",
            (lambda v=v: FloatFormat(ebits=4, mbits=3, specials=v)),
            Err(ValueError, r"\bspecials\b"),
        )
        for v in ("posit", None, ("ieee",))
    ],
    *_bool_cases("FloatFormat", lambda **kw: FloatFormat(ebits=4, mbits=3, specials="fn", **kw), ("signed", "zero")),
    ("FloatFormat name=5", lambda: FloatFormat(ebits=4, mbits=3, name=5), Err(TypeError, r"\bname\b")),
    ("FloatFormat positional", lambda: FloatFormat(4, 3), Py(TypeError, r"positional")),
    (
        "FloatFormat bfloat16 layout",
        lambda: FloatFormat(ebits=8, mbits=7),
        Ok(lambda f: f.bias == 127 and f.max_value == float(jnp.finfo(jnp.bfloat16).max)),
    ),
    (
        "FloatFormat radix 4 ebits 8",
        lambda: FloatFormat(ebits=8, mbits=0, radix=4, specials="finite"),
        Err(ValueError, r"\bbias\b"),
    ),
    *[
        (f"IntFormat bits={v!r}", (lambda v=v: IntFormat(bits=v)), Err(ValueError, r"\bbits\b"))
        for v in (0, 1, 17, 10**9, 8.0, "8", True, None)
    ],
    *_bool_cases("IntFormat", lambda **kw: IntFormat(bits=8, **kw), ("signed", "narrow")),
    ("IntFormat uint1 narrow", lambda: IntFormat(bits=1, signed=False, narrow=True), Err(ValueError, r"\bnarrow\b")),
    ("IntFormat name=None", lambda: IntFormat(bits=4, name=None), Err(TypeError, r"\bname\b")),
    ("IntFormat uint1", lambda: IntFormat(bits=1, signed=False), Ok(lambda f: f.max_int == 1)),
    ("BinaryFormat name=3", lambda: BinaryFormat(name=3), Err(TypeError, r"\bname\b")),
    ("BinaryFormat bits=2", lambda: BinaryFormat(bits=2), Py(TypeError, r"\bbits\b")),
    ("AdaptiveFloat base=str", lambda: AdaptiveFloat(base=E4), Err(ValueError, r"\bbase\b")),
    ("AdaptiveFloat base=IntFormat", lambda: AdaptiveFloat(base=IntFormat(bits=8)), Err(ValueError, r"\bbase\b")),
    ("AdaptiveFloat rule='median'", lambda: AdaptiveFloat(base=AF.base, rule="median"), Err(ValueError, r"\brule\b")),
    *[
        (f"AdaptiveFloat axis={v!r}", (lambda v=v: AdaptiveFloat(base=AF.base, axis=v)), Err(ValueError, r"\baxis\b"))
        for v in (1.5, 100, True, "0")
    ],
    *[
        (
            f"AdaptiveFloat search={v!r}",
            (lambda v=v: AdaptiveFloat(base=AF.base, search=v)),
            Err(ValueError, r"\bsearch\b"),
        )
        for v in (5, (1, 2), [0, 1], (0, 1.5), (0, 10**9), (), None, (0, True))
    ],
    ("BlockFormat element=str", lambda: BlockFormat(element="float4_e2m1fn"), Err(ValueError, r"\belement\b")),
    (
        "BlockFormat element=uint8",
        lambda: BlockFormat(element=IntFormat(bits=8, signed=False)),
        Err(ValueError, r"\belement\b"),
    ),
    (
        "BlockFormat element=radix4",
        lambda: BlockFormat(element=formats.get("fp4_radix4")),
        Err(ValueError, r"\belement\b"),
    ),
    *[
        (
            f"BlockFormat block_size={v!r}",
            (lambda v=v: BlockFormat(element=formats.get(E4), block_size=v)),
            Err(ValueError, r"\bblock_size\b"),
        )
        for v in (0, -1, 10**9, 32.0, True, None)
    ],
    ("BlockFormat kind='fp4'", lambda: BlockFormat(element=formats.get(E4), kind="fp4"), Err(ValueError, r"\bkind\b")),
    (
        "BlockFormat mx with e4m3 scale",
        lambda: BlockFormat(element=formats.get(E4), scale=formats.get(E4)),
        Err(ValueError, r"\bscale\b"),
    ),
    (
        "BlockFormat nvfp4 int scale",
        lambda: BlockFormat(element=formats.get(E4), kind="nvfp4", scale=IntFormat(bits=8)),
        Err(ValueError, r"\bscale\b"),
    ),
    ("BlockFormat name=1", lambda: BlockFormat(element=formats.get(E4), name=1), Err(TypeError, r"\bname\b")),
]

# ----- quant -----------------------------------------------------------------------------------
QUANT_CALLS = [
    ("Quantizer format=42", lambda: Quantizer(format=42), Err(ValueError, r"\bformat\b")),
    ("Quantizer format='nope'", lambda: Quantizer(format="nope"), Err(ValueError, r"\bformat\b")),
    ("Quantizer format=adaptive", lambda: Quantizer(format=AF), Err(ValueError, r"\bformat\b")),
    (
        "Quantizer granularity='row'",
        lambda: Quantizer(format="int8", granularity="row"),
        Err(TypeError, r"\bgranularity\b"),
    ),
    *[
        (f"Quantizer axis={v!r}", (lambda v=v: Channel(axis=v)), Err(ValueError, r"\baxis\b"))
        for v in (1.5, 100, None, True)
    ],
    (
        "Quantizer group_size=0",
        lambda: Quantizer(format="int8", granularity=Group(size=0)),
        Err(ValueError, r"\bGroup\.size\b"),
    ),
    (
        "Quantizer group_size=4.0",
        lambda: Quantizer(format="int8", granularity=Group(size=4.0)),
        Err(ValueError, r"\bGroup\.size\b"),
    ),
    ("Quantizer scale='max'", lambda: Quantizer(format="int8", scale="max"), Err(TypeError, r"\bscale\b")),
    *[
        (
            f"Quantizer percentile={v!r}",
            (lambda v=v: Quantizer(format="int8", scale=Percentile(q=v))),
            Err(ValueError, r"\bPercentile\.q\b"),
        )
        for v in (0, 101, "99", True, float("nan"))
    ],
    (
        "Quantizer scale_format='fp16'",
        lambda: Quantizer(format="int8", scale_format="fp16"),
        Err(ValueError, r"\bscale_format\b"),
    ),
    *_bool_cases("Quantizer", lambda **kw: Quantizer(format="int8", **kw), ("saturate",)),
    *_bool_cases("Uniform", lambda **kw: Uniform(**kw), ("symmetric",)),
    *_bool_cases("Absmax", lambda **kw: Absmax(**kw), ("static",)),
    ("Quantizer rounding='up'", lambda: Quantizer(format="int8", rounding="up"), Err(ValueError, r"\brounding\b")),
    (
        "Quantizer fixed_scale=-1",
        lambda: Quantizer(format="int8", scale=Fixed(step=-1.0)),
        Err(ValueError, r"\bFixed\.step\b"),
    ),
    (
        "Quantizer fixed_scale=inf",
        lambda: Quantizer(format="int8", scale=Fixed(step=float("inf"))),
        Err(ValueError, r"\bFixed\.step\b"),
    ),
    ("Quantizer kind='cubic'", lambda: Quantizer(format="int8", kind="cubic"), Err(TypeError, r"\bkind\b")),
    ("Twin shift=0", lambda: Twin(shift=0), Err(ValueError, r"\bshift\b")),
    (
        "Quantizer ptf_max_power=99",
        lambda: PTF(max_power=99),
        Err(ValueError, r"\bmax_power\b"),
    ),
    (
        "Quantizer zero_point_range='half'",
        lambda: Quantizer(format="int8", kind=Uniform(zero_point_range="half")),
        Err(ValueError, r"\bzero_point_range\b"),
    ),
    ("fake_quant quantizer=str", lambda: quant.fake_quant("int8", X), Err(TypeError, r"\bquantizer\b")),
    ("fake_quant x=str", lambda: quant.fake_quant(INT8, "x"), Err(TypeError, r"\bx\b")),
    ("fake_quant x=None", lambda: quant.fake_quant(INT8, None), Err(TypeError, r"\bx\b")),
    ("fake_quant x=float64", lambda: quant.fake_quant(INT8, X64), Err(TypeError, r"\bx\b.*float64")),
    ("fake_quant x=list", lambda: quant.fake_quant(INT8, [0.5, 1.0]), Err(TypeError, r"\bx\b.*float64")),
    ("fake_quant x=int", lambda: quant.fake_quant(INT8, jnp.arange(4)), Err(TypeError, r"\bx\b")),
    (
        "fake_quant mx x=float64",
        lambda: quant.fake_quant(Quantizer(format="mxfp4_e2m1"), M.astype(np.float64)),
        Err(TypeError, r"\bx\b.*float64"),
    ),
    ("fake_quant stochastic no key", lambda: quant.fake_quant(STOCH, X), Err(ValueError, r"\bkey\b")),
    ("fake_quant key=0", lambda: quant.fake_quant(STOCH, X, 0), Err(TypeError, r"\bkey\b")),
    ("fake_quant key=0.5", lambda: quant.fake_quant(STOCH, X, 0.5), Err(TypeError, r"\bkey\b")),
    ("fake_quant key batch", lambda: quant.fake_quant(STOCH, X, jax.random.split(KEY, 4)), Err(ValueError, r"\bkey\b")),
    ("fake_quant legacy key", lambda: quant.fake_quant(STOCH, X, LEGACY), _same(X)),
    ("fake_quant new key", lambda: quant.fake_quant(STOCH, X, KEY), _same(X)),
    ("fake_quant learned no scale", lambda: quant.fake_quant(LEARNED, M), Err(ValueError, r"\bscale\b")),
    (
        "fake_quant unexpected scale",
        lambda: quant.fake_quant(INT8, M, scale=np.float32(1)),
        Err(ValueError, r"\bscale\b"),
    ),
    (
        "fake_quant learned scale wrong shape",
        lambda: quant.fake_quant(LEARNED, M, scale=jnp.ones(3)),
        Err(ValueError, r"\bscale\b"),
    ),
    (
        "fake_quant learned scale (8,4) for (1,4)",
        lambda: quant.fake_quant(LEARNED, M, scale=jnp.ones((8, 4))),
        Err(ValueError, r"\bscale\b"),
    ),
    ("fake_quant learned scale=str", lambda: quant.fake_quant(LEARNED, M, scale="s"), Err(TypeError, r"\bscale\b")),
    (
        "fake_quant learned scale=float64",
        lambda: quant.fake_quant(LEARNED, M, scale=np.ones((1, 4))),
        Err(TypeError, r"\bscale\b"),
    ),
    ("fake_quant learned scale (1,4)", lambda: quant.fake_quant(LEARNED, M, scale=jnp.ones((1, 4))), _same(M)),
    ("fake_quant learned scale (4,)", lambda: quant.fake_quant(LEARNED, M, scale=jnp.full(4, 0.5)), _same(M)),
    ("fake_quant static no state", lambda: quant.fake_quant(STATIC, X), Err(ValueError, r"\bstate\b")),
    (
        "fake_quant axis out of range",
        lambda: quant.fake_quant(Quantizer(format="int8", granularity=Channel(axis=5)), M),
        Err(ValueError, r"\baxis\b"),
    ),
    (
        "fake_quant group does not divide",
        lambda: quant.fake_quant(Quantizer(format="int8", granularity=Group(size=3)), M),
        Err(ValueError, r"\bGroup\.size\b"),
    ),
    ("fake_quant empty", lambda: quant.fake_quant(INT8, np.zeros((0, 4), np.float32)), _shape((0, 4))),
    ("quantize quantizer=None", lambda: quant.quantize(None, X), Err(TypeError, r"\bquantizer\b")),
    ("quantize x=float64", lambda: quant.quantize(INT8, X64), Err(TypeError, r"\bx\b.*float64")),
    ("quantize key batch", lambda: quant.quantize(STOCH, X, jax.random.split(KEY, 2)), Err(ValueError, r"\bkey\b")),
    (
        "quantize learned wrong shape",
        lambda: quant.quantize(LEARNED, M, scale=jnp.ones((2, 4))),
        Err(ValueError, r"\bscale\b"),
    ),
    ("dequantize str", lambda: quant.dequantize("qt"), Err(TypeError, r"\bqt\b")),
    ("dequantize array", lambda: quant.dequantize(jnp.ones(3)), Err(TypeError, r"\bqt\b")),
    ("dequantize round trip", lambda: quant.dequantize(quant.quantize(INT8, X)), _same(X)),
    ("qparams block format", lambda: quant.qparams(Quantizer(format="mxfp4_e2m1"), M), Err(ValueError, r"qparams")),
]

CASES = FORMAT_CALLS + CONSTRUCTORS + QUANT_CALLS
_LOWBIT = os.sep + "lowbit" + os.sep


def _raised_in_lowbit(tb) -> bool:
    """Whether the innermost frame of the traceback is lowbit's own code (not JAX's, numpy's, Python's)."""
    while tb.tb_next is not None:
        tb = tb.tb_next
    return _LOWBIT in tb.tb_frame.f_code.co_filename


def classify(call, expected) -> bool:
    """Whether ``call`` behaves as ``expected`` says (used by the test and to count outcomes)."""
    try:
        result = call()
    except Exception as e:  # noqa: BLE001 - classifying is the point
        if isinstance(expected, Py):
            return isinstance(e, expected.type) and re.search(expected.field, str(e)) is not None
        return (
            isinstance(expected, Err)
            and type(e) is expected.type
            and _raised_in_lowbit(e.__traceback__)
            and re.search(expected.field, str(e)) is not None
        )
    return isinstance(expected, Ok) and bool(expected.check(result))


def test_the_table_is_large_enough():
    assert len(CASES) >= 100
    assert len({name for name, _, _ in CASES}) == len(CASES)


@pytest.mark.parametrize(("call", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_call(call, expected):
    if isinstance(expected, Ok):
        assert expected.check(call())
        return
    with pytest.raises(expected.type, match=expected.field) as info:
        call()
    if isinstance(expected, Err):
        assert type(info.value) is expected.type
        assert _raised_in_lowbit(info.tb), "raised outside lowbit"


# ----- the documented behaviours behind the table ----------------------------------------------
def test_float64_is_refused_because_narrowing_rounds_twice():
    """Why float64 is a TypeError: float64 -> float32 -> format can round differently from rounding once."""
    x = 1.0625 + 2.0**-40  # 2^-40 above the midpoint of e4m3's neighbours 1.0 and 1.125
    v = formats.values(E4).astype(np.float64)
    assert v[np.argmin(np.abs(v - x))] == 1.125  # the nearest value, found in float64: no tie
    # Narrowed first, x lands exactly on the midpoint, which ties to the even 1.0.
    assert float(formats.quantize(E4, np.float32(x))) == 1.0
    for call in (
        lambda a: formats.quantize(E4, a),
        lambda a: formats.encode(E4, a),
        lambda a: quant.fake_quant(INT8, a),
    ):
        with pytest.raises(TypeError, match="float64"):
            call(np.array([x]))
    with jax.enable_x64(True):  # with x64 on, jax float64 arrays exist; they are refused alike
        with pytest.raises(TypeError, match="float64"):
            formats.quantize(E4, jnp.asarray([x], jnp.float64))
        with pytest.raises(TypeError, match="float64"):
            quant.fake_quant(INT8, jnp.asarray([x], jnp.float64))


@pytest.mark.parametrize(
    ("name", "codes"),
    [
        (E4, np.array([0xFFFF, 0x1138, 0x0138, 0x7F00], np.uint16)),
        ("float4_e2m1fn", np.array([0xFF, 0x12, 0xF3, 0x10], np.uint8)),
        ("int4", np.array([-1, 0x1F, 16, -8], np.int32)),
        ("binary", np.array([2, 3, 0xFE], np.uint8)),
        ("p3109_k6p3", np.array([64, 127, 0xFFC0], np.uint16)),
    ],
)
def test_traced_codes_read_only_their_low_bits(name, codes):
    """Concrete codes that do not fit are a ValueError; under jit the low ``bits`` bits are decoded."""
    fmt = formats.get(name)
    low = (codes.astype(np.int64) & (2**fmt.bits - 1)).astype(np.uint8)
    with pytest.raises(ValueError, match=r"\bcodes\b.*allowed"):
        formats.decode(fmt, codes)
    traced = np.asarray(jax.jit(lambda c: formats.decode(fmt, c))(codes))
    np.testing.assert_array_equal(traced, np.asarray(formats.decode(fmt, low)))
    oracle = {E4: ml_dtypes.float8_e4m3fn, "float4_e2m1fn": ml_dtypes.float4_e2m1fn}.get(name)
    if oracle is not None:
        np.testing.assert_array_equal(traced, low.view(oracle).astype(np.float32))


def test_traced_scale_codes_and_biases_are_masked_and_clamped():
    codes, scales = formats.encode("mxfp4_e2m1", M.T)
    wide = scales.astype(jnp.int32) + 0x100  # a ninth bit set: the low 8 bits are the scale
    got = jax.jit(lambda s: formats.decode("mxfp4_e2m1", (codes, s)))(wide)
    np.testing.assert_array_equal(got, formats.decode("mxfp4_e2m1", (codes, scales)))
    c, bias = formats.encode(AF, X)
    far = bias + 1000  # outside [base.bias - 100, base.bias + 100]: clamped to its top
    got = jax.jit(lambda b: formats.decode(AF, (c, b)))(far)
    np.testing.assert_array_equal(got, formats.decode(AF, (c, jnp.full_like(bias, AF.base.bias + 100))))


@pytest.mark.parametrize("key", [KEY, LEGACY], ids=["new", "legacy"])
def test_one_key_per_call_and_vmap_for_a_batch(key):
    """Both key styles are reproducible, work traced, and a batch of keys goes through vmap."""

    def sq(k):
        return formats.quantize(E4, X, rounding="stochastic", key=k)

    np.testing.assert_array_equal(sq(key), sq(key))
    np.testing.assert_array_equal(jax.jit(sq)(key), sq(key))
    keys = jax.random.split(key, 3)
    np.testing.assert_array_equal(jax.vmap(sq)(keys), np.stack([sq(k) for k in keys]))
    np.testing.assert_array_equal(
        jax.jit(lambda k: quant.fake_quant(STOCH, X, k))(key), quant.fake_quant(STOCH, X, key)
    )


def test_learned_scale_shape_is_checked_under_jit_too():
    run = jax.jit(lambda s: quant.fake_quant(LEARNED, M, scale=s))
    np.testing.assert_array_equal(run(jnp.full((1, 4), 0.25)), quant.fake_quant(LEARNED, M, scale=jnp.full(4, 0.25)))
    with pytest.raises(ValueError, match=r"scale has shape \(3,\)"):
        run(jnp.ones(3))


_NOT_BOOLS = st.one_of(st.integers(), st.floats(), st.text(max_size=3), st.none(), st.just(np.bool_(True)))
_FLAGS = [
    ("signed", lambda v: FloatFormat(ebits=4, mbits=3, signed=v)),
    ("zero", lambda v: FloatFormat(ebits=4, mbits=3, zero=v)),
    ("signed", lambda v: IntFormat(bits=8, signed=v)),
    ("narrow", lambda v: IntFormat(bits=8, narrow=v)),
    ("symmetric", lambda v: Quantizer(format="int8", kind=Uniform(symmetric=v))),
    ("saturate", lambda v: Quantizer(format="int8", saturate=v)),
    ("static", lambda v: Quantizer(format="int8", scale=Absmax(static=v))),
    ("saturate", lambda v: formats.quantize(E4, X, saturate=v)),
    ("saturate", lambda v: formats.encode(E4, X, saturate=v)),
]


@given(_NOT_BOOLS)
def test_flags_accept_only_bools(value):
    for field, make in _FLAGS:
        with pytest.raises(TypeError, match=rf"\b{field}=.*True or False"):
            make(value)


@given(
    ebits=st.integers(0, 9),
    mbits=st.integers(-1, 24),
    bias=st.one_of(st.none(), st.integers(-260, 260), st.integers(-(10**40), 10**40)),
    radix=st.sampled_from([2, 4]),
    specials=st.sampled_from(formats.SPECIALS),
    signed=st.booleans(),
)
def test_every_accepted_float_format_lives_in_float32(ebits, mbits, bias, radix, specials, signed):
    """Any field values either construct a format the float32 kernels can hold or raise ValueError naming a field."""
    try:
        fmt = FloatFormat(ebits=ebits, mbits=mbits, bias=bias, radix=radix, specials=specials, signed=signed)
    except ValueError as e:
        assert re.match(r"FloatFormat\.(ebits|mbits|bias|bits|specials|zero)=.*allowed", str(e)), str(e)
        return
    # Radix 2 up to 32 bits (mbits <= 23: values exact in float32); radix 4 rounds by a table, up to 16.
    assert 1 <= fmt.ebits <= 8 and fmt.bits <= (32 if radix == 2 else 16) and -256 <= fmt.bias <= 256
    for v in (fmt.max_value, fmt.min_value, fmt.min_normal):
        assert np.float32(v) == v and 2.0**-149 <= v <= float(np.finfo(np.float32).max)
    x = X if signed else np.abs(X)  # an unsigned format reads negatives as NaN
    q = np.asarray(formats.quantize(fmt, jnp.asarray(x * np.float32(fmt.max_value))))
    if fmt.bits <= 16:
        assert np.isin(q, formats.values(fmt)).all()
    else:  # too many codes to list: on the grid means quantizing again changes nothing
        np.testing.assert_array_equal(np.asarray(formats.quantize(fmt, jnp.asarray(q))), q)
