"""Sample-quality metrics with the conventions of the ADM evaluator, on feature arrays.

The conventions (``openai/guided-diffusion`` ``evaluations/evaluator.py``):

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

Where the features come from is `_features`; running the metrics on a sample file against a
reference is `_evaluate`.
"""

import dataclasses
import math
import os
import warnings

import numpy as np
from jaxtyping import Float

from ._npz import EvalError, npz_keys, read_npz, write_npz

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


__all__ = [
    "FeatureStats",
    "fid_from_features",
    "frechet_distance",
    "inception_score",
    "manifold_radii",
    "precision_recall",
]
