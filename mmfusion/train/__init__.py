"""Training: the loop, tasks, losses, optimizer, checkpoints and distributed setup."""

from mmfusion.train.loop import config_from_run, train
from mmfusion.train.stages import train_stages

__all__ = ["config_from_run", "train", "train_stages"]
