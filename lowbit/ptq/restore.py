"""Load the model trained by ``lowbit train`` from its checkpoint, and save one back in that layout.

``lowbit train --out DIR`` writes ``DIR/checkpoints/epoch_NNNN/`` (see
``lowbit.trainer.checkpoint``): the whole ``TrainState`` of the quantized model
plus ``metadata.json`` naming the recipe, the dataset, the optimiser's
hyperparameters and the model: ``model.type`` (its class name), ``model.config``
(its constructor arguments: ``image_shape``, ``num_classes`` and the rest) and,
for a user's model, ``model.spec``, the ``PKG.MODULE:FACTORY`` string of
``lowbit train --model``. Restoring needs a template of that exact structure, so
the model is rebuilt: ``lowbit.nn.models.factory(spec)(**config,
rngs=nnx.Rngs(0))``, where a checkpoint without ``spec`` names a built-in model
by its class (``ViT`` -> ``vit``, ``MLP`` -> ``mlp``, ``CNN`` -> ``cnn``); it is
quantized with the recipe (its ops discovered on one zero image, so quantizer
state exists) and the optimiser state is rebuilt with ``make_optimizer`` (its
structure does not depend on the values).

``load_model`` returns the *float* model with the trained weights: every
variable of the quantized model except the ops' quantizer state (``lowbit_*``
children), which is what PTQ and fine-tuning start from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowbit import recipes
from lowbit.nn import models
from lowbit.nn.quantize import discover, quantize
from lowbit.trainer import checkpoint
from lowbit.trainer.checkpoint import CheckpointError
from lowbit.trainer.step import init_state, make_optimizer

__all__ = ["BUILT_IN", "CheckpointError", "find_checkpoint", "load_model", "save_model"]

_FORMAT = checkpoint.FORMAT  # the checkpoint layout version lowbit.trainer writes
# Class name of a built-in model -> its ``--model`` name.
BUILT_IN = {factory.__name__: name for name, factory in models.MODELS.items()}


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory that ``path`` names.

    Args:
      path: a checkpoint (``epoch_NNNN``), a directory of checkpoints, or a run
        directory holding ``checkpoints/`` (what ``lowbit train --out`` was given).

    Returns:
      The latest checkpoint found there.

    Raises:
      CheckpointError: nothing there looks like a checkpoint.
    """
    path = Path(path)
    if (path / "metadata.json").is_file():
        return path
    for directory in (path, path / "checkpoints"):
        found = checkpoint.latest(directory)
        if found is not None:
            return found
    where = "does not exist" if not path.exists() else "holds no metadata.json, epoch_NNNN/ or checkpoints/"
    raise CheckpointError(f"checkpoint {path} {where} (pass the --out directory of `lowbit train`)")


def _read_metadata(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / "metadata.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: cannot read metadata.json ({e})") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {path}: metadata.json holds a {type(meta).__name__}, not a JSON object")
    return meta


def _spec(path: Path, meta: dict[str, Any]) -> str:
    model_meta = meta.get("model") or {}
    spec = model_meta.get("spec") or BUILT_IN.get(model_meta.get("type"))
    if meta.get("format") != _FORMAT or not isinstance(spec, str):
        raise CheckpointError(
            f"checkpoint {path} is not a lowbit model checkpoint (format {meta.get('format')!r}, model "
            f"{model_meta.get('type')!r}; expected format {_FORMAT} and a built-in model "
            f"({', '.join(BUILT_IN)}) or a 'spec' naming the factory)"
        )
    return spec


def _build(path: Path, meta: dict[str, Any]) -> tuple[nnx.Module, Any, tuple]:
    """A fresh float model, the recipe and one example input, as the metadata describes them."""
    spec = _spec(path, meta)
    config = (meta.get("model") or {}).get("config")
    try:
        recipe = recipes.get(meta.get("recipe"))
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(config).items()}
        model = models.factory(spec)(**kwargs, rngs=nnx.Rngs(0))
        example = models.example_input(kwargs)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {path}: model {spec!r} with config {config!r} and recipe "
            f"{meta.get('recipe')!r} cannot be rebuilt ({e})"
        ) from e
    if not isinstance(model, nnx.Module):
        raise CheckpointError(f"checkpoint {path}: model {spec!r} built a {type(model).__name__}, not an NNX module")
    return model, recipe, example


