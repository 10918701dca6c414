"""The train loop, its public step, checkpoints and run reports (Flax NNX)."""

from lowbit.trainer import checkpoint
from lowbit.trainer.checkpoint import CheckpointError
from lowbit.trainer.loop import TrainState, make_optimizer, train

__all__ = ["CheckpointError", "TrainState", "checkpoint", "make_optimizer", "train"]
