"""Metrics of eqdisp.eval against independent computations and constructed cases."""

import json

import numpy as np
import pytest


@pytest.fixture
def cache_home(tmp_path_factory, monkeypatch):
    """One XDG cache for the whole session, so the digits classifier trains once."""
    path = tmp_path_factory.getbasetemp() / "xdg-cache"
    path.mkdir(exist_ok=True)
    monkeypatch.setenv("XDG_CACHE_HOME", str(path))
    return path


def _random_cov(rng, d, n):
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
    return x.mean(0), np.cov(x, rowvar=False)


def test_frechet_distance_matches_an_independent_scipy_computation():
    from scipy import linalg

    from eqdisp.eval import frechet_distance

    rng = np.random.default_rng(0)
    for d in (3, 16, 64):
        mu1, s1 = _random_cov(rng, d, 4 * d)
        mu2, s2 = _random_cov(rng, d, 4 * d)
        # Tr((S1 S2)^1/2) as the sum of square roots of the eigenvalues of S1 S2 (torchmetrics).
        tr_sqrt = np.sqrt(linalg.eigvals(s1 @ s2).real.clip(0)).sum()
        want = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
        got = frechet_distance(mu1, s1, mu2, s2)
        assert isinstance(got, float)
        assert got == pytest.approx(want, rel=1e-9, abs=1e-9)
        assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8 * np.trace(s1))


def test_frechet_distance_of_singular_covariances_is_finite():
    from eqdisp.eval import EvalError, FeatureStats, frechet_distance

    rng = np.random.default_rng(1)
    a = FeatureStats.from_features(rng.normal(size=(5, 32)))  # rank 4 of 32
    b = FeatureStats.from_features(rng.normal(size=(5, 32)) + 1.0)
    value = a.frechet_distance(b)
    assert np.isfinite(value) and value > 0
    from jaxtyping import TypeCheckError

    # The runtime type check of the tests catches the mismatch first; without it, EvalError does.
    with pytest.raises((EvalError, TypeCheckError)):
        frechet_distance(a.mu, a.sigma, a.mu[:3], a.sigma[:3, :3])


def test_feature_stats_are_numpy_mean_and_unbiased_cov_and_round_trip(tmp_path):
    from eqdisp.eval import FeatureStats

    x = np.random.default_rng(2).normal(size=(50, 6)).astype(np.float32)
    stats = FeatureStats.from_features(x, chunk=7)
    np.testing.assert_allclose(stats.mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-10)
    assert stats.mu.dtype == np.float64 and stats.n == 50
    stats.save(tmp_path / "s.npz", prefix="pool_")
    loaded = FeatureStats.load(tmp_path / "s.npz", prefix="pool_")
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    assert loaded.n == 50


def test_inception_score_of_uniform_predictions_is_one_and_of_confident_balanced_ones_is_k():
    from eqdisp.eval import inception_score

    assert inception_score(np.full((100, 10), 0.1)) == pytest.approx(1.0, abs=1e-12)
    one_hot = np.eye(7)[np.arange(700) % 7]  # every split holds each class equally often
    assert inception_score(one_hot, splits=10) == pytest.approx(7.0, rel=1e-12)
    # One split of identical one-hot predictions has IS 1; ADM averages over splits.
    halves = np.eye(2)[np.repeat([0, 1], 50)]
    assert inception_score(halves, splits=2) == pytest.approx(1.0)
    assert inception_score(halves, splits=1) == pytest.approx(2.0)


def _naive_pr(real, fake, k):
    from sklearn.neighbors import NearestNeighbors

    def radii(x):
        dist, _ = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x)
        return dist[:, k] ** 2  # neighbour 0 is the point itself

    d = ((fake[:, None, :] - real[None, :, :]) ** 2).sum(-1)
    precision = (d <= radii(real)[None, :]).any(1).mean()
    recall = (d.T <= radii(fake)[None, :]).any(1).mean()
    return precision, recall


