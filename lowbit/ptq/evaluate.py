"""Accuracy, per-op signal-to-quantization-noise ratios, and their plot."""

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
from lowbit.nn.quantize import op_name, ops, recipe_of
from lowbit.ptq.capture import probe, record_traced
from lowbit.recipes import op as oprule
from lowbit.training.qdot import DotQuantConfig

__all__ = ["accuracy", "evaluate", "op_sqnr", "plot_ops", "sqnr_db"]


@jax.jit
def _scores(graphdef, state, x, y):
    """``(correct predictions, summed cross-entropy in nats, labels)`` of one batch; label -1 is padding."""
    logits = nnx.merge(graphdef, state)(x).astype(jnp.float32)
    valid = y >= 0
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.maximum(y, 0)[..., None], axis=-1)[..., 0]
    correct = jnp.sum((jnp.argmax(logits, axis=-1) == y) & valid)
    return correct, jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid)


def evaluate(model: nnx.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 500) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy of ``model`` (in eval mode) on ``(x, y)``.

    Works for classifiers (``y``: ``(N,)`` labels, logits ``(N, classes)``) and
    language models (``y``: ``(N, T)`` next tokens, logits ``(N, T, vocab)``):
    both are averaged over every label. The last batch is padded to
    ``batch_size`` so one compiled shape covers all.

    Returns:
      ``accuracy`` (fraction of labels predicted) and ``loss`` (nats per label).
    """
    model.eval()
    graphdef, state = nnx.split(model)
    n = len(x)
    pad = -n % batch_size
    xs = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
    ys = np.concatenate([y, np.full((pad, *y.shape[1:]), -1, y.dtype)])  # label -1: padding, never counted
    correct = total = count = 0.0
    for i in range(0, n + pad, batch_size):
        c, s, k = _scores(graphdef, state, jnp.asarray(xs[i : i + batch_size]), jnp.asarray(ys[i : i + batch_size]))
        correct, total, count = correct + int(c), total + float(s), count + int(k)
    return dict(accuracy=correct / count, loss=total / count)


def accuracy(model: nnx.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 500) -> float:
    """Top-1 accuracy of ``model`` (in eval mode) on ``(x, y)`` (see ``evaluate``)."""
    return evaluate(model, x, y, batch_size)["accuracy"]


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


def _operand_power(qz, x):
    """(signal, noise) of ``x``'s own quantization by ``qz``; None where it needs state (learned, delayed,
    stochastic quantizers: the op's state or key, not the operand, decides)."""
    if qz is None:
        return _power(x, x)
    if qz.scale.given or qz.rounding == "stochastic":
        return None
    return _power(x, quant.fake_quant(qz, x))


@functools.partial(jax.jit, static_argnums=(0, 2))
def _errors(float_graphdef, float_state, quant_graphdef, quant_state, images):
    """(signal, noise) power of each op's output and operands, in one compiled pass."""
    _, reference = record_traced(nnx.merge(float_graphdef, float_state), images)
    model = nnx.merge(quant_graphdef, quant_state)
    _, got = record_traced(model, images)
    recipe = recipe_of(model)
    out = {}
    for op in ops(model):
        name = op_name(op.path, op.key)
        lhs, rhs = got[name].lhs, got[name].rhs
        dot = recipe.rules[op.rule].dot if op.rule is not None else DotQuantConfig()
        cfg = oprule.retarget(dot, op.call, lhs.ndim, rhs.ndim)
        out[name] = dict(
            sqnr_db=_power(reference[name].out, got[name].out),
            lhs_sqnr_db=_operand_power(cfg.lhs, lhs),
            rhs_sqnr_db=_operand_power(cfg.rhs, rhs),
        )
    return out


def op_sqnr(float_model: nnx.Module, quant_model: nnx.Module, images: np.ndarray) -> list[dict[str, Any]]:
    """Per-op SQNR (dB) of a quantized model against its float original on the same images.

    Args:
      float_model: the float NNX model.
      quant_model: ``float_model`` quantized (``lowbit.quantize``, PTQ), its ops discovered.
      images: one batch of inputs.

    Returns:
      One dict per op of the quantized model, in forward order: ``name``
      (``path:key``); ``sqnr_db``, the op's result in the quantized model
      against the float model's (the error of every quantizer up to and
      including this op); ``lhs_sqnr_db`` and ``rhs_sqnr_db``, each operand's
      own quantization in the quantized model (None for a quantizer whose step
      is op state: learned, delayed or stochastic).
    """
    float_model.eval()
    quant_model.eval()
    images = jnp.asarray(images)
    powers = _errors(*nnx.split(probe(float_model, images[:1])), *nnx.split(quant_model), images)
    names = [op_name(op.path, op.key) for op in ops(quant_model)]
    return [
        dict(name=n, **{k: None if v is None else _db(float(v[0]), float(v[1])) for k, v in powers[n].items()})
        for n in names
    ]


def plot_ops(rows: list[dict[str, Any]], path: str | Path, title: str) -> bool:
    """Plot the per-op SQNRs to ``path``; False when matplotlib is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    names = [r["name"].replace("blocks/", "b").replace("attn/", "").replace(":dot_general0", "") for r in rows]
    xs = np.arange(len(rows))
    fig = Figure(figsize=(max(6.0, 0.45 * len(rows) + 2), 4), layout="constrained")
    ax = fig.subplots()
    for key, label, marker in (
        ("sqnr_db", "op output (accumulated)", "o"),
        ("lhs_sqnr_db", "input activation", "s"),
        ("rhs_sqnr_db", "weight / 2nd operand", "^"),
    ):
        ys = [r[key] if r[key] is not None and math.isfinite(r[key]) else np.nan for r in rows]
        ax.plot(xs, ys, marker=marker, label=label)
    ax.set_xticks(xs, names, rotation=60, ha="right", fontsize=8)
    ax.set(ylabel="SQNR (dB)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)
    return True
