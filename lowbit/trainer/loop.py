"""The train loop: any Flax NNX classifier or language model, one recipe, data parallel over N devices.

``train`` runs AdamW (linear warmup, then cosine decay) with the recipe's precision
policy and loss scaling through the public step (``lowbit.trainer.step``),
evaluates test accuracy (for a language model: held-out loss, perplexity and bits
per byte) after every epoch, writes an atomic checkpoint per epoch
(keeping the last ``keep``) and, at the end, ``metrics.json`` and ``curves.png``.

Safe to stop and rerun:

* SIGINT (Ctrl-C) or SIGTERM stops the run at the next step boundary: the exact
  state is checkpointed (mid-epoch included), and ``resume=True`` continues it
  bit for bit (the data order depends only on ``(seed, epoch)``).
* An ``out_dir`` holding an earlier run is never silently reused: pass
  ``resume=True`` or ``overwrite=True``. A lock file keeps a second process out.
* Steps with a non-finite loss or gradient are skipped, counted, warned about
  once per epoch, and fail the run past ``max_skipped``. So are steps on a batch
  with NaN/inf pixels, whatever the recipe (a quantizer would saturate an inf
  silently); such images, in the training or the test data, are reported
  before training starts.

Parallelism is GSPMD over a ``data`` × ``fsdp`` × ``tensor`` mesh
(``lowbit.trainer.sharding``): batches split over ``data`` and ``fsdp``, parameters
as the model annotates them, and the step written for the global arrays.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import itertools
import json
import math
import os
import statistics
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lowbit import data as lowbit_data
from lowbit import recipes
from lowbit.nn.describe import describe
from lowbit.nn.layers import QConv, QEinsum, QLinear
from lowbit.nn.quantize import is_quantized
from lowbit.nn.quantize import ops as quantized_ops
from lowbit.trainer import checkpoint, metadata, report, sharding
from lowbit.trainer.interrupt import StopRequest
from lowbit.trainer.lock import RunLock, TrainingError
from lowbit.trainer.step import (
    TrainState,
    init_state,
    make_eval_step,
    make_lm_eval_step,
    make_optimizer,
    make_train_step,
)
from lowbit.training.policy import Policy

__all__ = ["MAX_SEED", "TrainState", "TrainingError", "check_seed", "make_optimizer", "train"]

_CHECKPOINTS = "checkpoints"
MAX_SEED = 2**63 - 1
"""The largest ``seed`` (jax keys and numpy generators take 64-bit seeds)."""
_REPORTS = ("metrics.json", "curves.png")


def train(
    model: nnx.Module,
    dataset: lowbit_data.Dataset,
    *,
    recipe: recipes.Recipe | str,
    epochs: int = 30,
    batch_size: int = 64,
    seed: int = 0,
    learning_rate: float = 3e-3,
    weight_decay: float = 0.05,
    warmup: float = 2.0,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
    keep: int = 2,
    max_skipped: int | None = None,
    devices: int = 1,
    mesh: str | Mapping[str, int] | Mesh | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Trains ``model`` on ``dataset`` with ``recipe``; deterministic given ``seed``.

    Every argument, the labels and the model's output shape are checked before
    anything is compiled.

    Args:
      model: An NNX classifier mapping (B, H, W, C) images to (B, classes) logits,
        with classes >= ``dataset.num_classes``, or a language model mapping (B, T)
        int token ids to (B, T, vocab) next-token logits, initialised by the caller (from
        ``seed`` for a reproducible run): a model from ``lowbit.quantize(model,
        recipe)`` (a quantized linen model goes through
        ``flax.nnx.bridge.ToNNX(...).lazy_init(x)``), or one built from lowbit's
        explicit layers (``QLinear``...), or any float model for a recipe that
        quantizes nothing (``fp32``, ``bf16``, ``fp16``). It is updated in place
        with the final (or, when stopped, the current) state and left in eval mode.
      dataset: Training and test data (``lowbit.data.load``); integer labels in
        ``[0, dataset.num_classes)``. Integer inputs of shape (N, T) with (N, T)
        targets (``lowbit.text.TextDataset``) are token windows: the model is
        trained on next-token cross-entropy over every position, and token ids
        outside ``[0, num_classes)`` are an error. Images with NaN or inf pixels are
        reported up front with a warning, whatever the recipe: a training
        batch holding one is skipped like a step with a non-finite loss, and
        such a test image is scored as misclassified.
      recipe: A ``lowbit.recipes.Recipe`` or its name: the precision policy and
        the loss scale; for a model from ``lowbit.quantize``, the recipe it was
        quantized with.
      epochs: Passes over the training set.
      batch_size: Global batch (split across ``devices``); the last partial
        batch of each epoch is dropped.
      seed: Data order: epoch ``e`` is shuffled with ``seed=(seed, e)``; an
        integer in ``[0, 2**63 - 1]``.
      learning_rate: Peak learning rate.
      weight_decay: AdamW decoupled weight decay (matrices only).
      warmup: Linear warmup length in epochs (may be fractional).
      out_dir: Where checkpoints (``checkpoints/``), ``metrics.json`` and
        ``curves.png`` go, relative to the working directory or absolute;
        created if missing. None writes nothing.
      resume: Continue from the newest intact checkpoint in ``out_dir``, bit-exactly
        where the earlier run stopped (damaged newer ones are skipped with a
        warning); with no checkpoint there, start fresh.
      overwrite: Without ``resume``, an ``out_dir`` that already holds
        checkpoints or reports is an error unless this is True; then only those
        files (what lowbit wrote) are deleted before training.
      keep: How many checkpoints to keep (the newest).
      max_skipped: The run fails once more steps than this were skipped for a
        non-finite loss or gradient. None: 10% of the run's steps, at least 16
        (room for a dynamic loss scale to back off from 2**15 to 1).
      devices: Data-parallel device count (the first ``devices`` of ``jax.devices()``);
        the same as ``mesh={"data": devices}``.
      mesh: A ``data`` × ``fsdp`` × ``tensor`` device mesh
        (``lowbit.trainer.sharding``): ``"data=2,fsdp=2,tensor=2"``, a mapping
        of axis to size, or a ``jax.sharding.Mesh`` with those axis names. The
        batch is split over ``data`` and ``fsdp``; parameters and their optimizer
        moments take the model's sharding annotations (``nnx.with_partitioning``
        names: mesh axes, or the logical names of
        ``sharding.DEFAULT_RULES``), unannotated matrices are split over
        ``fsdp``; quantizer state is replicated. Quantizer statistics are global
        reductions whatever the layout. None: ``devices`` decides.
      progress: Show a progress bar with an ETA (only on a terminal). Either way,
        one line per epoch is printed and flushed.

    Returns:
      The metrics also written to ``metrics.json`` (valid JSON: NaN is None):
      recipe, dataset, epochs, seed, hyperparameters, ``test_accuracy``
      (fraction), ``train_time_s``, ``step_time_ms`` (median step after
      compilation), ``final_loss``, ``skipped_steps``, ``max_skipped``, per-epoch
      ``history``; for token data also ``test_loss`` (held-out cross-entropy per
      token, nats), ``perplexity`` and ``bits_per_byte`` (``test_loss / ln 2``),
      with ``test_accuracy`` the next-token accuracy; ``stopped`` (a signal
      ended the run early), ``stopped_at``
      (``{"epoch": completed epochs, "step": steps into the next}`` or None) and
      ``curves`` (``"curves.png"`` if written, else None).

    Raises:
      TypeError: An argument of the wrong type (a bool given as 0/1 or "yes"
        included), a ``dataset`` that is not a Dataset, or non-integer labels.
      ValueError: Invalid arguments or data (labels or token ids out of range, a seed
        outside ``[0, 2**63 - 1]``, a model that does not take the images or
        whose output does not fit: checked before the model's first call),
        too few devices, an unwritable ``out_dir``, or one holding an earlier
        run without ``resume``/``overwrite``.
      TrainingError: Another process is using ``out_dir``, or more than
        ``max_skipped`` steps were skipped.
      checkpoint.CheckpointError: ``resume`` found only damaged checkpoints, or
        (``IncompatibleCheckpointError``) one from a different run (recipe,
        dataset, model or hyperparameters).
    """
    recipe = _check_recipe(model, recipe)
    _check_args(
        model,
        recipe,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        warmup=warmup,
        out_dir=out_dir,
        resume=resume,
        overwrite=overwrite,
        keep=keep,
        max_skipped=max_skipped,
        devices=devices,
        progress=progress,
    )
    steps_per_epoch = _check_data(dataset, batch_size)
    mesh = _mesh(devices, batch_size, mesh)
    ops = None
    if is_quantized(model) and not quantized_ops(model):
        # A quantized model creates its quantizer state on its first call; it must
        # exist before the model is split, not appear inside the traced step. That
        # call is the shape check's first half: a model that does not take the
        # images fails here with the shape check's message, not a raw jax error.
        first = dataset.x_train[:1]
        try:
            ops = describe(model, recipe.policy.cast_to_compute(first))
        except Exception as e:
            raise _does_not_fit(first.shape, e, _inputs(dataset)) from e
    _check_model(model, dataset, batch_size, recipe.policy)
    _warn_nonfinite(dataset)
    out = _prepare_out_dir(out_dir)
    # One process (of a jax.distributed run) owns the directory: it locks and writes; the others read.
    with RunLock(out) if out is not None and checkpoint.is_writer() else contextlib.nullcontext():
        return _train(
            model,
            dataset,
            recipe,
            mesh,
            out,
            steps_per_epoch,
            ops if progress else None,
            epochs=epochs,
            batch_size=batch_size,
            seed=seed,
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            warmup=warmup,
            resume=resume,
            overwrite=overwrite,
            keep=keep,
            max_skipped=max_skipped,
            devices=devices,
            progress=progress,
        )


