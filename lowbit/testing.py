"""Hypothesis strategies and reusable property suites for element formats and scaled quantizers.

Use it to property-test a format you define, lowbit's or any object
implementing ``lowbit.formats.Format``::

    from lowbit import formats, testing

    fmt = formats.FloatFormat(ebits=3, mbits=3, specials="fn")
    testing.check_format(fmt)                 # raises AssertionError listing every violation

In pytest, a test module can be two lines::

    from lowbit.testing import format_test
    test_my_format = format_test(MyFormat())  # or format_test(fmt, reference=my_numpy_cast)

The suite checks the format contract: decode∘encode is the identity on
``values(fmt)``; nearest rounding picks the nearest value and breaks exact ties
to the even code; quantize is idempotent, monotone and sign-symmetric (where
the grid is); toward-zero never grows a magnitude; stochastic rounding lands on
a neighbour, is unbiased, reproducible for a key and uses its key; saturation,
overflow, NaN and inf follow the format's flags; ``quantize == decode ∘ encode``
(except that quantize keeps NaN where the format has no NaN code); bfloat16 and
float16 inputs round as their float32 values do; and, given ``reference=``,
the results equal the reference's.

Every expectation is computed independently, in float64, from ``values(fmt)``
and the format's flags. Each format compiles one jitted kernel (cached per
format) and every array is checked in chunks of one fixed shape, so a format
costs one compilation however many examples run.

:func:`check_quantizer` checks what every scaled ``lowbit.quant.Quantizer``
must satisfy (idempotence, invariance under powers of two, padding of a last
partial block, independent scale groups, unbiased stochastic rounding through a
GEMM, equality with a user's reference)::

    testing.check_quantizer(quant.Quantizer(format="mxfp8_e4m3"))

Both suites raise inside ``@given``, so Hypothesis shrinks each counterexample
and replays it first next time from its example database.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from lowbit import formats, quant
from lowbit.formats import (
    AdaptiveFloat,
    BinaryFormat,
    BlockFormat,
    CodebookFormat,
    FloatFormat,
    IntFormat,
)
from lowbit.quant.granularity import Block, Channel, Group, Tensor, is_block
from lowbit.quant.sources import DATA_SCALES, KL, MSE, Fixed, Percentile

__all__ = [
    "CHUNK",
    "QUANTIZER_CHECKS",
    "FormatProperties",
    "QuantizerViolation",
    "check_array",
    "check_format",
    "check_grid",
    "check_quantizer",
    "float_formats",
    "format_test",
    "formats_any",
    "hard_arrays",
    "hard_floats",
    "hard_values",
    "int_formats",
    "quantizer_arrays",
]

CHUNK = 1024  # the one array length every kernel is compiled for
_STOCH_POINTS = 64  # points per chunk whose stochastic rounding is sampled ...
_STOCH_DRAWS = 1024  # ... this many times each (repeated in one array: every copy draws its own bits)
# A Chernoff bound with this exponent rejects an unbiased rounding with
# probability below e^-25 per point, so the suite does not flake.
_CHERNOFF_LIMIT = 25.0

# lowbit's element formats that map every input onto their grid (no overflow code).
_SATURATING = (IntFormat, BinaryFormat, CodebookFormat)
_HALF_DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16}
_F32_INF_BITS = 0x7F800000
_NAN_BITS = (0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FFFFFFF, 0xFFFFFFFF, 0x7FA5A5A5, 0xFFD00001)
_F32_EDGE_BITS = (
    0x00000000,
    0x00000001,
    0x00000002,
    0x00400000,
    0x007FFFFF,
    0x00800000,
    0x00800001,
    0x7F7FFFFF,
    0x7F7FFFFE,
    _F32_INF_BITS,
)


# ----- strategies ---------------------------------------------------------------------


def _is_element(fmt) -> bool:
    return isinstance(fmt, formats.Format) and not isinstance(fmt, (AdaptiveFloat, BlockFormat))


def _element(fmt):
    if not _is_element(fmt):
        from lowbit.formats.protocol import missing_members

        missing = missing_members(fmt)
        lacks = f" (it lacks {', '.join(missing)})" if missing else ""
        raise TypeError(
            f"{fmt!r} is not an element format{lacks}; allowed: an object implementing "
            "lowbit.formats.Format (FloatFormat, IntFormat, BinaryFormat, CodebookFormat or your "
            "own class; AdaptiveFloat and block formats scale themselves)"
        )
    return fmt


@functools.cache
def _valid_biases(ebits, mbits, radix, specials, signed, zero) -> tuple[int, ...]:
    """Every bias that makes a valid format, nearest the IEEE default first."""
    default = 2 ** (ebits - 1) - 1
    # Values must stay inside float32: the top exponent r^(2^ebits - 1 - bias) below
    # 2^128 and the bottom r^(1 - bias) / 2^mbits above 2^-149. Only biases in that
    # window (plus a margin) can pass the constructor.
    step = 1 if radix == 2 else 2
    lo = 2**ebits - 1 - 128 // step - 2
    hi = (149 - mbits) // step + 3
    found = []
    for bias in sorted(range(lo, hi + 1), key=lambda b: (abs(b - default), b)):
        try:
            FloatFormat(ebits=ebits, mbits=mbits, bias=bias, radix=radix, specials=specials, signed=signed, zero=zero)
        except ValueError:
            continue
        found.append(bias)
    return tuple(found)


@st.composite
def float_formats(draw, *, max_bits: int = 8, radix: int | None = None, specials: str | None = None):
    """Any valid :class:`~lowbit.formats.FloatFormat` of at most ``max_bits`` bits.

    Covers both radixes, every special-value policy, unsigned and zero-less
    formats, and every bias that keeps the values inside float32 (so grids that
    reach float32 subnormals and its largest values are drawn too).

    Args:
      max_bits: storage width limit, 3..16. Radix-4 kernels unroll one compare
        per value, so keep this small where compile time matters.
      radix: fix the radix (2 or 4) instead of drawing it.
      specials: fix the special-value policy instead of drawing it.

    Raises:
      ValueError: ``max_bits`` outside 3..16.
    """
    if not 3 <= max_bits <= 16:
        raise ValueError(f"float_formats max_bits={max_bits!r} is invalid; allowed: an integer in [3, 16]")
    radix = draw(st.sampled_from((2, 4))) if radix is None else radix
    specials = draw(st.sampled_from(formats.SPECIALS)) if specials is None else specials
    signed = draw(st.booleans()) if specials in ("ieee", "fn", "finite") else True
    zero = True if signed else draw(st.booleans())  # zero-less formats are unsigned (E8M0)
    width = max_bits - int(signed)  # ebits + mbits
    mbits = draw(st.integers(1 if specials == "ieee" else 0, max(width - 1, 0)))
    ebits = draw(st.integers(1, max(width - mbits, 1)))
    biases = _valid_biases(ebits, mbits, radix, specials, signed, zero)
    if not biases:  # e.g. 'fn' with one code, or a radix-4 grid too wide for float32
        reject()
    bias = biases[draw(st.integers(0, len(biases) - 1))]
    return FloatFormat(ebits=ebits, mbits=mbits, bias=bias, radix=radix, specials=specials, signed=signed, zero=zero)


def int_formats(*, max_bits: int = 16):
    """Any valid :class:`~lowbit.formats.IntFormat` (signed or not, narrow or not)."""
    unsigned = st.builds(IntFormat, bits=st.integers(1, max_bits), signed=st.just(False), narrow=st.just(False))
    # A narrow unsigned grid drops its largest code: that needs two bits.
    unsigned = unsigned | st.builds(
        IntFormat, bits=st.integers(2, max(max_bits, 2)), signed=st.just(False), narrow=st.just(True)
    )
    signed = st.builds(IntFormat, bits=st.integers(2, max_bits), signed=st.just(True), narrow=st.booleans())
    return st.one_of(signed, unsigned)


def formats_any(*, max_bits: int = 8):
    """Any element format: a registered one, a generated float or integer format, or binary."""
    registered = [formats.get(n) for n in formats.names() if _is_element(formats.get(n))]
    return st.one_of(
        st.sampled_from(registered),
        float_formats(max_bits=max_bits),
        int_formats(max_bits=max_bits),
        st.just(BinaryFormat()),
    )


def _f32(bits) -> np.ndarray:
    return np.asarray(bits, np.uint32).view(np.float32)


def _overflow_edge(fmt) -> float | None:
    """The first value past ``max_value`` on the format's unbounded grid (floats only)."""
    return fmt.grid_value(fmt.max_code + 1) if isinstance(fmt, FloatFormat) else None


