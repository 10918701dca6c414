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
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lowbit.ptq.capture import layer_output, quantized_layers, recording, role_of

__all__ = ["patch_similarity_entropy", "synthesize"]

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


def _loss(graphdef, state, entropy_weight, tv_weight, z, labels):
    model = nnx.merge(graphdef, state)
    x = jax.nn.sigmoid(z)
    layers = quantized_layers(model)
    with recording(layers) as calls:
        logits = model(x)
    entropy = jnp.mean(jnp.stack([
        patch_similarity_entropy(layer_output(layer, *calls[name][0])[:, 1:])
        for name, layer in layers.items() if role_of(name) == "proj"]))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()
    return ce - entropy_weight * entropy + tv_weight * _total_variation(x)


def synthesize(model: nnx.Module, n: int, *, steps: int = 200, batch_size: int = 64, learning_rate: float = 0.1,
               entropy_weight: float = 1.0, tv_weight: float = 0.05, seed: int = 0) -> np.ndarray:
    """``n`` synthetic calibration images for ``model`` (a float ViT, unchanged).

    Args:
      model: the float model; its ``config`` gives the image shape and classes.
      n: images to make.
      steps: Adam steps per batch.
      batch_size: images optimised together.
      learning_rate: Adam's step on the pre-sigmoid pixels.
      entropy_weight: weight of the patch-similarity entropy (maximised).
      tv_weight: weight of the total-variation prior.
      seed: initial noise and target classes.

    Returns:
      float32 ``(n, H, W, C)`` images in ``[0, 1]``.
    """
    model.eval()
    graphdef, state = nnx.split(model)
    shape, classes = tuple(model.config["image_shape"]), model.config["num_classes"]
    tx = optax.adam(learning_rate)
    grad = jax.jit(jax.grad(functools.partial(_loss, graphdef, state, entropy_weight, tv_weight)))

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
