"""The train loop: any Flax NNX classifier, one recipe, data parallel over N devices.

``train`` runs AdamW (linear warmup, then cosine decay) with the recipe's precision
policy and loss scaling, evaluates test accuracy after every epoch, writes an
atomic checkpoint per epoch and, at the end, ``metrics.json`` and ``curves.png``.

The model is handled functionally: it is split into three states,

* ``params``: ``nnx.Param`` (weights and learned quantizer parameters such as LSQ
  steps and PACT clips), updated by the optimizer;
* ``overwrite``: ``OverwriteWithGradient`` variables (GradScale), whose
  "gradient" is their new value, computed by the quantized backward pass;
* ``rest``: everything else (RNG streams for dropout and stochastic rounding),
  carried from step to step and checkpointed.

Data parallelism is GSPMD: a ``Mesh`` with a ``data`` axis, batches sharded along
it and the state replicated. The step is written for the global batch, so
quantizer statistics (amax, GradScale) are global reductions.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import math
import shutil
import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lowbit import data as lowbit_data
from lowbit.trainer import checkpoint
from lowbit.training.loss_scale import all_finite, skip_nonfinite
from lowbit.training.policy import Policy
from lowbit.nn.variables import OverwriteWithGradient

__all__ = ["TrainState", "make_optimizer", "train"]

_CHECKPOINT_FORMAT = 1


class Recipe(Protocol):
    """What the loop needs from a recipe (``lowbit.recipes.Recipe``)."""

    name: str
    policy: Policy

    def make_loss_scale(self) -> Any: ...


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything that changes during training; a pytree, checkpointed whole.

    Attributes:
      params: The ``nnx.Param`` state.
      overwrite: The ``OverwriteWithGradient`` state.
      rest: All other model state (RNG streams...).
      opt_state: Optimizer state.
      loss_scale: The recipe's loss scale.
    """

    params: nnx.State
    overwrite: nnx.State
    rest: nnx.State
    opt_state: Any
    loss_scale: Any


def make_optimizer(
    learning_rate: float, weight_decay: float, warmup_steps: int, total_steps: int
) -> optax.GradientTransformation:
    """AdamW with linear warmup then cosine decay to zero, skipping non-finite steps.

    Weight decay applies to matrices only: decaying biases, LayerNorm scales,
    positions or learned quantizer steps and clips would pull them toward zero
    for no regularisation benefit.
    """
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, warmup_steps, max(total_steps, warmup_steps + 1)
    )
    adamw = optax.adamw(schedule, weight_decay=weight_decay, mask=lambda p: jax.tree.map(lambda x: x.ndim == 2, p))
    return skip_nonfinite(adamw)


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


def _train_step(graphdef, policy: Policy, tx, state: TrainState, x, y):
    def loss_fn(diff):
        params, overwrite = diff
        model = nnx.merge(graphdef, params, overwrite, state.rest, copy=True)
        logits = model(policy.cast_to_compute(x))
        loss = _cross_entropy(logits, y)
        rest = nnx.split(model, nnx.Param, OverwriteWithGradient, ...)[3]
        return state.loss_scale.scale(loss), (loss, logits, rest)

    (grads, new_overwrite), (loss, logits, rest) = jax.grad(loss_fn, has_aux=True)((state.params, state.overwrite))
    grads = state.loss_scale.unscale(grads)
    finite = all_finite(grads)
    # optax.adamw mixes its float32 hyperparameters and counters with the
    # parameters, which jax_numpy_dtype_promotion="strict" rejects.
    with jax.numpy_dtype_promotion("standard"):
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
    # A skipped step must not adopt GradScale values computed from inf/NaN gradients.
    overwrite = jax.tree.map(lambda new, old: jnp.where(finite, new.astype(old.dtype), old),
                             new_overwrite, state.overwrite)
    new_state = TrainState(params, overwrite, rest, opt_state, state.loss_scale.adjust(finite))
    correct = jnp.sum(jnp.argmax(logits, axis=-1) == y)
    return new_state, dict(loss=loss, correct=correct)


def _eval_step(graphdef, policy: Policy, state: TrainState, x, y, mask):
    model = nnx.merge(graphdef, state.params, state.overwrite, state.rest)
    logits = model(policy.cast_to_compute(x))
    return jnp.sum((jnp.argmax(logits, axis=-1) == y) & mask)


