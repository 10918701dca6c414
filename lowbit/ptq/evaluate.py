"""Accuracy, per-layer signal-to-quantization-noise ratios, and their plot."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowbit import quant
from lowbit.ptq.capture import layer_output, quantized_layers, recording

__all__ = ["accuracy", "layer_sqnr", "plot_layers", "sqnr_db"]


@jax.jit
def _correct(graphdef, state, x, y):
    logits = nnx.merge(graphdef, state)(x)
    return jnp.sum(jnp.argmax(logits, axis=-1) == y)


def accuracy(model: nnx.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 500) -> float:
    """Top-1 accuracy of ``model`` (in eval mode) on ``(x, y)``.

    The last batch is padded to ``batch_size`` so one compiled shape covers all.
    """
    model.eval()
    graphdef, state = nnx.split(model)
    n = len(x)
    pad = -n % batch_size
    xs = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
    ys = np.concatenate([y, np.full(pad, -1, y.dtype)])  # label -1 never matches a prediction
    batches = ((jnp.asarray(xs[i : i + batch_size]), jnp.asarray(ys[i : i + batch_size]))
               for i in range(0, n + pad, batch_size))
    correct = sum(int(_correct(graphdef, state, bx, by)) for bx, by in batches)
    return correct / n


def sqnr_db(reference, approx) -> float:
    """``10 log10(sum(reference^2) / sum((reference - approx)^2))``; inf for an exact match."""
    reference = np.asarray(reference, np.float64)
    noise = float(np.sum(np.square(reference - np.asarray(approx, np.float64))))
    return _db(float(np.sum(np.square(reference))), noise)


def _db(signal: float, noise: float) -> float:
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def _power(reference, approx):
    reference = reference.astype(jnp.float32)
    return jnp.sum(jnp.square(reference)), jnp.sum(jnp.square(reference - approx.astype(jnp.float32)))


@functools.partial(jax.jit, static_argnums=(0, 2))
def _errors(float_graphdef, float_state, quant_graphdef, quant_state, images):
    """(signal, noise) power of each layer's output and operands, in one compiled pass."""
    models = nnx.merge(float_graphdef, float_state), nnx.merge(quant_graphdef, quant_state)
    layers = [quantized_layers(m) for m in models]
    calls = []
    for model, named in zip(models, layers):
        with recording(named) as recorded:
            model(images)
        calls.append({name: c[0] for name, c in recorded.items()})
    out = {}
    for name, layer in layers[1].items():
        cfg = layer.layer.dot
        lhs, rhs, dn = calls[1][name]
        out[name] = dict(
            sqnr_db=_power(layer_output(layers[0][name], *calls[0][name]), layer_output(layer, lhs, rhs, dn, cfg)),
            lhs_sqnr_db=_power(lhs, lhs if cfg.lhs is None else quant.fake_quant(cfg.lhs, lhs)),
            rhs_sqnr_db=_power(rhs, rhs if cfg.rhs is None else quant.fake_quant(cfg.rhs, rhs)))
    return out


def layer_sqnr(float_model: nnx.Module, quant_model: nnx.Module, images: np.ndarray) -> list[dict[str, Any]]:
    """Per-layer SQNR (dB) of a quantized model against its float original on the same images.

    Returns:
      One dict per layer, in forward order: ``name``; ``sqnr_db``, the layer's
      output in the quantized model against the float model's (the error of
      every quantizer up to and including this layer); ``lhs_sqnr_db`` and
      ``rhs_sqnr_db``, each operand's own quantization in the quantized model.
    """
    float_model.eval()
    quant_model.eval()
    powers = _errors(*nnx.split(float_model), *nnx.split(quant_model), jnp.asarray(images))
    return [dict(name=name, **{k: _db(float(s), float(n)) for k, (s, n) in powers[name].items()})
            for name in quantized_layers(quant_model)]


def plot_layers(rows: list[dict[str, Any]], path: str | Path, title: str) -> bool:
    """Plot the per-layer SQNRs to ``path``; False when matplotlib is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    names = [r["name"].replace("blocks.", "b").replace("attn.", "") for r in rows]
    xs = np.arange(len(rows))
    fig = Figure(figsize=(max(6.0, 0.45 * len(rows) + 2), 4), layout="constrained")
    ax = fig.subplots()
    for key, label, marker in (("sqnr_db", "layer output (accumulated)", "o"),
                               ("lhs_sqnr_db", "input activation", "s"), ("rhs_sqnr_db", "weight / 2nd operand", "^")):
        ys = [r[key] if math.isfinite(r[key]) else np.nan for r in rows]
        ax.plot(xs, ys, marker=marker, label=label)
    ax.set_xticks(xs, names, rotation=60, ha="right", fontsize=8)
    ax.set(ylabel="SQNR (dB)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)
    return True
