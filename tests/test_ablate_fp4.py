"""benchmarks/ablate_fp4.py: each variant drops exactly one side of fp4's quantization."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import ablate_fp4  # noqa: E402

from lowbit import recipes  # noqa: E402

FORWARD = ("lhs", "rhs")
GRADIENTS = ("dlhs_grad", "drhs_grad")


def test_forward_only_keeps_every_forward_quantizer_and_no_gradient_quantizer():
    base, var = recipes.get("fp4"), ablate_fp4.variant("fp4 forward only")
    assert len(var.rules) == len(base.rules)
    for b, v in zip(base.rules, var.rules):
        assert (v.weight, v.act, v.weight_bits, v.act_bits) == (b.weight, b.act, b.weight_bits, b.act_bits)
        assert all(getattr(v.dot, f) == getattr(b.dot, f) for f in FORWARD)
        assert all(getattr(v.dot, f) is None for f in GRADIENTS) and not v.dot.grad_scale


def test_gradients_only_keeps_every_gradient_quantizer_and_no_forward_quantizer():
    base, var = recipes.get("fp4"), ablate_fp4.variant("fp4 gradients only")
    assert any(r.weight != "none" for r in base.rules)  # the check below can fail
    for b, v in zip(base.rules, var.rules):
        assert (v.weight, v.act) == ("none", "none")
        assert all(getattr(v.dot, f) is None for f in FORWARD)
        assert all(getattr(v.dot, f) == getattr(b.dot, f) for f in GRADIENTS)
        assert (v.dot.grad_scale, v.dot.tpr) == (b.dot.grad_scale, b.dot.tpr)