def _train(
    model,
    dataset,
    recipe,
    mesh,
    out,
    steps_per_epoch,
    ops,
    *,
    epochs,
    batch_size,
    seed,
    learning_rate,
    weight_decay,
    warmup,
    resume,
    overwrite,
    keep,
    max_skipped,
    devices,
    progress,
) -> dict[str, Any]:
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = sharding.batch_sharding(mesh)
    policy = recipe.policy
    text = lowbit_data.is_text(dataset)
    positions = dataset.x_train.shape[1] if text else 1  # predictions per example
    unit = "tok/s" if text else "img/s"
    total_steps = epochs * steps_per_epoch
    limit = max(16, total_steps // 10) if max_skipped is None else max_skipped
    warmup_steps = min(round(warmup * steps_per_epoch), total_steps)
    tx = make_optimizer(learning_rate, weight_decay, warmup_steps, total_steps)
    graphdef, state = init_state(model, tx, policy=policy, loss_scale=recipe.make_loss_scale())
    placed = sharding.state_shardings(state, mesh)
    sharding.check_blocks(placed, state, recipe, mesh=mesh)
    hparams = dict(
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        warmup=warmup,
    )
    # Through JSON so tuples compare equal to the lists a checkpoint reads back.
    expected = json.loads(
        json.dumps(
            dict(
                recipe=recipe.name,
                dataset=dataset.name,
                hparams=hparams,
                steps_per_epoch=steps_per_epoch,
                model=dict(type=type(model).__name__, config=_json_or_none(getattr(model, "config", None))),
                # Token data only, so an image run's metadata is what it always was.
                **({"tokens_per_example": positions} if text else {}),
            )
        )
    )

    ckpt_dir = out / _CHECKPOINTS if out is not None else None
    start_epoch, start_step, history, step_times, elapsed, partial = 0, 0, [], [], 0.0, None
    messages = []
    found = None
    if ckpt_dir is not None and resume:
        found = checkpoint.restore_latest(ckpt_dir, state, expected, metadata.check_run)
        if found is None:
            messages.append("nothing to resume, starting fresh")
        else:
            state, meta, path = found
            start_epoch, start_step, partial = meta["epoch"], meta["step"], meta["partial"]
            history, step_times, elapsed = meta["history"], meta["step_times_ms"], meta["train_time_s"]
            where = f"epoch {start_epoch} of {epochs}"
            if start_step:
                where += f", step {start_step}/{steps_per_epoch} of epoch {start_epoch + 1}"
            finished = "; nothing left to train" if start_epoch == epochs else ""
            messages.append(f"resumed from {where} ({path.name}){finished}")
    if out is not None and found is None:
        _clear_earlier_run(out, overwrite=overwrite, resume=resume)
    if ops is not None:  # describe's table, after the checks: a refused run prints only its error
        print(ops, flush=True)
    state = sharding.place(state, placed)
    skipped_total = int(state.opt_state.total_notfinite)

    step = jax.jit(
        make_train_step(graphdef, tx, policy=policy),
        in_shardings=(placed, sharded, sharded),
        out_shardings=(placed, replicated),
    )
    evaluate = jax.jit(
        (make_lm_eval_step if text else make_eval_step)(graphdef, policy=policy),
        in_shardings=(placed, sharded, sharded, sharded),
        out_shardings=replicated,
    )
    test_batches = _padded_batches(dataset.x_test, dataset.y_test, batch_size)
    timer = _StepTimer(step_times)
    stopped_at, stop_signal = None, None
    session_start, session_steps = time.perf_counter(), 0
    remaining = total_steps - start_epoch * steps_per_epoch - start_step

    def save(stop: StopRequest, epoch: int, step_in_epoch: int, partial: dict | None) -> None:
        meta = dict(
            expected,
            history=history,
            step_times_ms=step_times,
            train_time_s=elapsed,
            partial=partial,
            lowbit_version=_version(),
        )
        with stop.shielded():  # a second Ctrl-C during the write stops the run after it, cleanly
            checkpoint.save(ckpt_dir, epoch, state, report.to_json(meta), step=step_in_epoch, keep=keep)

    with StopRequest() as stop, report.Progress(progress, remaining) as bar:
        for line in messages:
            bar.line(line)
        for epoch in range(start_epoch, epochs):
            first = start_step if epoch == start_epoch else 0
            run = partial if first else dict(losses=[], correct=0, skipped=0, time_s=0.0)
            partial = None
            t0 = time.perf_counter()
            batches = itertools.islice(
                lowbit_data.batches(dataset.x_train, dataset.y_train, batch_size, seed=(seed, epoch)), first, None
            )
            done, timed_before = first, len(step_times)
            for x, y in batches:
                with timer:
                    state, m = step(state, jax.device_put(x, sharded), jax.device_put(y, sharded))
                    loss = float(m["loss"])  # blocks, so the timer sees the computation
                done += 1
                session_steps += 1
                run["correct"] += int(m["correct"])
                if bool(m["skipped"]):
                    run["skipped"] += 1
                    skipped_total += 1
                    if skipped_total > limit:
                        raise TrainingError(
                            f"train: {skipped_total} steps skipped for a non-finite loss or gradient, more than "
                            f"max_skipped={limit} (at epoch {epoch + 1} step {done}); the data, labels or "
                            "learning rate produce NaN/inf"
                        )
                else:
                    run["losses"].append(loss)
                bar.step(
                    f"epoch {epoch + 1}/{epochs}",
                    f"loss {_mean(run['losses']):.4f}  acc {run['correct'] / (done * batch_size * positions):.3f}  "
                    f"{batch_size * positions / timer.last:,.0f} {unit}",
                )
                if stop.requested and done < steps_per_epoch:
                    break
            session_time = time.perf_counter() - t0
            elapsed += session_time
            run["time_s"] += session_time
            if done < steps_per_epoch:  # stopped mid-epoch
                stopped_at, stop_signal = dict(epoch=epoch, step=done), stop.requested
                if ckpt_dir is not None:
                    save(stop, epoch, done, run)
                break
            evaluated = [evaluate(state, *(jax.device_put(a, sharded) for a in b)) for b in test_batches]
            run["time_s"] += (eval_time := time.perf_counter() - t0 - session_time)
            elapsed += eval_time
            test_positions = len(dataset.x_test) * positions
            entry = dict(epoch=epoch + 1, loss=_mean(run["losses"]))
            if text:
                test_loss = sum(float(loss_sum) for loss_sum, _ in evaluated) / test_positions
                correct_test = sum(int(correct) for _, correct in evaluated)
                entry.update(test_loss=test_loss, **_text_metrics(test_loss))
            else:
                correct_test = sum(int(correct) for correct in evaluated)
            history.append(
                dict(
                    entry,
                    train_acc=run["correct"] / (steps_per_epoch * batch_size * positions),
                    test_accuracy=correct_test / test_positions,
                    time_s=run["time_s"],
                    skipped=run["skipped"],
                )
            )
            if run["skipped"]:
                warnings.warn(
                    f"epoch {epoch + 1}/{epochs}: {run['skipped']} of {steps_per_epoch} steps skipped for "
                    f"a non-finite loss or gradient ({skipped_total} in the run; it fails past "
                    f"max_skipped={limit})",
                    RuntimeWarning,
                    stacklevel=2,
                )
            wall = time.perf_counter() - session_start
            eta = wall / session_steps * (total_steps - (epoch + 1) * steps_per_epoch) if session_steps else math.nan
            h, timed = history[-1], step_times[timed_before:]  # the compiling step is not timed
            speed = 1e3 * batch_size * positions * len(timed) / sum(timed) if timed else math.nan
            scores = (
                f"test loss {h['test_loss']:.4f}  ppl {_fmt(h['perplexity'], '.2f')}  "
                f"{h['bits_per_byte']:.3f} bits/byte"
                if text
                else f"train acc {h['train_acc']:.3f}  test acc {h['test_accuracy']:.3f}"
            )
            bar.line(
                f"epoch {epoch + 1}/{epochs}: loss {_fmt(h['loss'], '.4f')}  {scores}  {_fmt(speed, ',.0f')} {unit}  "
                f"elapsed {report.duration(elapsed)}  ETA {report.duration(eta)}"
            )
            if ckpt_dir is not None:
                save(stop, epoch + 1, 0, None)
            if stop.requested and epoch + 1 < epochs:
                stopped_at, stop_signal = dict(epoch=epoch + 1, step=0), stop.requested
                break
        if stopped_at is not None:
            shown_epoch, shown_step = (
                (stopped_at["epoch"] + 1, stopped_at["step"])
                if stopped_at["step"]
                else (stopped_at["epoch"], steps_per_epoch)
            )
            where = f"stopped at epoch {shown_epoch}/{epochs} step {shown_step}/{steps_per_epoch} ({stop_signal})"
            bar.line(
                f"{where}; resume with --resume" if ckpt_dir is not None else f"{where}; no out_dir, nothing saved"
            )

    nnx.update(model, state.params, state.overwrite, state.rest)
    model.eval()
    last = history[-1] if history else dict(test_accuracy=None, loss=None)
    metrics = report.to_json(
        dict(
            recipe=recipe.name,
            dataset=dataset.name,
            **hparams,
            devices=devices,
            mesh=dict(mesh.shape),
            model=expected["model"],
            lowbit_version=_version(),
            test_accuracy=last["test_accuracy"],
            **({key: last.get(key) for key in _TEXT_METRICS} if text else {}),
            train_time_s=elapsed,
            step_time_ms=statistics.median(step_times) if step_times else None,
            final_loss=last["loss"],
            skipped_steps=int(state.opt_state.total_notfinite),
            max_skipped=limit,
            history=history,
            stopped=stopped_at is not None,
            stopped_at=stopped_at,
            curves=None,
        )
    )
    if out is not None and checkpoint.is_writer():
        metrics = report.write_report(out, metrics)
    return metrics


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan


_TEXT_METRICS = ("test_loss", "perplexity", "bits_per_byte")


def _text_metrics(test_loss: float) -> dict[str, float]:
    """Perplexity and bits per byte of a held-out cross-entropy in nats per token (byte tokens)."""
    # exp overflows float64 past ~709 nats: an untrained model is nowhere near, a diverged one may be.
    return dict(perplexity=math.exp(min(test_loss, 709.0)), bits_per_byte=test_loss / math.log(2))


def _inputs(dataset) -> str:
    return "tokens" if lowbit_data.is_text(dataset) else "images"


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None or not math.isfinite(value) else format(value, spec)


def _json_or_none(value: Any) -> Any:
    """``value`` if JSON can hold it (a model's config, compared on resume), else None."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return None
    return value


class _StepTimer:
    """Times steps into ``times`` (ms), leaving out the first, which compiles."""

    def __init__(self, times: list[float]):
        self.times, self.last, self._first = times, math.nan, True

    def __enter__(self):
        self._t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.last = time.perf_counter() - self._t0
        if not self._first:
            self.times.append(1e3 * self.last)
        self._first = False


def _check_recipe(model, recipe) -> recipes.Recipe:
    """The recipe (resolved from its name) after checking that ``model`` is trained the way it says."""
    if not isinstance(model, nnx.Module):
        raise TypeError(
            f"train: model must be a flax.nnx.Module (a linen model: wrap it with "
            f"flax.nnx.bridge.ToNNX), got {type(model).__name__}"
        )
    recipe = recipes.resolve(recipe)
    own = _model_recipe(model)
    if own is not None and own.name != recipe.name:
        raise ValueError(f"train: recipe={recipe.name!r} but the model was quantized with {own.name!r}")
    explicit = any(isinstance(m, (QLinear, QEinsum, QConv)) for _, m in nnx.iter_modules(model))
    if own is None and recipe.quantized and not explicit:
        raise ValueError(
            f"train: recipe={recipe.name!r} quantizes, but the model is a float model: pass "
            f"lowbit.quantize(model, {recipe.name!r})"
        )
    return recipe


def _model_recipe(model) -> recipes.Recipe | None:
    """The recipe of a model from ``lowbit.quantize`` (or of the linen model a ``nnx.bridge.ToNNX`` wraps)."""
    inner = getattr(model, "to_nnx__module", None)  # flax.nnx.bridge.ToNNX keeps the linen module here
    for m in (model, inner):
        if is_quantized(m):
            return m._lowbit_recipe
    return None


def _check_args(model, recipe, **args) -> None:
    for name in ("resume", "overwrite", "progress"):
        if not isinstance(args[name], bool):
            raise TypeError(f"train: {name} must be True or False, got {args[name]!r}")
    for name, lo in (("epochs", 1), ("batch_size", 1), ("devices", 1), ("keep", 1), ("max_skipped", 0)):
        value = args[name]
        if name == "max_skipped" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"train: {name} must be an integer, got {value!r}")
        if value < lo:
            raise ValueError(f"train: {name} must be >= {lo}, got {value!r}")
    check_seed(args["seed"], "train: seed")
    for name in ("learning_rate", "weight_decay", "warmup"):
        value = args[name]
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
            raise TypeError(f"train: {name} must be a number, got {value!r}")
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"train: {name} must be a finite number >= 0, got {value!r}")
    out_dir = args["out_dir"]
    if out_dir is not None and not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"train: out_dir must be a path (str or os.PathLike) or None, got {out_dir!r}")
    if args["resume"] and out_dir is None:
        raise ValueError("train: resume=True needs out_dir (where the checkpoints are)")
    if args["resume"] and args["overwrite"]:
        raise ValueError(
            "train: resume=True continues the run in out_dir and overwrite=True replaces it; pass one of them"
        )


def check_seed(seed: Any, what: str = "seed") -> int:
    """``seed`` as a Python int in ``[0, MAX_SEED]`` (NumPy integers accepted).

    Raises:
      TypeError: Not an integer (a bool included).
      ValueError: Out of range (jax keys and numpy generators take 64-bit seeds).
    """
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"{what}={seed!r} is invalid; allowed: an integer in [0, 2**63 - 1]")
    if not 0 <= seed <= MAX_SEED:
        # Python will not print ints past 4300 digits; the size is what matters.
        shown = seed if int(seed).bit_length() <= 256 else f"<an integer of {int(seed).bit_length()} bits>"
        raise ValueError(f"{what}={shown} is invalid; allowed: an integer in [0, 2**63 - 1]")
    return int(seed)


_DATASET_FIELDS = ("x_train", "y_train", "x_test", "y_test", "num_classes", "name")


def _check_data(dataset: lowbit_data.Dataset, batch_size: int) -> int:
    """Validates images and labels, or token windows and their targets; returns the number of steps per epoch."""
    if missing := [f for f in _DATASET_FIELDS if not hasattr(dataset, f)]:
        raise TypeError(
            f"train: dataset must be a lowbit.data.Dataset (lowbit.data.load(...)) or an object with "
            f"{', '.join(_DATASET_FIELDS)}; got {type(dataset).__name__}"
            + ("" if dataset is None else f", which lacks {', '.join(missing)}")
        )
    classes = dataset.num_classes
    if isinstance(classes, bool) or not isinstance(classes, (int, np.integer)) or classes < 1:
        raise ValueError(f"train: dataset.num_classes must be an integer >= 1, got {classes!r}")
    text = lowbit_data.is_text(dataset)
    for split in ("train", "test"):
        x, y = np.asarray(getattr(dataset, f"x_{split}")), np.asarray(getattr(dataset, f"y_{split}"))
        if text:
            _check_tokens(split, x, y, classes)
            continue
        if not np.issubdtype(x.dtype, np.floating) or x.ndim != 4:
            raise TypeError(
                f"train: dataset.x_{split} must be float images of shape (N, H, W, C), got {x.dtype}{list(x.shape)}"
            )
        if not np.issubdtype(y.dtype, np.integer) or y.shape != (len(x),):
            raise TypeError(
                f"train: dataset.y_{split} must be integer labels of shape ({len(x)},), got {y.dtype}{list(y.shape)}"
            )
        if len(x) == 0:
            raise ValueError(f"train: dataset.x_{split} is empty")
        if (bad := np.flatnonzero((y < 0) | (y >= classes))).size:
            raise ValueError(
                f"train: dataset.y_{split} has {bad.size} labels outside [0, {classes}) "
                f"(num_classes={classes}), e.g. {int(y[bad[0]])} at index {int(bad[0])}"
            )
    if batch_size > len(dataset.x_train):
        raise ValueError(f"train: batch_size {batch_size} exceeds the {len(dataset.x_train)} training examples")
    return len(dataset.x_train) // batch_size


def _check_tokens(split: str, x: np.ndarray, y: np.ndarray, vocab: int) -> None:
    """Token windows: (N, T) integer inputs and targets, every id in ``[0, vocab)``.

    An id out of range would not fail by itself: the embedding lookup clamps or
    fills it, and the loss of an out-of-range target is silently wrong.
    """
    if x.ndim != 2 or x.shape[1] < 1:
        raise TypeError(
            f"train: dataset.x_{split} must be integer token ids of shape (N, T), got {x.dtype}{list(x.shape)}"
        )
    if not np.issubdtype(y.dtype, np.integer) or y.shape != x.shape:
        raise TypeError(
            f"train: dataset.y_{split} must be integer next-token ids of shape {list(x.shape)}, "
            f"got {y.dtype}{list(y.shape)}"
        )
    if len(x) == 0:
        raise ValueError(f"train: dataset.x_{split} is empty")
    for name, ids in (("x", x), ("y", y)):
        if (bad := np.argwhere((ids < 0) | (ids >= vocab))).size:
            at = tuple(int(i) for i in bad[0])
            raise ValueError(
                f"train: dataset.{name}_{split} has {len(bad)} token ids outside [0, {vocab}) "
                f"(num_classes={vocab}), e.g. {int(ids[at])} at index {list(at)}"
            )


def _warn_nonfinite(dataset: lowbit_data.Dataset) -> None:
    """Reports NaN/inf pixels up front, whatever the recipe (a quantizer would saturate an inf unseen).

    The train step skips a batch holding one (counted with the other skipped
    steps); the eval step scores such a test image as misclassified.
    """
    for split, effect in (
        # Worded without "skipped": the per-epoch warnings are the ones that count skipped steps.
        ("train", "a step on a batch holding one is not applied (counted with the non-finite steps)"),
        ("test", "each is scored as misclassified"),
    ):
        x = np.asarray(getattr(dataset, f"x_{split}"))
        bad = np.concatenate(  # in chunks: no boolean copy the size of a large dataset
            [
                i + np.flatnonzero(~np.isfinite(x[i : i + 4096]).reshape(-1, x[0].size).all(axis=1))
                for i in range(0, len(x), 4096)
            ]
        )
        if bad.size:
            warnings.warn(
                f"train: dataset.x_{split} has {bad.size} of {len(x)} images with NaN or inf pixels "
                f"(e.g. index {', '.join(map(str, bad[:3]))}); {effect}",
                RuntimeWarning,
                stacklevel=3,
            )


def _does_not_fit(shape: tuple[int, ...], error: Exception, inputs: str = "images") -> ValueError:
    """The shape check's error: the batch shape, then the first line of what the model raised."""
    lines = str(error).strip().splitlines()
    cause = f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return ValueError(f"train: the model cannot be applied to a batch of {inputs} of shape {list(shape)} ({cause})")


def _check_model(model: nnx.Module, dataset: lowbit_data.Dataset, batch_size: int, policy: Policy) -> None:
    """Traces (without compiling or running) the model on one batch and checks its output shape."""
    graphdef, state = nnx.split(model)

    def forward(state, x):
        return nnx.merge(graphdef, state, copy=True)(policy.cast_to_compute(x))

    images = jax.ShapeDtypeStruct((batch_size, *dataset.x_train.shape[1:]), dataset.x_train.dtype)
    try:
        logits = jax.eval_shape(forward, state, images)
    except Exception as e:  # whatever the user's model raises, say where it came from
        raise _does_not_fit(images.shape, e, _inputs(dataset)) from e
    shape = getattr(logits, "shape", None)
    # Token windows get a prediction per position: (B, T, classes); images one: (B, classes).
    lead = tuple(images.shape[:2]) if lowbit_data.is_text(dataset) else (batch_size,)
    if shape is None or tuple(shape[:-1]) != lead or shape[-1] < dataset.num_classes:
        raise ValueError(
            f"train: the model maps a batch of shape {list(images.shape)} to "
            f"{list(shape) if shape is not None else type(logits).__name__}; expected logits of shape "
            f"[{', '.join(map(str, lead))}, classes] with classes >= dataset.num_classes={dataset.num_classes}"
        )


def _prepare_out_dir(out_dir: str | os.PathLike | None) -> Path | None:
    """``out_dir`` made absolute (orbax needs absolute paths) and created; checks it is writable."""
    if out_dir is None:
        return None
    out = Path(out_dir).expanduser().resolve()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"train: cannot create out_dir {out} ({e.strerror or e})") from None
    if not out.is_dir() or not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"train: out_dir {out} is not a writable directory")
    return out


