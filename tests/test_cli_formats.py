"""Tests for ``lowbit formats`` and ``lowbit formats show NAME``."""

import importlib.metadata
import shutil
import subprocess
import sys

import pytest

from lowbit import formats
from lowbit.cli import main

ELEMENT = [
    n
    for n in formats.names()
    if isinstance(formats.get(n), (formats.FloatFormat, formats.IntFormat, formats.BinaryFormat))
]


def _row(out: str, name: str) -> list[str]:
    """The cells of the table row that starts with ``name`` (rich or plain layout)."""
    for line in out.splitlines():
        cells = [c.strip() for c in line.replace("│", " ").split("  ") if c.strip()]
        if cells and cells[0] == name:
            return cells
    raise AssertionError(f"no row for {name!r} in:\n{out}")


def test_formats_lists_every_element_format(capsys):
    assert main(["formats"]) == 0
    out = capsys.readouterr().out
    for name in ELEMENT:
        _row(out, name)
    assert _row(out, "float8_e4m3fn")[1:6] == ["8", "7", "448", "0.015625", "0.00195312"]
    assert _row(out, "float8_e8m0fnu")[1:6] == ["8", "127", "1.70141e+38", "5.87747e-39", "-"]
    assert _row(out, "int4")[1:4] == ["4", "-", "7"]
    assert "fnuz" in " ".join(_row(out, "float8_e4m3fnuz")) and "inf" in " ".join(_row(out, "p3109_k8p3"))
    element_table = out.split("Block formats")[0]
    for block in ("mxfp8_e4m3", "nvfp4"):  # block formats are not element formats
        assert f" {block} " not in element_table


def test_formats_lists_every_block_format(capsys):
    assert main(["formats"]) == 0
    blocks = capsys.readouterr().out.split("Block formats")[1]
    names = [n for n in formats.names() if isinstance(formats.get(n), formats.BlockFormat)]
    assert {"mxfp8_e4m3", "mxfp4_e2m1", "mxint8", "nvfp4"} <= set(names)
    for name in names:
        _row(blocks, name)
    # OCP MX v1.0: 32 elements share one E8M0 scale; NVFP4: 16 E2M1 elements per E4M3 scale under an FP32 one.
    assert _row(blocks, "mxfp4_e2m1")[1:] == ["mx", "float4_e2m1fn", "32", "float8_e8m0fnu", "-", "4.25", "6"]
    assert _row(blocks, "nvfp4")[1:] == ["nvfp4", "float4_e2m1fn", "16", "float8_e4m3fn", "float32", "4.5", "6"]
    assert _row(blocks, "mxfp8_e5m2")[-1] == "57344"


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"lowbit {importlib.metadata.version('lowbit')}"


def test_formats_show_lists_every_code_and_value(capsys):
    assert main(["formats", "show", "float4_e2m1fn"]) == 0
    out = capsys.readouterr().out
    codes = {_row(out, f"0x{c:x}")[2] for c in range(16)}
    assert codes == {"0", "-0", "0.5", "-0.5", "1", "-1", "1.5", "-1.5", "2", "-2", "3", "-3", "4", "-4", "6", "-6"}
    assert _row(out, "0xf")[1] == "1111"


def test_formats_show_specials(capsys):
    assert main(["formats", "show", "float8_e5m2"]) == 0
    out = capsys.readouterr().out
    assert _row(out, "0x7c")[2] == "inf" and _row(out, "0xfc")[2] == "-inf" and _row(out, "0x7f")[2] == "nan"
    assert _row(out, "0x7b")[2] == "57344"


def test_formats_show_unknown_name_lists_known_ones(capsys):
    assert main(["formats", "show", "float9"]) == 2
    err = capsys.readouterr().err
    assert "float9" in err and "float8_e4m3fn" in err


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main([])
    assert exit_.value.code == 2


def test_console_script_runs_in_a_subprocess():
    # The installed `lowbit` script when there is one, else the module: either way a fresh process.
    script = shutil.which("lowbit")
    cmd = [script] if script else [sys.executable, "-m", "lowbit.cli"]
    done = subprocess.run([*cmd, "formats", "show", "fp4_radix4"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert _row(done.stdout, "0x7")[2] == "64" and _row(done.stdout, "0x1")[2] == "0.015625"
