"""Sample-quality metrics with the conventions of the ADM evaluator, and `evaluate`, which runs them.

The conventions (``guided-diffusion/evaluations/evaluator.py``; reference notes
``meanflow_unet_fid.md`` §3):

- **FID**: Fréchet distance between Gaussians fitted to features, ``mu`` the mean and ``sigma``
  the unbiased covariance (``np.cov``, N - 1), computed here in float64. The trace term uses
  ``scipy.linalg.sqrtm(sigma1 @ sigma2)``; if that is not finite, ``1e-6 I`` is added to both
  matrices and it is retried; an imaginary part above 1e-3 on the diagonal raises, a smaller one is
  dropped (ADM, pytorch-fid, MeanFlow all do exactly this).
- **sFID**: the same distance on *spatial* features (Inception ``mixed_6/conv``, first 7 channels,
  flattened NHWC, 2023-d); here any second feature set an extractor provides.
- **Inception Score**: ``exp(mean_i KL(p_i || mean p))`` per split, averaged over splits. ADM uses
  splits of 5,000 consecutive samples, which is 10 splits for 50k; here ``splits`` sets the count
  and the split size is ``ceil(n / splits)`` (identical to ADM for 50k).
- **Precision/recall** (Kynkäänniemi et al. 2019, ADM's ``ManifoldEstimator``): the radius of each
  point is the squared L2 distance to its k-th nearest neighbour in its own set (k = 3; the point
  itself is neighbour 0); precision is the fraction of samples inside at least one reference ball,
  recall the fraction of references inside at least one sample ball. ADM computes the distances
  in float16 (float32 if that overflows); here they are float32 throughout, in blocks.

Statistics of a reference are cached in the user's cache directory (`cache_dir`), keyed by the
feature extractor and the reference, so evaluating many sample sets against one reference
extracts its features once.
"""

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import time
import warnings
from collections.abc import Callable, Iterator
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np
from jaxtyping import Float, UInt8

from ._npz import EvalError, iter_npz, npz_info, npz_keys, read_npz, write_npz

# ----------------------------------------------------------------------------------------------
# Fréchet distance and Gaussian statistics


def frechet_distance(
    mu1: Float[np.ndarray, " d"],
    sigma1: Float[np.ndarray, "d d"],
    mu2: Float[np.ndarray, " d"],
    sigma2: Float[np.ndarray, "d d"],
    *,
    eps: float = 1e-6,
) -> float:
    """The Fréchet distance ``|mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2))``, in float64.

    **Arguments:**

    - `mu1`, `sigma1`: mean and covariance of the first Gaussian.
    - `mu2`, `sigma2`: the same for the second.
    - `eps`: the diagonal offset of the fallback when the matrix square root is not finite.

    **Returns:** the distance, a Python float.

    **Raises:** `EvalError` when the shapes differ or the square root keeps a significant
    imaginary part (max |imag| on the diagonal above 1e-3).
    """
    from scipy import linalg

    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise EvalError(
            f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
            f"{sigma2.shape} (features of different extractors?)"
        )
    diff = mu1 - mu2
    with warnings.catch_warnings():  # scipy warns on singular products; the fallback handles them
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            worst = float(np.max(np.abs(covmean.imag)))
            raise EvalError(f"Fréchet distance: the matrix square root has imaginary part {worst:.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


@dataclasses.dataclass(frozen=True)
class FeatureStats:
    """Mean and unbiased covariance of a feature set, float64 (what FID compares)."""

    mu: Float[np.ndarray, " d"]
    """The mean feature."""
    sigma: Float[np.ndarray, "d d"]
    """The covariance, normalised by ``n - 1`` like ``np.cov``."""
    n: int
    """How many feature vectors (0 when unknown, e.g. statistics read from an ADM reference)."""

    @classmethod
    def from_features(cls, features: Float[np.ndarray, "n d"], *, chunk: int = 8192) -> "FeatureStats":
        """Fit the statistics of ``features`` in float64, two passes over row chunks (so 50k x 2048
        float32 features never become one float64 copy)."""
        n, d = features.shape
        if n < 2:
            raise EvalError(f"need at least 2 feature vectors for a covariance, got {n}")
        total = np.zeros(d, np.float64)
        for start in range(0, n, chunk):
            total += features[start : start + chunk].astype(np.float64).sum(0)
        mu = total / n
        sigma = np.zeros((d, d), np.float64)
        for start in range(0, n, chunk):
            centred = features[start : start + chunk].astype(np.float64) - mu
            sigma += centred.T @ centred
        return cls(mu=mu, sigma=sigma / (n - 1), n=int(n))

    def save(self, path: str | os.PathLike, *, prefix: str = "") -> None:
        """Write ``{prefix}mu``, ``{prefix}sigma`` and ``{prefix}n`` to an ``.npz`` (atomically)."""
        write_npz(path, {f"{prefix}mu": self.mu, f"{prefix}sigma": self.sigma, f"{prefix}n": np.int64(self.n)})

    @classmethod
    def load(cls, path: str | os.PathLike, *, prefix: str = "", suffix: str = "") -> "FeatureStats":
        """Read ``{prefix}mu{suffix}``, ``{prefix}sigma{suffix}`` (and ``n`` if present): statistics
        written by `save`, or an ADM reference batch's ``mu``/``sigma`` (FID) or, with
        ``suffix="_s"``, ``mu_s``/``sigma_s`` (sFID)."""
        keys = npz_keys(path)
        mu, sigma, n = (f"{prefix}{name}{suffix}" for name in ("mu", "sigma", "n"))
        if mu not in keys or sigma not in keys:
            raise EvalError(f"{path}: no {mu}/{sigma} statistics in this file")
        return cls(
            mu=read_npz(path, mu).astype(np.float64),
            sigma=read_npz(path, sigma).astype(np.float64),
            n=int(read_npz(path, n)) if n in keys else 0,
        )

    def frechet_distance(self, other: "FeatureStats") -> float:
        """`frechet_distance` between these statistics and `other`."""
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma)