def train(
    model: nnx.Module,
    dataset: lowbit_data.Dataset,
    *,
    recipe: Recipe,
    epochs: int = 30,
    batch_size: int = 64,
    seed: int = 0,
    learning_rate: float = 3e-3,
    weight_decay: float = 0.05,
    warmup: float = 2.0,
    out_dir: str | Path | None = None,
    resume: bool = False,
    devices: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Trains ``model`` on ``dataset`` with ``recipe``; deterministic given ``seed``.

    Args:
      model: An NNX classifier mapping (B, H, W, C) images to (B, classes) logits,
        initialised by the caller (from ``seed`` for a reproducible run). It is
        updated in place with the final state and left in eval mode.
      dataset: Training and test data (``lowbit.data.load``).
      recipe: Supplies the precision policy and a fresh loss scale.
      epochs: Passes over the training set.
      batch_size: Global batch (split across ``devices``); the last partial
        batch of each epoch is dropped.
      seed: Data order: epoch ``e`` is shuffled with ``seed=(seed, e)``.
      learning_rate: Peak learning rate.
      weight_decay: AdamW decoupled weight decay (matrices only).
      warmup: Linear warmup length in epochs (may be fractional).
      out_dir: Where checkpoints (``checkpoints/``), ``metrics.json`` and
        ``curves.png`` go; None writes nothing.
      resume: Continue from the latest checkpoint in ``out_dir``, bit-exactly where
        the earlier run stopped; with no checkpoint there, start from scratch.
        False deletes earlier checkpoints.
      devices: Data-parallel device count (the first ``devices`` of ``jax.devices()``).
      progress: Show a progress bar (only on a terminal).

    Returns:
      The metrics also written to ``metrics.json``: recipe, dataset, epochs, seed,
      hyperparameters, ``test_accuracy`` (fraction), ``train_time_s``,
      ``step_time_ms`` (median step after compilation), ``final_loss``,
      ``skipped_steps`` (non-finite gradients) and per-epoch ``history``.

    Raises:
      ValueError: Invalid arguments, or too few devices.
      checkpoint.CheckpointError: ``resume`` found a corrupt checkpoint or one from
        a different run (recipe, dataset, model or hyperparameters).
    """
    _check_args(epochs, batch_size, learning_rate, weight_decay, warmup, devices, resume, out_dir)
    mesh = _mesh(devices, batch_size)
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, PartitionSpec("data"))
    policy = recipe.policy
    steps_per_epoch = len(dataset.x_train) // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {batch_size} exceeds the {len(dataset.x_train)} training examples")
    warmup_steps = min(round(warmup * steps_per_epoch), epochs * steps_per_epoch)
    tx = make_optimizer(learning_rate, weight_decay, warmup_steps, epochs * steps_per_epoch)

    graphdef, eval_graphdef, state = _initial_state(model, recipe, tx)
    hparams = dict(epochs=epochs, batch_size=batch_size, seed=seed, learning_rate=learning_rate,
                   weight_decay=weight_decay, warmup=warmup)
    # Through JSON so tuples compare equal to the lists a checkpoint reads back.
    expected = json.loads(json.dumps(dict(
        format=_CHECKPOINT_FORMAT, recipe=recipe.name, dataset=dataset.name, hparams=hparams,
        model=dict(type=type(model).__name__, config=getattr(model, "config", None)))))
    ckpt_dir = Path(out_dir) / "checkpoints" if out_dir is not None else None
    if ckpt_dir is not None and not resume:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    done, history, step_times, elapsed = 0, [], [], 0.0
    if resume:
        state, done, history, step_times, elapsed = _resume(ckpt_dir, state, expected)
    state = jax.device_put(state, replicated)

    step = jax.jit(functools.partial(_train_step, graphdef, policy, tx),
                   in_shardings=(replicated, sharded, sharded), out_shardings=(replicated, replicated))
    evaluate = jax.jit(functools.partial(_eval_step, eval_graphdef, policy),
                       in_shardings=(replicated, sharded, sharded, sharded), out_shardings=replicated)
    test_batches = _padded_batches(dataset.x_test, dataset.y_test, batch_size)
    timer = _StepTimer(step_times)
    with _progress(progress) as bar:
        task = bar.add_task("compiling", total=(epochs - done) * steps_per_epoch, stats="")
        for epoch in range(done, epochs):
            start = time.perf_counter()
            losses, correct = [], 0
            for x, y in lowbit_data.batches(dataset.x_train, dataset.y_train, batch_size, seed=(seed, epoch)):
                with timer:
                    state, m = step(state, jax.device_put(x, sharded), jax.device_put(y, sharded))
                    losses.append(float(m["loss"]))  # blocks, so the timer sees the computation
                correct += int(m["correct"])
                bar.update(task, advance=1, description=f"epoch {epoch + 1}/{epochs}",
                           stats=f"loss {np.mean(losses):.4f}  acc {correct / (len(losses) * batch_size):.3f}  "
                                 f"{batch_size / timer.last:,.0f} img/s")
            correct_test = sum(int(evaluate(state, *(jax.device_put(a, sharded) for a in b))) for b in test_batches)
            epoch_time = time.perf_counter() - start
            elapsed += epoch_time
            history.append(dict(epoch=epoch + 1, loss=float(np.mean(losses)),
                                train_acc=correct / (steps_per_epoch * batch_size),
                                test_accuracy=correct_test / len(dataset.x_test), time_s=epoch_time))
            if bar.live.is_started:
                bar.console.print("epoch {epoch}/{0}: loss {loss:.4f}  train acc {train_acc:.3f}  "
                                  "test acc {test_accuracy:.3f}  {time_s:.1f} s".format(epochs, **history[-1]))
            if ckpt_dir is not None:
                meta = dict(expected, epoch=epoch + 1, history=history, step_times_ms=step_times,
                            train_time_s=elapsed, lowbit_version=_version())
                checkpoint.save(ckpt_dir, epoch + 1, state, meta)

    nnx.update(model, state.params, state.overwrite, state.rest)
    model.eval()
    last = history[-1] if history else dict(test_accuracy=math.nan, loss=math.nan)
    metrics = dict(
        recipe=recipe.name, dataset=dataset.name, **hparams, devices=devices, model=expected["model"],
        lowbit_version=_version(), test_accuracy=last["test_accuracy"], train_time_s=elapsed,
        step_time_ms=statistics.median(step_times) if step_times else math.nan, final_loss=last["loss"],
        skipped_steps=int(state.opt_state.total_notfinite), history=history,
    )
    if out_dir is not None:
        _write_report(Path(out_dir), metrics)
    return metrics


def _initial_state(model: nnx.Module, recipe: Recipe, tx: optax.GradientTransformation):
    """Graph definitions for training and evaluation, and the initial train state."""
    model.eval()
    eval_graphdef = nnx.graphdef(model)
    model.train()
    graphdef, params, overwrite, rest = nnx.split(model, nnx.Param, OverwriteWithGradient, ...)
    params = recipe.policy.cast_to_param(params)
    return graphdef, eval_graphdef, TrainState(params, overwrite, rest, tx.init(params), recipe.make_loss_scale())


def _resume(ckpt_dir: Path, state: TrainState, expected: dict[str, Any]):
    """The latest checkpoint's state and progress, or ``state`` and no progress if there is none."""
    path = checkpoint.latest(ckpt_dir)
    if path is None:
        return state, 0, [], [], 0.0
    state, meta = checkpoint.restore(path, state, expected)
    try:
        return state, meta["epoch"], meta["history"], meta["step_times_ms"], meta["train_time_s"]
    except KeyError as e:
        raise checkpoint.CheckpointError(f"checkpoint {path}: metadata.json has no {e}") from None


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


def _check_args(epochs, batch_size, learning_rate, weight_decay, warmup, devices, resume, out_dir) -> None:
    for name, value in dict(epochs=epochs, batch_size=batch_size, devices=devices).items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"train: {name} must be an integer >= 1, got {value!r}")
    for name, value in dict(learning_rate=learning_rate, weight_decay=weight_decay, warmup=warmup).items():
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"train: {name} must be a finite number >= 0, got {value!r}")
    if resume and out_dir is None:
        raise ValueError("train: resume=True needs out_dir (where the checkpoints are)")