def _clear_earlier_run(out: Path, *, overwrite: bool, resume: bool) -> None:
    """Refuses, or with ``overwrite`` deletes, the checkpoints and reports of an earlier run in ``out``."""
    found = checkpoint.checkpoints(out / _CHECKPOINTS)
    reports = [out / name for name in _REPORTS if (out / name).exists()]
    if not (found or reports):
        return
    if not overwrite:
        listed = ", ".join([f"{_CHECKPOINTS}/{p.name}" for p in found[:3]] + [p.name for p in reports])
        hint = "there is no checkpoint to resume" if resume else "pass resume=True (--resume) to continue it"
        raise ValueError(
            f"train: out_dir {out} already holds a run ({listed}); {hint}, or overwrite=True "
            "(--overwrite) to delete it, or choose another out_dir"
        )
    checkpoint.barrier("listed the earlier run")  # every process has seen it before process 0 deletes it
    if checkpoint.is_writer():
        for path in found:
            checkpoint.remove(path)
        for path in reports:
            path.unlink()
    checkpoint.barrier("deleted the earlier run")


def _mesh(devices: int, batch_size: int, mesh: str | Mapping[str, int] | Mesh | None) -> Mesh:
    if mesh is not None and devices != 1:
        raise ValueError(f"train: give devices ({devices}) or mesh ({mesh!r}), not both")
    made = sharding.make_mesh({"data": devices} if mesh is None else mesh)
    shards = sharding.batch_shards(made)
    if batch_size % shards:
        raise ValueError(
            f"train: batch_size {batch_size} is not divisible by the {shards} batch shards (data × fsdp) "
            f"of mesh {dict(made.shape)}"
        )
    return made


def _padded_batches(x: np.ndarray, y: np.ndarray, batch_size: int) -> list[tuple[np.ndarray, ...]]:
    """Fixed-size (x, y, mask) batches covering every example once.

    Padding the last batch instead of dropping it scores the whole test set with a
    single compiled shape.
    """
    pad = -len(x) % batch_size
    mask = np.arange(len(x) + pad) < len(x)
    x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
    y = np.concatenate([y, np.zeros((pad, *y.shape[1:]), y.dtype)])
    return [
        (x[i : i + batch_size], y[i : i + batch_size], mask[i : i + batch_size]) for i in range(0, len(x), batch_size)
    ]


def _version() -> str:
    try:
        return importlib.metadata.version("lowbit")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