def fid_from_features(
    features1: Float[np.ndarray, "n d"], features2: Float[np.ndarray, "m d"]
) -> float:
    """The Fréchet distance between two feature sets (FID on pool features, sFID on spatial ones)."""
    return FeatureStats.from_features(features1).frechet_distance(FeatureStats.from_features(features2))


# ----------------------------------------------------------------------------------------------
# Inception Score


def inception_score(probs: Float[np.ndarray, "n classes"], *, splits: int = 10) -> float:
    """The Inception Score of class probabilities, ADM's convention.

    **Arguments:**

    - `probs`: one softmax distribution per sample (Inception: 1008 classes; the digits
      classifier: 10).
    - `splits`: number of consecutive splits; each has ``ceil(n / splits)`` samples (the last may be
      shorter), so 50k samples give ADM's 10 splits of 5,000.

    **Returns:** the mean over splits of ``exp(mean_i KL(p_i || mean_j p_j))``. It is 1 when every
    prediction is the same distribution and the number of classes for confident, balanced ones.
    ``0 log 0`` is taken as 0 (ADM's float arithmetic would give NaN there).
    """
    if splits < 1:
        raise EvalError(f"splits={splits!r} is not allowed: expected a positive int")
    p = np.asarray(probs, np.float64)
    size = math.ceil(len(p) / splits)
    scores = []
    for start in range(0, len(p), size):
        part = p[start : start + size]
        marginal = part.mean(0, keepdims=True)
        safe = np.where(part > 0, part, 1.0)
        kl = np.where(part > 0, part * (np.log(safe) - np.log(np.where(part > 0, marginal, 1.0))), 0.0)
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores))


# ----------------------------------------------------------------------------------------------
# Precision and recall


