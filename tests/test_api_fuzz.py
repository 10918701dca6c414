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
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowbit import formats, quant
from lowbit.formats import AdaptiveFloat, BinaryFormat, BlockFormat, FloatFormat, IntFormat
from lowbit.quant import Quantizer


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
LEARNED = Quantizer(format="int8", scale="learned", granularity="channel", axis=-1)
STATIC = Quantizer(format="int8", static=True)


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
    return [(f"{owner}.{f}={v!r}", (lambda f=f, v=v: make(**{f: v})), Err(TypeError, rf"\b{f}\b"))
            for f in fields for v in ("no", 0, 1, None)]


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
    ("quantize mxfp4 x=float64", lambda: formats.quantize("mxfp4_e2m1", M.astype(np.float64)),
     Err(TypeError, r"\bx\b.*float64")),
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
    ("quantize stochastic no key", lambda: formats.quantize(E4, X, rounding="stochastic"),
     Err(ValueError, r"\bkey\b")),
    ("quantize key=0", lambda: formats.quantize(E4, X, rounding="stochastic", key=0), Err(TypeError, r"\bkey\b")),
    ("quantize key=1.5", lambda: formats.quantize(E4, X, rounding="stochastic", key=1.5), Err(TypeError, r"\bkey\b")),
    ("quantize key='seed'", lambda: formats.quantize(E4, X, rounding="stochastic", key="seed"),
     Err(TypeError, r"\bkey\b")),
    ("quantize key=float array", lambda: formats.quantize(E4, X, rounding="stochastic", key=jnp.zeros(2)),
     Err(TypeError, r"\bkey\b")),
    ("quantize key=int32[2]", lambda: formats.quantize(E4, X, rounding="stochastic", key=np.zeros(2, np.int32)),
     Err(TypeError, r"\bkey\b")),
    ("quantize key=uint32[3]", lambda: formats.quantize(E4, X, rounding="stochastic", key=np.zeros(3, np.uint32)),
     Err(ValueError, r"\bkey\b")),
    ("quantize key batch (new)", lambda: formats.quantize(E4, X, rounding="stochastic", key=jax.random.split(KEY, 3)),
     Err(ValueError, r"\bkey\b")),
    ("quantize key batch (legacy)",
     lambda: formats.quantize(E4, X, rounding="stochastic", key=jax.random.split(LEGACY, 3)),
     Err(ValueError, r"\bkey\b")),
    ("quantize key=0 with nearest", lambda: formats.quantize(E4, X, key=0), Err(TypeError, r"\bkey\b")),
    ("encode key batch", lambda: formats.encode(E4, X, rounding="stochastic", key=jax.random.split(KEY, 2)),
     Err(ValueError, r"\bkey\b")),
    ("quantize legacy key", lambda: formats.quantize(E4, X, rounding="stochastic", key=LEGACY), _same(X)),
    ("quantize new-style key", lambda: formats.quantize(E4, X, rounding="stochastic", key=KEY), _same(X)),
    ("quantize x=0-d", lambda: formats.quantize(E4, np.float32(1.5)), _shape(())),
    ("quantize x=empty", lambda: formats.quantize(E4, np.zeros((0, 3), np.float32)), _shape((0, 3))),
    ("quantize x=bfloat16 keeps dtype", lambda: formats.quantize(E4, jnp.asarray(X, jnp.bfloat16)),
     _shape((8,), jnp.bfloat16)),
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
    ("decode codes=list of ints", lambda: formats.decode(E4, [0, 56]), Ok(lambda y: list(np.asarray(y)) == [0, 1])),
    ("decode codes=int32 in range", lambda: formats.decode(E4, _u(0x38, dtype=np.int32)),
     Ok(lambda y: float(y[0]) == 1.0)),
    ("decode dtype=int32", lambda: formats.decode(E4, _u(1), dtype=jnp.int32), Err(TypeError, r"\bdtype\b")),
    ("decode dtype='banana'", lambda: formats.decode(E4, _u(1), dtype="banana"), Err(TypeError, r"\bdtype\b")),
    ("decode dtype=float64", lambda: formats.decode(E4, _u(1), dtype=np.float64), Err(TypeError, r"\bdtype\b")),
    ("decode dtype=bfloat16", lambda: formats.decode(E4, _u(0x38), dtype=jnp.bfloat16), _shape((1,), jnp.bfloat16)),
    ("decode mx without scales", lambda: formats.decode("mxfp4_e2m1", _mx_codes()[0]), Err(ValueError, r"\bcodes\b")),
    ("decode mx scales wrong shape", lambda: formats.decode("mxfp4_e2m1", (_mx_codes()[0], _u(127, 127))),
     Err(ValueError, r"\bscales\b")),
    ("decode mx scales float", lambda: formats.decode("mxfp4_e2m1", (_mx_codes()[0], np.ones((4, 1), np.float32))),
     Err(TypeError, r"\bscales\b")),
    ("decode mx element code 0xFF", lambda: formats.decode("mxfp4_e2m1", (np.full((4, 8), 0xFF, np.uint8),
                                                                          _mx_codes()[1])),
     Err(ValueError, r"\bcodes\b")),
    ("decode mx scale code 300", lambda: formats.decode("mxfp4_e2m1", (_mx_codes()[0], np.full((4, 1), 300, np.int32))),
     Err(ValueError, r"\bscales\b")),
    ("decode nvfp4 missing tensor scale", lambda: formats.decode("nvfp4", _nv_codes()[:2]),
     Err(ValueError, r"tensor_scale")),
    ("decode adaptive without bias", lambda: formats.decode(AF, _u(1, 2)), Err(ValueError, r"\bbias\b")),
    ("decode adaptive float bias", lambda: formats.decode(AF, (_u(1, 2), np.float32(7))), Err(TypeError, r"\bbias\b")),
    ("decode adaptive bias 10**6", lambda: formats.decode(AF, (_u(1, 2), np.int32(10**6))),
     Err(ValueError, r"\bbias\b")),
    ("values unknown name", lambda: formats.values("nope"), Err(ValueError, r"format 'nope'")),
    ("values int4", lambda: formats.values("int4"), Ok(lambda v: v.size == 16 and v.dtype == np.float32)),
    ("get 42", lambda: formats.get(42), Err(ValueError, r"unknown format 42")),
    ("get None", lambda: formats.get(None), Err(ValueError, r"unknown format None")),
    ("get p3109 K=99", lambda: formats.get("p3109_k99p3"), Err(ValueError, r"\bK\b")),
    ("get trailing space", lambda: formats.get(E4 + " "), Err(ValueError, r"format 'float8_e4m3fn '")),
    ("block quantize 0-d", lambda: formats.quantize("mxfp4_e2m1", np.float32(1)), Err(ValueError, r"\bx\b")),
    ("block quantize empty last axis", lambda: formats.quantize("mxfp4_e2m1", np.zeros((2, 0), np.float32)),
     _shape((2, 0))),
    ("adaptive quantize empty", lambda: formats.quantize(AF, np.zeros((0,), np.float32)), _shape((0,))),
    ("adaptive encode empty", lambda: formats.encode(AF, np.zeros((0, 2), np.float32)),
     Ok(lambda r: r[0].shape == (0, 2) and int(r[1].ravel()[0]) == AF.base.bias)),
    ("adaptive per-channel empty", lambda: formats.quantize(AdaptiveFloat(base=AF.base, axis=0, rule="sqnr"),
                                                            np.zeros((3, 0), np.float32)), _shape((3, 0))),
    ("adaptive axis out of range", lambda: formats.quantize(AdaptiveFloat(base=AF.base, axis=3), X),
     Err(ValueError, r"\baxis\b")),
    ("choose_bias x=str", lambda: formats.choose_bias(AF, "x"), Err(TypeError, r"\bx\b")),
    ("choose_bias x=float64", lambda: formats.choose_bias(AF, X64), Err(TypeError, r"\bx\b")),
    ("choose_bias fmt=FloatFormat", lambda: formats.choose_bias(AF.base, X), Err(TypeError, r"\bfmt\b")),
]