def _mesh(devices: int, batch_size: int) -> Mesh:
    available = jax.devices()
    if devices > len(available):
        raise ValueError(
            f"train: {devices} devices requested but jax sees {len(available)}; on CPU set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={devices} before jax starts"
        )
    if batch_size % devices:
        raise ValueError(f"train: batch_size {batch_size} is not divisible by devices {devices}")
    return Mesh(np.array(available[:devices]), ("data",))


def _padded_batches(x: np.ndarray, y: np.ndarray, batch_size: int) -> list[tuple[np.ndarray, ...]]:
    """Fixed-size (x, y, mask) batches covering every example once.

    Padding the last batch instead of dropping it scores the whole test set with a
    single compiled shape.
    """
    pad = -len(x) % batch_size
    mask = np.arange(len(x) + pad) < len(x)
    x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
    y = np.concatenate([y, np.zeros(pad, y.dtype)])
    return [(x[i : i + batch_size], y[i : i + batch_size], mask[i : i + batch_size])
            for i in range(0, len(x), batch_size)]


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console()
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.fields[stats]}"), console=console,
                    disable=not (enabled and console.is_terminal))


def _version() -> str:
    try:
        return importlib.metadata.version("lowbit")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _write_report(out_dir: Path, metrics: dict[str, Any]) -> None:
    """Writes ``metrics.json`` and, when matplotlib is installed, ``curves.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        warnings.warn("matplotlib is not installed (pip install lowbit[plot]): no curves.png", stacklevel=3)
        return
    hist = metrics["history"]
    epochs = [h["epoch"] for h in hist]
    # A bare Figure renders with Agg and leaves pyplot's global backend alone.
    fig = Figure(figsize=(9, 3.5), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    loss_ax.plot(epochs, [h["loss"] for h in hist], marker="o")
    loss_ax.set(xlabel="epoch", ylabel="train loss", yscale="log")
    acc_ax.plot(epochs, [h["train_acc"] for h in hist], marker="o", label="train")
    acc_ax.plot(epochs, [h["test_accuracy"] for h in hist], marker="o", label="test")
    acc_ax.set(xlabel="epoch", ylabel="accuracy")
    acc_ax.legend()
    for ax in (loss_ax, acc_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"{metrics['recipe']} on {metrics['dataset']} (seed {metrics['seed']})")
    fig.savefig(out_dir / "curves.png", dpi=100)