@functools.lru_cache(maxsize=64)
def hard_values(fmt) -> np.ndarray:
    """Every input where a rounding rule can go wrong, as float32 (both signs).

    The format's values, the exact midpoints between neighbours, the overflow
    threshold, and one float32 ulp either side of each; zero, the float32
    subnormal and largest-value edges, +-inf, and NaNs of both signs with
    several payloads. Sorted by bit pattern; NaN payloads are kept exactly.
    """
    fmt = _element(fmt)
    v = formats.values(fmt).astype(np.float64)
    points = [v, (v[1:] + v[:-1]) / 2, [v[0] / 2, v[0] * 2, v[-1] * 2]]
    edge = _overflow_edge(fmt)
    if edge is not None:
        points.append([edge, (v[-1] + edge) / 2])
    pts = np.concatenate(points)
    # A midpoint float32 cannot hold rounds to a neighbour here; the ulps added below straddle it.
    pts = pts[np.abs(pts) <= np.finfo(np.float32).max].astype(np.float32)
    pts = np.concatenate([pts, _f32(_F32_EDGE_BITS)])
    inf = np.float32(np.inf)
    with np.errstate(over="ignore"):  # the ulp above float32's max is inf, which we want too
        pts = np.concatenate([pts, np.nextafter(pts, inf), np.nextafter(pts, -inf)])
    bits = np.concatenate([pts.view(np.uint32), (-pts).view(np.uint32), np.array(_NAN_BITS, np.uint32)])
    out = _f32(np.unique(bits))
    out.setflags(write=False)
    return out


def _log_uniform(rng, fmt, n) -> np.ndarray:
    """Magnitudes log-uniform over the format's range and a little beyond, random sign."""
    v = np.abs(formats.values(fmt).astype(np.float64))
    v = v[v > 0] if (v > 0).any() else np.array([1.0])  # a grid of zero alone: around 1
    lo = max(v.min() / 8, 2.0**-149)
    hi = min(v.max() * 8, float(np.finfo(np.float32).max))
    mags = np.exp(rng.uniform(np.log(lo), np.log(hi), n))
    return (mags * rng.choice([-1.0, 1.0], n)).astype(np.float32)


def _random_inputs(fmt, seed: int, n: int) -> np.ndarray:
    """A mix of hard values, in-range randoms, float32 subnormals and raw bit patterns."""
    rng = np.random.default_rng(seed)
    hv = hard_values(fmt)
    kind = rng.integers(0, 10, n)
    raw = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    subnormal = (raw & np.uint32(0x807FFFFF)).view(np.float32)
    return np.select(
        [kind < 4, kind < 8, kind < 9],
        [hv[rng.integers(0, len(hv), n)], _log_uniform(rng, fmt, n), subnormal],
        raw.view(np.float32),
    ).astype(np.float32)


def hard_floats(fmt):
    """A float32 scalar (``np.float32``) drawn to hit the format's hard cases.

    Draws from :func:`hard_values` (grid points, midpoints and their ulps,
    overflow thresholds, subnormals, +-0, +-inf, NaNs with payloads), from the
    format's range, and from all float32 bit patterns.
    """
    hv = hard_values(fmt)
    return st.one_of(
        st.integers(0, len(hv) - 1).map(lambda i: hv[i]),
        st.integers(0, 2**32 - 1).map(lambda b: _f32(b)[()]),
        st.floats(width=32, allow_nan=True, allow_infinity=True).map(np.float32),
    )


@st.composite
def hard_arrays(draw, fmt, *, shape: tuple[int, ...] = (CHUNK,)):
    """A float32 array of ``shape`` rich in the format's hard cases.

    The first entries are drawn one by one (Hypothesis shrinks a failure to
    them); the rest come from a drawn seed, so large arrays stay cheap to draw.
    """
    size = math.prod(shape)
    head = draw(st.lists(hard_floats(fmt), max_size=min(8, size)))
    seed = draw(st.integers(0, 2**32 - 1))
    out = _random_inputs(fmt, seed, size)
    out[: len(head)] = np.array(head, np.float32)
    return out.reshape(shape)


# ----- compiled kernels -----------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _kernel(fmt):
    """One jitted function computing every output the suite checks, for one format.

    Compilation is the suite's main cost, so calls with the same arguments share
    one trace: ``x`` and ``-x`` are quantized together, and so are the chunk and
    the repeated points whose stochastic roundings are counted. The repeated
    points are rounded again under a second key (the key must matter), and the
    chunk is rounded as bfloat16 and float16 too, beside the float32 rounding
    of the same (already 16-bit) values.
    """
    q = functools.partial(formats.quantize, fmt)
    enc = functools.partial(formats.encode, fmt)
    dec = functools.partial(formats.decode, fmt)

    @jax.jit
    def run(x, repeated, codes, key):
        c = x.shape[0]
        nearest = q(jnp.concatenate([x, -x]))
        both = jnp.concatenate([x, repeated])
        stoch = q(both, rounding="stochastic", key=key)
        enc_sat = enc(x, saturate=True)
        enc_ns = enc(x, saturate=False)
        out = {
            "near": nearest[:c],
            "neg": nearest[c:],
            "near_ns": q(x, saturate=False),
            "zero": q(x, rounding="toward_zero"),
            "zero_ns": q(x, saturate=False, rounding="toward_zero"),
            "stoch": stoch[:c],
            "draws": stoch[c:],
            # The same array under another key: only the key differs, not the shape or positions.
            "draws_other_key": q(both, rounding="stochastic", key=jax.random.fold_in(key, 1))[c:],
            "codes": enc_sat,
            "codes_ns": enc_ns,
            "dec": dec(enc_sat),
            "dec_ns": dec(enc_ns),
            "table": dec(codes),
        }
        for name, dtype in _HALF_DTYPES.items():
            xh = x.astype(dtype)
            x32 = xh.astype(jnp.float32)  # exact: the same values in float32
            out[f"{name}_near"] = q(xh)
            out[f"{name}_near_f32"] = q(x32).astype(dtype)
            out[f"{name}_zero_ns"] = q(xh, saturate=False, rounding="toward_zero")
            out[f"{name}_zero_ns_f32"] = q(x32, saturate=False, rounding="toward_zero").astype(dtype)
            out[f"{name}_codes_ns"] = enc(xh, saturate=False)
            out[f"{name}_codes_ns_f32"] = enc(x32, saturate=False)
        return out

    return run


def _run(fmt, x, points=None, codes=None, key=None):
    """Call the kernel on one CHUNK of ``x``, the stochastic ``points`` and ``codes`` (padded)."""
    pts = np.zeros(_STOCH_POINTS, np.float32)
    if points is not None:
        pts[: points.size] = points
    all_codes = np.zeros(CHUNK, np.uint8 if fmt.bits <= 8 else np.uint16)
    if codes is not None:
        all_codes[: codes.size] = codes
    key = jax.random.key(0) if key is None else key
    out = _kernel(fmt)(jnp.asarray(x), jnp.asarray(np.repeat(pts, _STOCH_DRAWS)), jnp.asarray(all_codes), key)
    out = {k: np.asarray(v) for k, v in out.items()}
    for k in ("draws", "draws_other_key"):
        out[k] = out[k].reshape(_STOCH_POINTS, _STOCH_DRAWS).T
    return out


@functools.lru_cache(maxsize=64)
def _code_table(fmt) -> np.ndarray:
    """decode(fmt, c) for every code c in 0 .. 2^bits - 1, as float32."""
    codes = np.arange(2**fmt.bits)
    return np.concatenate(
        [
            _run(fmt, np.zeros(CHUNK, np.float32), codes=codes[s : s + CHUNK])["table"]
            for s in range(0, codes.size, CHUNK)
        ]
    )[: codes.size]


# ----- the properties ---------------------------------------------------------------------


def _show(a) -> str:
    a = np.float32(a)
    return f"{float(a)!r} (0x{int(a.view(np.uint32)):08x})"


@dataclasses.dataclass
class _Report:
    """Collects property violations (the first examples of each property) and raises them together."""

    fmt: object
    found: dict = dataclasses.field(default_factory=dict)

    def _add(self, prop: str, line: str):
        self.found.setdefault(prop, line)

    def check(self, prop: str, bad, x, got, want=None):
        """Record ``prop`` as violated on the inputs ``x[bad]``."""
        idx = np.flatnonzero(bad)
        if idx.size == 0:
            return
        examples = []
        for i in idx[:4]:
            e = f"x={_show(x[i])} got {_show(got[i])}"
            if want is not None:
                e += f", expected {_show(want[i])}"
            examples.append(e)
        self._add(prop, f"  {prop}: {idx.size} of {np.size(bad)} inputs; " + "; ".join(examples))

    def fact(self, prop: str, ok: bool, detail: str = ""):
        """Record ``prop`` as violated unless ``ok``."""
        if not ok:
            self._add(prop, f"  {prop}" + (f": {detail}" if detail else ""))

    def raise_if_any(self):
        if self.found:
            name = getattr(self.fmt, "name", type(self.fmt).__name__)
            raise AssertionError(
                f"format {name} ({self.fmt!r}) violates {len(self.found)} "
                f"propert{'y' if len(self.found) == 1 else 'ies'}:\n" + "\n".join(self.found.values())
            )


