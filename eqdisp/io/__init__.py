"""Torch-free readers of weight files, shared by every loader (Inception, SD-VAE, converters).

- `read_state_dict(path, *, entry=None)`: name -> NumPy array from a `.safetensors`, an `.npz`
  or a PyTorch file (zip or legacy format, any suffix), told apart by content; `entry` picks one
  state dict of a training checkpoint (`"ema"`, `"model"`, `"state_dict"`).
- `read_torch(path)`: the whole unpickled object of a PyTorch file, tensors as lazy
  `TorchTensor`s (only the ones you read touch the disk), other objects as inert `Opaque`
  records: the file's code never runs.
- `state_dict_entries(path)`, `describe(path)`: what a file holds, without reading tensor data.
- `WeightsError`: missing, unreadable or unexpected files; one line naming the file.
"""

from ._errors import WeightsError as WeightsError
from ._files import (
    describe as describe,
)
from ._files import (
    read_state_dict as read_state_dict,
)
from ._files import (
    state_dict_entries as state_dict_entries,
)
from ._torch import Opaque as Opaque
from ._torch import TorchTensor as TorchTensor
from ._torch import read_torch as read_torch
