"""The built-in models of ``lowbit train --model``, and loading a user's model factory.

Every model is a plain Flax NNX module; ``lowbit.quantize`` applies the recipe. An image
model (``vit``, ``mlp``, ``cnn``) classifies (B, H, W, C) images and its factory is called
as ``factory(image_shape=(H, W, C), num_classes=K, rngs=nnx.Rngs(seed))``; a text model
(``lm``, in :data:`TEXT_MODELS`) maps (B, T) token ids to (B, T, vocab) next-token logits
and is called as ``factory(vocab_size=V, context=T, rngs=nnx.Rngs(seed))``. Either
returns an ``nnx.Module``.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowbit.nn.lm import LM
from lowbit.nn.vit import Configured, ViT, config_tuple

__all__ = ["CNN", "LM", "MLP", "MODELS", "TEXT_MODELS", "build", "example_input", "factory"]


class MLP(Configured, nnx.Module):
    """Flattened pixels → two ReLU hidden layers → logits.

    Args:
      image_shape: (H, W, C).
      num_classes: logits out.
      rngs: parameter initialisation.
      hidden: widths of the hidden layers.
    """

    def __init__(
        self,
        *,
        image_shape: tuple[int, int, int],
        num_classes: int,
        rngs: nnx.Rngs,
        hidden: tuple[int, ...] = (256, 128),
    ):
        sizes = (math.prod(image_shape), *hidden)
        self.hidden = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes, sizes[1:])])
        self.head = nnx.Linear(sizes[-1], num_classes, rngs=rngs)
        self._config = config_tuple(image_shape=tuple(image_shape), num_classes=num_classes, hidden=tuple(hidden))

    def __call__(self, images: jax.Array) -> jax.Array:
        x = images.reshape(images.shape[0], -1).astype(jnp.float32)
        for layer in self.hidden:
            x = jax.nn.relu(layer(x))
        return self.head(x)


class CNN(Configured, nnx.Module):
    """Two 3x3 convolutions (the second with stride 2) → a ReLU hidden layer → logits.

    Args:
      image_shape: (H, W, C).
      num_classes: logits out.
      rngs: parameter initialisation.
      channels: output channels of the two convolutions.
      hidden: width of the dense hidden layer.
    """

    def __init__(
        self,
        *,
        image_shape: tuple[int, int, int],
        num_classes: int,
        rngs: nnx.Rngs,
        channels: tuple[int, int] = (16, 32),
        hidden: int = 128,
    ):
        h, w, c = image_shape
        self.conv1 = nnx.Conv(c, channels[0], (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(channels[0], channels[1], (3, 3), strides=(2, 2), rngs=rngs)
        flat = math.ceil(h / 2) * math.ceil(w / 2) * channels[1]
        self.fc = nnx.Linear(flat, hidden, rngs=rngs)
        self.head = nnx.Linear(hidden, num_classes, rngs=rngs)
        self._config = config_tuple(
            image_shape=tuple(image_shape), num_classes=num_classes, channels=tuple(channels), hidden=hidden
        )

    def __call__(self, images: jax.Array) -> jax.Array:
        x = jax.nn.relu(self.conv1(images.astype(jnp.float32)))
        x = jax.nn.relu(self.conv2(x))
        return self.head(jax.nn.relu(self.fc(x.reshape(x.shape[0], -1))))


MODELS: dict[str, Callable[..., nnx.Module]] = {"vit": ViT, "mlp": MLP, "cnn": CNN, "lm": LM}
TEXT_MODELS = frozenset({"lm"})
"""The built-in models of token sequences (the others classify images)."""


def _allowed() -> str:
    images = ", ".join(name for name in MODELS if name not in TEXT_MODELS)
    return f"{images} or PKG.MODULE:FACTORY for images; {', '.join(sorted(TEXT_MODELS))} or PKG.MODULE:FACTORY for text"


def factory(spec: str) -> Callable[..., nnx.Module]:
    """The model factory named by ``spec``: ``vit``, ``mlp``, ``cnn``, ``lm`` or ``PKG.MODULE:FACTORY``.

    Raises:
      ValueError: an unknown name, a module that does not import, or a missing or
        non-callable attribute; the message says what is allowed.
    """
    if not isinstance(spec, str):
        raise TypeError(f"model={spec!r} is invalid; allowed: {_allowed()}")
    if spec in MODELS:
        return MODELS[spec]
    module_name, colon, attr = spec.partition(":")
    if not colon or not module_name or not attr:
        raise ValueError(f"model={spec!r} is invalid; allowed: {_allowed()}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"model={spec!r}: cannot import {module_name!r} ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"model={spec!r}: {module_name} has no callable {attr!r}")
    return fn


def build(
    spec: str,
    *,
    seed: int,
    image_shape: tuple[int, int, int] | None = None,
    num_classes: int | None = None,
    vocab_size: int | None = None,
    context: int | None = None,
) -> nnx.Module:
    """A float model from ``spec`` (see ``factory``) for the dataset.

    Pass ``image_shape`` and ``num_classes`` for images, or ``vocab_size`` and
    ``context`` for token sequences: the factory is called with those two.

    Raises:
      ValueError: a bad ``spec`` (see ``factory``), or not exactly one of the two pairs given.
      TypeError: the factory did not return an ``nnx.Module``.
    """
    images = dict(image_shape=None if image_shape is None else tuple(image_shape), num_classes=num_classes)
    tokens = dict(vocab_size=vocab_size, context=context)
    given = [pair for pair in (images, tokens) if any(v is not None for v in pair.values())]
    if len(given) != 1 or any(v is None for v in given[0].values()):
        raise ValueError(
            f"model={spec!r}: pass image_shape= and num_classes= (images) or vocab_size= and context= (tokens)"
        )
    model = factory(spec)(**given[0], rngs=nnx.Rngs(seed))
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model={spec!r} returned {type(model).__name__}; allowed: a flax.nnx.Module")
    return model


def example_input(config: dict) -> np.ndarray:
    """One zero input of the model a ``config`` describes: ``(1, *image_shape)`` float32 or ``(1, context)`` int32.

    Raises:
      KeyError: the config has neither ``image_shape`` nor ``context``.
    """
    if "image_shape" in config:
        return np.zeros((1, *config["image_shape"]), np.float32)
    return np.zeros((1, int(config["context"])), np.int32)