def _chunks(x):
    """Split flat float32 ``x`` into zero-padded CHUNK-long pieces: (piece, valid length)."""
    for s in range(0, x.size, CHUNK):
        part = x[s : s + CHUNK]
        yield np.pad(part, (0, CHUNK - part.size)), part.size


@functools.lru_cache(maxsize=64)
def _grid(fmt):
    """values(fmt) in float64 and the code ``encode`` gives each (for the tie-to-even rule)."""
    v = formats.values(fmt)
    codes = np.concatenate([_run(fmt, c)["codes"][:n] for c, n in _chunks(v)])
    return v.astype(np.float64), codes.astype(np.int64)


def _same(a, b, signed_zero: bool) -> np.ndarray:
    """Elementwise equality where NaN equals NaN; with ``signed_zero`` -0 differs from +0."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    eq = (a == b) | (np.isnan(a) & np.isnan(b))
    if signed_zero:
        eq &= ~((a == 0) & (np.signbit(a) != np.signbit(b)))
    return eq


def _inside(fmt, x):
    """For ``x`` inside [min value, max value]: the mask, both neighbours, and the expected
    nearest and toward-zero results, from values(fmt) alone (float64)."""
    v, codes = _grid(fmt)
    xf = x.astype(np.float64)
    with np.errstate(invalid="ignore"):
        inr = (xf >= v[0]) & (xf <= v[-1])
    i = np.clip(np.searchsorted(v, np.where(inr, xf, v[0]), "right") - 1, 0, len(v) - 1)
    j = np.minimum(i + (v[i] < xf), len(v) - 1)
    lo, hi = v[i], v[j]
    mid = (lo + hi) / 2  # exact: neighbours are float32 values of similar magnitude
    near = np.where(xf < mid, lo, np.where(xf > mid, hi, np.where(codes[i] % 2 == 0, lo, hi)))
    # Toward zero: the neighbour on x's side of zero; a format without zero has
    # no smaller magnitude to give, so it keeps the smallest one of x's sign.
    zero = np.where(xf >= 0, np.where(lo >= 0, lo, hi), np.where(hi <= 0, hi, lo))
    if isinstance(fmt, FloatFormat) and not fmt.zero and fmt.signed:
        # Sign-magnitude without a zero: +-0 keeps its sign, as every other input does.
        tiny = np.copysign(fmt.min_value, xf)
        near = np.where(xf == 0, tiny, near)
        zero = np.where(xf == 0, tiny, zero)
    return inr, lo, hi, near, zero


def _outside(fmt, x, saturate: bool, rounding: str) -> np.ndarray:
    """Expected results for inputs outside [min value, max value] (float64).

    A user's format without saturation has its overflow checked by ``_overflow_choices``.
    """
    v, _ = _grid(fmt)
    xf = x.astype(np.float64)
    with np.errstate(invalid="ignore"):
        above, below = xf > v[-1], xf < v[0]
    out = np.where(above, v[-1], np.where(below, v[0], np.nan))
    if not isinstance(fmt, FloatFormat):
        return out  # integers, binary and codebooks always saturate: they have no overflow code
    if not fmt.signed:
        # An unsigned float cannot hold a negative (nor a zero when it has none):
        # those become NaN; positives below the smallest value round up to it.
        unheld = (xf < 0) | ((xf == 0) & (not fmt.zero))
        out = np.where(below & unheld, np.nan, out)
    if not saturate:
        over = math.inf if fmt.has_inf else (math.nan if fmt.has_nan else fmt.max_value)
        threshold = (fmt.max_value + _overflow_edge(fmt)) / 2
        mag = np.abs(xf)
        if rounding == "toward_zero":
            overflows = np.isinf(xf)  # toward zero never rounds a finite input past max
        else:  # nearest: past the midpoint to the next grid value, or onto it with an odd max code
            overflows = (mag > threshold) | ((mag == threshold) & (fmt.max_code % 2 == 1))
        out = np.where((above | (below & fmt.signed)) & overflows, np.copysign(over, xf), out)
    return out


def _overflow_choices(fmt, x, got) -> np.ndarray:
    """For a user's format with saturate=False: whether each out-of-range result is allowed:
    the saturated end value, an inf of x's sign (if some code is inf) or NaN (if some code is)."""
    table = _code_table(fmt)
    sat = _outside(fmt, x, True, "nearest")
    g = got.astype(np.float64)
    ok = _same(g, sat, False)
    if np.isinf(table).any():
        ok |= np.isinf(g) & (np.signbit(g) == np.signbit(x))
    if fmt.has_nan:
        ok |= np.isnan(g)
    return ok


def check_array(fmt, x, *, seed: int = 0, reference=None) -> None:
    """Check every property of ``fmt`` on the inputs ``x`` (any shape, cast to float32).

    Args:
      fmt: an element format (``lowbit.formats.Format``).
      x: the inputs.
      seed: seeds the stochastic-rounding keys.
      reference: optional ``(x: float32 ndarray) -> ndarray``, see :func:`check_format`.

    Raises:
      AssertionError: naming each violated property with example inputs.
      TypeError: ``fmt`` is not an element format.
    """
    r = _Report(_element(fmt))
    _check_array(fmt, x, r, seed, reference)
    r.raise_if_any()


def _check_array(fmt, x, r, seed, reference):
    flat = np.asarray(x, np.float32).reshape(-1)
    key = jax.random.key(seed)
    # Casting signalling NaNs and comparing with NaN warn; the checks handle both.
    with np.errstate(invalid="ignore", over="ignore"):
        for n, (part, size) in enumerate(_chunks(flat)):
            _check_chunk(fmt, part, size, jax.random.fold_in(key, n), r, reference)


_QUANTIZED = ("near", "near_ns", "zero", "zero_ns", "stoch")


def _symmetric_limit(v) -> float:
    """The largest |x| up to which the grid is its own mirror image (inf: everywhere)."""
    mirrored = np.isin(-v, v)
    if mirrored.all():
        return math.inf
    mags = np.abs(v)
    first_bad = mags[~mirrored].min()
    inner = mags[mirrored & (mags < first_bad)]
    return float(inner.max()) if inner.size else 0.0


