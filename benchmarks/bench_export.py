"""Exported model size and accuracy: packed kernels vs fake-quantized vs the trained model.

Trains three digits ViTs (``lowbit train`` defaults, seed 0): fp32, ternary and
binary recipes. Each is exported with ``lowbit.nn.export.export`` (the fp32
model as fp32, fp8, fp4, int8 and int4; the ternary model as ternary; the
binary model as binary) and scored three ways on the test set:

* trained: the model as it came out of training (its recipe's forward pass);
* fake-quant: ``export.fake_quant_weights`` on a copy (the reference);
* exported: the packed kernels dequantized into a copy with ``export.load``.

Exported and fake-quant must agree exactly (same kernels, hence same accuracy).
``export`` applies one format to every layer, but the ternary and binary
recipes train the first and last layers (patch embedding, head) at int8; the
"+ int8 edges" rows export those two as int8, i.e. the model as it was trained.
Sizes: kernel bytes per parameter (codes + scales, ``export.bytes_per_parameter``)
and the whole model, i.e. exported kernels plus every other parameter (biases,
LayerNorms, positions, class token, learned quantizer steps) at its stored dtype.

Usage: ``python benchmarks/bench_export.py [--quick] [--epochs N]``
Writes ``benchmarks/results/bench_export.{json,md}`` (``--quick``: 3 epochs, ``bench_export_quick.*``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing  # noqa: E402

import lowbit  # noqa: E402
from lowbit import (
    data,  # noqa: E402
    recipes,  # noqa: E402
)
from lowbit.nn import export  # noqa: E402
from lowbit.nn.variables import OverwriteWithGradient  # noqa: E402
from lowbit.nn.vit import ViT  # noqa: E402
from lowbit.trainer import loop  # noqa: E402
from lowbit.trainer.step import TrainState, make_eval_step  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# model recipe -> (export format, export format of the edge layers or None for the same)
PLAN = {
    "fp32": [(f, None) for f in ("fp32", "fp8", "fp4", "int8", "int4")],
    "ternary": [("ternary", None), ("ternary", "int8")],
    "binary": [("binary", None), ("binary", "int8")],
}
EDGES = ("patch_embed", "head")  # the ViT's first and last layers (recipes.EDGES roles)
SEED = 0


def accuracy(model: nnx.Module, dataset, policy) -> float:
    """Test accuracy through the train loop's own eval step (padded batches cover every example)."""
    model.eval()
    graphdef, params, overwrite, rest = nnx.split(model, nnx.Param, OverwriteWithGradient, ...)
    state = TrainState(params, overwrite, rest, opt_state=None, loss_scale=None)
    evaluate = jax.jit(make_eval_step(graphdef, policy=policy))
    correct = sum(int(evaluate(state, *batch)) for batch in loop._padded_batches(dataset.x_test, dataset.y_test, 64))
    return correct / len(dataset.x_test)


def kernels(model: nnx.Module) -> dict[str, np.ndarray]:
    return {path: np.asarray(layer.kernel[...]) for path, layer in export._kernels(model)}


def is_edge(path: str) -> bool:
    return path.split("/")[0] in EDGES


def export_model(model: nnx.Module, fmt: str, edge_fmt: str | None) -> dict:
    exported = export.export(model, fmt)
    if edge_fmt is not None:
        exported.update({p: v for p, v in export.export(model, edge_fmt).items() if is_edge(p)})
    return exported


def fake_quant_model(model: nnx.Module, fmt: str, edge_fmt: str | None) -> nnx.Module:
    fake = nnx.clone(model)
    export.fake_quant_weights(fake, fmt)
    if edge_fmt is not None:
        edge = nnx.clone(model)
        export.fake_quant_weights(edge, edge_fmt)
        source = dict(export._kernels(edge))
        for path, layer in export._kernels(fake):
            if is_edge(path):
                layer.kernel[...] = source[path].kernel[...]
    return fake


