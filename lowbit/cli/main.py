"""The ``lowbit`` command line.

Each subcommand is registered by one ``add_*_parser(subparsers)`` function in
``COMMANDS``: it adds its parser and sets ``func``, which takes the parsed
arguments and returns the exit status. Command functions import what they
need themselves, so ``lowbit --help`` stays fast and a command can set up its
environment (e.g. ``XLA_FLAGS``) before jax starts a backend.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import sys
from collections.abc import Callable, Sequence

from lowbit.cli.compare import add_compare_parser
from lowbit.cli.output import print_table
from lowbit.cli.ptq import add_finetune_parser, add_ptq_parser
from lowbit.cli.train import add_train_parser

__all__ = ["COMMANDS", "add_formats_parser", "build_parser", "main"]


def add_formats_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers ``lowbit formats`` and ``lowbit formats show NAME``."""
    parser = subparsers.add_parser(
        "formats",
        help="list the registered element and block formats",
        description="Print every registered element format (bits, bias, range, special values) and every "
        "block format (MX, NVFP4: element format, block size, scale format, bits per value).",
    )
    parser.set_defaults(func=_formats_command)
    actions = parser.add_subparsers(dest="action", metavar="{show}")
    show = actions.add_parser(
        "show",
        help="list every code of one format and its value",
        description="Print every code of a format with its bit pattern and value.",
    )
    show.add_argument("name", help="a registered format name, e.g. float8_e4m3fn")
    show.set_defaults(func=_show_command)
    return parser


COMMANDS: list[Callable[[argparse._SubParsersAction], argparse.ArgumentParser]] = [
    add_train_parser,
    add_compare_parser,
    add_ptq_parser,
    add_finetune_parser,
    add_formats_parser,
]


def build_parser() -> argparse.ArgumentParser:
    """The ``lowbit`` parser with every command in ``COMMANDS``."""
    parser = argparse.ArgumentParser(prog="lowbit", description="Low-precision number formats and training in them.")
    parser.add_argument("--version", action="version", version=f"lowbit {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lowbit`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C outside training (which stops cleanly by itself): no traceback
        print(f"lowbit {args.command}: interrupted", file=sys.stderr)
        return 130


def _version() -> str:
    try:
        return importlib.metadata.version("lowbit")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


# ----- lowbit formats ----------------------------------------------------------------------


def _number(v: float | None) -> str:
    if v is None:
        return "-"
    if math.isnan(v):
        return "nan"
    if v == 0:
        return "-0" if math.copysign(1.0, v) < 0 else "0"
    return f"{v:.6g}"


def _describe(fmt) -> dict[str, str]:
    """One table row: how a format is laid out and where its range ends."""
    from lowbit.formats import BinaryFormat, FloatFormat, IntFormat

    if isinstance(fmt, FloatFormat):
        notes = [fmt.specials]
        notes += [] if fmt.signed else ["unsigned"]
        notes += [] if fmt.zero else ["no zero"]
        notes += ["radix 4"] if fmt.radix == 4 else []
        flags = [w for w, on in (("NaN", fmt.has_nan), ("inf", fmt.has_inf), ("-0", fmt.has_negative_zero)) if on]
        subnormal = fmt.min_value if fmt.zero and fmt.mbits > 0 else None
        return dict(
            bias=str(fmt.bias),
            max=_number(fmt.max_value),
            min_normal=_number(fmt.min_normal),
            min_subnormal=_number(subnormal),
            specials=f"{', '.join(notes)} ({', '.join(flags) or 'no NaN, no inf'})",
        )
    if isinstance(fmt, IntFormat):
        kind = ("int" if fmt.signed else "uint") + (", narrow" if fmt.narrow else "")
        return dict(
            bias="-",
            max=_number(fmt.max_value),
            min_normal="-",
            min_subnormal="-",
            specials=f"{kind} [{fmt.min_int}, {fmt.max_int}]",
        )
    if isinstance(fmt, BinaryFormat):
        return dict(bias="-", max=_number(fmt.max_value), min_normal="-", min_subnormal="-", specials="sign: {-1, +1}")
    raise TypeError(f"not an element format: {fmt!r}")


def _element_formats() -> list:
    from lowbit import formats

    kinds = (formats.FloatFormat, formats.IntFormat, formats.BinaryFormat)
    return [(n, formats.get(n)) for n in formats.names() if isinstance(formats.get(n), kinds)]


_COLUMNS = (
    ("name", "name"),
    ("bits", "bits"),
    ("bias", "bias"),
    ("max", "max"),
    ("min normal", "min_normal"),
    ("min subnormal", "min_subnormal"),
    ("specials", "specials"),
)


def _block_row(name: str, fmt) -> list[str]:
    """One row of the block format table: layout, scales and storage cost."""
    tensor_scale = "float32" if fmt.kind == "nvfp4" else "-"
    bits_per_value = fmt.element.bits + fmt.scale.bits / fmt.block_size  # the per-tensor scale is negligible
    return [
        name,
        fmt.kind,
        fmt.element.name,
        str(fmt.block_size),
        fmt.scale.name,
        tensor_scale,
        f"{bits_per_value:g}",
        _number(fmt.element_max),
    ]


def _formats_command(args: argparse.Namespace) -> int:
    from lowbit import formats

    rows = [dict(name=name, bits=str(fmt.bits), **_describe(fmt)) for name, fmt in _element_formats()]
    print_table(
        "Element formats",
        [c for c, _ in _COLUMNS],
        [[r[k] for _, k in _COLUMNS] for r in rows],
        left=("name", "specials"),
    )
    blocks = [_block_row(n, formats.get(n)) for n in formats.names() if isinstance(formats.get(n), formats.BlockFormat)]
    print_table(
        "Block formats (scaled along the last axis)",
        ["name", "kind", "element", "block", "scale", "tensor scale", "bits/value", "element max"],
        blocks,
        left=("name", "kind", "element", "scale", "tensor scale"),
    )
    return 0


def _show_command(args: argparse.Namespace) -> int:
    import numpy as np

    from lowbit import formats

    try:
        fmt = formats.get(args.name)
    except ValueError as e:
        print(f"lowbit formats show: {e}", file=sys.stderr)
        return 2
    element = getattr(fmt, "element", fmt)  # a block format lists its element's values
    codes = np.arange(2**element.bits, dtype=np.uint8 if element.bits <= 8 else np.uint16)
    table = np.asarray(formats.decode(element, codes))
    print(f"{args.name}: {fmt!r}")
    if element is not fmt:
        print(f"element format {element.name}:")
    values = formats.values(element)
    print(f"{values.size} finite values, {element.bits} bits")
    rows = [
        [f"0x{int(c):0{(element.bits + 3) // 4}x}", format(int(c), f"0{element.bits}b"), _number(float(v))]
        for c, v in zip(codes, table, strict=True)
    ]
    print_table(None, ["code", "bits", "value"], rows, left=("code", "bits"))
    return 0
