"""A small Vision Transformer whose every matmul goes through a training recipe.

Pre-LN encoder (Dosovitskiy et al. 2021): non-overlapping patches, flattened by a
reshape and embedded by a ``QLinear`` (role ``patch``); a learned class token and
learned positions; ``depth`` blocks of LayerNorm → multi-head self-attention
(``qkv``, ``attn_qk``, ``attn_av``, ``proj``) and LayerNorm → MLP (``mlp_in``, GELU,
``mlp_out``), each added to the residual stream; a final LayerNorm and a ``head``
on the class token.

Dtypes follow ``recipe.policy``: parameters in ``param_dtype``, activations,
softmax and LayerNorm in ``compute_dtype``, logits in ``output_dtype``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from lowbit.nn.layers import QEinsum, QLinear
from lowbit.recipes import Recipe

__all__ = ["ViT", "default_patch_size"]

_MAX_TOKENS = 64


def default_patch_size(image_shape: tuple[int, int, int]) -> int:
    """The smallest patch size >= 2 that tiles the image into at most 64 patches.

    8x8 digits get 2 (16 patches), 28x28 Fashion-MNIST 4 (49) and 32x32 CIFAR-10 4
    (64): fine enough to learn, few enough tokens to train on a CPU.

    Raises:
      ValueError: No such patch size divides both height and width.
    """
    h, w, _ = image_shape
    for p in range(2, min(h, w) + 1):
        if h % p == 0 and w % p == 0 and (h // p) * (w // p) <= _MAX_TOKENS:
            return p
    raise ValueError(f"no patch size >= 2 divides the {h}x{w} image into at most {_MAX_TOKENS} patches")


def _layer_norm(norm: nnx.LayerNorm, x: jax.Array) -> jax.Array:
    # Flax reduces the mean and variance in float32 by promoting the input, which
    # jax_numpy_dtype_promotion="strict" rejects for float16/bfloat16; the output
    # is still cast back to the compute dtype (norm.dtype).
    with jax.numpy_dtype_promotion("standard"):
        return norm(x)


def _norm(dim: int, recipe: Recipe, rngs: nnx.Rngs) -> nnx.LayerNorm:
    policy = recipe.policy
    return nnx.LayerNorm(dim, dtype=policy.compute_dtype, param_dtype=policy.param_dtype, rngs=rngs)


class _Attention(nnx.Module):
    """Multi-head self-attention with quantized projections and products."""

    def __init__(self, dim: int, heads: int, recipe: Recipe, rngs: nnx.Rngs):
        self.heads = heads
        self.qkv = QLinear(dim, 3 * dim, recipe=recipe, role="qkv", rngs=rngs)
        self.qk = QEinsum("bhqd,bhkd->bhqk", recipe=recipe, role="attn_qk", rngs=rngs)
        self.av = QEinsum("bhqk,bhkd->bhqd", recipe=recipe, role="attn_av", rngs=rngs)
        self.proj = QLinear(dim, dim, recipe=recipe, role="proj", rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, dim = x.shape
        head_dim = dim // self.heads
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, head_dim).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        # Scaling q before the product keeps QK^T in range for narrow compute dtypes.
        q = q * jnp.asarray(1 / math.sqrt(head_dim), q.dtype)
        attn = jax.nn.softmax(self.qk(q, k), axis=-1)
        out = self.av(attn, v).transpose(0, 2, 1, 3).reshape(b, n, dim)
        return self.proj(out)


class _Block(nnx.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float, recipe: Recipe, rngs: nnx.Rngs):
        self.norm1 = _norm(dim, recipe, rngs)
        self.attn = _Attention(dim, heads, recipe, rngs)
        self.norm2 = _norm(dim, recipe, rngs)
        self.mlp_in = QLinear(dim, mlp_dim, recipe=recipe, role="mlp_in", rngs=rngs)
        self.mlp_out = QLinear(mlp_dim, dim, recipe=recipe, role="mlp_out", rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.dropout(self.attn(_layer_norm(self.norm1, x)))
        h = jax.nn.gelu(self.mlp_in(_layer_norm(self.norm2, x)))
        return x + self.dropout(self.mlp_out(self.dropout(h)))


class ViT(nnx.Module):
    """Vision Transformer classifier; every matmul is quantized by ``recipe``.

    Args:
      image_shape: (H, W, C) of the input images.
      num_classes: Number of output logits.
      patch_size: Side of the square, non-overlapping patches; must divide H and W.
        None picks :func:`default_patch_size`.
      dim: Token width; divisible by ``heads``.
      depth: Number of transformer blocks.
      heads: Attention heads.
      mlp_dim: Hidden width of each block's MLP.
      recipe: The training recipe: quantizers per matmul role and the precision policy.
      rngs: Parameter initialisation, dropout and stochastic-rounding streams.
      dropout: Dropout rate after the embedding, attention and MLP (0 disables it).

    Raises:
      ValueError: A size is not positive, ``dim`` is not divisible by ``heads``, or
        ``patch_size`` does not divide the image.
    """

    def __init__(
        self,
        *,
        image_shape: tuple[int, int, int],
        num_classes: int,
        patch_size: int | None = None,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_dim: int = 128,
        recipe: Recipe,
        rngs: nnx.Rngs,
        dropout: float = 0.0,
    ):
        h, w, c = image_shape
        patch_size = default_patch_size(image_shape) if patch_size is None else patch_size
        for name, value in dict(num_classes=num_classes, patch_size=patch_size, dim=dim, depth=depth,
                                heads=heads, mlp_dim=mlp_dim).items():
            if value < 1:
                raise ValueError(f"ViT: {name} must be >= 1, got {value}")
        if dim % heads:
            raise ValueError(f"ViT: dim {dim} is not divisible by heads {heads}")
        if h % patch_size or w % patch_size:
            raise ValueError(f"ViT: patch_size {patch_size} does not divide the {h}x{w} image")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"ViT: dropout must be in [0, 1), got {dropout}")
        # A tuple, not a dict: NNX keeps plain attributes in the (hashable) graph definition.
        self._config = (("image_shape", (h, w, c)), ("num_classes", num_classes), ("patch_size", patch_size),
                        ("dim", dim), ("depth", depth), ("heads", heads), ("mlp_dim", mlp_dim),
                        ("dropout", dropout), ("recipe", recipe.name))
        self.policy = recipe.policy
        self.patch_size = patch_size
        num_patches = (h // patch_size) * (w // patch_size)
        param_dtype = recipe.policy.param_dtype
        self.patch_embed = QLinear(patch_size * patch_size * c, dim, recipe=recipe, role="patch", rngs=rngs)
        self.cls_token = nnx.Param(jnp.zeros((1, 1, dim), param_dtype))
        # Small positions (ViT/DeiT use std 0.02) let patch content dominate early on.
        self.pos_embed = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, num_patches + 1, dim), param_dtype))
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.blocks = nnx.List([_Block(dim, heads, mlp_dim, dropout, recipe, rngs) for _ in range(depth)])
        self.norm = _norm(dim, recipe, rngs)
        self.head = QLinear(dim, num_classes, recipe=recipe, role="head", rngs=rngs)

    @property
    def config(self) -> dict:
        """The constructor arguments (recipe by name), JSON-serialisable: what a checkpoint records."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self._config}

    def __call__(self, images: jax.Array) -> jax.Array:
        """Classifies a batch of images.

        Args:
          images: (B, H, W, C) array.

        Returns:
          (B, num_classes) logits in the policy's output dtype.
        """
        compute = self.policy.compute_dtype
        x = self.patch_embed(self._patches(images.astype(compute)))
        cls = jnp.broadcast_to(self.cls_token[...].astype(compute), (x.shape[0], 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...].astype(compute)
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x)
        logits = self.head(_layer_norm(self.norm, x[:, 0]))
        return logits.astype(self.policy.output_dtype)

    def _patches(self, images: jax.Array) -> jax.Array:
        """(B, H, W, C) → (B, num_patches, p·p·C), patches in row-major order."""
        b, h, w, c = images.shape
        p = self.patch_size
        x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, (h // p) * (w // p), p * p * c)