def param_bytes(model: nnx.Module) -> int:
    return sum(v.nbytes for v in jax.tree.leaves(nnx.state(model, nnx.Param)))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=30, help="training epochs (default: 30, as lowbit train)")
    ap.add_argument("--quick", action="store_true", help="3 epochs")
    args = ap.parse_args(argv)
    if args.quick:
        args.epochs = 3
    import flax

    dataset = data.load("digits")
    rows = []
    for recipe_name, formats_ in PLAN.items():
        recipe = recipes.get(recipe_name)
        model = ViT(image_shape=dataset.image_shape, num_classes=dataset.num_classes, rngs=nnx.Rngs(SEED))
        if recipe.quantized:
            model = lowbit.quantize(model, recipe)
        print(f"training {recipe_name} ({args.epochs} epochs) ...", flush=True)
        metrics = loop.train(model, dataset, recipe=recipe, epochs=args.epochs, seed=SEED, progress=False)
        trained = accuracy(model, dataset, recipe.policy)
        assert abs(trained - metrics["test_accuracy"]) < 1e-9, "eval here must match the train loop's"
        float_kernel_bytes = sum(k.nbytes for k in kernels(model).values())
        fp32_model_bytes = param_bytes(model)
        for fmt, edge_fmt in formats_:
            exported = export_model(model, fmt, edge_fmt)
            kernel_bytes = export.nbytes(exported)
            fake = fake_quant_model(model, fmt, edge_fmt)
            loaded = nnx.clone(model)
            export.load(loaded, exported)
            diff = max(float(np.max(np.abs(a - kernels(fake)[p]))) for p, a in kernels(loaded).items())
            label = fmt if edge_fmt is None else f"{fmt} + {edge_fmt} edges"
            row = dict(
                model=recipe_name,
                export=label,
                kernel_params=sum(k.size for k in kernels(model).values()),
                kernel_bytes_per_param=export.bytes_per_parameter(exported),
                kernel_bytes=kernel_bytes,
                model_bytes=fp32_model_bytes - float_kernel_bytes + kernel_bytes,
                fp32_model_bytes=fp32_model_bytes,
                acc_trained=trained,
                acc_fake_quant=accuracy(fake, dataset, recipe.policy),
                acc_exported=accuracy(loaded, dataset, recipe.policy),
                max_kernel_diff=diff,
            )
            row["exported_equals_fake_quant"] = row["acc_exported"] == row["acc_fake_quant"] and diff == 0.0
            rows.append(row)
            print(
                f"  {recipe_name:8s} -> {label:20s} {row['kernel_bytes_per_param']:.3f} B/param  "
                f"model {row['model_bytes']:,} B  acc trained {100 * trained:.2f}  "
                f"fake {100 * row['acc_fake_quant']:.2f}  exported {100 * row['acc_exported']:.2f}",
                flush=True,
            )

    info = dict(_timing.machine_info(), flax=flax.__version__)
    result = dict(benchmark="bench_export", dataset="digits", epochs=args.epochs, seed=SEED, rows=rows, machine=info)
    lines = [
        "# bench_export: exported size and accuracy (digits ViT, lowbit train defaults)",
        "",
        f"{info['date']}, `{info['command']}`; {info['cpu']}, {info['cores']} cores, jax {info['jax']}, "
        f"flax {info['flax']}, load average {info['load_average']}. {args.epochs} epochs, seed {SEED}.",
        "",
        "Kernels: the weights of the quantized layers (exported packed: codes + scales). Model: exported "
        "kernels + all other parameters at their stored dtype (float32). Trained: the model as trained "
        "(its recipe's forward); fake-quant: `fake_quant_weights`; exported: packed kernels loaded back. "
        "Accuracies in %.",
        "",
        "| model | export | kernel B/param | kernel bytes | model bytes | × fp32 size | trained | fake-quant "
        "| exported | exported = fake-quant |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['export']} | {r['kernel_bytes_per_param']:.3f} | {r['kernel_bytes']:,} "
            f"| {r['model_bytes']:,} | {r['model_bytes'] / r['fp32_model_bytes']:.3f} | {100 * r['acc_trained']:.2f} "
            f"| {100 * r['acc_fake_quant']:.2f} | {100 * r['acc_exported']:.2f} "
            f"| {'yes' if r['exported_equals_fake_quant'] else 'NO (max |Δw| {:.3g})'.format(r['max_kernel_diff'])} |"
        )
    md = "\n".join(lines) + "\n"
    stem = RESULTS / ("bench_export_quick" if args.quick else "bench_export")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    stem.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {stem}.json, .md")
    return result


if __name__ == "__main__":
    main()
