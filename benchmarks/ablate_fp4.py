"""Where fp4's Fashion-MNIST gap comes from: its forward quantizers and its gradient quantizers, one at a time.

``fp4`` (Sun et al. 2020) quantizes three things: 4-bit SAWB weights and PACT
activations (8-bit on the first and last layer, int8 attention products) and
radix-4 FP4 gradients with GradScale and two-phase rounding (e5m2 on the edges
and on attention's two activation products). This trains the same patch-7 ViT as
``bench_accuracy.py --datasets fashion-mnist`` (same epochs, optimizer and seed)
in variants of the recipe:

* ``fp4 forward only``: the rules' gradient quantizers removed (float gradients);
* ``fp4 gradients only``: the rules' forward quantizers removed (float weights
  and activations);
* ``fp4 with radix-4 attention gradients``: the products of two activations
  (attention's QK^T and AV) get radix-4 FP4 gradients with GradScale and
  two-phase rounding like the weighted layers: ``fp4`` before its change in
  ``bench_accuracy.REDEFINED``. Sun et al. define FP4 gradients for the GEMMs
  of weighted layers; their CNNs have no product of two activations;
* ``fp4 with float attention products``: those two products not quantized at
  all (int8 forward and e5m2 gradients in ``fp4``), the paper's scope;
* ``fp4 with float edges``: the first and last weighted op unquantized, as
  Sun et al. 2019 (HFP8) keep them, instead of 8 bits;
* ``fp4 without two-phase rounding``: both backward GEMMs take the gradient on
  the same (even) radix-4 grid. On the built-in LM, seed 2, fp4 diverges in its
  second epoch and this variant does not (``results/summary.md``).

Usage: ``python benchmarks/ablate_fp4.py [--seeds 0] [--variants A,B] [--report]``; appends one JSON
line per run (with the CPU it ran on) to ``results/ablate_fp4.jsonl`` and writes
``results/ablate_fp4.md``: one table per CPU type, each variant next to fp32 and fp4 on
the same seeds. ``--variants fp32,fp4`` runs those baselines on this CPU type; records
from before CPUs were recorded use ``results/bench_accuracy.jsonl``'s of that time.
Records of variants of the earlier ``fp4`` carry the earlier definition in their name
(``EARLIER``), so that every row of the report is one definition.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402
import bench_accuracy  # noqa: E402

from lowbit import recipes  # noqa: E402
from lowbit.training import DotQuantConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DATASET = "fashion-mnist"


def _forward_only(rule):
    return dataclasses.replace(
        rule, dot=dataclasses.replace(rule.dot, dlhs_grad=None, drhs_grad=None, grad_scale=False, tpr=False)
    )


def _gradients_only(rule):
    d = rule.dot
    return dataclasses.replace(
        rule,
        weight="none",
        act="none",
        dot=DotQuantConfig(dlhs_grad=d.dlhs_grad, drhs_grad=d.drhs_grad, grad_scale=d.grad_scale, tpr=d.tpr),
    )


def _attention_radix4(rules):
    """Products of two activations get the weighted layers' radix-4 FP4 gradients, GradScale and TPR."""
    weighted = next(r.dot for r in rules if r.operands == "any" and r.position == "any")
    grads = {f: getattr(weighted, f) for f in ("dlhs_grad", "drhs_grad", "grad_scale", "tpr")}
    return tuple(
        dataclasses.replace(r, dot=dataclasses.replace(r.dot, **grads)) if r.operands == "activation" else r
        for r in rules
    )


def _float_attention(rule):
    """Products of two activations left in float, forward and gradients: the paper quantizes weighted layers only."""
    return dataclasses.replace(rule, dot=DotQuantConfig()) if rule.operands == "activation" else rule


def _float_edges(rule):
    """The first and last weighted op left in float (forward and gradients), as in Sun et al. 2019's HFP8."""
    if rule.position != "edges":
        return rule
    return dataclasses.replace(rule, dot=DotQuantConfig(), weight="none", act="none")


def _without_tpr(rule):
    """Two-phase rounding off: the weight gradient's gradient on the input gradient's grid."""
    return dataclasses.replace(rule, dot=dataclasses.replace(rule.dot, tpr=False))


def _each(change):
    """A variant that changes each rule on its own."""
    return lambda rules: tuple(change(r) for r in rules)


BASELINES = ("fp32", "fp4")  # registered recipes, run beside the variants on the same CPU
RADIX4 = "fp4 with radix-4 attention gradients"  # what fp4 was before bench_accuracy.REDEFINED's change
CHANGED = bench_accuracy.REDEFINED["fp4"][0]
VARIANTS = {  # name -> the fp4 rules -> the variant's rules
    "fp4 forward only": _each(_forward_only),
    "fp4 gradients only": _each(_gradients_only),
    RADIX4: _attention_radix4,
    "fp4 with float attention products": _each(_float_attention),
    "fp4 with float edges": _each(_float_edges),
    "fp4 without two-phase rounding": _each(_without_tpr),
}
# The name of a variant run on fp4 as it was before its attention gradients became e5m2 (bench_accuracy.REDEFINED).
EARLIER = " (earlier fp4: radix-4 attention gradients)"


