"""Test accuracy of every training recipe against fp32: digits and Fashion-MNIST, several seeds.

Every (dataset, recipe, seed) run trains the ViT with ``lowbit.trainer.loop.train``
from scratch and appends one JSON record (with the CPU type it ran on) to
``results/bench_accuracy.jsonl``; rerunning skips the runs already recorded with
the same configuration on the same CPU type, so an interrupted sweep continues
where it stopped. The report keeps one section per CPU type: quantized training
ends at other accuracies on another CPU type. Runs go seed-major (every recipe
once, then every recipe again), so a partial sweep already covers all recipes.
After every run the report (``bench_accuracy.md``, ``.png``: mean ± std over
seeds, gap to fp32 in points) is rewritten from all records.

Configurations: digits uses ``lowbit train``'s defaults (ViT dim 64, depth 2,
patch 2, 30 epochs); Fashion-MNIST a ViT with patch 7 (16 tokens), dim 64,
depth 2, 10 epochs: patch 4 (49 tokens) measured 205 s per fp32 epoch on the
2-core machine, 35 min per run, too slow for a sweep of 7 recipes x 3 seeds. Targets (gap
to fp32): digits fp8 0.5 and fp4 1.5 points, Fashion-MNIST fp8 0.3 and fp4 1.0.

Usage::

    python benchmarks/bench_accuracy.py                 # digits (all recipes), then Fashion-MNIST
    python benchmarks/bench_accuracy.py --datasets fashion-mnist --seeds 0
    python benchmarks/bench_accuracy.py --report        # rewrite the report from the records only
    python benchmarks/bench_accuracy.py --quick         # digits, 3 epochs, 1 seed, 4 recipes (*_quick.*)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DATASETS = {
    "digits": dict(
        model=dict(patch_size=None, dim=64, depth=2, heads=4, mlp_dim=128), epochs=30, recipes=None
    ),  # None: every recipe
    "fashion-mnist": dict(
        model=dict(patch_size=7, dim=64, depth=2, heads=4, mlp_dim=128),
        epochs=10,
        recipes=["fp32", "fp8", "fp8_delayed", "fp4", "mxfp8", "mxfp4", "nvfp4", "nvfp4_v0", "int8", "int4_lsq"],
    ),
}
TRAIN = dict(batch_size=64, learning_rate=3e-3, weight_decay=0.05, warmup=2.0)  # lowbit train's defaults
TARGETS = {
    ("digits", "fp8"): 0.5,
    ("digits", "fp4"): 1.5,
    ("fashion-mnist", "fp8"): 0.3,
    ("fashion-mnist", "fp4"): 1.0,
    ("fashion-mnist", "mxfp8"): 0.2,  # issue 19
    ("fashion-mnist", "nvfp4"): 0.5,
}
QUICK_RECIPES = ["fp32", "fp8", "fp4", "int8_lsq"]


def machine_info() -> dict:
    import flax
    import optax

    return dict(_timing.machine_info(), flax=flax.__version__, optax=optax.__version__)


def lowbit_commit() -> str:
    """The code a run trained with: recipes change under a long sweep, and a record must say which it used."""
    root = Path(__file__).resolve().parent.parent
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "lowbit"], cwd=root, capture_output=True, text=True)
    return (head.stdout.strip() or "unknown") + ("+dirty" if dirty.stdout.strip() else "")


# How the model is quantized: "quantize" = the stock ViT through lowbit.quantize (rules by op path).
# Records without it come from the earlier ViT built of QLinear layers with recipe roles: the "before" column.
API = "quantize"


def config_key(dataset: str, recipe: str, seed: int, epochs: int, api: str | None = API) -> str:
    """What makes two runs the same run: a record is reused only if all of it matches."""
    cfg = dict(dataset=dataset, recipe=recipe, seed=seed, epochs=epochs, model=DATASETS[dataset]["model"], **TRAIN)
    return json.dumps(cfg | (dict(api=api) if api else {}), sort_keys=True)


# Records from before the CPU was recorded: the one CPU type of 2026-12-02 to 12-07. Quantized training ends at
# other accuracies on another CPU type (tests/test_accuracy_pins.py), so runs of two types never share a table.
UNRECORDED_CPU = "AMD EPYC (family and model not recorded; the machine of 2026-12-02 to 12-07)"


def cpu_of(record: dict) -> str:
    """The CPU type a record trained on."""
    return record.get("cpu", UNRECORDED_CPU)


def cpu_types(records: list[dict]) -> list[str]:
    """The CPU types ``records`` trained on: the unrecorded (oldest) first, then in the order recorded."""
    return sorted({cpu_of(r): None for r in records}, key=lambda c: c != UNRECORDED_CPU)


# When a recipe's numerics last changed (its commit's time) and what it computed before. A row of runs older than
# the change trained the earlier definition and says so: a CPU type that is not rerun keeps such rows.
REDEFINED = {
    "fp4": ("2026-12-07T21:10:57+00:00", "radix-4 FP4 gradients on attention's QK^T and AV, not e5m2"),
    "nvfp4": ("2026-12-07T21:10:57+00:00", "its first weighted op (the patch embedding) in NVFP4, not BF16"),
    "mxfp8": ("2026-12-07T23:34:38+00:00", "attention's QK^T and AV in MXFP8, not BF16"),
}


def earlier_definition(record: dict) -> str | None:
    """What ``record``'s recipe computed before its last change, if the record was trained before it."""
    change = REDEFINED.get(record["recipe"])
    return change[1] if change and record["date"] < change[0] else None


