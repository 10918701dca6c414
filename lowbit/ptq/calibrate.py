"""Static post-training quantization of a ViT: capture, calibrate, freeze, apply.

``quantize_vit`` runs the float model eagerly over the calibration images with
every quantized layer recording its operands, folds each activation operand
into a ``lowbit.quant`` observer, and then gives every layer instance a
``LayerRecipe`` whose quantizers are frozen: activations per tensor at the
calibrated step (``scale="fixed"``), weights per channel (or group) at a scale
computed from the fixed weight. Per-channel LayerNorm quantization is folded
into the LayerNorm and the next weight first (see ``lowbit.ptq.vit``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowbit import quant
from lowbit.nn.layers import QEinsum, QLinear
from lowbit.ptq import vit
from lowbit.ptq.capture import quantized_layers, record, role_of, set_child
from lowbit.ptq.config import PTQConfig
from lowbit.ptq.noise import NoisyBias, noisy_bias_search
from lowbit.training.qdot import DotQuantConfig
from lowbit.recipes import LayerRecipe

__all__ = ["quantize_vit"]

_TWIN_SHIFTS = range(1, 9)


def _batches(images: np.ndarray, batch_size: int) -> Iterator[jax.Array]:
    for i in range(0, len(images), batch_size):
        yield jnp.asarray(images[i : i + batch_size])


def _operands(layer) -> tuple[str, ...]:
    """The operands that are activations: both for an attention product, only the input for a linear layer."""
    return ("lhs", "rhs") if isinstance(layer, QEinsum) else ("lhs",)


def _observe(model, layers, cfg: PTQConfig, images: np.ndarray):
    """Calibration statistics of every activation operand, and the first batch's operands."""
    states: dict[tuple[str, str], Any] = {}
    sample = None
    for batch in _batches(images, cfg.batch_size):
        calls = record(model, batch)
        if sample is None:
            sample = calls
        for name, (lhs, rhs, _) in calls.items():
            for operand in _operands(layers[name]):
                q = vit.activation_quantizer(role_of(name), operand, cfg)
                x = lhs if operand == "lhs" else rhs
                obs = quant.observer(q)
                states[name, operand] = obs.update(states.get((name, operand)) or obs.init(x), x)
    return states, sample


@functools.partial(jax.jit, static_argnums=0)
def _errors(candidates, x):
    return jnp.stack([jnp.sum(jnp.square(quant.fake_quant(c, x) - x)) for c in candidates])


def _best_twin_shift(q, x) -> quant.Quantizer:
    """PTQ4ViT's search of the fine range: the shift with the least squared error on ``x``."""
    candidates = tuple(dataclasses.replace(q, twin_shift=s) for s in _TWIN_SHIFTS)
    return candidates[int(np.argmin(_errors(candidates, jnp.asarray(x, jnp.float32))))]


def _freeze(model, name, layer, operand, cfg, states, sample) -> tuple[quant.Quantizer, dict[str, Any]]:
    """The frozen quantizer of one activation operand (folding a per-channel one first)."""
    role = role_of(name)
    q = vit.activation_quantizer(role, operand, cfg)
    if cfg.dynamic:
        return q, {}
    params = quant.observer(q).scale(states[name, operand])
    info: dict[str, Any] = {}
    if q.granularity == "channel":
        r, step = vit.folding(q, params)
        vit.fold_layernorm(vit.input_norm(model, name), layer.kernel, r)
        lhs, _, dn = sample[name]
        sample[name] = (lhs / jnp.asarray(r), layer.kernel[...], dn)
        fixed = vit.fixed_quantizer(q, params, step)
        info["fold_ratio_max"] = float(np.max(r) / np.min(r))
    else:
        fixed = vit.fixed_quantizer(q, params)
    if fixed.kind == "twin_uniform" and fixed.twin_split == "magnitude":
        fixed = _best_twin_shift(fixed, sample[name][0])
    info["step"] = fixed.fixed_scale
    return fixed, info


def _describe(q: quant.Quantizer | None) -> str:
    if q is None:
        return "float"
    parts = [q.format.name, q.kind if q.kind != "uniform" else "", q.granularity, q.scale]
    if q.kind == "twin_uniform":
        parts.append(f"shift {q.twin_shift}")
    return " ".join(p for p in parts if p)


def quantize_vit(model: nnx.Module, images: np.ndarray, cfg: PTQConfig) -> list[dict[str, Any]]:
    """Post-training quantization of a float ViT, in place.

    Args:
      model: a float ``lowbit.nn.ViT`` (put in eval mode). Its layers get
        frozen quantizers; LayerNorms and kernels change when ``layernorm`` is
        ``channel`` / ``ptf``; linear layers may be wrapped in ``NoisyBias``.
      images: calibration images ``(N, H, W, C)`` (unused with ``dynamic``).
      cfg: the setting.

    Returns:
      One dict per quantized layer, in forward order: ``name``, ``role``, the
      ``lhs`` / ``rhs`` quantizers (as text), the activation ``step`` and, where
      applied, the fold's ``fold_ratio_max`` and the ``noisy_bias`` amplitude
      (in input steps).

    Raises:
      ValueError: no images to calibrate on.
    """
    if not cfg.dynamic and len(images) == 0:
        raise ValueError("quantize_vit: static calibration needs at least one image; images is empty")
    model.eval()
    layers = quantized_layers(model)
    states, sample = ({}, None) if cfg.dynamic else _observe(model, layers, cfg, images)
    key = jax.random.key(cfg.seed)
    report = []
    for name, layer in layers.items():
        row: dict[str, Any] = dict(name=name, role=role_of(name))
        lhs, info = _freeze(model, name, layer, "lhs", cfg, states, sample)
        row.update(info)
        if isinstance(layer, QEinsum):
            rhs, _ = _freeze(model, name, layer, "rhs", cfg, states, sample)
        else:
            rhs = vit.weight_quantizer(cfg)
        # Per-channel input scales run along the contraction: an integer matmul cannot apply them.
        config = DotQuantConfig(lhs=lhs, rhs=rhs, matmul="fake" if lhs.granularity == "channel" else "auto")
        layer.layer = LayerRecipe(dot=config)
        row.update(lhs=_describe(lhs), rhs=_describe(rhs))
        if cfg.noisy_bias and isinstance(layer, QLinear) and lhs.kind == "uniform":
            x, w, dn = sample[name]
            noise, amplitude = noisy_bias_search(config, x, w, dn, lhs.fixed_scale,
                                                 jax.random.fold_in(key, len(report)))
            row["noisy_bias"] = amplitude
            if noise is not None:
                set_child(model, name, NoisyBias(layer, noise))
        report.append(row)
    return report