def variant(name: str) -> recipes.Recipe:
    """A baseline recipe, or the ``fp4`` recipe with every rule passed through ``VARIANTS[name]``."""
    if name in BASELINES:
        return recipes.get(name)
    base = recipes.get("fp4")
    return dataclasses.replace(base, name=name.replace(" ", "_"), rules=VARIANTS[name](base.rules))


def _table(accs: dict[str, dict[int, float]]) -> list[str]:
    lines = ["| recipe | seeds | test accuracy (%) | gap to fp32 (points) |", "|---|---|---:|---:|"]
    base = statistics.fmean(accs["fp32"].values()) if accs["fp32"] else None
    for name, by_seed in accs.items():
        if not by_seed:
            continue
        vals = [by_seed[s] for s in sorted(by_seed)]
        mean, std = bench_accuracy.mean_std(vals)
        gap = "" if base is None else f"{mean - base:+.2f}"
        lines.append(f"| {name} | {','.join(map(str, sorted(by_seed)))} | {mean:.2f} ± {std:.2f} | {gap} |")
    return lines


def report() -> str:
    """Markdown, one table per CPU type: fp32, each variant and fp4 on the seeds the variants ran, mean ± std.

    Quantized training on two CPU types ends at other accuracies, so a variant is
    compared with baselines run on its own CPU type; records without one use
    bench_accuracy's fp32 and fp4 records of that time.
    """
    records = bench_accuracy.read_records(RESULTS / "ablate_fp4.jsonl")
    lines = [
        "# ablate_fp4: where fp4's Fashion-MNIST gap comes from",
        "",
        f"`python benchmarks/ablate_fp4.py`: the {DATASET} ViT of bench_accuracy (same epochs, optimizer, "
        "seeds), fp4 with only its forward quantizers (SAWB weights, PACT activations, int8 attention "
        "products; float gradients) or only its gradient quantizers (radix-4 FP4 with GradScale and "
        "two-phase rounding, e5m2 on the edges and attention's products; float forward); with radix-4 FP4 "
        f"instead of e5m2 gradients on attention's two activation products (fp4 before {CHANGED}); with "
        "those products in float; with the first and last layer in float. A name ending in "
        f'"{EARLIER.strip()}" is that variant of the earlier fp4. '
        "One table per CPU type: the same seed ends elsewhere on another CPU type.",
    ]
    for cpu in bench_accuracy.cpu_types(records):
        runs = [r for r in records if bench_accuracy.cpu_of(r) == cpu]
        seeds = sorted({r["seed"] for r in runs})
        names = [BASELINES[0], *VARIANTS, *(v + EARLIER for v in VARIANTS), BASELINES[1]]
        accs: dict[str, dict[int, float]] = {name: {} for name in names}
        for r in runs:
            accs[r["variant"]][r["seed"]] = 100 * r["test_accuracy"]
        if cpu == bench_accuracy.UNRECORDED_CPU:
            for r in bench_accuracy.read_records(bench_accuracy.RESULTS / "bench_accuracy.jsonl"):
                if (
                    bench_accuracy.cpu_of(r) == cpu
                    and r["dataset"] == DATASET
                    and r["recipe"] in BASELINES
                    and r["seed"] in seeds
                    and r["key"] == bench_accuracy.config_key(DATASET, r["recipe"], r["seed"], r["epochs"])
                ):
                    name = RADIX4 if bench_accuracy.earlier_definition(r) else r["recipe"]
                    accs[name][r["seed"]] = 100 * r["test_accuracy"]
        lines += ["", f"## {cpu}", "", *_table(accs)]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0", help="comma-separated (default: 0)")
    ap.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated names of variants or baselines ({', '.join(BASELINES)}); default: every variant",
    )
    ap.add_argument("--report", action="store_true", help="only rewrite results/ablate_fp4.md from the records")
    args = ap.parse_args(argv)
    if args.report:
        (RESULTS / "ablate_fp4.md").write_text(report() + "\n")
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    names = args.variants.split(",")
    for name in names:
        if name not in (*VARIANTS, *BASELINES):
            ap.error(f"--variants: {name!r} is not a variant; allowed: {', '.join((*VARIANTS, *BASELINES))}")
    from lowbit import data

    dataset = data.load(DATASET)
    epochs = bench_accuracy.DATASETS[DATASET]["epochs"]
    RESULTS.mkdir(exist_ok=True)
    for seed in seeds:
        for name in names:
            m = bench_accuracy.run_one(dataset, variant(name), seed, epochs, None)
            row = dict(
                dataset=DATASET,
                variant=name,
                seed=seed,
                epochs=epochs,
                test_accuracy=m["test_accuracy"],
                load_average=_timing.load_average(),
                cpu=_timing.cpu_model(),
                code=bench_accuracy.lowbit_commit(),
            )
            print(json.dumps(row), flush=True)
            with (RESULTS / "ablate_fp4.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
            (RESULTS / "ablate_fp4.md").write_text(report() + "\n")


if __name__ == "__main__":
    main()
