"""The train loop, its public step, checkpoints and run reports (Flax NNX).

* :func:`train`: the whole loop (checkpoints, resume, clean stop on SIGINT/SIGTERM), for
  image classifiers and language models on token windows.
* :func:`make_train_step`, :func:`make_eval_step`, :func:`make_lm_eval_step`, :func:`init_state`,
  :func:`make_optimizer`, :class:`TrainState`: the pieces, for your own loop.
* :mod:`checkpoint`: atomic, verified checkpoints.
"""

from lowbit.trainer import checkpoint
from lowbit.trainer.checkpoint import CheckpointError, IncompatibleCheckpointError
from lowbit.trainer.lock import TrainingError
from lowbit.trainer.loop import train
from lowbit.trainer.step import (
    TrainState,
    init_state,
    make_eval_step,
    make_lm_eval_step,
    make_optimizer,
    make_train_step,
)

__all__ = [
    "CheckpointError",
    "IncompatibleCheckpointError",
    "TrainState",
    "TrainingError",
    "checkpoint",
    "init_state",
    "make_eval_step",
    "make_lm_eval_step",
    "make_optimizer",
    "make_train_step",
    "train",
]
