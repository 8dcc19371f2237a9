"""Training: the train state, the compiled step, checkpoints, and the loop."""

from .._config_json import config_from_dict, config_to_dict
from ._checkpoint import (
    Checkpoint,
    Checkpointer,
    CheckpointError,
    abstract_train_state,
    load_checkpoint,
)
from ._loop import TrainingError, train
from ._step import (
    TrainState,
    diagnostic_disp,
    ema_decay_at,
    init_train_state,
    make_diagnostics,
    make_optimizer,
    make_train_step,
)

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "Checkpointer",
    "TrainState",
    "TrainingError",
    "abstract_train_state",
    "config_from_dict",
    "config_to_dict",
    "diagnostic_disp",
    "ema_decay_at",
    "init_train_state",
    "load_checkpoint",
    "make_diagnostics",
    "make_optimizer",
    "make_train_step",
    "train",
]