def _check_chunk(fmt, x, size, key, r, reference):
    inr, lo, hi, near, zero = _inside(fmt, x[:size])
    between = np.flatnonzero(inr & (lo < hi))[:_STOCH_POINTS]  # where stochastic rounding has a choice
    out = _run(fmt, x, x[between], key=key)
    draws = out.pop("draws")[:, : between.size]
    draws_other = out.pop("draws_other_key")[:, : between.size]
    out = {k: v[:size] for k, v in out.items()}
    x = x[:size]
    xf = x.astype(np.float64)
    nan_in = np.isnan(xf)
    v, _ = _grid(fmt)
    float_fmt = isinstance(fmt, FloatFormat)

    for k in ("near", "near_ns", "zero", "zero_ns", "stoch", "neg", "dec", "dec_ns"):
        r.fact(f"{k} has dtype float32", out[k].dtype == np.float32, str(out[k].dtype))
    for k in ("codes", "codes_ns"):
        r.fact(
            "codes are uint8 up to 8 bits, else uint16",
            out[k].dtype == (np.uint8 if fmt.bits <= 8 else np.uint16),
            str(out[k].dtype),
        )
        r.check(f"codes fit in {fmt.bits} bits", out[k] >= 2**fmt.bits, x, out[k])

    # NaN in, NaN out: quantize propagates NaN even where the format has no NaN code.
    for k in _QUANTIZED:
        r.check(f"quantize ({k}) keeps NaN", nan_in & ~np.isnan(out[k]), x, out[k])

    # In range: exact nearest (ties to the even code), toward zero, stochastic on a neighbour.
    for k, want, what in (
        ("near", near, "nearest rounding, ties to the even code"),
        ("near_ns", near, "saturate=False agrees with saturate=True in range"),
        ("zero", zero, "toward_zero rounding"),
        ("zero_ns", zero, "toward_zero rounding (saturate=False)"),
    ):
        r.check(what, inr & ~_same(out[k], want, False), x, out[k], want)
    err = np.abs(out["near"].astype(np.float64) - xf)
    r.check("|quantize(x) - x| <= half the local spacing", inr & (err > (hi - lo) / 2), x, out["near"], near)
    s = out["stoch"].astype(np.float64)
    r.check("stochastic rounding lands on a neighbour", inr & (s != lo) & (s != hi), x, out["stoch"])

    # Outside the range: saturation, overflow, inf and signs the format cannot hold.
    outside = ~inr & ~nan_in
    for k, sat, rnd in (
        ("near", True, "nearest"),
        ("near_ns", False, "nearest"),
        ("zero", True, "toward_zero"),
        ("zero_ns", False, "toward_zero"),
        ("stoch", True, "stochastic"),
    ):
        prop = f"{k} (saturate={sat}): saturation, overflow and inf per the format's flags"
        if not sat and not isinstance(fmt, (FloatFormat, *_SATURATING)):
            r.check(prop, outside & ~_overflow_choices(fmt, x, out[k]), x, out[k])
            continue
        want = _outside(fmt, x, sat, rnd)
        r.check(prop, outside & ~_same(out[k], want, False), x, out[k], want)

    # Zeros carry x's sign exactly where the format has a negative zero.
    if float_fmt:
        want_neg = np.signbit(xf) & fmt.has_negative_zero
        for k in (*_QUANTIZED, "dec", "dec_ns"):
            r.check(
                f"{k}: sign of a zero result", ~nan_in & (out[k] == 0) & (np.signbit(out[k]) != want_neg), x, out[k]
            )

    # Every saturating result is a value of the format; check_grid checks each value is a
    # fixed point, so together quantize(quantize(x)) == quantize(x).
    for k in ("near", "zero", "stoch"):
        r.check(f"idempotent: {k} is a value of the format", ~np.isnan(out[k]) & ~np.isin(out[k], v), x, out[k])
    if v[0] < 0:
        # Signed formats are symmetric where the grid is (int8's -128 has no mirror, NF4's
        # table only at zero and +-1).
        sym = ~nan_in & (xf != 0)
        with np.errstate(invalid="ignore"):
            sym &= np.abs(xf) <= _symmetric_limit(v)
        r.check(
            "sign-symmetric: quantize(-x) == -quantize(x)",
            sym & ~_same(out["neg"], -out["near"], False),
            x,
            out["neg"],
            -out["near"],
        )
    for k in ("near", "near_ns", "zero"):
        ok = ~nan_in & ~np.isnan(out[k])
        order = np.argsort(xf[ok], kind="stable")
        xs, qs = x[ok][order], out[k][ok][order]
        drop = np.zeros(qs.size, bool)
        drop[1:] = qs[1:] < qs[:-1]
        r.check(f"{k} is monotone (non-decreasing); got is below the previous result", drop, xs, qs)

    # quantize == decode(encode(.)), except that quantize keeps NaN where the format has no NaN code.
    for qk, dk in (("near", "dec"), ("near_ns", "dec_ns")):
        exempt = np.isnan(out[qk]) & (not fmt.has_nan)
        r.check(
            f"quantize == decode(encode) ({qk})", ~exempt & ~_same(out[qk], out[dk], float_fmt), x, out[dk], out[qk]
        )
        r.check(
            f"decode(encode) is a finite value where the format has no NaN ({dk})",
            exempt & ~np.isfinite(out[dk]),
            x,
            out[dk],
        )

    _check_half(fmt, x, out, r)
    _check_draws(r, x[between], lo[between], hi[between], draws, draws_other)
    if reference is not None:
        _check_reference(fmt, x, out, r, reference)


def _check_half(fmt, x, out, r):
    """bfloat16 / float16 inputs: x's dtype kept, and rounded exactly as the same values in float32."""
    for name, dtype in _HALF_DTYPES.items():
        xh = x.astype(dtype)
        for k in ("near", "zero_ns"):
            got, want = out[f"{name}_{k}"], out[f"{name}_{k}_f32"]
            r.fact(f"quantize keeps the input dtype ({name})", got.dtype == np.dtype(dtype), str(got.dtype))
            r.check(
                f"{name} inputs: quantize ({k}) equals quantize of the same values in float32",
                ~_same(got.astype(np.float32), want.astype(np.float32), True),
                xh.astype(np.float32),
                got.astype(np.float32),
                want.astype(np.float32),
            )
        got, want = out[f"{name}_codes_ns"], out[f"{name}_codes_ns_f32"]
        r.check(
            f"{name} inputs: encode equals encode of the same values in float32",
            got != want,
            xh.astype(np.float32),
            got,
            want,
        )


def _check_draws(r, xs, lo, hi, draws, draws_other):
    """Many stochastic roundings of points strictly between neighbours: on the grid, unbiased, keyed."""
    if xs.size == 0:
        return
    draws = draws.astype(np.float64)
    r.check("stochastic draws land on a neighbour", ((draws != lo) & (draws != hi)).any(0), xs, draws[0])
    # The count of upward roundings is Binomial(K, p), p = (x - lo) / (hi - lo);
    # Chernoff: P(count/K = q or further from p) <= exp(-K * KL(q || p)).
    p = (xs.astype(np.float64) - lo) / (hi - lo)
    q = (draws == hi).mean(0)
    r.check(
        f"stochastic rounding is unbiased (got: the mean of {_STOCH_DRAWS} roundings)",
        _STOCH_DRAWS * _kl(q, p) > _CHERNOFF_LIMIT,
        xs,
        draws.mean(0),
        xs,
    )
    # Two keys: each pair of draws differs with probability 2p(1-p) when the key is used,
    # so all K draws of all points agree with probability <= exp(-K * sum 2p(1-p)).
    if _STOCH_DRAWS * np.sum(2 * p * (1 - p)) > _CHERNOFF_LIMIT:
        r.fact(
            "stochastic rounding uses its key (two keys gave the same draws)",
            bool((draws != draws_other.astype(np.float64)).any()),
            f"{xs.size} points, e.g. x={_show(xs[np.argmax(p * (1 - p))])}",
        )


def _check_reference(fmt, x, out, r, reference):
    """Nearest rounding with saturate=False (ml_dtypes' cast) against the user's reference."""
    ref = np.asarray(reference(x.copy()))
    if ref.shape != x.shape:
        r.fact("reference(x) has x's shape", False, f"{ref.shape} for {x.shape}")
        return
    want = ref.astype(np.float64)
    # Where the format has no NaN code, quantize keeps NaN and decode(encode) writes a number.
    compared = ~np.isnan(x) | fmt.has_nan
    signed = isinstance(fmt, FloatFormat)
    for k, what in (("near_ns", "quantize"), ("dec_ns", "decode(encode)")):
        r.check(
            f"{what} (nearest, saturate=False) matches the reference",
            compared & ~_same(out[k], want, signed),
            x,
            out[k],
            want,
        )
    standard = ref.dtype in (np.float16, np.float32, np.float64)
    if not standard and ref.dtype.itemsize in (1, 2):  # ml_dtypes: the array holds the codes
        codes = ref.view(np.uint8 if ref.dtype.itemsize == 1 else np.uint16).astype(np.int64)
        got = out["codes_ns"].astype(np.int64)
        bad = got != codes
        if bad.any():
            idx = np.flatnonzero(bad)[:4]
            r.fact(
                "encode (saturate=False) matches the reference's bit patterns",
                False,
                "; ".join(f"x={_show(x[i])} got 0x{got[i]:x}, expected 0x{codes[i]:x}" for i in idx),
            )


