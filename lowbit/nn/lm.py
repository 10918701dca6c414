"""A small GPT-style byte language model, written with stock Flax NNX layers and raw matmuls.

Decoder-only transformer (Radford et al. 2019): a token embedding plus learned
positions (or rotary positions on queries and keys, Su et al. 2021); ``depth``
pre-LN blocks of causal multi-head self-attention (``qkv`` Linear, ``QK^T`` and
``AV`` as ``jnp.einsum``, ``proj`` Linear) and a GELU MLP (``mlp_in``,
``mlp_out``); a final LayerNorm and a head tied to the embedding
(``x @ embedding.T``, a raw matmul on a parameter).

Nothing here knows lowbit's quantization: ``lowbit.quantize(LM(...), recipe)``
quantizes it like any user model, the tied head included.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowbit.nn.vit import Configured, _Block, config_tuple, sharded

__all__ = ["LM", "POSITIONS", "greedy"]

POSITIONS = ("learned", "rotary")


class LM(Configured, nnx.Module):
    """Decoder-only byte language model (float32; ``lowbit.quantize`` it to train in low precision).

    Args:
      vocab_size: Token ids are in ``[0, vocab_size)``; 256 for bytes.
      context: The longest sequence the model takes (the learned positions' length).
      dim: Token width; divisible by ``heads`` (and, for rotary positions, by 2 per head).
      depth: Number of decoder blocks.
      heads: Attention heads.
      mlp_dim: Hidden width of each block's MLP; None: 4 * dim.
      positions: ``"learned"`` (added to the embedding) or ``"rotary"`` (applied to queries and keys).
      rngs: Parameter initialisation and dropout streams.
      dropout: Dropout rate after the embedding, attention and MLP (0 disables it).

    Raises:
      ValueError: A size is not positive, ``dim`` does not split into ``heads`` (even-sized
        for rotary) heads, ``positions`` is unknown, or ``dropout`` is outside [0, 1).
    """

    def __init__(
        self,
        *,
        vocab_size: int = 256,
        context: int = 64,
        dim: int = 128,
        depth: int = 2,
        heads: int = 4,
        mlp_dim: int | None = None,
        positions: str = "learned",
        rngs: nnx.Rngs,
        dropout: float = 0.0,
    ):
        mlp_dim = 4 * dim if mlp_dim is None else mlp_dim
        for name, value in dict(
            vocab_size=vocab_size, context=context, dim=dim, depth=depth, heads=heads, mlp_dim=mlp_dim
        ).items():
            if value < 1:
                raise ValueError(f"LM: {name} must be >= 1, got {value}")
        if dim % heads:
            raise ValueError(f"LM: dim {dim} is not divisible by heads {heads}")
        if positions not in POSITIONS:
            raise ValueError(f"LM: positions={positions!r} is unknown; allowed: {', '.join(POSITIONS)}")
        if positions == "rotary" and (dim // heads) % 2:
            raise ValueError(f"LM: rotary positions need an even head width, got dim {dim} / heads {heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LM: dropout must be in [0, 1), got {dropout}")
        self._config = config_tuple(
            vocab_size=vocab_size,
            context=context,
            dim=dim,
            depth=depth,
            heads=heads,
            mlp_dim=mlp_dim,
            positions=positions,
            dropout=dropout,
        )
        self.context = context
        # GPT-2's std 0.02 for the tied embedding: larger would start the head with
        # confident, wrong logits.
        # Rows split over the vocabulary only: splitting the width too makes XLA's SPMD
        # partitioner replicate the lookup's gradient under fsdp × tensor meshes.
        self.embed = nnx.Embed(
            vocab_size, dim, embedding_init=sharded(nnx.initializers.normal(0.02), "vocab", None), rngs=rngs
        )
        self.pos_embed = (
            nnx.Param(
                0.02 * jax.random.normal(rngs.params(), (context, dim), jnp.float32),
                out_sharding=(None, "embed"),
                eager_sharding=False,
            )
            if positions == "learned"
            else None
        )
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.blocks = nnx.List(
            [
                _Block(
                    dim, heads, mlp_dim, dropout, rngs, causal=True, rotary=positions == "rotary", hidden_dropout=False
                )
                for _ in range(depth)
            ]
        )
        self.norm = nnx.LayerNorm(dim, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Next-token logits at every position.

        Args:
          tokens: (B, T) integer token ids in ``[0, vocab_size)``, T <= ``context``.

        Returns:
          (B, T, vocab_size) float32 logits; position t depends on tokens[:, :t + 1] only.
        """
        t = tokens.shape[1]
        if t > self.context:
            raise ValueError(f"LM: a sequence of {t} tokens is longer than context={self.context}")
        x = self.embed(tokens)
        if self.pos_embed is not None:
            x = x + self.pos_embed[:t]
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x)
        # The tied head: a raw product with the embedding table's transposed view.
        return self.norm(x) @ self.embed.embedding[...].T


def greedy(model: nnx.Module, prompt: bytes, num_tokens: int, *, context: int) -> bytes:
    """Continues ``prompt`` by ``num_tokens`` bytes, each the argmax of the model's next-byte logits.

    Every call feeds one (1, ``context``) window, the prompt's last bytes padded on the
    right with zeros: position t sees only tokens up to t, so the padding leaves a
    float model's prediction unchanged (a quantized model's per-tensor scales may see
    it), and the fixed shape compiles once.

    Args:
      model: Maps (1, context) int32 byte ids to (1, context, >= 256) logits; in eval mode.
      prompt: At least one byte.
      num_tokens: Bytes to generate, >= 0.
      context: The window length the model takes.

    Returns:
      The ``num_tokens`` generated bytes (the prompt not included).

    Raises:
      ValueError: An empty prompt or a negative ``num_tokens``.
    """
    if not prompt:
        raise ValueError("greedy: prompt must hold at least one byte")
    if num_tokens < 0:
        raise ValueError(f"greedy: num_tokens must be >= 0, got {num_tokens}")
    seq = list(prompt)
    for _ in range(num_tokens):
        window = seq[-context:]
        x = np.zeros((1, context), np.int32)
        x[0, : len(window)] = window
        # Called eagerly: a quantized model runs compiled by itself (and creates its
        # quantizer state on a first call, which it could not inside a trace); a float
        # one runs op by op, each op compiled once.
        logits = model(jnp.asarray(x))
        seq.append(int(jnp.argmax(logits[0, len(window) - 1, :256])))
    return bytes(seq[len(prompt) :])