def test_precision_recall_on_constructed_point_sets():
    from eqdisp.eval import precision_recall

    rng = np.random.default_rng(3)
    real = rng.normal(size=(100, 4)).astype(np.float32)
    far = rng.normal(size=(40, 4)).astype(np.float32) + 1000.0
    # 60 exact copies of references (inside their balls) and 40 points far away: precision 0.6.
    fake = np.concatenate([real[:60], far])
    precision, recall = precision_recall(real, fake, k=3, block=16)
    assert precision == pytest.approx(0.6)
    assert recall >= 0.6  # the copies themselves are recalled
    assert (precision, recall) == pytest.approx(_naive_pr(real, fake, 3), abs=1e-12)
    assert precision_recall(real, real, k=3) == (1.0, 1.0)
    assert precision_recall(real, far, k=3) == (0.0, 0.0)
    other = rng.normal(size=(70, 4)).astype(np.float32) * 1.5 + 0.3
    assert precision_recall(real, other, k=3, block=9) == pytest.approx(_naive_pr(real, other, 3), abs=1e-12)


def test_fid_classifier_of_a_set_with_itself_is_zero_and_grows_with_noise(cache_home):
    from eqdisp.eval import (
        CLASSIFIER_SETTINGS,
        classifier_path,
        digits_classifier_accuracy,
        digits_feature_extractor,
        fid_from_features,
    )
    from eqdisp.eval._classifier import digits_uint8

    extractor = digits_feature_extractor()
    assert classifier_path().is_file() and str(classifier_path()).startswith(str(cache_home))
    assert digits_classifier_accuracy(extractor.model) > 0.9
    images, _ = digits_uint8()
    clean = extractor(images)
    assert clean.pool.shape == (1797, CLASSIFIER_SETTINGS["hidden"]) and clean.spatial.shape == (1797, 112)
    assert np.allclose(clean.probs.sum(1), 1.0)
    assert abs(fid_from_features(clean.pool, clean.pool)) < 1e-6
    rng = np.random.default_rng(4)
    fids = []
    for scale in (8, 32, 96):
        noisy = np.clip(images + rng.normal(scale=scale, size=images.shape), 0, 255).astype(np.uint8)
        fids.append(fid_from_features(clean.pool, extractor(noisy).pool))
    assert 0 < fids[0] < fids[1] < fids[2]


