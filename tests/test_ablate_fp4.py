"""benchmarks/ablate_fp4.py: each variant drops exactly one side of fp4's quantization."""

import dataclasses
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


def test_without_two_phase_rounding_changes_tpr_alone():
    base, var = recipes.get("fp4"), ablate_fp4.variant("fp4 without two-phase rounding")
    assert any(r.dot.tpr for r in base.rules)  # the check below can fail
    for b, v in zip(base.rules, var.rules, strict=True):
        assert not v.dot.tpr and v == dataclasses.replace(b, dot=dataclasses.replace(b.dot, tpr=False))


def test_report_puts_each_variant_beside_fp32_and_fp4_on_the_same_seeds(tmp_path, monkeypatch):
    import json

    import bench_accuracy

    monkeypatch.setattr(ablate_fp4, "RESULTS", tmp_path)
    monkeypatch.setattr(bench_accuracy, "RESULTS", tmp_path)
    ds, epochs = ablate_fp4.DATASET, 10
    variants = [dict(variant=name, seed=0, test_accuracy=acc) for name, acc in zip(ablate_fp4.VARIANTS, (0.88, 0.87))]
    (tmp_path / "ablate_fp4.jsonl").write_text("".join(json.dumps(r) + "\n" for r in variants))
    changed = bench_accuracy.REDEFINED["fp4"][0]
    runs = [
        dict(
            key=bench_accuracy.config_key(ds, recipe, seed, epochs),
            dataset=ds,
            recipe=recipe,
            seed=seed,
            epochs=epochs,
            test_accuracy=acc,
            date=date,
        )
        for recipe, seed, acc, date in (
            ("fp32", 0, 0.89, changed),
            ("fp4", 0, 0.86, changed),  # trained on the current fp4
            ("fp32", 1, 0.50, changed),  # seed 1: not ablated
        )
    ]
    (tmp_path / "bench_accuracy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    rows = {
        line.split(" | ")[0].lstrip("| "): line for line in ablate_fp4.report().splitlines() if line.startswith("| ")
    }
    assert rows["fp32"].endswith("| 89.00 ± 0.00 | +0.00 |")
    assert rows["fp4 forward only"].endswith("| -1.00 |") and rows["fp4 gradients only"].endswith("| -2.00 |")
    assert rows["fp4"].endswith("| -3.00 |")


def test_a_cpu_type_is_compared_only_with_baselines_run_on_it(tmp_path, monkeypatch):
    import json

    import bench_accuracy

    monkeypatch.setattr(ablate_fp4, "RESULTS", tmp_path)
    monkeypatch.setattr(bench_accuracy, "RESULTS", tmp_path)
    cpu = "AMD EPYC (family 26, model 2)"
    records = [
        dict(variant="fp32", seed=0, test_accuracy=0.80, cpu=cpu),
        dict(variant="fp4 with float edges", seed=0, test_accuracy=0.79, cpu=cpu),
        dict(variant="fp4 forward only", seed=0, test_accuracy=0.88),  # before CPUs were recorded
    ]
    (tmp_path / "ablate_fp4.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    ds = ablate_fp4.DATASET
    old = dict(key=bench_accuracy.config_key(ds, "fp32", 0, 10), dataset=ds, recipe="fp32", seed=0, epochs=10)
    earlier = "2026-12-02T00:00:00+00:00"  # before fp4's attention gradients became e5m2
    fp4 = dict(old, key=bench_accuracy.config_key(ds, "fp4", 0, 10), recipe="fp4", test_accuracy=0.85, date=earlier)
    zen5 = dict(old, test_accuracy=0.70, date=earlier, cpu=cpu)  # bench_accuracy's run on the other CPU type
    lines = (dict(old, test_accuracy=0.90, date=earlier), fp4, zen5)
    (tmp_path / "bench_accuracy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    text = ablate_fp4.report()
    unrecorded, recorded = text.split(f"## {cpu}")
    assert "| fp4 forward only | 0 | 88.00 ± 0.00 | -2.00 |" in unrecorded  # the old fp32 record, 90 %
    assert f"| {ablate_fp4.RADIX4} | 0 | 85.00 ± 0.00 | -5.00 |" in unrecorded  # what fp4 was then
    assert "| fp4 |" not in unrecorded
    assert "| fp4 with float edges | 0 | 79.00 ± 0.00 | -1.00 |" in recorded  # this CPU's own fp32, 80 %
    assert "fp4 forward only" not in recorded


def test_attention_and_edge_variants_change_only_their_rules():
    base = recipes.get("fp4")
    radix4 = ablate_fp4.variant(ablate_fp4.RADIX4)
    edges = ablate_fp4.variant("fp4 with float edges")
    floats = ablate_fp4.variant("fp4 with float attention products")
    weighted = next(r.dot for r in base.rules if r.operands == "any" and r.position == "any")
    assert weighted.dlhs_grad.format.name == "fp4_radix4" and weighted.grad_scale and weighted.tpr
    for b, a, e, f in zip(base.rules, radix4.rules, edges.rules, floats.rules):
        if b.operands == "activation":
            assert {b.dot.dlhs_grad.format.name, b.dot.drhs_grad.format.name} == {"float8_e5m2"}  # fp4's own
            grads = ("dlhs_grad", "drhs_grad", "grad_scale", "tpr")
            assert all(getattr(a.dot, f) == getattr(weighted, f) for f in grads)  # fp4 before the change
            assert (a.dot.lhs, a.dot.rhs) == (b.dot.lhs, b.dot.rhs)
            assert b.quantizes and not f.quantizes
        else:
            assert a == b and f == b
        if b.position == "edges":
            assert not e.quantizes
        else:
            assert e == b
    assert any(not r.quantizes for r in edges.rules)  # the edge rule exists, so the loop checks something
    assert any(r.operands == "activation" for r in base.rules)  # and so does the attention rule
