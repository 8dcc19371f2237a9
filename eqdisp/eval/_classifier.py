"""The bundled-digits classifier: the feature extractor of **FID-classifier**, the number eqdisp's CPU
experiments report.

Inception-v3 features make no sense for 8x8 greyscale digits, so these experiments use a small CNN
trained on the bundled digits instead. Its numbers (FID-classifier, sFID-classifier,
IS-classifier, precision/recall on its features) compare runs *with each other*; they are not
comparable with any FID-Inception in the literature.

- **Data split**: scikit-learn's 1,797 digits in their stored order; the first
  `DIGITS_TRAIN_SIZE` = 1,500 train the classifier, the remaining 297 are held out (reference
  ``digits-test``, and the accuracy this module reports).
- **Input**: uint8 NHWC images ``(n, 8, 8, 1)`` (the ADM sample format), mapped to
  ``u / 127.5 - 1``. The training images go through `eqdisp.images.to_uint8` first, exactly like
  samples, so real and generated digits are quantised the same way.
- **Network**: conv 3x3 (32) - ReLU - conv 3x3 (64) - ReLU - 2x2 average pool - dense (64) - ReLU -
  dense (10). Features: the 64-d penultimate layer (FID, precision/recall); the first 7 channels
  of the pooled conv map, flattened NHWC, 4 * 4 * 7 = 112-d (sFID, after ADM's ``mixed_6/conv[..., :7]``);
  softmax of the logits (IS, 10 classes, so at most 10).
- **Training**: deterministic: fixed seed, Adam, a fixed sequence of minibatch permutations, one
  compiled step (a few seconds on a CPU). The weights are cached in
  ``cache_dir()`` (``$XDG_CACHE_HOME/eqdisp`` or ``~/.cache/eqdisp``) under a name that hashes every
  training setting, so a change of settings never reads stale weights.
"""

import hashlib
import json
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray, UInt8

from ..io import atomic_path
from ._features import Features, cache_dir
from ._npz import EvalError

DIGITS_TRAIN_SIZE = 1500
"""The classifier trains on the first 1,500 bundled digits; the last 297 are held out."""

CLASSIFIER_SETTINGS = {
    "version": 1,
    "train_size": DIGITS_TRAIN_SIZE,
    "channels": (32, 64),
    "hidden": 64,
    "spatial_channels": 7,
    "seed": 0,
    "epochs": 30,
    "batch_size": 100,
    "learning_rate": 3e-3,
}
"""Everything that determines the trained weights; its hash names the cache file."""


