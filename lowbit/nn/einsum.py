"""Two-operand einsum specs as ``dot_general`` dimension numbers plus an output permutation."""

from __future__ import annotations

import functools


@functools.cache
def einsum_dimension_numbers(spec: str):
    """Translate ``"bhqd,bhkd->bhqk"``-style specs for ``lax.dot_general``.

    Returns:
      ``(dimension_numbers, perm)``: ``dot_general`` yields batch, lhs-free,
      rhs-free dims in that order; ``perm`` transposes that into the spec's
      output order (``None`` when it already matches).

    Raises:
      ValueError: not a two-operand spec with an explicit output, a repeated or
        unknown label, or a label summed over that appears in only one operand.
    """
    spec = spec.replace(" ", "")
    try:
        ins, out = spec.split("->")
        a, b = ins.split(",")
    except ValueError:
        raise ValueError(f"einsum spec {spec!r} is invalid; allowed: 'lhs,rhs->out' with two operands") from None
    for part in (a, b, out):
        if len(set(part)) != len(part) or not part.isalpha():
            raise ValueError(f"einsum spec {spec!r}: each operand needs distinct letter labels")
    if set(out) - set(a) - set(b):
        raise ValueError(f"einsum spec {spec!r}: output labels {sorted(set(out) - set(a) - set(b))} are in no operand")
    contract = [c for c in a if c in b and c not in out]
    batch = [c for c in a if c in b and c in out]
    lonely = [c for c in a + b if c not in out and c not in contract]
    if lonely:
        raise ValueError(f"einsum spec {spec!r}: labels {lonely} are summed in one operand only; sum them first")
    dn = (
        (tuple(a.index(c) for c in contract), tuple(b.index(c) for c in contract)),
        (tuple(a.index(c) for c in batch), tuple(b.index(c) for c in batch)),
    )
    produced = batch + [c for c in a if c not in b] + [c for c in b if c not in a]
    perm = tuple(produced.index(c) for c in out)
    return dn, (None if perm == tuple(range(len(out))) else perm)