@pytest.mark.slow
def test_digits_classifier_training_is_deterministic(cache_home):
    import jax

    from eqdisp.eval import load_digits_classifier

    cached = load_digits_classifier()
    again = load_digits_classifier(cache=False)
    for a, b in zip(jax.tree.leaves(cached), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class _MeanExtractor:
    """A stand-in for Inception: per-channel means and a 2x2 average map as features."""

    name = "test-means"
    adm_compatible = True

    def __call__(self, images):
        from eqdisp.eval import Features

        x = images.astype(np.float32)
        pool = np.concatenate([x.mean((1, 2)), x.std((1, 2))], axis=1)
        n, h, w, c = x.shape
        spatial = x.reshape(n, 2, h // 2, 2, w // 2, c).mean((2, 4)).reshape(n, -1)
        return Features(pool, spatial, None)


def test_adm_reference_statistics_are_used_and_computed_ones_cached(tmp_path, cache_home):
    from eqdisp.eval import FeatureStats, evaluate, write_npz

    rng = np.random.default_rng(5)
    ref_images = rng.integers(0, 256, size=(64, 4, 4, 3), dtype=np.uint8)
    samples = rng.integers(0, 200, size=(48, 4, 4, 3), dtype=np.uint8)
    write_npz(tmp_path / "samples.npz", {"arr_0": samples})
    extractor = _MeanExtractor()
    sample_feats = extractor(samples)
    ref_feats = extractor(ref_images)

    # arr_0 only: statistics computed from the images, then cached per (extractor, reference).
    write_npz(tmp_path / "ref.npz", {"arr_0": ref_images})
    result = evaluate(tmp_path / "samples.npz", str(tmp_path / "ref.npz"), features=extractor, batch_size=10)
    want = FeatureStats.from_features(sample_feats.pool).frechet_distance(FeatureStats.from_features(ref_feats.pool))
    assert result["fid"] == pytest.approx(want, rel=1e-9)
    assert result["sfid"] is not None and result["inception_score"] is None
    assert result["num_samples"] == 48 and result["num_reference_images"] == 64
    assert list((cache_home / "eqdisp" / "references" / "test-means").glob("ref-*.npz"))
    again = evaluate(tmp_path / "samples.npz", str(tmp_path / "ref.npz"), features=extractor)
    assert again["fid"] == pytest.approx(result["fid"], rel=1e-12)

    # Stored mu/sigma (ADM) win over arr_0, which then only feeds precision/recall.
    stored = FeatureStats.from_features(ref_feats.pool[:20])
    write_npz(
        tmp_path / "adm.npz",
        {"arr_0": ref_images, "mu": stored.mu, "sigma": stored.sigma},
    )
    adm = evaluate(tmp_path / "samples.npz", str(tmp_path / "adm.npz"), features=extractor, cache=False)
    assert adm["fid"] == pytest.approx(FeatureStats.from_features(sample_feats.pool).frechet_distance(stored))
    assert adm["sfid"] is None  # no mu_s/sigma_s stored
    assert (adm["precision"], adm["recall"]) == (result["precision"], result["recall"])
    json.dumps(adm)  # JSON-able


def test_npz_streaming_round_trip(tmp_path):
    from eqdisp.eval import EvalError, iter_npz, npz_info, npz_keys, read_npz, write_npz

    a = np.arange(7 * 2 * 3, dtype=np.uint8).reshape(7, 2, 3)
    write_npz(tmp_path / "a.npz", {"arr_0": (a.shape, np.uint8, [a[:3], a[3:]]), "n": np.int64(7)})
    with np.load(tmp_path / "a.npz") as data:
        np.testing.assert_array_equal(data["arr_0"], a)
    assert npz_keys(tmp_path / "a.npz") == ["arr_0", "n"]
    assert npz_info(tmp_path / "a.npz", "arr_0") == ((7, 2, 3), np.dtype(np.uint8))
    assert int(read_npz(tmp_path / "a.npz", "n")) == 7
    np.savez_compressed(tmp_path / "c.npz", arr_0=a)
    chunks = list(iter_npz(tmp_path / "c.npz", "arr_0", 3))
    assert [len(c) for c in chunks] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(chunks), a)
    with pytest.raises(EvalError, match="expected 7"):
        write_npz(tmp_path / "b.npz", {"arr_0": (a.shape, np.uint8, [a[:3]])})
    assert not (tmp_path / "b.npz").exists()


def test_evaluate_rejects_non_uint8_samples(tmp_path):
    from eqdisp.eval import EvalError, evaluate

    np.savez(tmp_path / "f.npz", arr_0=np.zeros((4, 8, 8, 1), np.float32))
    with pytest.raises(EvalError, match="expected uint8"):
        evaluate(tmp_path / "f.npz", "digits")
    with pytest.raises(EvalError, match="no such file"):
        evaluate(tmp_path / "missing.npz", "digits")


class _ColourFeatures:
    """A transparent extractor for tests: per-channel means and standard deviations."""

    name = "colour-moments"
    adm_compatible = False

    def __call__(self, images):
        from eqdisp.eval import Features

        x = images.astype(np.float64) / 255.0
        pool = np.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2))], axis=1)
        return Features(pool=pool, spatial=None, probs=None)


def test_an_image_folder_is_a_reference(tmp_path, cache_home):
    """A folder of images is read with the ADM centre crop to the samples' size, like a ref npz."""
    from PIL import Image

    from eqdisp.data import adm_center_crop
    from eqdisp.eval import EvalError, evaluate, reference_stats, write_npz

    rng = np.random.default_rng(0)
    crops = []
    for label in ("a", "b"):
        (tmp_path / "ref" / label).mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 256, (20 + 3 * i, 17 + 2 * i, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "ref" / label / f"{i}.png")
            crops.append(np.asarray(adm_center_crop(Image.fromarray(pixels), 8)))
    write_npz(tmp_path / "same.npz", {"arr_0": np.stack(crops)})

    stats = reference_stats(str(tmp_path / "ref"), _ColourFeatures(), image_size=8, cache=False)
    expected = _ColourFeatures()(np.stack(crops)).pool
    np.testing.assert_allclose(stats.pool.mu, expected.mean(axis=0), rtol=1e-12)
    report = evaluate(tmp_path / "same.npz", str(tmp_path / "ref"), features=_ColourFeatures(), cache=False)
    assert abs(report["fid"]) < 1e-6
    with pytest.raises(EvalError, match="image folder"):
        reference_stats(str(tmp_path / "ref"), _ColourFeatures(), cache=False)
