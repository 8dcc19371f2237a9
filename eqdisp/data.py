"""Training data. The bundled default needs no download: scikit-learn ships the 8x8 digits."""

import numpy as np
from jaxtyping import Float, Int

from .config import DataConfig


def load_digits() -> tuple[Float[np.ndarray, "n 1 8 8"], Int[np.ndarray, " n"]]:
    """scikit-learn's 1,797 handwritten digits (UCI), as images in [-1, 1] and labels 0..9."""
    from sklearn.datasets import load_digits as _load

    bunch = _load()
    images = (bunch.images.astype(np.float32) / 16.0) * 2.0 - 1.0
    return images[:, None], bunch.target.astype(np.int32)


def load_dataset(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """The arrays of the configured source (images channels-first in [-1, 1], int32 labels)."""
    if cfg.source == "digits":
        return load_digits()
    raise ValueError(f"data.source={cfg.source!r} is not available")


def epoch_batches(num_examples: int, batch_size: int, *, seed: int, epoch: int) -> np.ndarray:
    """Indices of the full batches of one epoch, reshuffled per epoch from ``(seed, epoch)``."""
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    count = num_examples // batch_size
    return order[: count * batch_size].reshape(count, batch_size)