def _kl(q, p):
    """Bernoulli KL divergence KL(q || p), with 0 log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where(q > 0, q * np.log(q / p), 0.0)
        b = np.where(q < 1, (1 - q) * np.log((1 - q) / (1 - p)), 0.0)
    return a + b


def check_grid(fmt, *, reference=None) -> None:
    """Deterministic checks: the code table, the declared flags, and every :func:`hard_values` input.

    Raises:
      AssertionError: naming each violated property.
      TypeError: ``fmt`` is not an element format.
    """
    r = _Report(_element(fmt))
    _check_grid(fmt, r, reference)
    r.raise_if_any()


def _check_grid(fmt, r, reference):
    v = formats.values(fmt)
    r.fact(
        "values(fmt) is float32, finite and strictly ascending",
        v.dtype == np.float32 and np.isfinite(v).all() and bool((np.diff(v) > 0).all()),
    )
    table = _code_table(fmt)
    finite = np.unique(table[np.isfinite(table)])
    if isinstance(fmt, IntFormat) and fmt.narrow:
        # The code a narrow range gives up still decodes (to the value it would have had).
        unused = fmt.min_int - 1 if fmt.signed else fmt.max_int + 1
        finite = finite[finite != unused]
    r.fact(
        "values(fmt) == the finite values of all codes",
        np.array_equal(finite, v),
        f"{finite.size} decoded vs {v.size} values",
    )
    r.fact("has_nan matches the code table", bool(np.isnan(table).any()) == fmt.has_nan, f"has_nan={fmt.has_nan}")
    r.fact(
        "max_value is the largest value (or the largest magnitude)",
        np.float32(fmt.max_value) in (v[-1], -v[0]),
        f"{fmt.max_value} vs {v[0]} .. {v[-1]}",
    )
    if isinstance(fmt, FloatFormat):
        r.fact(
            "decode_table() == decode(every code)",
            np.array_equal(fmt.decode_table().view(np.uint32), table.view(np.uint32)),
        )
        r.fact("has_inf matches the code table", bool(np.isinf(table).any()) == fmt.has_inf, f"has_inf={fmt.has_inf}")
        negzero = bool(((table == 0) & np.signbit(table)).any())
        r.fact(
            "has_negative_zero matches the code table",
            negzero == fmt.has_negative_zero,
            f"has_negative_zero={fmt.has_negative_zero}",
        )
        r.fact(
            "decode(max_code) == max_value",
            table[fmt.max_code] == np.float32(fmt.max_value),
            f"{table[fmt.max_code]} vs {fmt.max_value}",
        )
        pos = v[v > 0]
        r.fact(
            "min_value == smallest positive value",
            pos.min() == np.float32(fmt.min_value),
            f"{fmt.min_value} vs {pos.min()}",
        )
        r.fact("min_normal is a value", np.float32(fmt.min_normal) in pos, f"{fmt.min_normal}")
    _, vcodes = _grid(fmt)
    back = table[np.minimum(vcodes, table.size - 1)]
    r.check("decode(encode(v)) == v on values(fmt)", ~_same(back, v, False), v, back, v)
    fixed = np.concatenate([_run(fmt, c)["near"][:n] for c, n in _chunks(v)])
    r.check("quantize(v) == v on values(fmt)", ~_same(fixed, v, False), v, fixed, v)
    r.fact("distinct values get distinct codes", np.unique(vcodes).size == v.size)
    # Same key, same rounding: compare two separate calls bit for bit.
    x = hard_values(fmt)[:CHUNK]
    x = np.pad(x, (0, CHUNK - x.size))
    key = jax.random.key(1)
    first, second = (_run(fmt, x, x[:_STOCH_POINTS], key=key) for _ in range(2))
    r.fact(
        "stochastic rounding is reproducible for a given key",
        all(np.array_equal(first[k].view(np.uint32), second[k].view(np.uint32)) for k in ("stoch", "draws")),
    )
    _check_array(fmt, hard_values(fmt), r, 0, reference)


def _resolve(fmt):
    return _element(formats.get(fmt) if isinstance(fmt, str) else fmt)


def _new_violations_test(fmt, known: frozenset, examples: int, seed: int, reference):
    """A Hypothesis test that raises ``_NewViolations`` on an input violating a property not in ``known``."""

    @settings(
        max_examples=examples,
        deadline=None,
        report_multiple_bugs=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(hard_arrays(fmt))
    def run(x):
        found = _Report(fmt)
        _check_array(fmt, x, found, seed, reference)
        new = {p: line for p, line in found.found.items() if p not in known}
        if new:
            raise _NewViolations(new)

    # Keyed by format and by what is already known, so each run replays its own counterexample.
    run._hypothesis_internal_database_key = f"lowbit.check_format:{fmt!r}:{seed}:{sorted(known)}".encode()
    return run


class _NewViolations(AssertionError):
    """Raised inside ``check_format``'s ``@given`` test: the properties an input violates, with their lines."""

    def __init__(self, found: dict):
        super().__init__("\n".join(found.values()))
        self.found = found


def _count_arg(owner: str, field: str, value, lo: int, hi: int) -> int:
    """An integer argument in [lo, hi] as a Python int: ``TypeError`` for a non-integer
    (a bool, a float or a string such as ``"5"`` included), ``ValueError`` out of range."""
    allowed = f"an integer in [{lo}, {hi}]"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{owner}: {field}={value!r} is invalid; allowed: {allowed}")
    if not lo <= value <= hi:
        raise ValueError(f"{owner}: {field}={value!r} is invalid; allowed: {allowed}")
    return int(value)


def check_format(fmt, *, examples: int = 100, seed: int = 0, reference=None) -> None:
    """Run the whole property suite on ``fmt`` and report every violated property at once.

    Runs the deterministic checks of :func:`check_grid` (every code and every
    hard input), then :func:`check_array` on ``examples`` Hypothesis-drawn
    :func:`hard_arrays`. The Hypothesis test raises inside ``@given`` on the
    first input that violates a property not yet reported, so Hypothesis
    shrinks that input and saves it to its example database; the properties the
    shrunk input violates are reported with it, and the test runs again for the
    others until no new property fails. The one ``AssertionError`` at the end
    lists every violated property, each with its (shrunk) counterexample.

    Args:
      fmt: a registered name or any element format (``lowbit.formats.Format``:
        FloatFormat, IntFormat, BinaryFormat, CodebookFormat or your own class).
      examples: how many random arrays of ``CHUNK`` inputs to check.
      seed: seeds the stochastic-rounding keys.
      reference: optional ``(x: float32 ndarray) -> ndarray`` giving what
        ``quantize(fmt, x, saturate=False)`` (nearest) should return, e.g.
        ``lambda x: x.astype(ml_dtypes.float8_e4m3fn)`` or a numpy function.
        Its values are compared with quantize and decode(encode) (NaN inputs
        only where the format has a NaN code); when it returns an ml_dtypes
        array, its bit patterns are compared with ``encode(fmt, x)``.

    Raises:
      AssertionError: one message naming every violated property, each with
        up to four offending inputs.
      TypeError: ``fmt`` is not an element format (the message names the
        members it lacks), or ``examples``/``seed`` is not an integer.
      ValueError: ``examples`` below 1 or ``seed`` outside [0, 2^63 - 1].
    """
    fmt = _resolve(fmt)
    examples = _count_arg("check_format", "examples", examples, 1, 2**31 - 1)
    seed = _count_arg("check_format", "seed", seed, 0, 2**63 - 1)
    if reference is not None and not callable(reference):
        raise TypeError(f"reference={reference!r} is invalid; allowed: None or a callable (x: ndarray) -> ndarray")
    r = _Report(fmt)
    _check_grid(fmt, r, reference)
    # One Hypothesis run per newly failing property set: each run raises inside @given as
    # soon as an input violates a property not yet reported, so Hypothesis shrinks that
    # input (and saves it to its database); the shrunk input's new violations are then
    # reported with it, and the next run looks for the remaining properties.
    while True:
        try:
            _new_violations_test(fmt, frozenset(r.found), examples, seed, reference)()
        except _NewViolations as err:
            r.found.update(err.found)
            continue
        break
    r.raise_if_any()


def format_test(fmt, *, examples: int = 100, seed: int = 0, reference=None):
    """A pytest test function running :func:`check_format` (arguments as there).

    Bind it to a ``test_`` name in a test module; that is the whole test file::

        from lowbit.testing import format_test
        test_my_format = format_test(MyFormat(), reference=my_reference)

    Raises:
      TypeError: ``fmt`` is not an element format (at import, so collection fails loudly).
    """
    fmt = _resolve(fmt)

    def test_format():
        check_format(fmt, examples=examples, seed=seed, reference=reference)

    test_format.__doc__ = f"lowbit.testing.check_format on {getattr(fmt, 'name', fmt)!r}"
    return test_format


class FormatProperties:
    """pytest base class: subclass it with ``fmt = ...`` to get the suite as tests.

    Example::

        class TestE3M3(FormatProperties):
            fmt = FloatFormat(ebits=3, mbits=3, specials="fn")
    """

    fmt = None

    def test_grid(self):
        check_grid(self.fmt)

    @given(data=st.data())
    def test_properties(self, data):
        check_array(self.fmt, data.draw(hard_arrays(self.fmt), label="x"))


# ----- the property kit for scaled quantizers ----------------------------------------------

QUANTIZER_CHECKS = ("idempotent", "pow2_invariant", "padding", "independent", "unbiased", "reference")
"""The checks of :func:`check_quantizer`, in the order it runs them."""

