"""Hypothesis strategies and a reusable property suite for element formats.

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

from lowbit import formats
from lowbit.formats import AdaptiveFloat, BinaryFormat, BlockFormat, CodebookFormat, FloatFormat, IntFormat

__all__ = [
    "CHUNK", "FormatProperties", "check_array", "check_format", "check_grid", "float_formats",
    "format_test", "formats_any", "hard_arrays", "hard_floats", "hard_values", "int_formats",
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
_F32_EDGE_BITS = (0x00000000, 0x00000001, 0x00000002, 0x00400000, 0x007FFFFF, 0x00800000, 0x00800001,
                  0x7F7FFFFF, 0x7F7FFFFE, _F32_INF_BITS)


# ----- strategies ---------------------------------------------------------------------


def _is_element(fmt) -> bool:
    return isinstance(fmt, formats.Format) and not isinstance(fmt, (AdaptiveFloat, BlockFormat))


def _element(fmt):
    if not _is_element(fmt):
        raise TypeError(f"{fmt!r} is not an element format; allowed: an object implementing "
                        "lowbit.formats.Format (FloatFormat, IntFormat, BinaryFormat, CodebookFormat or your "
                        "own class; AdaptiveFloat and block formats scale themselves)")
    return fmt


@functools.lru_cache(maxsize=None)
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
            FloatFormat(ebits=ebits, mbits=mbits, bias=bias, radix=radix, specials=specials,
                        signed=signed, zero=zero)
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
    return FloatFormat(ebits=ebits, mbits=mbits, bias=bias, radix=radix, specials=specials,
                       signed=signed, zero=zero)


def int_formats(*, max_bits: int = 16):
    """Any valid :class:`~lowbit.formats.IntFormat` (signed or not, narrow or not)."""
    unsigned = st.builds(IntFormat, bits=st.integers(1, max_bits), signed=st.just(False), narrow=st.just(False))
    # A narrow unsigned grid drops its largest code: that needs two bits.
    unsigned = unsigned | st.builds(IntFormat, bits=st.integers(2, max(max_bits, 2)), signed=st.just(False),
                                    narrow=st.just(True))
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
    return np.concatenate([_run(fmt, np.zeros(CHUNK, np.float32), codes=codes[s : s + CHUNK])["table"]
                           for s in range(0, codes.size, CHUNK)])[: codes.size]


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
            raise AssertionError(f"format {name} ({self.fmt!r}) violates {len(self.found)} "
                                 f"propert{'y' if len(self.found) == 1 else 'ies'}:\n" + "\n".join(self.found.values()))


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
        r.fact("codes are uint8 up to 8 bits, else uint16",
               out[k].dtype == (np.uint8 if fmt.bits <= 8 else np.uint16), str(out[k].dtype))
        r.check(f"codes fit in {fmt.bits} bits", out[k] >= 2**fmt.bits, x, out[k])

    # NaN in, NaN out: quantize propagates NaN even where the format has no NaN code.
    for k in _QUANTIZED:
        r.check(f"quantize ({k}) keeps NaN", nan_in & ~np.isnan(out[k]), x, out[k])

    # In range: exact nearest (ties to the even code), toward zero, stochastic on a neighbour.
    for k, want, what in (("near", near, "nearest rounding, ties to the even code"),
                          ("near_ns", near, "saturate=False agrees with saturate=True in range"),
                          ("zero", zero, "toward_zero rounding"),
                          ("zero_ns", zero, "toward_zero rounding (saturate=False)")):
        r.check(what, inr & ~_same(out[k], want, False), x, out[k], want)
    err = np.abs(out["near"].astype(np.float64) - xf)
    r.check("|quantize(x) - x| <= half the local spacing", inr & (err > (hi - lo) / 2), x, out["near"], near)
    s = out["stoch"].astype(np.float64)
    r.check("stochastic rounding lands on a neighbour", inr & (s != lo) & (s != hi), x, out["stoch"])

    # Outside the range: saturation, overflow, inf and signs the format cannot hold.
    outside = ~inr & ~nan_in
    for k, sat, rnd in (("near", True, "nearest"), ("near_ns", False, "nearest"),
                        ("zero", True, "toward_zero"), ("zero_ns", False, "toward_zero"),
                        ("stoch", True, "stochastic")):
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
            r.check(f"{k}: sign of a zero result", ~nan_in & (out[k] == 0) & (np.signbit(out[k]) != want_neg),
                    x, out[k])

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
        r.check("sign-symmetric: quantize(-x) == -quantize(x)", sym & ~_same(out["neg"], -out["near"], False),
                x, out["neg"], -out["near"])
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
        r.check(f"quantize == decode(encode) ({qk})", ~exempt & ~_same(out[qk], out[dk], float_fmt),
                x, out[dk], out[qk])
        r.check(f"decode(encode) is a finite value where the format has no NaN ({dk})",
                exempt & ~np.isfinite(out[dk]), x, out[dk])

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
            r.check(f"{name} inputs: quantize ({k}) equals quantize of the same values in float32",
                    ~_same(got.astype(np.float32), want.astype(np.float32), True), xh.astype(np.float32),
                    got.astype(np.float32), want.astype(np.float32))
        got, want = out[f"{name}_codes_ns"], out[f"{name}_codes_ns_f32"]
        r.check(f"{name} inputs: encode equals encode of the same values in float32", got != want,
                xh.astype(np.float32), got, want)


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
    r.check(f"stochastic rounding is unbiased (got: the mean of {_STOCH_DRAWS} roundings)",
            _STOCH_DRAWS * _kl(q, p) > _CHERNOFF_LIMIT, xs, draws.mean(0), xs)
    # Two keys: each pair of draws differs with probability 2p(1-p) when the key is used,
    # so all K draws of all points agree with probability <= exp(-K * sum 2p(1-p)).
    if _STOCH_DRAWS * np.sum(2 * p * (1 - p)) > _CHERNOFF_LIMIT:
        r.fact("stochastic rounding uses its key (two keys gave the same draws)",
               bool((draws != draws_other.astype(np.float64)).any()),
               f"{xs.size} points, e.g. x={_show(xs[np.argmax(p * (1 - p))])}")


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
        r.check(f"{what} (nearest, saturate=False) matches the reference", compared & ~_same(out[k], want, signed),
                x, out[k], want)
    standard = ref.dtype in (np.float16, np.float32, np.float64)
    if not standard and ref.dtype.itemsize in (1, 2):  # ml_dtypes: the array holds the codes
        codes = ref.view(np.uint8 if ref.dtype.itemsize == 1 else np.uint16).astype(np.int64)
        got = out["codes_ns"].astype(np.int64)
        bad = got != codes
        if bad.any():
            idx = np.flatnonzero(bad)[:4]
            r.fact("encode (saturate=False) matches the reference's bit patterns", False,
                   "; ".join(f"x={_show(x[i])} got 0x{got[i]:x}, expected 0x{codes[i]:x}" for i in idx))


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
    r.fact("values(fmt) is float32, finite and strictly ascending",
           v.dtype == np.float32 and np.isfinite(v).all() and bool((np.diff(v) > 0).all()))
    table = _code_table(fmt)
    finite = np.unique(table[np.isfinite(table)])
    if isinstance(fmt, IntFormat) and fmt.narrow:
        # The code a narrow range gives up still decodes (to the value it would have had).
        unused = fmt.min_int - 1 if fmt.signed else fmt.max_int + 1
        finite = finite[finite != unused]
    r.fact("values(fmt) == the finite values of all codes", np.array_equal(finite, v),
           f"{finite.size} decoded vs {v.size} values")
    r.fact("has_nan matches the code table", bool(np.isnan(table).any()) == fmt.has_nan, f"has_nan={fmt.has_nan}")
    r.fact("max_value is the largest value (or the largest magnitude)",
           np.float32(fmt.max_value) in (v[-1], -v[0]), f"{fmt.max_value} vs {v[0]} .. {v[-1]}")
    if isinstance(fmt, FloatFormat):
        r.fact("decode_table() == decode(every code)",
               np.array_equal(fmt.decode_table().view(np.uint32), table.view(np.uint32)))
        r.fact("has_inf matches the code table", bool(np.isinf(table).any()) == fmt.has_inf, f"has_inf={fmt.has_inf}")
        negzero = bool(((table == 0) & np.signbit(table)).any())
        r.fact("has_negative_zero matches the code table", negzero == fmt.has_negative_zero,
               f"has_negative_zero={fmt.has_negative_zero}")
        r.fact("decode(max_code) == max_value", table[fmt.max_code] == np.float32(fmt.max_value),
               f"{table[fmt.max_code]} vs {fmt.max_value}")
        pos = v[v > 0]
        r.fact("min_value == smallest positive value", pos.min() == np.float32(fmt.min_value),
               f"{fmt.min_value} vs {pos.min()}")
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
    first, second = (_run(fmt, x, x[: _STOCH_POINTS], key=key) for _ in range(2))
    r.fact("stochastic rounding is reproducible for a given key",
           all(np.array_equal(first[k].view(np.uint32), second[k].view(np.uint32)) for k in ("stoch", "draws")))
    _check_array(fmt, hard_values(fmt), r, 0, reference)


def _resolve(fmt):
    return _element(formats.get(fmt) if isinstance(fmt, str) else fmt)


def check_format(fmt, *, examples: int = 100, seed: int = 0, reference=None) -> None:
    """Run the whole property suite on ``fmt`` and report every violated property at once.

    Runs the deterministic checks of :func:`check_grid` (every code and every
    hard input), then :func:`check_array` on ``examples`` Hypothesis-drawn
    :func:`hard_arrays`, collecting violations instead of stopping at the first.

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
      TypeError: ``fmt`` is not an element format.
    """
    fmt = _resolve(fmt)
    if reference is not None and not callable(reference):
        raise TypeError(f"reference={reference!r} is invalid; allowed: None or a callable (x: ndarray) -> ndarray")
    r = _Report(fmt)
    _check_grid(fmt, r, reference)

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(hard_arrays(fmt))
    def run(x):
        _check_array(fmt, x, r, seed, reference)  # records, never raises: every property gets reported

    run()
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
