"""Training: the train state, the compiled step and the loop."""

from ._loop import train
from ._step import TrainState, init_train_state, make_optimizer, make_train_step

__all__ = ["TrainState", "init_train_state", "make_optimizer", "make_train_step", "train"]