_POW2_MAX = 16  # |k| of the powers of two 2^k that pow2_invariant multiplies by
# Drawn magnitudes are 0 or within [2^-100, 2^12]: times 2^+-16 they stay float32
# normals, far from E8M0's and NVFP4's scale clamps, so no check meets under/overflow.
_TINY, _HUGE = 2.0**-100, 2.0**12
_CLIPPING_SCALES = (Percentile, MSE, KL)  # clips below the absmax, chosen from the data
_SR_DRAWS = 1024  # stochastic roundings per set (two sets: see _check_unbiased)
_SR_DELTA = 1e-12  # Hoeffding false-alarm probability per GEMM output
_SR_COLUMNS = 4  # columns of the fixed matrix w of the GEMM
# Re-quantizing recomputes a float32 (or E4M3, NVFP4) step from the quantized amax, which
# is the step times the top level rounded to float32: the step may move by a few ulps.
# 2^-20 (8 ulps) allows that and is far below one grid level (>= 2^-11 relative for
# element formats of up to 10 fraction bits).
_IDEMPOTENT_RTOL = 2.0**-20


class QuantizerViolation(AssertionError):
    """A check of :func:`check_quantizer` failed on one input (Hypothesis shrinks that input).

    Attributes:
      check: the check's name (one of ``QUANTIZER_CHECKS``).
      x: the float32 input the check failed on (the shrunk counterexample once
        Hypothesis has finished).
    """

    def __init__(self, check: str, x: np.ndarray, message: str):
        nz = np.flatnonzero(x)
        shown = ", ".join(f"[{', '.join(map(str, np.unravel_index(i, x.shape)))}]={_show(x.flat[i])}" for i in nz[:6])
        super().__init__(
            f"{check}: {message}\n    on x of shape {x.shape} with {nz.size} nonzero element(s)"
            + (f": {shown}" + (" ..." if nz.size > 6 else "") if nz.size else "")
        )
        self.check, self.x = check, x


def _describe(q) -> str:
    """``q`` as its format's name and the fields that differ from their defaults."""
    fields = [f"format={getattr(q.format, 'name', q.format)!r}"]
    fields += [
        f"{f.name}={getattr(q, f.name)!r}"
        for f in dataclasses.fields(q)
        if f.name != "format" and getattr(q, f.name) != f.default
    ]
    return f"Quantizer({', '.join(fields)})"


def _two_level(q) -> bool:
    """Whether a tensor-wide statistic sets one scale level of every group (NVFP4, ``e4m3`` steps, PTF)."""
    return getattr(q.format, "kind", None) == "nvfp4" or q.scale_format == "e4m3" or q.kind.name == "ptf"


def _group_extent(q) -> int | None:
    """Elements per scale group along the granularity's axis for 1-D blocks and groups, else None."""
    return q.granularity.size if isinstance(q.granularity, Group) else None


def _shape(q, ragged: bool = False) -> tuple[int, ...]:
    """The fixed input shape of ``q``'s checks: two scale groups along each quantized axis.

    With ``ragged`` (1-D block formats), the axis ends in a partial block instead,
    and the other axes have length 1: the check is about one row's last block.
    """
    g = q.granularity
    if isinstance(g, Block):
        bm, bn = g.shape
        return (2 * bm, 2 * bn)
    axis = -1 if isinstance(g, Tensor) else g.axis
    ndim = max(2, axis + 1 if axis >= 0 else -axis)
    a = axis % ndim
    extent = _group_extent(q)
    if extent is not None:
        n = extent + extent // 2 + 1 if ragged else 2 * extent
    else:
        n = 4 if isinstance(g, Channel) else 16
    return tuple(n if i == a else 1 if ragged else 3 for i in range(ndim))


