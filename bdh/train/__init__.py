"""Training: arguments, optimizer and schedule, the loop, checkpoints, distributed data parallel."""

from bdh.train.args import TrainConfig
from bdh.train.loop import TrainResult, TrainingDiverged, TrainingInterrupted, train

__all__ = ["TrainConfig", "TrainResult", "TrainingDiverged", "TrainingInterrupted", "train"]
