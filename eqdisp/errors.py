"""The errors that mean "bad input", which command-line tools print as one line without a traceback."""

from .config import ConfigError
from .data import DataError
from .eval import EvalError, InceptionWeightsError
from .io import WeightsError
from .train import CheckpointError, TrainingError

USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    DataError,
    CheckpointError,
    TrainingError,
    EvalError,
    InceptionWeightsError,
    WeightsError,
)

__all__ = [
    "USER_ERRORS",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "EvalError",
    "InceptionWeightsError",
    "TrainingError",
    "WeightsError",
]
