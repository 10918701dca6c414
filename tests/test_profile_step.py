"""benchmarks/profile_step.py attributes each compiled instruction to the source that emitted it."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from lowbit import quant

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import profile_step  # noqa: E402


def test_dots_and_quantizers_are_told_apart_by_opcode_and_source():
    q = quant.Quantizer(format="int8")
    f = jax.jit(lambda x, w: jnp.tanh(jnp.dot(quant.fake_quant(q, x), w)))
    x, w = jnp.ones((8, 16), jnp.float32), jnp.ones((16, 4), jnp.float32)
    text = f.lower(x, w).compile().as_text()
    cats = profile_step.classify(text)
    assert set(cats.values()) <= set(profile_step.CATEGORIES)
    assert profile_step.DOTS in cats.values()
    quantizer_ops = [n for n, c in cats.items() if c == "quantizers"]
    assert quantizer_ops  # the rounding and the scale come from lowbit/quant
    # The tanh is this file's own code: no category claims it but "other".
    tanh = [m.group(1) for line in text.splitlines() if " tanh(" in line and (m := profile_step._INSTR.match(line))]
    assert tanh and all(cats[n] == profile_step.OTHER for n in tanh)