def read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_one(dataset, recipe, seed: int, epochs: int, ckpt_dir: Path | None) -> dict:
    """Train the dataset's ViT in ``recipe`` (a registered name or a ``Recipe``); ``train``'s metrics."""
    import jax
    from flax import nnx

    import lowbit
    from lowbit import recipes
    from lowbit.nn.vit import ViT
    from lowbit.trainer.loop import train

    recipe = recipes.get(recipe) if isinstance(recipe, str) else recipe
    model = lowbit.quantize(
        ViT(
            image_shape=dataset.image_shape,
            num_classes=dataset.num_classes,
            rngs=nnx.Rngs(seed),
            **DATASETS[dataset.name]["model"],
        ),
        recipe,
        seed=seed,
    )
    # Fashion-MNIST runs take many minutes: per-epoch checkpoints let a killed
    # sweep resume mid-run. Digits runs take under a minute, not worth the writes.
    metrics = train(
        model,
        dataset,
        recipe=recipe,
        epochs=epochs,
        seed=seed,
        out_dir=ckpt_dir,
        resume=ckpt_dir is not None,
        progress=False,
        **TRAIN,
    )
    jax.clear_caches()  # one process trains dozens of models: drop their executables
    return metrics


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(records: list[dict], before: list[dict] = ()) -> dict[str, dict[str, list[dict]]]:
    """CPU type -> dataset -> rows (recipe, seeds, mean/std accuracy in %, gap to fp32 in points, ...).

    ``before``: records of the earlier implementation; each row gets their mean ± std
    (on the same CPU type) as ``before``. CPU types come oldest first, then as recorded.
    """
    return {
        cpu: _summarise_cpu([r for r in records if cpu_of(r) == cpu], [r for r in before if cpu_of(r) == cpu])
        for cpu in cpu_types(records)
    }


def _summarise_cpu(records: list[dict], before: list[dict]) -> dict[str, list[dict]]:
    """dataset -> rows, for the records of one CPU type."""
    by: dict[str, dict[str, list[dict]]] = {}
    for r in records:
        by.setdefault(r["dataset"], {}).setdefault(r["recipe"], []).append(r)
    out = {}
    for ds, per_recipe in by.items():
        rows = []
        for name, runs in per_recipe.items():
            mean, std = mean_std([100 * r["test_accuracy"] for r in runs])
            rows.append(
                dict(
                    recipe=name,
                    seeds=sorted(r["seed"] for r in runs),
                    n=len(runs),
                    mean=mean,
                    std=std,
                    step_time_ms=statistics.median(r["step_time_ms"] for r in runs),
                    train_time_s=statistics.fmean(r["train_time_s"] for r in runs),
                    skipped_steps=sum(r["skipped_steps"] for r in runs),
                    commits=sorted({r.get("lowbit_commit", "?") for r in runs}),
                    # Records before 2026-12-07 did not keep their command line.
                    commands=sorted({r.get("command", "?") for r in runs}),
                    earlier=sorted({d for r in runs if (d := earlier_definition(r))}),
                )
            )
        base = next((r for r in rows if r["recipe"] == "fp32"), None)
        for row in rows:
            old = [100 * r["test_accuracy"] for r in before if r["dataset"] == ds and r["recipe"] == row["recipe"]]
            row["before"] = mean_std(old) if old else None
            row["gap"] = row["mean"] - base["mean"] if base else None
            target = TARGETS.get((ds, row["recipe"]))
            row["target"] = target
            row["meets_target"] = None if target is None or row["gap"] is None else -row["gap"] <= target
        order = {name: i for i, name in enumerate(_recipe_order())}
        out[ds] = sorted(rows, key=lambda r: order.get(r["recipe"], len(order)))
    return out