class DigitsClassifier(eqx.Module):
    """A small CNN for 8x8x1 digits. ``__call__`` maps one image in [-1, 1], ``(1, 8, 8)``, to
    ``(spatial, features, logits)``."""

    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d
    hidden: eqx.nn.Linear
    head: eqx.nn.Linear
    spatial_channels: int = eqx.field(static=True)

    def __init__(self, *, key: PRNGKeyArray, channels=(32, 64), hidden: int = 64, spatial_channels: int = 7):
        k1, k2, k3, k4 = jr.split(key, 4)
        c1, c2 = channels
        self.conv1 = eqx.nn.Conv2d(1, c1, 3, padding=1, key=k1)
        self.conv2 = eqx.nn.Conv2d(c1, c2, 3, padding=1, key=k2)
        self.hidden = eqx.nn.Linear(c2 * 4 * 4, hidden, key=k3)
        self.head = eqx.nn.Linear(hidden, 10, key=k4)
        self.spatial_channels = spatial_channels

    def __call__(
        self, x: Float[Array, "1 8 8"]
    ) -> tuple[Float[Array, " spatial"], Float[Array, " hidden"], Float[Array, " 10"]]:
        h = jax.nn.relu(self.conv1(x))
        h = jax.nn.relu(self.conv2(h))
        c, height, width = h.shape
        h = h.reshape(c, height // 2, 2, width // 2, 2).mean(axis=(2, 4))  # 2x2 average pool
        spatial = jnp.transpose(h[: self.spatial_channels], (1, 2, 0)).reshape(-1)  # NHWC order
        features = jax.nn.relu(self.hidden(h.reshape(-1)))
        return spatial, features, self.head(features)


def _to_input(images: UInt8[Array, "n 8 8 1"]) -> Float[Array, "n 1 8 8"]:
    x = images.astype(jnp.float32) / jnp.float32(127.5) - jnp.float32(1.0)
    return jnp.transpose(x, (0, 3, 1, 2))


def digits_uint8() -> tuple[UInt8[np.ndarray, "1797 8 8 1"], Int[np.ndarray, " 1797"]]:
    """The bundled digits quantised like samples (`eqdisp.images.to_uint8`), and their labels."""
    from ..data import load_digits
    from ..images import to_uint8

    images, labels = load_digits()
    return to_uint8(images), labels


def _settings_hash() -> str:
    text = json.dumps(CLASSIFIER_SETTINGS, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _new_model(key: PRNGKeyArray) -> DigitsClassifier:
    s = CLASSIFIER_SETTINGS
    return DigitsClassifier(
        key=key, channels=tuple(s["channels"]), hidden=s["hidden"], spatial_channels=s["spatial_channels"]
    )


def train_digits_classifier() -> DigitsClassifier:
    """Train the classifier from scratch on the first 1,500 digits (deterministic; seconds on a CPU)."""
    s = CLASSIFIER_SETTINGS
    images, labels = digits_uint8()
    x = _to_input(jnp.asarray(images[: s["train_size"]]))
    y = jnp.asarray(labels[: s["train_size"]], jnp.int32)
    key_model, key_order = jr.split(jr.key(s["seed"]))
    model = _new_model(key_model)
    optimizer = optax.adam(s["learning_rate"])
    params, static = eqx.partition(model, eqx.is_inexact_array)
    per_epoch = s["train_size"] // s["batch_size"]
    # A fixed sequence of minibatches: one permutation per epoch from the seed.
    order = jax.vmap(lambda k: jr.permutation(k, s["train_size"]))(jr.split(key_order, s["epochs"]))
    order = order[:, : per_epoch * s["batch_size"]].reshape(-1, s["batch_size"])

    def loss_fn(params, xb, yb):
        logits = jax.vmap(eqx.combine(params, static))(xb)[2]
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    @jax.jit
    def step(params, opt_state, idx):
        grads = jax.grad(loss_fn)(params, x[idx], y[idx])
        # optax computes b ** count (float ** int32); allow that promotion whatever the global mode.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    # A Python loop over one compiled step: measured ~8 ms a step on a loaded 2-core CPU, while
    # the same steps under one lax.scan ran for minutes (XLA CPU picks a slow convolution there).
    opt_state = optimizer.init(params)
    for idx in order:
        params, opt_state = step(params, opt_state, idx)
    return eqx.combine(params, static)


def classifier_path() -> pathlib.Path:
    """Where the trained classifier is cached (the file name hashes `CLASSIFIER_SETTINGS`)."""
    return cache_dir() / f"digits-classifier-{_settings_hash()}.eqx"


def load_digits_classifier(*, cache: bool = True) -> DigitsClassifier:
    """The trained digits classifier: read from `classifier_path` or, the first time, trained and
    written there (atomically). ``cache=False`` trains without touching the cache."""
    path = classifier_path()
    like = _new_model(jr.key(0))
    if cache and path.is_file():
        try:
            return eqx.tree_deserialise_leaves(path, like)
        except Exception:  # noqa: BLE001 - a truncated or foreign file: retrain and overwrite it
            path.unlink(missing_ok=True)
    model = train_digits_classifier()
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            eqx.tree_serialise_leaves(tmp, model)
    return model


@eqx.filter_jit
def _forward(model: DigitsClassifier, images: UInt8[Array, "n 8 8 1"]):
    spatial, features, logits = jax.vmap(model)(_to_input(images))
    return spatial, features, jax.nn.softmax(logits, axis=-1)


class DigitsFeatureExtractor:
    """The `FeatureExtractor` of FID-classifier: uint8 ``(n, 8, 8, 1)`` images to features.

    Images go through the network in batches of ``batch_size`` (the last padded), so one compiled
    program serves any number of images.
    """

    adm_compatible = False

    def __init__(self, model: DigitsClassifier, *, batch_size: int = 256):
        self.model = model
        self.batch_size = batch_size
        self.name = f"classifier-digits-{_settings_hash()}"

    def __call__(self, images: UInt8[np.ndarray, "n h w c"]) -> Features:
        if images.shape[1:] != (8, 8, 1):
            raise EvalError(
                f"the digits classifier (FID-classifier) needs 8x8x1 images, got {list(images.shape[1:])}; "
                "use --features inception for other data"
            )
        outs = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            n = len(chunk)
            if n < self.batch_size:
                chunk = np.concatenate([chunk, np.zeros((self.batch_size - n, 8, 8, 1), np.uint8)])
            outs.append([np.asarray(a)[:n] for a in _forward(self.model, jnp.asarray(chunk))])
        spatial, features, probs = (np.concatenate(parts) for parts in zip(*outs))
        return Features(pool=features, spatial=spatial, probs=probs.astype(np.float64))

    def __repr__(self) -> str:
        return f"DigitsFeatureExtractor({self.name})"


def digits_feature_extractor(*, batch_size: int = 256, cache: bool = True) -> DigitsFeatureExtractor:
    """The FID-classifier feature extractor, with the (cached) trained classifier."""
    return DigitsFeatureExtractor(load_digits_classifier(cache=cache), batch_size=batch_size)


def digits_classifier_accuracy(model: DigitsClassifier | None = None) -> float:
    """Accuracy of the classifier on the 297 held-out digits."""
    model = load_digits_classifier() if model is None else model
    images, labels = digits_uint8()
    probs = DigitsFeatureExtractor(model)(images[DIGITS_TRAIN_SIZE:]).probs
    return float((probs.argmax(1) == labels[DIGITS_TRAIN_SIZE:]).mean())


__all__ = [
    "CLASSIFIER_SETTINGS",
    "DIGITS_TRAIN_SIZE",
    "DigitsClassifier",
    "DigitsFeatureExtractor",
    "classifier_path",
    "digits_classifier_accuracy",
    "digits_feature_extractor",
    "digits_uint8",
    "load_digits_classifier",
    "train_digits_classifier",
]
