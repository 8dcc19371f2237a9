"""Feature extractors: what they return (`Features`), what they are (`FeatureExtractor`), running
one over image batches (`extract`), FID-Inception's extractor, and eqdisp's cache directory.

The digits classifier, the other extractor, is `_classifier`; the metrics on the features are
`_metrics`.
"""

import hashlib
import os
import pathlib
from collections.abc import Iterator
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np
from jaxtyping import Float, UInt8

from ._npz import EvalError


class Features(NamedTuple):
    """What a feature extractor returns for a batch of images."""

    pool: Float[np.ndarray, "n d"]
    """The features of FID and precision/recall (Inception: pool3, 2048-d)."""
    spatial: Float[np.ndarray, "n s"] | None
    """The features of sFID (Inception: mixed_6/conv[..., :7], 2023-d), or None."""
    probs: Float[np.ndarray, "n classes"] | None
    """Class probabilities for the Inception Score, or None."""


@runtime_checkable
class FeatureExtractor(Protocol):
    """Maps uint8 NHWC images to `Features`. Implementations: the digits classifier
    (`eqdisp.eval.digits_feature_extractor`) and Inception-v3 (``eqdisp.eval._inception``)."""

    name: str
    """Identifies the extractor and its weights; it keys the reference-statistics cache."""
    adm_compatible: bool
    """Whether an ADM reference batch's stored ``mu``/``sigma`` (Inception pool3) and
    ``mu_s``/``sigma_s`` (spatial) may be compared with these features."""

    def __call__(self, images: UInt8[np.ndarray, "n h w c"]) -> Features: ...


def cache_dir() -> pathlib.Path:
    """eqdisp's cache directory: ``$XDG_CACHE_HOME/eqdisp``, else ``~/.cache/eqdisp``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "eqdisp"


class InceptionFeatureExtractor:
    """The `FeatureExtractor` of FID-Inception: ``eqdisp.eval._inception``'s FID Inception-v3
    (TF1 front end, as ADM) with the weights the user supplies; pool3 (FID, precision/recall),
    mixed_6/conv[..., :7] (sFID) and the softmax of the bias-free logits (IS, 1008 classes)."""

    adm_compatible = True

    def __init__(self, weights: str | os.PathLike | None = None, *, batch_size: int = 64):
        try:
            from ._inception import inception_features, load_inception
        except ImportError as e:
            raise EvalError(f"Inception features are not available in this install ({e})") from e
        from . import _inception

        weights_error = getattr(_inception, "InceptionWeightsError", EvalError)
        try:
            path = pathlib.Path(weights) if weights else _inception.default_weights_path()
            self.model = load_inception(path)
        except weights_error as e:
            raise EvalError(str(e)) from e
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        self.name = f"inception-tf1-{digest.hexdigest()[:12]}"
        self.batch_size = batch_size
        self._features = inception_features

    def __call__(self, images: UInt8[np.ndarray, "n h w c"]) -> Features:
        if images.shape[-1] != 3:
            raise EvalError(f"Inception needs RGB images (n, h, w, 3), got {list(images.shape)}")
        out = self._features(self.model, images, self.batch_size)
        logits = out["logits"].astype(np.float64)
        probs = np.exp(logits - logits.max(1, keepdims=True))
        return Features(out["pool3"], out["spatial"], probs / probs.sum(1, keepdims=True))


def extract(
    extractor: FeatureExtractor, batches: Iterator[np.ndarray]
) -> tuple[Features, int]:
    """Run `extractor` over uint8 image batches and concatenate; returns ``(features, count)``."""
    pools, spatials, probs, count = [], [], [], 0
    for images in batches:
        if images.dtype != np.uint8 or images.ndim != 4:
            raise EvalError(
                f"images must be uint8 NHWC (the ADM sample format), got {images.dtype}{list(images.shape)}"
            )
        out = extractor(np.ascontiguousarray(images))
        pools.append(out.pool)
        spatials.append(out.spatial)
        probs.append(out.probs)
        count += len(images)
    if not count:
        raise EvalError("no images to evaluate")

    def cat(parts):
        return None if any(p is None for p in parts) else np.concatenate(parts)

    return Features(np.concatenate(pools), cat(spatials), cat(probs)), count


__all__ = ["FeatureExtractor", "Features", "InceptionFeatureExtractor", "cache_dir", "extract"]
