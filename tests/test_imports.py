"""The numerics packages import without the training stack's optional-weight dependencies."""

import subprocess
import sys

HEAVY = ("orbax", "matplotlib", "sklearn", "rich")


def test_numerics_import_none_of_the_heavy_dependencies():
    code = (
        "import sys\n"
        "import lowbit, lowbit.formats, lowbit.quant, lowbit.training\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"imported: {out.stdout.strip()}"
