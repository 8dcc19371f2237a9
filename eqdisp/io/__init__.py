"""Files in and out: torch-free readers of weight files, shared by every loader (Inception,
SD-VAE, converters), and the atomic writer every other file eqdisp writes goes through.

- `read_state_dict(path, *, entry=None)`: name -> NumPy array from a `.safetensors`, an `.npz`
  or a PyTorch file (zip or legacy format, any suffix), told apart by content; `entry` picks one
  state dict of a training checkpoint (`"ema"`, `"model"`, `"state_dict"`).
- `read_torch(path)`: the whole unpickled object of a PyTorch file, tensors as lazy
  `TorchTensor`s (only the ones you read touch the disk), other objects as inert `Opaque`
  records: the file's code never runs.
- `state_dict_entries(path)`, `describe(path)`: what a file holds, without reading tensor data.
- `WeightsError`: missing, unreadable or unexpected files; one line naming the file.
- `atomic_path(path)`, `write_text_atomically(path, text)`: a file written whole or not at all
  (a temporary name beside it, renamed over it), so a crash or a SIGTERM never leaves a part.
"""

from ._atomic import atomic_path as atomic_path
from ._atomic import write_text_atomically as write_text_atomically
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