def _sq_norms(x: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", x, x)


def _sq_dists(a: np.ndarray, a_sq: np.ndarray, b: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
    return np.maximum(a_sq[:, None] - 2.0 * (a @ b.T) + b_sq[None, :], 0.0)


def manifold_radii(
    features: Float[np.ndarray, "n d"], *, k: int = 3, block: int = 4096
) -> Float[np.ndarray, " n"]:
    """Squared L2 distance of each point to its k-th nearest neighbour in the same set (the point
    itself is neighbour 0, as in ADM). Computed in float32 blocks of ``block x block`` distances,
    keeping the ``k + 1`` smallest per row, so memory stays O(n k + block^2)."""
    x = np.asarray(features, np.float32)
    n = len(x)
    if not 0 < k < n:
        raise EvalError(f"k={k} nearest neighbours need more than k points, got {n}")
    sq = _sq_norms(x)
    radii = np.empty(n, np.float32)
    for r in range(0, n, block):
        best = np.full((min(block, n - r), 0), np.inf, np.float32)
        for c in range(0, n, block):
            d = _sq_dists(x[r : r + block], sq[r : r + block], x[c : c + block], sq[c : c + block])
            both = np.concatenate([best, d], axis=1)
            keep = min(k + 1, both.shape[1])
            best = np.partition(both, keep - 1, axis=1)[:, :keep]
        radii[r : r + block] = np.partition(best, k, axis=1)[:, k]
    return radii


def _inside_any_ball(
    points: np.ndarray, centres: np.ndarray, radii: np.ndarray, block: int
) -> np.ndarray:
    """For each point, whether its squared distance to some centre is <= that centre's radius."""
    p_sq, c_sq = _sq_norms(points), _sq_norms(centres)
    inside = np.zeros(len(points), bool)
    for r in range(0, len(points), block):
        for c in range(0, len(centres), block):
            d = _sq_dists(points[r : r + block], p_sq[r : r + block], centres[c : c + block], c_sq[c : c + block])
            inside[r : r + block] |= (d <= radii[None, c : c + block]).any(axis=1)
    return inside


def precision_recall(
    real_features: Float[np.ndarray, "n d"],
    fake_features: Float[np.ndarray, "m d"],
    *,
    k: int = 3,
    block: int = 4096,
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with ADM's conventions.

    **Arguments:**

    - `real_features`: features of the reference set (ADM: the 10k images of the reference batch).
    - `fake_features`: features of the samples.
    - `k`: the neighbourhood size of the radii (ADM: 3).
    - `block`: rows and columns of each block of pairwise distances.

    **Returns:** ``(precision, recall)``: the fraction of samples inside at least one reference
    ball, and the fraction of references inside at least one sample ball.
    """
    real = np.asarray(real_features, np.float32)
    fake = np.asarray(fake_features, np.float32)
    real_radii = manifold_radii(real, k=k, block=block)
    fake_radii = manifold_radii(fake, k=k, block=block)
    precision = _inside_any_ball(fake, real, real_radii, block).mean()
    recall = _inside_any_ball(real, fake, fake_radii, block).mean()
    return float(precision), float(recall)


# ----------------------------------------------------------------------------------------------
# Feature extractors


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


def resolve_extractor(features: "str | FeatureExtractor", *, inception_weights: str | None = None):
    """``"classifier"`` (the bundled-digits classifier), ``"inception"`` (`InceptionFeatureExtractor`
    with `inception_weights`) or a `FeatureExtractor` passed through."""
    if not isinstance(features, str):
        return features
    if features == "classifier":
        from ._classifier import digits_feature_extractor

        return digits_feature_extractor()
    if features == "inception":
        return InceptionFeatureExtractor(inception_weights)
    raise EvalError(f"features={features!r} is not allowed: expected 'classifier' or 'inception'")


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


# ----------------------------------------------------------------------------------------------
# References


DIGITS_REFERENCES = {"digits": "all 1,797 bundled digits", "digits-test": "the 297 held-out digits"}


@dataclasses.dataclass(frozen=True)
class ReferenceStats:
    """What the metrics need from a reference: pool statistics, optional spatial statistics and
    pool features for precision/recall (None when the reference stores statistics only)."""

    pool: FeatureStats
    spatial: FeatureStats | None
    pool_features: Float[np.ndarray, "n d"] | None


def _digits_images(which: str) -> np.ndarray:
    from ..data import load_digits
    from ..images import to_uint8
    from ._classifier import DIGITS_TRAIN_SIZE

    images, _ = load_digits()
    if which == "digits-test":
        images = images[DIGITS_TRAIN_SIZE:]
    return to_uint8(images)


def _reference_id(ref: str, image_size: int | None) -> str:
    if ref in DIGITS_REFERENCES:
        return ref
    path = pathlib.Path(ref).absolute()
    st = path.stat()
    stamp = f"{path}:{st.st_size}:{st.st_mtime_ns}:{image_size if path.is_dir() else ''}"
    return f"{path.stem}-{hashlib.sha256(stamp.encode()).hexdigest()[:16]}"


def _reference_batches(ref: str, batch_size: int, image_size: int | None) -> Iterator[np.ndarray]:
    if ref in DIGITS_REFERENCES:
        images = _digits_images(ref)
        return (images[i : i + batch_size] for i in range(0, len(images), batch_size))
    if pathlib.Path(ref).is_dir():
        from ..data import iter_image_folder

        return iter_image_folder(ref, image_size, batch_size)
    return iter_npz(ref, "arr_0", batch_size)


def reference_stats(
    ref: str,
    extractor: FeatureExtractor,
    *,
    batch_size: int = 256,
    cache: bool = True,
    image_size: int | None = None,
) -> ReferenceStats:
    """Statistics of a reference, from the cache when possible.

    **Arguments:**

    - `ref`: ``digits`` (all 1,797 bundled digits), ``digits-test`` (the 297 the classifier did not
      see in training), or an ADM reference batch ``.npz`` with ``arr_0`` (uint8 NHWC images)
      and/or precomputed ``mu``, ``sigma`` (``mu_s``, ``sigma_s``). Stored statistics are used
      only with an `adm_compatible` extractor (they are Inception statistics); otherwise they are
      computed from ``arr_0``. Or an image folder (ImageNet layout ``ref/<class>/<image>``),
      ADM-centre-cropped to `image_size` (the samples' resolution).
    - `extractor`: the feature extractor.
    - `batch_size`: images per extractor call.
    - `cache`: read and write ``cache_dir()/references/<extractor>/<reference>.npz``.
    - `image_size`: the crop size of an image-folder reference.
    """
    is_dir = ref not in DIGITS_REFERENCES and pathlib.Path(ref).is_dir()
    is_file = ref not in DIGITS_REFERENCES and not is_dir
    if is_file and not pathlib.Path(ref).is_file():
        raise EvalError(
            f"reference {ref!r}: no such file or folder (expected an ADM .npz, an image folder, or "
            f"one of {', '.join(DIGITS_REFERENCES)})"
        )
    if is_dir and image_size is None:
        raise EvalError(f"reference {ref!r} is an image folder: give the image size to crop it to")
    keys = npz_keys(ref) if is_file else ["arr_0"]
    stored = None
    if is_file and extractor.adm_compatible and "mu" in keys and "sigma" in keys:
        spatial = None
        if "mu_s" in keys and "sigma_s" in keys:
            spatial = FeatureStats.load(ref, suffix="_s")
        stored = (FeatureStats.load(ref), spatial)
        if "arr_0" not in keys:
            return ReferenceStats(stored[0], stored[1], None)
    if "arr_0" not in keys:
        raise EvalError(
            f"{ref}: no arr_0 images to compute {extractor.name} features from"
            + (" (its mu/sigma are Inception statistics)" if "mu" in keys else "")
        )

    file = cache_dir() / "references" / extractor.name / f"{_reference_id(ref, image_size)}.npz"
    if cache and file.is_file():
        got = npz_keys(file)
        pool = FeatureStats.load(file, prefix="pool_")
        spatial = FeatureStats.load(file, prefix="spatial_") if "spatial_mu" in got else None
        feats = read_npz(file, "pool_features")
    else:
        features, _ = extract(extractor, _reference_batches(ref, batch_size, image_size))
        pool = FeatureStats.from_features(features.pool)
        spatial = None if features.spatial is None else FeatureStats.from_features(features.spatial)
        feats = features.pool.astype(np.float32)
        if cache:
            file.parent.mkdir(parents=True, exist_ok=True)
            members = {"pool_mu": pool.mu, "pool_sigma": pool.sigma, "pool_n": np.int64(pool.n),
                       "pool_features": feats}
            if spatial is not None:
                members.update(spatial_mu=spatial.mu, spatial_sigma=spatial.sigma, spatial_n=np.int64(spatial.n))
            write_npz(file, members)
    if stored is not None:  # ADM: stored statistics win; arr_0 only feeds precision/recall
        pool, spatial = stored
    return ReferenceStats(pool, spatial, feats)


# ----------------------------------------------------------------------------------------------
# Evaluating a sample file


def evaluate(
    samples: str | os.PathLike,
    ref: str,
    *,
    features: "str | FeatureExtractor" = "classifier",
    inception_weights: str | None = None,
    batch_size: int = 256,
    splits: int = 10,
    k: int = 3,
    cache: bool = True,
    limit: int | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """FID, sFID, Inception Score and precision/recall of a sample batch against a reference.

    **Arguments:**

    - `samples`: an ADM sample batch, ``.npz`` with ``arr_0`` uint8 ``(N, H, W, C)`` (what
      `generate` and DiT/SiT's ``sample_ddp.py`` write); read in batches.
    - `ref`: the reference, see `reference_stats`.
    - `features`: ``"classifier"`` (the bundled-digits classifier: *FID-classifier*, the number the
      CPU experiments report; 8x8x1 images only), ``"inception"`` (FID-Inception, the papers'
      number; needs ``inception_weights``) or any `FeatureExtractor`.
    - `inception_weights`: the Inception weight file, for ``features="inception"``.
    - `batch_size`: images per extractor call.
    - `splits`: Inception Score splits (10, as ADM for 50k).
    - `k`: neighbourhood size of precision/recall (3, as ADM).
    - `cache`: cache the reference statistics (`reference_stats`).
    - `limit`: evaluate only the first `limit` samples.
    - `log`: called with progress messages (e.g. ``print``).

    **Returns:** a JSON-able dict: ``fid``, ``sfid`` (None without spatial features),
    ``inception_score`` (None without class probabilities), ``precision`` and ``recall`` (None when
    the reference has no images), counts, names and ``seconds``.
    """
    say = log or (lambda message: None)
    start = time.perf_counter()
    shape, dtype = npz_info(samples, "arr_0")
    if dtype != np.uint8 or len(shape) != 4:
        raise EvalError(
            f"{samples}: arr_0 is {dtype}{list(shape)}, expected uint8 (N, H, W, C) as the ADM evaluator"
        )
    extractor = resolve_extractor(features, inception_weights=inception_weights)
    say(f"reference {ref}: {extractor.name} statistics")
    reference = reference_stats(
        ref, extractor, batch_size=batch_size, cache=cache, image_size=shape[1]
    )
    say(f"samples {samples}: {extractor.name} features of {shape[0] if limit is None else min(limit, shape[0])} images")
    feats, count = extract(extractor, iter_npz(samples, "arr_0", batch_size, limit=limit))
    extracted = time.perf_counter()
    pool = FeatureStats.from_features(feats.pool)
    result: dict = {
        "samples": str(samples),
        "reference": str(ref),
        "features": extractor.name,
        "num_samples": count,
        "num_reference_images": None if reference.pool_features is None else len(reference.pool_features),
        "fid": pool.frechet_distance(reference.pool),
        "sfid": None,
        "inception_score": None,
        "precision": None,
        "recall": None,
    }
    if feats.spatial is not None and reference.spatial is not None:
        result["sfid"] = FeatureStats.from_features(feats.spatial).frechet_distance(reference.spatial)
    if feats.probs is not None:
        result["inception_score"] = inception_score(feats.probs, splits=splits)
    if reference.pool_features is not None:
        result["precision"], result["recall"] = precision_recall(reference.pool_features, feats.pool, k=k)
    end = time.perf_counter()
    result["seconds"] = round(end - start, 3)
    result["seconds_features"] = round(extracted - start, 3)
    result["seconds_metrics"] = round(end - extracted, 3)
    return result


def format_report(result: dict) -> str:
    """A small text table of `evaluate`'s result; metric names carry the feature extractor's kind
    (``FID-classifier``, ``FID-inception``)."""
    kind = str(result["features"]).split("-")[0]
    rows = [
        (f"FID-{kind}", result["fid"]),
        (f"sFID-{kind}", result["sfid"]),
        (f"IS-{kind}", result["inception_score"]),
        ("precision", result["precision"]),
        ("recall", result["recall"]),
    ]
    lines = [f"{result['samples']}: {result['num_samples']} samples vs {result['reference']}"]
    lines += [f"  {name:<16}{'n/a' if value is None else f'{value:.4f}'}" for name, value in rows]
    lines.append(f"  {'seconds':<16}{result['seconds']:.1f}")
    return "\n".join(lines)


def write_report(result: dict, path: str | os.PathLike) -> None:
    """Write `evaluate`'s result as JSON (atomically)."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)


__all__ = [
    "DIGITS_REFERENCES",
    "FeatureExtractor",
    "FeatureStats",
    "Features",
    "InceptionFeatureExtractor",
    "ReferenceStats",
    "cache_dir",
    "evaluate",
    "extract",
    "fid_from_features",
    "format_report",
    "frechet_distance",
    "inception_score",
    "manifold_radii",
    "precision_recall",
    "reference_stats",
    "resolve_extractor",
    "write_report",
]
