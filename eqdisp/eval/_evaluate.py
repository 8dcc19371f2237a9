"""`evaluate`: the metrics of a sample batch against a reference (``python -m cli.evaluate``).

Statistics of a reference are cached in the user's cache directory (`cache_dir`), keyed by the
feature extractor and the reference, so evaluating many sample sets against one reference
extracts its features once.
"""

import dataclasses
import hashlib
import json
import os
import pathlib
import time
from collections.abc import Callable, Iterator

import numpy as np
from jaxtyping import Float

from ..data import iter_image_folder, load_digits
from ..images import to_uint8
from ..io import write_text_atomically
from ._classifier import DIGITS_TRAIN_SIZE, digits_feature_extractor
from ._features import FeatureExtractor, InceptionFeatureExtractor, cache_dir, extract
from ._metrics import FeatureStats, inception_score, precision_recall
from ._npz import EvalError, iter_npz, npz_info, npz_keys, read_npz, write_npz


def resolve_extractor(features: "str | FeatureExtractor", *, inception_weights: str | None = None):
    """``"classifier"`` (the bundled-digits classifier), ``"inception"`` (`InceptionFeatureExtractor`
    with `inception_weights`) or a `FeatureExtractor` passed through."""
    if not isinstance(features, str):
        return features
    if features == "classifier":
        return digits_feature_extractor()
    if features == "inception":
        return InceptionFeatureExtractor(inception_weights)
    raise EvalError(f"features={features!r} is not allowed: expected 'classifier' or 'inception'")


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
    write_text_atomically(path, json.dumps(result, indent=2) + "\n")


__all__ = [
    "DIGITS_REFERENCES",
    "ReferenceStats",
    "evaluate",
    "format_report",
    "reference_stats",
    "resolve_extractor",
    "write_report",
]