def _recipe_order() -> list[str]:
    from lowbit import recipes

    return recipes.names()


def table(ds: str, rows: list[dict], epochs: int) -> str:
    lines = [
        f"### {ds} ({epochs} epochs, model {DATASETS[ds]['model']})",
        "",
        "| recipe | seeds | test accuracy (%) | before (QLinear ViT) | gap to fp32 (points) | target | step (ms) "
        "| train time (s) | skipped steps | commit |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    for r in rows:
        gap = "—" if r["gap"] is None else f"{r['gap']:+.2f}"
        target = "" if r["target"] is None else f"≥ −{r['target']} {'✓' if r['meets_target'] else '✗'}"
        before = "—" if not r.get("before") else f"{r['before'][0]:.2f} ± {r['before'][1]:.2f}"
        mark = " †" if r.get("earlier") else ""
        lines.append(
            f"| {r['recipe']}{mark} | {r['n']} | {r['mean']:.2f} ± {r['std']:.2f} | {before} | {gap} | {target} "
            f"| {r['step_time_ms']:.1f} | {r['train_time_s']:.0f} | {r['skipped_steps']} | {', '.join(r['commits'])} |"
        )
    for r in rows:
        for what in r.get("earlier", ()):
            when = REDEFINED[r["recipe"]][0]
            lines += ["", f"† {r['recipe']}: trained before the recipe changed on {when}, with {what}."]
    commands = sorted({c for r in rows for c in r["commands"]})
    lines += ["", "Commands that produced these rows (`?`: a record from before commands were kept):", ""]
    lines += [f"- `{c}`" if c != "?" else "- ?" for c in commands]
    return "\n".join(lines)


def plot(summary: dict[str, list[dict]], path: Path) -> None:
    """Gap to fp32 per recipe; the axis stops at -6 points so a diverged run does not flatten the rest."""
    from matplotlib.figure import Figure

    floor = -6.0
    fig = Figure(figsize=(6 * len(summary), 3.8), layout="constrained")
    axes = fig.subplots(1, len(summary), squeeze=False)[0]
    for ax, (ds, rows) in zip(axes, summary.items()):
        rows = [r for r in rows if r["gap"] is not None]
        names = [r["recipe"] for r in rows]
        ax.bar(names, [max(r["gap"], floor) for r in rows], yerr=[r["std"] for r in rows], capsize=3)
        for i, r in enumerate(rows):
            if r["gap"] < floor:
                ax.annotate(f"{r['gap']:.0f}", (i, floor), ha="center", va="bottom", color="w", fontsize=8)
        ax.axhline(0.0, color="k", lw=0.8)
        ax.set(
            title=f"{ds} (fp32 {next((r['mean'] for r in rows if r['recipe'] == 'fp32'), float('nan')):.2f}%)",
            ylabel="gap to fp32 (points, ± std)",
            ylim=(floor, 2.0),
        )
        ax.tick_params(axis="x", rotation=45)
    fig.savefig(path, dpi=100)


def _label(ds: str, cpu: str, several: bool) -> str:
    """A plot panel's name: the dataset, and on a second line its CPU type where the records span several."""
    if not several:
        return ds
    return f"{ds}\n{'the 2026-12-02..07 machine' if cpu == UNRECORDED_CPU else cpu}"


def plot_curves(records: list[dict], path: Path) -> None:
    """Test accuracy after every epoch, mean over seeds, one line per recipe, one panel per dataset (and CPU type)."""
    from matplotlib.figure import Figure

    several = len(cpu_types(records)) > 1
    by: dict[str, dict[str, list[list[float]]]] = {}
    for r in records:
        panel = by.setdefault(_label(r["dataset"], cpu_of(r), several), {})
        panel.setdefault(r["recipe"], []).append(r["test_accuracy_per_epoch"])
    fig = Figure(figsize=(6 * len(by), 3.8), layout="constrained")
    axes = fig.subplots(1, len(by), squeeze=False)[0]
    order = {name: i for i, name in enumerate(_recipe_order())}
    for ax, (ds, per_recipe) in zip(axes, by.items()):
        for i, name in enumerate(sorted(per_recipe, key=lambda n: order.get(n, len(order)))):
            curves = per_recipe[name]
            mean = [100 * statistics.fmean(c[e] for c in curves) for e in range(min(map(len, curves)))]
            # The colour cycle has 10 entries: a line style per cycle keeps 15 recipes apart.
            ax.plot(
                range(1, len(mean) + 1),
                mean,
                marker=".",
                ls=("-", "--", ":")[i // 10 % 3],
                label=f"{name} ({len(curves)})",
            )
        ax.set(title=f"{ds}: test accuracy per epoch (mean over seeds)", xlabel="epoch", ylabel="%")
        ax.legend(fontsize=7, ncol=2)
    fig.savefig(path, dpi=100)


def write_report(
    records: list[dict], stem: Path, epochs_for: dict[str, int], command_info: dict, before: list[dict] = ()
) -> None:
    summary = summarise(records, before)
    if not summary:
        return
    parts = [
        "# bench_accuracy: recipes vs fp32 (mean ± std over seeds)",
        "",
        f"Generated {command_info['date']} by `{command_info['command']}`; "
        f"{len(records)} runs, one section per CPU type they trained on (quantized training ends at other "
        f"accuracies on another CPU type, so runs of two types never share a table); "
        f"jax {command_info['jax']}, flax {command_info['flax']}. Load average when each run ended is in "
        f"the JSONL records (step times are under that load; compare them only within a dataset).",
        "",
        f"Training: AdamW lr {TRAIN['learning_rate']}, wd {TRAIN['weight_decay']}, batch {TRAIN['batch_size']}, "
        f"warmup {TRAIN['warmup']} epochs, cosine decay. Gap = mean(recipe) − mean(fp32).",
        "",
    ]
    for cpu, by_ds in summary.items():
        parts += [f"## {cpu}", ""]
        for ds, rows in by_ds.items():
            parts += [table(ds, rows, epochs_for.get(ds, DATASETS[ds]["epochs"])), ""]
    curves = stem.with_name(stem.name + "_curves.png")
    parts.append(
        f"Curves (test accuracy after each epoch, mean over seeds; seeds per recipe in brackets): `{curves.name}`."
    )
    stem.with_suffix(".md").write_text("\n".join(parts) + "\n")
    several = len(summary) > 1
    plot(
        {_label(ds, cpu, several): rows for cpu, by_ds in summary.items() for ds, rows in by_ds.items()},
        stem.with_suffix(".png"),
    )
    plot_curves(records, curves)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="digits,fashion-mnist", help="comma-separated (default: both)")
    ap.add_argument("--recipes", help="comma-separated (default: every recipe on digits, 10 on Fashion-MNIST)")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated (default: 0,1,2)")
    ap.add_argument("--epochs", type=int, help="override the per-dataset epochs")
    ap.add_argument("--report", action="store_true", help="only rewrite the report from the records")
    ap.add_argument(
        "--rerun",
        action="store_true",
        help="train again even where a record exists (the code changed); the newest record of a run counts",
    )
    ap.add_argument("--quick", action="store_true", help="digits, 3 epochs, seed 0, 4 recipes; *_quick.* files")
    args = ap.parse_args(argv)

    from lowbit import data

    if args.quick:
        args.datasets, args.seeds, args.epochs = "digits", "0", 3
        args.recipes = args.recipes or ",".join(QUICK_RECIPES)
    stem = RESULTS / ("bench_accuracy_quick" if args.quick else "bench_accuracy")
    jsonl = stem.with_suffix(".jsonl")
    RESULTS.mkdir(parents=True, exist_ok=True)
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    epochs_for = {
        ds: (args.epochs if ds in datasets and args.epochs else cfg["epochs"]) for ds, cfg in DATASETS.items()
    }
    info = machine_info()
    commit = lowbit_commit()  # once: this process keeps the code it imported, whatever is committed later

    def current(records, api=API):
        """Per CPU type, the newest record of each run of this configuration (another --epochs stays in the file)."""
        newest = {
            (cpu_of(r), r["key"]): r
            for r in records
            if r["key"] == config_key(r["dataset"], r["recipe"], r["seed"], epochs_for[r["dataset"]], api)
        }
        return list(newest.values())

    if not args.report:
        for ds_name in datasets:
            names = args.recipes.split(",") if args.recipes else DATASETS[ds_name]["recipes"] or _recipe_order()
            dataset = data.load(ds_name)
            todo = [(seed, name) for seed in seeds for name in names]
            for i, (seed, name) in enumerate(todo):
                key = config_key(ds_name, name, seed, epochs_for[ds_name])
                done = [r for r in read_records(jsonl) if r["key"] == key and cpu_of(r) == info["cpu"]]
                if done and (not args.rerun or done[-1].get("lowbit_commit") == commit):
                    continue
                print(f"[{ds_name} {i + 1}/{len(todo)}] {name} seed {seed} ...", flush=True)
                # Per commit: a rerun must not resume the finished checkpoint of older code.
                run_dir = RESULTS / "runs" / ds_name / name / f"seed{seed}-{commit}"
                ckpt = run_dir if ds_name == "fashion-mnist" else None
                t0 = time.perf_counter()
                m = run_one(dataset, name, seed, epochs_for[ds_name], ckpt)
                if m["stopped"]:  # a signal stopped it: not a result; its checkpoint resumes it next time
                    print(f"    stopped at {m['stopped_at']}; rerun the same command to resume", flush=True)
                    sys.exit(130)
                record = dict(
                    key=key,
                    dataset=ds_name,
                    recipe=name,
                    seed=seed,
                    epochs=epochs_for[ds_name],
                    model=DATASETS[ds_name]["model"],
                    **TRAIN,
                    test_accuracy=m["test_accuracy"],
                    final_loss=m["final_loss"],
                    train_time_s=m["train_time_s"],
                    step_time_ms=m["step_time_ms"],
                    skipped_steps=m["skipped_steps"],
                    test_accuracy_per_epoch=[h["test_accuracy"] for h in m["history"]],
                    wall_s=time.perf_counter() - t0,
                    load_average=_timing.load_average(),
                    lowbit_commit=commit,
                    cpu=info["cpu"],
                    command=info["command"],
                    xla_flags=info["xla_flags"],
                    date=_timing.machine_info()["date"],
                )
                with jsonl.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                print(
                    f"    {100 * m['test_accuracy']:.2f}%  {m['step_time_ms']:.1f} ms/step  "
                    f"{record['wall_s']:.0f} s  load {record['load_average']}",
                    flush=True,
                )
                write_report(current(read_records(jsonl)), stem, epochs_for, info, current(read_records(jsonl), None))

    records = current(read_records(jsonl))
    before = current(read_records(jsonl), None)
    write_report(records, stem, epochs_for, info, before)
    for cpu, by_ds in summarise(records, before).items():
        for ds, rows in by_ds.items():
            print(f"{cpu}\n" + table(ds, rows, epochs_for.get(ds, DATASETS[ds]["epochs"])) + "\n")
    stem.with_suffix(".json").write_text(
        json.dumps(
            dict(
                benchmark="bench_accuracy",
                training=TRAIN,
                datasets={ds: dict(DATASETS[ds], epochs=epochs_for[ds]) for ds in DATASETS},
                summary=summarise(records, before),
                machine=info,
            ),
            indent=2,
        )
    )
    print(f"wrote {stem}.md, .png, .json ({len(records)} runs in {jsonl})")


if __name__ == "__main__":
    main()