# ----- format constructors ---------------------------------------------------------------------
CONSTRUCTORS = [
    *[(f"FloatFormat ebits={v!r}", (lambda v=v: FloatFormat(ebits=v, mbits=3)), Err(ValueError, r"\bebits\b"))
      for v in (10**6, 10**8, 64, 9, 0, -1, 4.0, "4", None)],
    ("FloatFormat ebits=True", lambda: FloatFormat(ebits=True, mbits=3), Err(ValueError, r"\bebits\b")),
    *[(f"FloatFormat mbits={v!r}", (lambda v=v: FloatFormat(ebits=4, mbits=v)), Err(ValueError, r"\bmbits\b"))
      for v in (-1, 16, 24, 10**9, 2.0, None)],
    *[(f"FloatFormat bias={v!r}", (lambda v=v: FloatFormat(ebits=5, mbits=2, bias=v)), Err(ValueError, r"\bbias\b"))
      for v in (10**30, -(10**6), -2000, 2000, 300, -200, 2.5, "7")],
    *[(f"FloatFormat radix={v!r}", (lambda v=v: FloatFormat(ebits=4, mbits=3, radix=v)), Err(ValueError, r"\bradix\b"))
      for v in (3, 2.0, "2", 8, True)],
    *[(f"FloatFormat specials={v!r}", (lambda v=v: FloatFormat(ebits=4, mbits=3, specials=v)),
       Err(ValueError, r"\bspecials\b")) for v in ("posit", None, ("ieee",))],
    *_bool_cases("FloatFormat", lambda **kw: FloatFormat(ebits=4, mbits=3, specials="fn", **kw), ("signed", "zero")),
    ("FloatFormat name=5", lambda: FloatFormat(ebits=4, mbits=3, name=5), Err(TypeError, r"\bname\b")),
    ("FloatFormat positional", lambda: FloatFormat(4, 3), Py(TypeError, r"positional")),
    ("FloatFormat bfloat16 layout", lambda: FloatFormat(ebits=8, mbits=7),
     Ok(lambda f: f.bias == 127 and f.max_value == float(jnp.finfo(jnp.bfloat16).max))),
    ("FloatFormat radix 4 ebits 8", lambda: FloatFormat(ebits=8, mbits=0, radix=4, specials="finite"),
     Err(ValueError, r"\bbias\b")),
    *[(f"IntFormat bits={v!r}", (lambda v=v: IntFormat(bits=v)), Err(ValueError, r"\bbits\b"))
      for v in (0, 1, 17, 10**9, 8.0, "8", True, None)],
    *_bool_cases("IntFormat", lambda **kw: IntFormat(bits=8, **kw), ("signed", "narrow")),
    ("IntFormat uint1 narrow", lambda: IntFormat(bits=1, signed=False, narrow=True), Err(ValueError, r"\bnarrow\b")),
    ("IntFormat name=None", lambda: IntFormat(bits=4, name=None), Err(TypeError, r"\bname\b")),
    ("IntFormat uint1", lambda: IntFormat(bits=1, signed=False), Ok(lambda f: f.max_int == 1)),
    ("BinaryFormat name=3", lambda: BinaryFormat(name=3), Err(TypeError, r"\bname\b")),
    ("BinaryFormat bits=2", lambda: BinaryFormat(bits=2), Py(TypeError, r"\bbits\b")),
    ("AdaptiveFloat base=str", lambda: AdaptiveFloat(base=E4), Err(ValueError, r"\bbase\b")),
    ("AdaptiveFloat base=IntFormat", lambda: AdaptiveFloat(base=IntFormat(bits=8)), Err(ValueError, r"\bbase\b")),
    ("AdaptiveFloat rule='median'", lambda: AdaptiveFloat(base=AF.base, rule="median"), Err(ValueError, r"\brule\b")),
    *[(f"AdaptiveFloat axis={v!r}", (lambda v=v: AdaptiveFloat(base=AF.base, axis=v)), Err(ValueError, r"\baxis\b"))
      for v in (1.5, 100, True, "0")],
    *[(f"AdaptiveFloat search={v!r}", (lambda v=v: AdaptiveFloat(base=AF.base, search=v)),
       Err(ValueError, r"\bsearch\b")) for v in (5, (1, 2), [0, 1], (0, 1.5), (0, 10**9), (), None, (0, True))],
    ("BlockFormat element=str", lambda: BlockFormat(element="float4_e2m1fn"), Err(ValueError, r"\belement\b")),
    ("BlockFormat element=uint8", lambda: BlockFormat(element=IntFormat(bits=8, signed=False)),
     Err(ValueError, r"\belement\b")),
    ("BlockFormat element=radix4", lambda: BlockFormat(element=formats.get("fp4_radix4")),
     Err(ValueError, r"\belement\b")),
    *[(f"BlockFormat block_size={v!r}", (lambda v=v: BlockFormat(element=formats.get(E4), block_size=v)),
       Err(ValueError, r"\bblock_size\b")) for v in (0, -1, 10**9, 32.0, True, None)],
    ("BlockFormat kind='fp4'", lambda: BlockFormat(element=formats.get(E4), kind="fp4"), Err(ValueError, r"\bkind\b")),
    ("BlockFormat mx with e4m3 scale", lambda: BlockFormat(element=formats.get(E4), scale=formats.get(E4)),
     Err(ValueError, r"\bscale\b")),
    ("BlockFormat nvfp4 int scale", lambda: BlockFormat(element=formats.get(E4), kind="nvfp4", scale=IntFormat(bits=8)),
     Err(ValueError, r"\bscale\b")),
    ("BlockFormat name=1", lambda: BlockFormat(element=formats.get(E4), name=1), Err(TypeError, r"\bname\b")),
]