def _template(model: nnx.Module, recipe, hparams: dict[str, Any], example: np.ndarray):
    """``(quantized model, TrainState)`` of the structure the train loop checkpoints."""
    qmodel = quantize(model, recipe)
    discover(qmodel, jnp.asarray(example))
    tx = make_optimizer(float(hparams.get("learning_rate", 1e-3)), float(hparams.get("weight_decay", 0.0)), 1, 2)
    _, state = init_state(qmodel, tx, policy=recipe.policy, loss_scale=recipe.make_loss_scale())
    return qmodel, state


def _float_state(qmodel: nnx.Module) -> nnx.State:
    """The variables of ``qmodel`` that its float model has: all but the ops' quantizer state."""
    flat = [
        (p, v)
        for p, v in nnx.to_flat_state(nnx.state(qmodel))
        if not any(isinstance(k, str) and k.startswith("lowbit_") for k in p)
    ]
    return nnx.from_flat_state(flat)


def load_model(path: str | Path) -> tuple[nnx.Module, dict[str, Any]]:
    """Restore the float model of a ``lowbit train`` (or ``lowbit finetune``) checkpoint.

    Args:
      path: anything ``find_checkpoint`` accepts.

    Returns:
      ``(model, metadata)``: the float model in eval mode with the trained
      weights (without the recipe's quantizer state), and the checkpoint's
      metadata (``dataset``, ``model``, ``recipe``, ...).

    Raises:
      CheckpointError: no checkpoint, a checkpoint of a model lowbit cannot
        rebuild or of another layout, arrays that do not fit the described
        model, or corrupt data.
    """
    path = find_checkpoint(path)
    meta = _read_metadata(path)
    model, recipe, example = _build(path, meta)
    qmodel, template = _template(model, recipe, meta.get("hparams") or {}, example)
    state, meta = checkpoint.restore(path, template, {})
    state = jax.tree.map(jnp.asarray, state)
    nnx.update(qmodel, state.params, state.overwrite, state.rest)
    nnx.update(model, _float_state(qmodel))
    model.eval()
    return model, meta


def save_model(
    model: nnx.Module,
    out: str | Path,
    epoch: int,
    metadata: dict[str, Any],
    *,
    recipe: str = "fp32",
    spec: str | None = None,
) -> Path:
    """Write float ``model`` as ``out/checkpoints/epoch_NNNN`` in the layout ``load_model`` reads.

    The optimiser state is written fresh (zero moments): a fine-tuned model is
    a starting point for PTQ, not a run to resume.

    Args:
      model: a float NNX model with a ``config`` (its constructor arguments:
        the built-in models have it).
      out: the run directory.
      epoch: the checkpoint's number.
      metadata: extra JSON-serialisable entries (e.g. how it was fine-tuned).
      recipe: the float recipe it runs in (``fp32``, ``bf16``, ``fp16``).
      spec: the factory of a user's model (``PKG.MODULE:FACTORY``); None for a built-in one.

    Returns:
      The checkpoint's path.

    Raises:
      ValueError: ``model`` has no ``config``, or ``recipe`` quantizes (this saves float models).
    """
    recipe_obj = recipes.get(recipe)
    if recipe_obj.quantized:
        raise ValueError(f"recipe={recipe!r} is invalid; allowed: a float recipe (fp32, bf16, fp16)")
    config = getattr(model, "config", None)
    if not isinstance(config, dict) or not ("image_shape" in config or "context" in config):
        raise ValueError(
            f"model {type(model).__name__} has no config (its constructor arguments, image_shape or context "
            "included) to save"
        )
    _, state = _template(model, recipe_obj, dict(metadata.get("hparams") or {}), models.example_input(config))
    model_meta = dict(type=type(model).__name__, config=config) | ({"spec": spec} if spec is not None else {})
    meta = dict(metadata, format=_FORMAT, recipe=recipe_obj.name, model=model_meta)
    return checkpoint.save(Path(out) / "checkpoints", epoch, state, meta)
