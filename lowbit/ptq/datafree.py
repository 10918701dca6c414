"""Data-free calibration images, synthesised from the model itself (PSAQ-ViT).

PSAQ-ViT (Li et al., ECCV 2022) observes that a trained ViT's self-attention
makes the patches of a real image respond diversely: the pairwise similarities
of the attention outputs' patch tokens spread out, where for noise they
collapse. It optimises images from noise to maximise the entropy of that
similarity distribution (a kernel density estimate, so it is differentiable),
together with a cross-entropy term that makes the model confident of a random
target class. Pixels are ``sigmoid`` of free variables, which keeps them in
the ``[0, 1]`` range of the real data; a small total-variation term favours
smooth images.

The patch tokens are the results of the ops named by ``feature_ops`` (a regex on
op names ``path:key``; default the built-in ViT's attention output projections),
viewed as ``(B, N, D)`` tokens (a convolution's ``(B, H, W, C)`` result as
``H*W`` tokens), less the first ``skip_tokens`` (the ViT's class token). Any
NNX model with such ops can be given its own.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lowbit.ptq.capture import names, probe, record_traced

__all__ = ["FEATURE_OPS", "patch_similarity_entropy", "synthesize"]

FEATURE_OPS = r"(.*/)?attn/proj:dot_general0"  # the built-in ViT's attention outputs

_GRID = jnp.linspace(-1.0, 1.0, 64, dtype=jnp.float32)


def patch_similarity_entropy(tokens, bandwidth: float = 0.05):
    """Mean over the batch of the entropy of the patch tokens' pairwise cosine similarities.

    Args:
      tokens: ``(B, N, D)`` features of ``N`` patches (no class token).
      bandwidth: the Gaussian kernel width of the density estimate.
    """
    t = tokens / jnp.maximum(jnp.linalg.norm(tokens, axis=-1, keepdims=True), 1e-6)
    sim = jnp.einsum("bnd,bmd->bnm", t, t)
    iu = np.triu_indices(tokens.shape[1], k=1)
    values = sim[:, iu[0], iu[1]]  # (B, pairs)
    density = jnp.mean(jnp.exp(-jnp.square(_GRID[None, :, None] - values[:, None, :]) / (2 * bandwidth**2)), axis=-1)
    p = density / jnp.maximum(jnp.sum(density, axis=-1, keepdims=True), 1e-12)
    return jnp.mean(-jnp.sum(p * jnp.log(jnp.maximum(p, 1e-12)), axis=-1))


def _total_variation(x):
    return jnp.mean(jnp.abs(x[:, 1:] - x[:, :-1])) + jnp.mean(jnp.abs(x[:, :, 1:] - x[:, :, :-1]))


def _loss(graphdef, state, features, skip_tokens, entropy_weight, tv_weight, z, labels):
    x = jax.nn.sigmoid(z)
    logits, calls = record_traced(nnx.merge(graphdef, state), x)
    tokens = [calls[name].out.reshape(x.shape[0], -1, calls[name].out.shape[-1])[:, skip_tokens:] for name in features]
    entropy = jnp.mean(jnp.stack([patch_similarity_entropy(t.astype(jnp.float32)) for t in tokens]))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()
    return ce - entropy_weight * entropy + tv_weight * _total_variation(x)


def synthesize(
    model: nnx.Module,
    n: int,
    *,
    steps: int = 200,
    batch_size: int = 64,
    learning_rate: float = 0.1,
    entropy_weight: float = 1.0,
    tv_weight: float = 0.05,
    seed: int = 0,
    feature_ops: str = FEATURE_OPS,
    skip_tokens: int = 1,
) -> np.ndarray:
    """``n`` synthetic calibration images for ``model`` (a float NNX classifier, unchanged).

    Args:
      model: the float model; its ``config`` gives the image shape and classes
        (``image_shape``, ``num_classes``: the built-in models have it).
      n: images to make.
      steps: Adam steps per batch.
      batch_size: images optimised together.
      learning_rate: Adam's step on the pre-sigmoid pixels.
      entropy_weight: weight of the patch-similarity entropy (maximised).
      tv_weight: weight of the total-variation prior.
      seed: initial noise and target classes.
      feature_ops: regex on op names whose results are the patch tokens.
      skip_tokens: leading tokens that are no patch (the ViT's class token).

    Returns:
      float32 ``(n, H, W, C)`` images in ``[0, 1]``.

    Raises:
      ValueError: the model has no ``config`` with ``image_shape`` and
        ``num_classes``, or no op matches ``feature_ops``.
    """
    config = getattr(model, "config", None)
    if not isinstance(config, dict) or "image_shape" not in config or "num_classes" not in config:
        raise ValueError(f"synthesize: model {type(model).__name__} has no config with image_shape and num_classes")
    shape, classes = tuple(config["image_shape"]), config["num_classes"]
    model.eval()
    probed = probe(model, jnp.zeros((1, *shape), jnp.float32))
    features = [name for name in names(probed) if re.fullmatch(feature_ops, name)]
    if not features:
        raise ValueError(
            f"synthesize: feature_ops={feature_ops!r} matches no op of the model (its ops: {', '.join(names(probed))})"
        )
    graphdef, state = nnx.split(probed)
    tx = optax.adam(learning_rate)
    grad = jax.jit(
        jax.grad(functools.partial(_loss, graphdef, state, tuple(features), skip_tokens, entropy_weight, tv_weight))
    )

    @jax.jit
    def update(z, opt_state, labels):
        # optax mixes float32 hyperparameters with int32 counters (strict promotion rejects that).
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = tx.update(grad(z, labels), opt_state)
            return optax.apply_updates(z, updates), opt_state

    key = jax.random.key(seed)
    out = []
    for start in range(0, n, batch_size):
        k_z, k_y = jax.random.split(jax.random.fold_in(key, start))
        b = min(batch_size, n - start)
        z = jax.random.normal(k_z, (b, *shape), jnp.float32)
        labels = jax.random.randint(k_y, (b,), 0, classes)
        opt_state = tx.init(z)
        for _ in range(steps):
            z, opt_state = update(z, opt_state, labels)
        out.append(np.asarray(jax.nn.sigmoid(z)))
    return np.concatenate(out)
