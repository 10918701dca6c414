"""A small Vision Transformer written with stock Flax NNX layers and raw einsums.

Pre-LN encoder (Dosovitskiy et al. 2021): non-overlapping patches, flattened by a
reshape and embedded by an ``nnx.Linear``; a learned class token and learned
positions; ``depth`` blocks of LayerNorm → multi-head self-attention (``qkv``
Linear, ``QK^T`` and ``AV`` as ``jnp.einsum``, ``proj`` Linear) and LayerNorm →
MLP (``mlp_in``, GELU, ``mlp_out``), each added to the residual stream; a final
LayerNorm and a ``head`` on the class token.

Nothing here knows lowbit's quantization: ``lowbit.quantize(ViT(...), recipe)``
quantizes it like any user model (and applies the recipe's precision policy to
its matmuls).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["ViT", "default_patch_size"]

_MAX_TOKENS = 64
_EMBED3 = (None, None, "embed")  # class token and positions: (1, tokens, dim)


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


def sharded(init: nnx.Initializer, *axes: str | None) -> nnx.Initializer:
    """``init`` with logical sharding names (``lowbit.trainer.sharding.DEFAULT_RULES`` maps them to mesh axes).

    Only metadata: the values are what ``init`` draws, and nothing is placed on
    devices until a trainer with a mesh reads the names (``eager_sharding=False``
    lets the model be built outside a mesh).
    """
    return nnx.with_partitioning(init, axes, eager_sharding=False)


def _linear(fan_in: int, fan_out: int, axes: tuple[str | None, str | None], rngs: nnx.Rngs) -> nnx.Linear:
    """An ``nnx.Linear`` whose kernel carries sharding names (Megatron column/row splits over ``heads``/``mlp``)."""
    return nnx.Linear(fan_in, fan_out, kernel_init=sharded(nnx.initializers.lecun_normal(), *axes), rngs=rngs)


def _rotary(x: jax.Array) -> jax.Array:
    """Rotates pairs of channels of (B, heads, T, head_dim) queries or keys by position-dependent angles."""
    t, d = x.shape[-2], x.shape[-1]
    freqs = 1.0 / 10000.0 ** (np.arange(0, d, 2, dtype=np.float32) / d)  # (d/2,), numpy: constants
    angles = np.arange(t, dtype=np.float32)[:, None] * freqs[None, :]  # (T, d/2)
    cos, sin = (jnp.asarray(f(angles), x.dtype) for f in (np.cos, np.sin))
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).reshape(x.shape)


class _Attention(nnx.Module):
    """Multi-head self-attention (the ViT's and, ``causal`` and optionally ``rotary``, the LM's).

    ``causal``: position t attends to positions <= t, the softmax in float32.
    ``rotary``: rotary positions on queries and keys (Su et al. 2021).
    """

    def __init__(self, dim: int, heads: int, rngs: nnx.Rngs, *, causal: bool = False, rotary: bool = False):
        self.heads = heads
        self.causal = causal
        self.rotary = rotary
        self.qkv = _linear(dim, 3 * dim, ("embed", "heads"), rngs)
        self.proj = _linear(dim, dim, ("heads", "embed"), rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, dim = x.shape
        head_dim = dim // self.heads
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, head_dim).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.rotary:
            q, k = _rotary(q), _rotary(k)
        # Scaling q before the product keeps QK^T in range for narrow compute dtypes.
        q = q * jnp.asarray(1 / math.sqrt(head_dim), q.dtype)
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k)
        if self.causal:
            mask = np.tril(np.ones((n, n), bool))  # a constant: no mask input, nothing to quantize
            # The finite minimum rather than -inf: a fully masked row cannot occur, but -inf
            # would turn a quantizer's saturation into NaN.
            scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
            attn = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
        else:
            attn = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bhqk,bhkd->bhqd", attn, v).transpose(0, 2, 1, 3).reshape(b, n, dim)
        return self.proj(out)


class _Block(nnx.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x)).

    ``causal``/``rotary`` go to :class:`_Attention`; ``hidden_dropout`` also drops
    the MLP's hidden activations (the ViT does, the LM does not).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_dim: int,
        dropout: float,
        rngs: nnx.Rngs,
        *,
        causal: bool = False,
        rotary: bool = False,
        hidden_dropout: bool = True,
    ):
        self.hidden_dropout = hidden_dropout
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = _Attention(dim, heads, rngs, causal=causal, rotary=rotary)
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        self.mlp_in = _linear(dim, mlp_dim, ("embed", "mlp"), rngs)
        self.mlp_out = _linear(mlp_dim, dim, ("mlp", "embed"), rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.dropout(self.attn(self.norm1(x)))
        h = jax.nn.gelu(self.mlp_in(self.norm2(x)))
        if self.hidden_dropout:
            h = self.dropout(h)
        return x + self.dropout(self.mlp_out(h))


def config_tuple(**kwargs) -> tuple:
    """Constructor arguments as a tuple, not a dict: NNX keeps plain attributes in the (hashable) graph."""
    return tuple(kwargs.items())


class Configured:
    """``config``: the constructor arguments a model recorded in ``_config``, JSON-serialisable."""

    @property
    def config(self) -> dict:
        """The constructor arguments, JSON-serialisable: what a checkpoint records."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self._config}


