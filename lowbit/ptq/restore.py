"""Load a ViT trained by ``lowbit train`` from its checkpoint, and save one back in that layout.

``lowbit train --out DIR`` writes ``DIR/checkpoints/epoch_NNNN/`` (see
``lowbit.trainer.checkpoint``): the whole ``TrainState`` plus ``metadata.json``
naming the model class, its constructor arguments, the recipe, the dataset and
the optimiser's hyperparameters. Restoring needs a template of that exact
structure, so the model is rebuilt from the metadata and the optimiser state is
rebuilt with ``make_optimizer`` (its structure does not depend on the values).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lowbit.nn.vit import ViT
from lowbit import recipes
from lowbit.trainer import checkpoint
from lowbit.trainer.checkpoint import CheckpointError
from lowbit.trainer.step import TrainState, make_optimizer
from lowbit.nn.variables import OverwriteWithGradient

__all__ = ["CheckpointError", "find_checkpoint", "load_vit", "save_vit"]

_FORMAT = checkpoint.FORMAT  # the checkpoint layout version lowbit.trainer writes


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
        return json.loads((path / "metadata.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: cannot read metadata.json ({e})") from e


def _build(path: Path, meta: dict[str, Any]) -> tuple[ViT, Any]:
    """A fresh ViT and the recipe, as the metadata describes them."""
    model_meta = meta.get("model") or {}
    if meta.get("format") != _FORMAT or model_meta.get("type") != "ViT":
        raise CheckpointError(
            f"checkpoint {path} is not a lowbit ViT checkpoint (format {meta.get('format')!r}, "
            f"model {model_meta.get('type')!r}; expected format {_FORMAT} and model 'ViT')")
    config = dict(model_meta.get("config") or {})
    try:
        recipe = recipes.get(config.pop("recipe"))
        config["image_shape"] = tuple(config["image_shape"])
        return ViT(**config, recipe=recipe, rngs=nnx.Rngs(0)), recipe
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: model config {model_meta.get('config')!r} is unusable ({e})") from e


def _template(model: ViT, recipe, hparams: dict[str, Any]) -> tuple[nnx.GraphDef, TrainState]:
    model.train()  # the state the train loop splits (train/eval only flips static flags)
    graphdef, params, overwrite, rest = nnx.split(model, nnx.Param, OverwriteWithGradient, ...)
    tx = make_optimizer(float(hparams.get("learning_rate", 1e-3)), float(hparams.get("weight_decay", 0.0)), 1, 2)
    return graphdef, TrainState(params, overwrite, rest, tx.init(params), recipe.make_loss_scale())


def load_vit(path: str | Path) -> tuple[ViT, dict[str, Any]]:
    """Restore the ViT of a ``lowbit train`` (or ``lowbit finetune``) checkpoint.

    Args:
      path: anything ``find_checkpoint`` accepts.

    Returns:
      ``(model, metadata)``: the model in eval mode with the trained weights,
      and the checkpoint's metadata (``dataset``, ``model``, ``recipe``, ...).

    Raises:
      CheckpointError: no checkpoint, a checkpoint of another model or layout,
        arrays that do not fit the described model, or corrupt data.
    """
    path = find_checkpoint(path)
    meta = _read_metadata(path)
    model, recipe = _build(path, meta)
    _, template = _template(model, recipe, meta.get("hparams") or {})
    state, meta = checkpoint.restore(path, template, {})
    state = jax.tree.map(jnp.asarray, state)
    nnx.update(model, state.params, state.overwrite, state.rest)
    model.eval()
    return model, meta


def save_vit(model: ViT, out: str | Path, epoch: int, metadata: dict[str, Any]) -> Path:
    """Write ``model`` as ``out/checkpoints/epoch_NNNN`` in the layout ``load_vit`` reads.

    The optimiser state is written fresh (zero moments): a fine-tuned model is
    a starting point for PTQ, not a run to resume.

    Args:
      model: a ``ViT`` (its ``config`` names the recipe).
      out: the run directory.
      epoch: the checkpoint's number.
      metadata: extra JSON-serialisable entries (e.g. how it was fine-tuned).

    Returns:
      The checkpoint's path.
    """
    recipe = recipes.get(model.config["recipe"])
    hparams = dict(metadata.get("hparams") or {})
    _, state = _template(model, recipe, hparams)
    model.eval()
    meta = dict(metadata, format=_FORMAT, recipe=recipe.name, model=dict(type="ViT", config=model.config))
    return checkpoint.save(Path(out) / "checkpoints", epoch, state, meta)
