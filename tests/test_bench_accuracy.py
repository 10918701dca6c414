"""benchmarks/bench_accuracy.py: runs of two CPU types never share a table (their gaps are computed apart)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_accuracy  # noqa: E402


def test_bench_accuracy_keeps_each_cpu_type_in_its_own_table():
    ds, zen5 = "fashion-mnist", "AMD EPYC (family 26, model 2)"
    key = bench_accuracy.config_key(ds, "fp32", 0, 10)
    run = dict(key=key, dataset=ds, seed=0, epochs=10, step_time_ms=1.0, train_time_s=1.0, skipped_steps=0)
    run["date"] = bench_accuracy.REDEFINED["fp4"][0]
    records = [
        dict(run, recipe="fp32", test_accuracy=0.90),  # before CPUs were recorded
        dict(run, recipe="fp4", test_accuracy=0.89),
        dict(run, recipe="fp32", test_accuracy=0.80, cpu=zen5),
        dict(run, recipe="fp4", test_accuracy=0.78, cpu=zen5),
    ]
    summary = bench_accuracy.summarise(records)
    assert list(summary) == [bench_accuracy.UNRECORDED_CPU, zen5]
    gaps = {cpu: {r["recipe"]: round(r["gap"], 6) for r in by_ds[ds]} for cpu, by_ds in summary.items()}
    assert gaps == {bench_accuracy.UNRECORDED_CPU: {"fp32": 0, "fp4": -1}, zen5: {"fp32": 0, "fp4": -2}}


def test_a_row_trained_before_its_recipe_changed_says_what_it_trained():
    ds, changed = "fashion-mnist", bench_accuracy.REDEFINED["fp4"][0]
    run = dict(dataset=ds, seed=0, epochs=10, step_time_ms=1.0, train_time_s=1.0, skipped_steps=0, test_accuracy=0.9)
    records = [
        dict(run, recipe="fp32", date="2026-12-01T00:00:00+00:00"),  # fp32 never changed
        dict(run, recipe="fp4", date="2026-12-01T00:00:00+00:00"),
        dict(run, recipe="nvfp4", date=changed),  # trained on the current definition
    ]
    rows = bench_accuracy.summarise(records)[bench_accuracy.UNRECORDED_CPU][ds]
    assert {r["recipe"]: r["earlier"] for r in rows} == {
        "fp32": [],
        "fp4": [bench_accuracy.REDEFINED["fp4"][1]],
        "nvfp4": [],
    }
    text = bench_accuracy.table(ds, rows, 10)
    assert "| fp4 † |" in text and "| nvfp4 |" in text and "| fp32 |" in text
    assert f"† fp4: trained before the recipe changed on {changed}, with {bench_accuracy.REDEFINED['fp4'][1]}." in text