def _group_ids(q, shape) -> np.ndarray:
    """The scale group of every element of an array of ``shape``, as integer labels."""
    idx = np.indices(shape)
    g = q.granularity
    if isinstance(g, Block):
        bm, bn = g.shape
        parts = [*idx[:-2], idx[-2] // bm, idx[-1] // bn]
    elif isinstance(g, Group):
        a = g.axis % len(shape)
        parts = [*(idx[i] for i in range(len(shape)) if i != a), idx[a] // g.size]
    elif isinstance(g, Channel):
        parts = [idx[g.axis % len(shape)]]
    else:
        parts = [np.zeros(shape, int)]
    rows = np.stack([p.ravel() for p in parts], axis=1)
    return np.unique(rows, axis=0, return_inverse=True)[1].reshape(shape)


def _applies(q, check: str, reference) -> str | None:
    """Why ``check`` does not apply to ``q`` (None when it does)."""
    if check == "idempotent" and isinstance(q.scale, _CLIPPING_SCALES):
        return (
            f"scale={q.scale!r} clips at a statistic of x that quantizing x changes, so q(q(x)) may clip "
            "elsewhere (idempotence holds for Absmax() and Fixed() scales and block formats)"
        )
    if check == "idempotent" and q.rounding == "stochastic" and not _pow2_steps(q):
        return (
            "stochastic rounding may move a group's largest element down a level, and the step recomputed "
            "from it is not a power of two, so the grid itself moves (idempotence holds for deterministic "
            "rounding, and for stochastic rounding with power-of-two or fixed steps)"
        )
    if check == "pow2_invariant" and not (is_block(q.format) or isinstance(q.scale, DATA_SCALES)):
        return (
            f"scale={q.scale!r} does not come from x, so q(x * 2^k) = q(x) * 2^k is not promised "
            "(it holds for scales computed from x: Absmax, Percentile, MSE, KL and block formats)"
        )
    if check == "padding" and (_group_extent(q) is None or not is_block(q.format) or q.format.block_size == 1):
        return (
            "only block formats with 1-D blocks of more than one element pad a last partial block "
            "(groups and 2-D blocks must divide their axes)"
        )
    if check == "independent" and _group_ids(q, _shape(q)).max() == 0:
        return "a single scale for the whole tensor has no other group to leak into"
    if check == "unbiased" and q.rounding != "stochastic":
        return f"rounding={q.rounding!r} is deterministic (this checks rounding='stochastic')"
    if check == "reference" and reference is None:
        return "no reference= was given"
    return None


def _fq(q, x, key=None) -> np.ndarray:
    return np.asarray(quant.fake_quant(q, jnp.asarray(x), key))


def _bits_equal(a, b) -> np.ndarray:
    """Elementwise bit equality of float32 arrays, any NaN equal to any NaN."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return (a.view(np.uint32) == b.view(np.uint32)) | (np.isnan(a) & np.isnan(b))


def _raise_unequal(check, x, got, want, what: str, mask=None):
    """Raise a QuantizerViolation naming the first elements (in ``mask``) where ``got`` differs from ``want``."""
    bad = ~_bits_equal(got, want) if mask is None else ~_bits_equal(got, want) & mask
    if bad.any():
        where = np.argwhere(bad)[:3]
        detail = "; ".join(
            f"at {tuple(int(i) for i in w)}: got {_show(got[tuple(w)])}, expected {_show(want[tuple(w)])}"
            for w in where
        )
        raise QuantizerViolation(check, x, f"{what}: {int(bad.sum())} element(s) differ; {detail}")


def quantizer_arrays(q, *, ragged: bool = False):
    """Float32 input arrays for ``q``'s checks, at the fixed shape the checks use.

    Either one background value with up to 8 drawn elements, or a seeded dense
    array (normal values, each row at its own magnitude) of which only a drawn
    window of elements (in flat order, wrapping around) is kept. Hypothesis
    shrinks a failure to few drawn elements, or to a short window. Magnitudes
    are 0 or within [2^-100, 2^12], so every check may scale them by 2^+-16.

    Args:
      q: the ``lowbit.quant.Quantizer``.
      ragged: the shape whose quantized axis ends in a partial block (1-D block formats).
    """
    shape = _shape(q, ragged)
    size = math.prod(shape)
    elements = st.floats(-_HUGE, _HUGE, width=32, allow_subnormal=False).map(
        lambda v: np.float32(v if abs(v) >= _TINY else 0.0)
    )

    def sparse(background, entries):
        x = np.full(size, background, np.float32)
        for i, v in entries:
            x[i] = v
        return x.reshape(shape)

    def dense(seed, kept, start):
        rng = np.random.default_rng(seed)
        mags = rng.standard_normal(shape) * np.exp2(rng.uniform(-8, 8, shape[:1] + (1,) * (len(shape) - 1)))
        outside = (np.arange(size) - start) % size >= kept
        return np.where(outside, np.float32(0), mags.astype(np.float32).reshape(-1)).reshape(shape)

    entries = st.lists(st.tuples(st.integers(0, size - 1), elements), max_size=8)
    return st.one_of(
        st.builds(sparse, elements, entries),
        st.builds(dense, st.integers(0, 2**32 - 1), st.integers(0, size), st.integers(0, size - 1)),
    )


def _pow2_steps(q) -> bool:
    """Whether ``q``'s steps are powers of two or fixed, so re-quantizing recomputes them exactly."""
    if is_block(q.format):
        return q.format.kind == "mx"
    return q.pow2_step or isinstance(q.scale, Fixed)


def _check_idempotent(q, x, key):
    """q(q(x)) == q(x): bit for bit, or on the same grid levels (see check_quantizer)."""
    k1, k2 = (None, None) if key is None else jax.random.split(key)
    y = _fq(q, x, k1)
    yy = _fq(q, y, k2)
    if _pow2_steps(q):
        _raise_unequal("idempotent", x, yy, y, "q(q(x)) != q(x)")
        return
    with np.errstate(invalid="ignore"):
        beyond = ~(np.abs(yy.astype(np.float64) - y) <= _IDEMPOTENT_RTOL * np.abs(y.astype(np.float64)))
    _raise_unequal("idempotent", x, yy, y, f"q(q(x)) is not within {_IDEMPOTENT_RTOL:g} of q(x) (relative)", beyond)


def _check_pow2(q, x, key, k: int):
    """q(x * 2^k) == q(x) * 2^k bit for bit (one key for both: the same bits at every position)."""
    f = np.float32(2.0**k)
    _raise_unequal("pow2_invariant", x, _fq(q, x * f, key), _fq(q, x, key) * f, f"q(x * 2^{k}) != q(x) * 2^{k}")


def _check_padding(q, x):
    """q(x) equals q(x zero-padded to whole blocks along the axis), cut back to x's length."""
    qn = q if q.rounding != "stochastic" else dataclasses.replace(q, rounding="nearest")
    a = q.granularity.axis % x.ndim
    n, b = x.shape[a], q.format.block_size
    widths = [(0, 0)] * x.ndim
    widths[a] = (0, -n % b)
    padded = np.take(_fq(qn, np.pad(x, widths)), np.arange(n), axis=a)
    _raise_unequal("padding", x, padded, _fq(qn, x), "q(pad(x)) cut back to x's length != q(x)")


def _check_independent(q, x, key, group: int, other: np.ndarray):
    """Replacing scale group ``group`` of ``x`` by ``other``'s values changes no other group's output.

    Where a tensor-wide statistic sets a scale level (see ``_two_level``), the
    changed group's values (old and new) are first clipped into the range of
    the other groups, so that statistic is the same for both inputs.
    """
    ids = _group_ids(q, x.shape)
    mine = ids == group
    if _two_level(q):
        rest = x[~mine]
        lo, hi = min(rest.min(), 0), max(rest.max(), 0)
        x = np.where(mine, np.clip(x, lo, hi), x)
        other = np.clip(other, lo, hi)
    changed = np.where(mine, other, x).astype(np.float32)
    _raise_unequal(
        "independent",
        x,
        _fq(q, changed, key),
        _fq(q, x, key),
        f"changing scale group {group} changed another group's output",
        ~mine,
    )


@functools.lru_cache(maxsize=16)
def _draws_fn(q):
    """Jitted: ``q``'s stochastic roundings of one ``x`` under each key of a batch."""
    return jax.jit(jax.vmap(lambda x, k: quant.fake_quant(q, x, k), in_axes=(None, 0)))


def _widest_gap(q) -> float | None:
    """The largest gap above a positive grid value, relative to it (1 for E2M1 and integers).

    None where the grid is not the element format's values times a scale (the
    non-uniform kinds) or has fewer than two positive values.
    """
    if not is_block(q.format) and q.kind.name != "uniform":
        return None
    v = formats.values(q.format).astype(np.float64)
    pos = v[v > 0]
    return float(np.max(pos[1:] / pos[:-1]) - 1) if pos.size > 1 else None


def _check_unbiased(q, x, seed: int):
    """E[q(x) @ w] == x @ w for stochastic rounding, through a Hoeffding bound (see check_quantizer)."""
    xf = x.astype(np.float64)
    n = max(64, min(_SR_DRAWS, 2**20 // x.size))
    draws = np.asarray(_draws_fn(q)(jnp.asarray(x), jax.random.split(jax.random.key(seed), 2 * n)), np.float64)
    learn, test = draws[:n], draws[n:]
    tz = _fq(dataclasses.replace(q, rounding="toward_zero"), x).astype(np.float64)
    near = _fq(dataclasses.replace(q, rounding="nearest"), x).astype(np.float64)
    # The candidates of each element: toward zero, and the other neighbour where the
    # nearest result or the first draw set shows it. The statistic uses the second set
    # only, so which elements it covers does not depend on the draws it averages.
    moved = learn != tz
    first = np.take_along_axis(learn, np.argmax(moved, 0)[None], 0)[0]
    other = np.where(near != tz, near, np.where(moved.any(0), first, np.nan))
    # Every draw is one of two values, toward zero or (if they differ) the nearest result.
    lo, hi = draws.min(0), draws.max(0)
    away = np.where(near != tz, near, np.where(lo == tz, hi, lo))
    off = ((draws != tz) & (draws != away)).any(0)
    if off.any():
        i = tuple(np.argwhere(off)[0])
        raise QuantizerViolation(
            "unbiased",
            x,
            f"stochastic rounding of x{list(map(int, i))}={_show(x[i])} gave "
            f"{sorted(set(draws[(slice(None), *i)].tolist()))}, not two neighbours: "
            f"toward zero {tz[i]!r} and the nearest {near[i]!r} or one other",
        )
    ratio = _widest_gap(q)
    if ratio is not None:
        # An element whose 2n draws all gave one nonzero v with x beyond it (away from zero):
        # were v not the end of the grid, the next value would lie within ratio * |v| beyond
        # it and each draw would reach it with probability >= |x - v| / (ratio |v|).
        v = lo.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            log_miss = -2 * n * np.abs(xf - v) / (ratio * np.abs(v))
        clipped = (
            (lo == hi)
            & (v != 0)
            & (np.abs(xf) > np.abs(v))
            & (np.sign(xf) == np.sign(v))
            & (log_miss < math.log(_SR_DELTA))
        )
        if clipped.any():
            i = tuple(np.argwhere(clipped)[0])
            raise QuantizerViolation(
                "unbiased",
                x,
                f"all {2 * n} stochastic roundings of x{list(map(int, i))}="
                f"{_show(x[i])} gave {_show(v[i])}, never the value beyond it, which an "
                f"unbiased rounding reaches with probability >= {-log_miss[i] / (2 * n):.3g} "
                "per draw: clipped (a scale that saturates the largest elements) or not "
                "stochastic",
            )
    known = ~np.isnan(other) | (tz == xf)
    gap = np.where(np.isnan(other), 0.0, np.abs(other - tz))
    w = np.random.default_rng(seed).standard_normal((x.shape[-1], _SR_COLUMNS))
    dev = np.where(known, test.mean(0) - xf, 0.0) @ w
    bound = math.sqrt(math.log(2 / _SR_DELTA) / (2 * n)) * np.sqrt((gap**2 * known) @ w**2)
    bound += 1e-12 * (np.abs(xf) @ np.abs(w))  # float64 rounding of the sums
    bad = np.abs(dev) > bound
    if bad.any():
        i = tuple(np.argwhere(bad)[0])
        raise QuantizerViolation(
            "unbiased",
            x,
            f"mean over {n} keys of (q(x) @ w){list(i)} - (x @ w){list(i)} = "
            f"{dev[i]:.6g}, beyond the Hoeffding bound {bound[i]:.6g} "
            f"(false-alarm probability {_SR_DELTA:g})",
        )


def _check_quantizer_reference(q, x, key, reference):
    """q(x) (and the stored scales, when the reference returns them) equal ``reference(x)`` bit for bit."""
    ref = reference(x.copy())
    want, scales = ref if isinstance(ref, tuple) else (ref, None)
    want = np.asarray(want)
    if want.shape != x.shape:
        raise QuantizerViolation("reference", x, f"reference(x) has shape {want.shape}; expected {x.shape}")
    _raise_unequal("reference", x, _fq(q, x, key), want.astype(np.float32), "q(x) != reference(x)")
    if scales is not None:
        got = np.asarray(quant.quantize(q, jnp.asarray(x), key).scale)
        scales = np.asarray(scales)
        if got.shape != scales.shape or got.dtype != scales.dtype or got.tobytes() != scales.tobytes():
            raise QuantizerViolation(
                "reference",
                x,
                f"stored scales {got.dtype}{list(got.shape)} {got.ravel()[:8]} "
                f"!= reference's {scales.dtype}{list(scales.shape)} {scales.ravel()[:8]}",
            )


def _given_check(q, check: str, reference, seed: int):
    """The Hypothesis test of one check: draws its inputs and raises QuantizerViolation inside ``@given``."""
    key = jax.random.key(seed) if q.rounding == "stochastic" else None
    if check == "idempotent":
        return given(quantizer_arrays(q))(lambda x: _check_idempotent(q, x, key))
    if check == "pow2_invariant":
        return given(quantizer_arrays(q), st.integers(-_POW2_MAX, _POW2_MAX))(lambda x, k: _check_pow2(q, x, key, k))
    if check == "padding":
        return given(quantizer_arrays(q, ragged=True))(lambda x: _check_padding(q, x))
    if check == "independent":
        groups = int(_group_ids(q, _shape(q)).max()) + 1
        return given(quantizer_arrays(q), quantizer_arrays(q), st.integers(0, groups - 1))(
            lambda x, other, g: _check_independent(q, x, key, g, other)
        )
    if check == "unbiased":
        return given(quantizer_arrays(q))(lambda x: _check_unbiased(q, x, seed))
    return given(quantizer_arrays(q))(lambda x: _check_quantizer_reference(q, x, key, reference))


def check_quantizer(q, *, checks=None, examples: int | None = None, seed: int = 0, reference=None) -> None:
    """Property-test a scaled quantizer (``lowbit.quant.Quantizer``) with Hypothesis.

    Each check is its own Hypothesis test that raises inside ``@given``, so a
    failure is shrunk to a small input and replayed first next time (from
    Hypothesis' example database). ``q`` runs through ``quant.fake_quant`` on
    float32 arrays of one fixed shape per check (two scale groups along each
    quantized axis), so each check compiles once. Let ``F(x)`` be
    ``fake_quant(q, x, key)``; equal means bit for bit (NaN equals NaN):

    * ``idempotent``: ``F(F(x)) == F(x)``. Bit for bit where the steps are
      powers of two or fixed (MX blocks, ``e8m0``, ``fixed``, ``none``); with
      stochastic rounding only there, the second call under another key (a
      value on the grid must not move; with other steps, a largest element
      rounded down a level moves the recomputed step and the whole grid).
      Where a float32 or E4M3 step (or NVFP4's scales) is recomputed from the
      quantized amax, that amax is the step times the top level rounded to
      float32, so the step may move by a few ulps: there each element must be
      within ``2^-20`` of ``F(x)`` relative (zeros stay zero), far below one
      grid level. Not for ``percentile``/``mse``/``kl``
      scales: their clip is a statistic of ``x`` that quantizing changes.
    * ``pow2_invariant``: ``F(x * 2^k) == F(x) * 2^k`` for ``k`` in
      [-16, 16], for scales computed from ``x`` (absmax, percentile, mse, kl,
      block formats: E8M0 shifts its exponent, and float32/E4M3 steps and the
      NVFP4 tensor scale commute with powers of two because float rounding
      does). Inputs are 0 or of magnitude in [2^-100, 2^12], so no scaled
      input, scale or output leaves the float32 normals.
    * ``padding`` (1-D block formats): on an axis ending in a partial block,
      ``F(x)`` equals ``F`` of ``x`` zero-padded to whole blocks, cut back.
      Stochastic rounding draws its bits by position, so a stochastic ``q`` is
      checked with nearest rounding here.
    * ``independent``: replacing the values of one scale group (block, 2-D
      block, group or channel) changes no other group's output. Where a
      tensor-wide statistic sets one level of every scale (NVFP4's FP32 tensor
      scale, ``scale_format="e4m3"``, PTF) the changed group stays within the
      range of the others, so that statistic is unchanged.
    * ``unbiased`` (``rounding="stochastic"``): the mean of ``F(x) @ w`` over
      ``n`` keys (``n = 1024``, fewer for large shapes) is ``x @ w`` within a
      Hoeffding bound, for a fixed Gaussian ``w`` with 4 columns. Each
      element's two rounding candidates are its toward-zero rounding and the
      other neighbour, known from its nearest rounding or from a first set of
      ``n`` draws; every draw must be one of them. From a second, independent
      set of ``n`` draws, with ``g_i`` the gap between element ``i``'s
      candidates, ``|mean(F(x)) @ w - x @ w| <= sqrt(ln(2/d) / (2n)) *
      sqrt(g^2 @ w^2)`` per output, ``d = 1e-12`` (Hoeffding over ``n`` keys
      times independent elements; plus ``1e-12 * |x| @ |w|`` for float64
      sums). Elements with an unseen second candidate (its probability below
      about ``1/n``, or a saturated value) are left out of both sides. The
      keys come from ``seed``: the verdict on an input never changes.
    * ``reference``: ``F(x) == reference(x)``; when the reference returns
      ``(values, scales)``, the scales also equal
      ``quant.quantize(q, x).scale`` (dtype, shape and bytes: E8M0 or E4M3
      codes of shape ``(..., blocks)`` for block formats, float32 steps in the
      scales' kept-dims shape otherwise).

    Args:
      q: the ``lowbit.quant.Quantizer``; its scales must come from ``x``
        (``scale="learned"``/``"delayed"`` and ``static=True`` take them from
        outside ``fake_quant`` and are refused).
      checks: names from ``QUANTIZER_CHECKS`` to run; None runs every check
        that applies to ``q`` (and ``reference`` when given) and skips the
        others. A named check that does not apply is a ValueError saying why.
      examples: Hypothesis examples per check; None takes the active settings
        profile's ``max_examples``.
      seed: seeds the stochastic-rounding keys and the GEMM's ``w``.
      reference: optional numpy callable ``(x: float32 ndarray) -> values`` or
        ``-> (values, scales)``, what ``fake_quant(q, x)`` (and
        ``quantize(q, x).scale``) should give.

    Raises:
      AssertionError: one message naming every failing check, each with its
        shrunk counterexample; its ``failures`` attribute maps each failing
        check to its ``QuantizerViolation`` (whose ``x`` is that input).
      TypeError: ``q`` is not a ``Quantizer``, ``checks`` is not a sequence of
        names, ``reference`` is not callable, or ``examples``/``seed`` are not
        integers.
      ValueError: an unknown or inapplicable check, a quantizer whose scales
        do not come from ``x``, or ``examples`` below 1.
    """
    if not isinstance(q, quant.Quantizer):
        raise TypeError(f"check_quantizer q has type {type(q).__name__}; allowed: a lowbit.quant.Quantizer")
    if q.static or q.scale.given:
        raise ValueError(
            f"check_quantizer needs scales computed inside fake_quant; q has scale={q.scale!r}; "
            "allowed: a dynamic quantizer (Absmax, Percentile, MSE or KL without static, Fixed, or a block format)"
        )
    for name, v, lo in (("examples", examples, 1), ("seed", seed, 0)):
        if v is not None and (not isinstance(v, (int, np.integer)) or isinstance(v, bool)):
            raise TypeError(f"check_quantizer {name}={v!r} is invalid; allowed: an integer >= {lo}")
        if v is not None and v < lo:
            raise ValueError(f"check_quantizer {name}={v!r} is invalid; allowed: an integer >= {lo}")
    if reference is not None and not callable(reference):
        raise TypeError(
            f"check_quantizer reference={reference!r} is invalid; allowed: None or a callable "
            "(x: float32 ndarray) -> values or (values, scales)"
        )
    if checks is None:
        selected = [c for c in QUANTIZER_CHECKS if _applies(q, c, reference) is None]
    else:
        if isinstance(checks, str) or not all(isinstance(c, str) for c in checks):
            raise TypeError(
                f"check_quantizer checks={checks!r} is invalid; allowed: None or a sequence of names "
                f"from {', '.join(QUANTIZER_CHECKS)}"
            )
        for c in checks:
            if c not in QUANTIZER_CHECKS:
                raise ValueError(f"check_quantizer: unknown check {c!r}; allowed: {', '.join(QUANTIZER_CHECKS)}")
            why = _applies(q, c, reference)
            if why is not None:
                raise ValueError(f"check_quantizer: check {c!r} does not apply to {_describe(q)}: {why}")
        selected = [c for c in QUANTIZER_CHECKS if c in checks]
    failures = {}
    for check in selected:
        test = settings(
            max_examples=examples or settings.default.max_examples,
            deadline=None,
            report_multiple_bugs=False,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )(_given_check(q, check, reference, seed))
        # Keyed by quantizer and check, so Hypothesis replays a saved counterexample where it belongs.
        test._hypothesis_internal_database_key = f"lowbit.check_quantizer:{q!r}:{check}:{seed}".encode()
        with np.errstate(invalid="ignore", over="ignore"):
            try:
                test()
            except QuantizerViolation as err:
                failures[check] = err
    if failures:
        err = AssertionError(
            f"{_describe(q)} fails {len(failures)} check(s):\n" + "\n".join(f"  {e}" for e in failures.values())
        )
        err.failures = failures
        raise err