class ViT(Configured, nnx.Module):
    """Vision Transformer classifier (float32; ``lowbit.quantize`` it to train in low precision).

    Args:
      image_shape: (H, W, C) of the input images.
      num_classes: Number of output logits.
      patch_size: Side of the square, non-overlapping patches; must divide H and W.
        None picks :func:`default_patch_size`.
      dim: Token width; divisible by ``heads``.
      depth: Number of transformer blocks.
      heads: Attention heads.
      mlp_dim: Hidden width of each block's MLP.
      rngs: Parameter initialisation and dropout streams.
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
        rngs: nnx.Rngs,
        dropout: float = 0.0,
    ):
        h, w, c = image_shape
        patch_size = default_patch_size(image_shape) if patch_size is None else patch_size
        for name, value in dict(
            num_classes=num_classes, patch_size=patch_size, dim=dim, depth=depth, heads=heads, mlp_dim=mlp_dim
        ).items():
            if value < 1:
                raise ValueError(f"ViT: {name} must be >= 1, got {value}")
        if dim % heads:
            raise ValueError(f"ViT: dim {dim} is not divisible by heads {heads}")
        if h % patch_size or w % patch_size:
            raise ValueError(f"ViT: patch_size {patch_size} does not divide the {h}x{w} image")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"ViT: dropout must be in [0, 1), got {dropout}")
        self._config = config_tuple(
            image_shape=(h, w, c),
            num_classes=num_classes,
            patch_size=patch_size,
            dim=dim,
            depth=depth,
            heads=heads,
            mlp_dim=mlp_dim,
            dropout=dropout,
        )
        self.patch_size = patch_size
        num_patches = (h // patch_size) * (w // patch_size)
        self.patch_embed = _linear(patch_size * patch_size * c, dim, (None, "embed"), rngs)
        self.cls_token = nnx.Param(jnp.zeros((1, 1, dim), jnp.float32), out_sharding=_EMBED3, eager_sharding=False)
        # Small positions (ViT/DeiT use std 0.02) let patch content dominate early on.
        self.pos_embed = nnx.Param(
            0.02 * jax.random.normal(rngs.params(), (1, num_patches + 1, dim), jnp.float32),
            out_sharding=_EMBED3,
            eager_sharding=False,
        )
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.blocks = nnx.List([_Block(dim, heads, mlp_dim, dropout, rngs) for _ in range(depth)])
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.head = _linear(dim, num_classes, ("embed", None), rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        """Classifies a batch of images.

        Args:
          images: (B, H, W, C) array.

        Returns:
          (B, num_classes) float32 logits.
        """
        x = self.patch_embed(self._patches(images.astype(jnp.float32)))
        cls = jnp.broadcast_to(self.cls_token[...], (x.shape[0], 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...]
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))

    def _patches(self, images: jax.Array) -> jax.Array:
        """(B, H, W, C) → (B, num_patches, p·p·C), patches in row-major order."""
        b, h, w, c = images.shape
        p = self.patch_size
        x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, (h // p) * (w // p), p * p * c)