# ----- quant -----------------------------------------------------------------------------------
QUANT_CALLS = [
    ("Quantizer format=42", lambda: Quantizer(format=42), Err(ValueError, r"\bformat\b")),
    ("Quantizer format='nope'", lambda: Quantizer(format="nope"), Err(ValueError, r"\bformat\b")),
    ("Quantizer format=adaptive", lambda: Quantizer(format=AF), Err(ValueError, r"\bformat\b")),
    ("Quantizer granularity='row'", lambda: Quantizer(format="int8", granularity="row"),
     Err(ValueError, r"\bgranularity\b")),
    *[(f"Quantizer axis={v!r}", (lambda v=v: Quantizer(format="int8", axis=v)), Err(ValueError, r"\baxis\b"))
      for v in (1.5, 100, None, True)],
    ("Quantizer group_size=0", lambda: Quantizer(format="int8", granularity="group", group_size=0),
     Err(ValueError, r"\bgroup_size\b")),
    ("Quantizer group_size=4.0", lambda: Quantizer(format="int8", granularity="group", group_size=4.0),
     Err(ValueError, r"\bgroup_size\b")),
    ("Quantizer scale='max'", lambda: Quantizer(format="int8", scale="max"), Err(ValueError, r"\bscale\b")),
    *[(f"Quantizer percentile={v!r}", (lambda v=v: Quantizer(format="int8", scale="percentile", percentile=v)),
       Err(ValueError, r"\bpercentile\b")) for v in (0, 101, "99", True, float("nan"))],
    ("Quantizer scale_format='fp16'", lambda: Quantizer(format="int8", scale_format="fp16"),
     Err(ValueError, r"\bscale_format\b")),
    *_bool_cases("Quantizer", lambda **kw: Quantizer(format="int8", **kw), ("symmetric", "saturate", "static")),
    ("Quantizer rounding='up'", lambda: Quantizer(format="int8", rounding="up"), Err(ValueError, r"\brounding\b")),
    ("Quantizer fixed_scale=-1", lambda: Quantizer(format="int8", scale="fixed", fixed_scale=-1.0),
     Err(ValueError, r"\bfixed_scale\b")),
    ("Quantizer fixed_scale=inf", lambda: Quantizer(format="int8", scale="fixed", fixed_scale=float("inf")),
     Err(ValueError, r"\bfixed_scale\b")),
    ("Quantizer kind='cubic'", lambda: Quantizer(format="int8", kind="cubic"), Err(ValueError, r"\bkind\b")),
    ("Quantizer twin_shift=0", lambda: Quantizer(format="int8", twin_shift=0), Err(ValueError, r"\btwin_shift\b")),
    ("Quantizer ptf_max_power=99", lambda: Quantizer(format="int8", ptf_max_power=99),
     Err(ValueError, r"\bptf_max_power\b")),
    ("Quantizer zero_point_range='half'", lambda: Quantizer(format="int8", zero_point_range="half"),
     Err(ValueError, r"\bzero_point_range\b")),
    ("fake_quant quantizer=str", lambda: quant.fake_quant("int8", X), Err(TypeError, r"\bquantizer\b")),
    ("fake_quant x=str", lambda: quant.fake_quant(INT8, "x"), Err(TypeError, r"\bx\b")),
    ("fake_quant x=None", lambda: quant.fake_quant(INT8, None), Err(TypeError, r"\bx\b")),
    ("fake_quant x=float64", lambda: quant.fake_quant(INT8, X64), Err(TypeError, r"\bx\b.*float64")),
    ("fake_quant x=list", lambda: quant.fake_quant(INT8, [0.5, 1.0]), Err(TypeError, r"\bx\b.*float64")),
    ("fake_quant x=int", lambda: quant.fake_quant(INT8, jnp.arange(4)), Err(TypeError, r"\bx\b")),
    ("fake_quant mx x=float64", lambda: quant.fake_quant(Quantizer(format="mxfp4_e2m1"), M.astype(np.float64)),
     Err(TypeError, r"\bx\b.*float64")),
    ("fake_quant stochastic no key", lambda: quant.fake_quant(STOCH, X), Err(ValueError, r"\bkey\b")),
    ("fake_quant key=0", lambda: quant.fake_quant(STOCH, X, 0), Err(TypeError, r"\bkey\b")),
    ("fake_quant key=0.5", lambda: quant.fake_quant(STOCH, X, 0.5), Err(TypeError, r"\bkey\b")),
    ("fake_quant key batch", lambda: quant.fake_quant(STOCH, X, jax.random.split(KEY, 4)), Err(ValueError, r"\bkey\b")),
    ("fake_quant legacy key", lambda: quant.fake_quant(STOCH, X, LEGACY), _same(X)),
    ("fake_quant new key", lambda: quant.fake_quant(STOCH, X, KEY), _same(X)),
    ("fake_quant learned no scale", lambda: quant.fake_quant(LEARNED, M), Err(ValueError, r"\bscale\b")),
    ("fake_quant unexpected scale", lambda: quant.fake_quant(INT8, M, scale=np.float32(1)),
     Err(ValueError, r"\bscale\b")),
    ("fake_quant learned scale wrong shape", lambda: quant.fake_quant(LEARNED, M, scale=jnp.ones(3)),
     Err(ValueError, r"\bscale\b")),
    ("fake_quant learned scale (8,4) for (1,4)", lambda: quant.fake_quant(LEARNED, M, scale=jnp.ones((8, 4))),
     Err(ValueError, r"\bscale\b")),
    ("fake_quant learned scale=str", lambda: quant.fake_quant(LEARNED, M, scale="s"), Err(TypeError, r"\bscale\b")),
    ("fake_quant learned scale=float64", lambda: quant.fake_quant(LEARNED, M, scale=np.ones((1, 4))),
     Err(TypeError, r"\bscale\b")),
    ("fake_quant learned scale (1,4)", lambda: quant.fake_quant(LEARNED, M, scale=jnp.ones((1, 4))), _same(M)),
    ("fake_quant learned scale (4,)", lambda: quant.fake_quant(LEARNED, M, scale=jnp.full(4, 0.5)), _same(M)),
    ("fake_quant static no state", lambda: quant.fake_quant(STATIC, X), Err(ValueError, r"\bstate\b")),
    ("fake_quant axis out of range", lambda: quant.fake_quant(Quantizer(format="int8", granularity="channel", axis=5), M),
     Err(ValueError, r"\baxis\b")),
    ("fake_quant group does not divide", lambda: quant.fake_quant(
        Quantizer(format="int8", granularity="group", group_size=3), M), Err(ValueError, r"\bgroup_size\b")),
    ("fake_quant empty", lambda: quant.fake_quant(INT8, np.zeros((0, 4), np.float32)), _shape((0, 4))),
    ("quantize quantizer=None", lambda: quant.quantize(None, X), Err(TypeError, r"\bquantizer\b")),
    ("quantize x=float64", lambda: quant.quantize(INT8, X64), Err(TypeError, r"\bx\b.*float64")),
    ("quantize key batch", lambda: quant.quantize(STOCH, X, jax.random.split(KEY, 2)), Err(ValueError, r"\bkey\b")),
    ("quantize learned wrong shape", lambda: quant.quantize(LEARNED, M, scale=jnp.ones((2, 4))),
     Err(ValueError, r"\bscale\b")),
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
        import re

        if isinstance(expected, Py):
            return isinstance(e, expected.type) and re.search(expected.field, str(e)) is not None
        return (isinstance(expected, Err) and type(e) is expected.type and _raised_in_lowbit(e.__traceback__)
                and re.search(expected.field, str(e)) is not None)
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
