"""benchmarks/bench_lm_ptq.py: a lowbit row scores a model and reports its ops; the table shows what failed and why."""

import math
import sys
from pathlib import Path

import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_lm_ptq  # noqa: E402

from lowbit.nn.lm import LM  # noqa: E402
from lowbit.ptq.evaluate import evaluate  # noqa: E402


def test_reason_is_type_and_first_line():
    assert bench_lm_ptq._reason(ValueError("bad shape\nmore detail")) == "ValueError: bad shape"


def test_a_lowbit_row_scores_the_quantized_model():
    model = LM(vocab_size=256, context=8, dim=128, depth=1, heads=4, mlp_dim=128, rngs=nnx.Rngs(0))
    model.eval()
    rng = np.random.default_rng(0)
    calib = rng.integers(0, 256, (8, 8)).astype(np.int32)
    x, y = rng.integers(0, 256, (16, 8)).astype(np.int32), rng.integers(0, 256, (16, 8)).astype(np.int32)
    float_loss = evaluate(model, x, y)["loss"]
    rec = bench_lm_ptq.run_lowbit(model, [calib], x, y, ("W4A16 g128 RTN", "int4", 128, "rtn", None), float_loss, True)
    assert math.isfinite(rec["bits_per_byte"])
    assert rec["bits_per_byte_increase"] == (rec["test_loss"] - float_loss) / math.log(2)
    assert {op["name"] for op in rec["ops"] if op["method"] == "rtn"} == {
        "blocks/0/attn/qkv:dot_general0",
        "blocks/0/attn/proj:dot_general0",
        "blocks/0/mlp_in:dot_general0",
        "blocks/0/mlp_out:dot_general0",
    }
    assert rec["float_ops"]  # the tied head stays float, and the row says so
    assert rec["mean_error"] > 0
    assert rec["memory"]["packed_ratio"] <= 0.3  # a weight-only row is packed


def test_table_shows_failures_and_nominal_memory():
    header = dict(
        checkpoint="ckpt",
        model="LM",
        float_bits_per_byte=3.0,
        test_windows=4,
        context=8,
        samples=16,
        seed=0,
        batch_size=64,
        commit="abc",
        qwix="0.1.8",
        load="1 1 1",
        cpu="cpu",
        cores=2,
        date="today",
        command="python bench_lm_ptq.py",
    )
    records = [
        dict(library="qwix", row="qwix W4A16 g128 AWQ", failed="ValueError: cannot tile"),
        dict(library="lowbit", row="fp32", bits_per_byte=3.0, bits_per_byte_increase=0.0, memory=None),
        dict(
            library="qwix",
            row="qwix W4A16 g128 GPTQ",
            bits_per_byte=3.1,
            bits_per_byte_increase=0.1,
            memory=dict(packed_ratio=0.133, ratio=0.2, nominal=True),
        ),
    ]
    text = bench_lm_ptq.table(records, header)
    rows = [line for line in text.splitlines() if line.startswith("| lowbit") or line.startswith("| qwix")]
    assert rows[0].startswith("| lowbit | fp32 |")  # the table's own order, not the records'
    assert "ValueError: cannot tile" in rows[-1]
    assert "0.133 (nominal)" in rows[1]
