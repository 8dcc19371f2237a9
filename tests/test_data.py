"""Tests of eqdisp.data: the ADM crop, the four sources, determinism, sharding, resumption, errors.

Everything runs on tiny generated folders and shards in ``tmp_path``; nothing is downloaded.
"""

import numpy as np
import pytest
from PIL import Image

SCALE = 0.18215


@pytest.fixture
def D():
    # Imported inside a fixture so that the jaxtyping import hook instruments the module.
    from eqdisp import data

    return data


def _cfg(**kwargs):
    from eqdisp.config import DataConfig

    return DataConfig(**kwargs)


def _take(ds, count):
    it = iter(ds)
    out = [next(it) for _ in range(count)]
    it.close()
    return out


def _same(a, b):
    return all(
        np.array_equal(x["x"], y["x"]) and np.array_equal(x["y"], y["y"]) for x, y in zip(a, b)
    )


# ----------------------------------------------------------------------------------------------
# Fixtures: an image folder and latent shards


def _reference_crop(image, size):
    """ADM's centre crop, re-derived from the reference description with PIL's own crop()."""
    w, h = image.size
    while min(w, h) >= 2 * size:
        w, h = w // 2, h // 2
        image = image.resize((w, h), Image.BOX)
    factor = size / min(w, h)
    w, h = round(w * factor), round(h * factor)
    image = image.resize((w, h), Image.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)))


def _reference_tensor(file, size):
    with Image.open(file) as image:
        crop = _reference_crop(image.convert("RGB"), size)
    return ((crop.astype(np.float32) / np.float32(255)) - np.float32(0.5)) / np.float32(0.5)


IMAGE_SIZES = [(300, 200), (70, 90), (64, 64), (41, 129), (100, 33)]


@pytest.fixture
def folder(tmp_path):
    """2 classes x 5 images of odd sizes, mixed formats and modes, plus files to skip."""
    root = tmp_path / "imagenet"
    rng = np.random.default_rng(0)
    files = []
    for cls, exts in (("bee", ["png", "JPG", "bmp", "png", "webp"]), ("ant", ["png"] * 5)):
        (root / cls).mkdir(parents=True)
        for i, ((w, h), ext) in enumerate(zip(IMAGE_SIZES, exts)):
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            image = Image.fromarray(pixels)
            if cls == "ant" and i == 1:
                image = image.convert("L")  # a grey image is read as RGB
            file = root / cls / f"img{i}.{ext}"
            image.save(file, **({"quality": 95} if ext.lower() == "jpg" else {}))
            files.append((file, 0 if cls == "ant" else 1))
        (root / cls / "notes.txt").write_text("not an image")
        (root / cls / ".hidden.png").write_bytes(b"skipped")
    return root, files


def _write_index_shards(D, root, sizes=(7, 6, 8), shape=(1, 2, 2)):
    """Shards whose record i is filled with the value i (identifiable) and labelled i % 3."""
    root.mkdir(parents=True, exist_ok=True)
    start = 0
    for k, n in enumerate(sizes):
        index = np.arange(start, start + n)
        latents = np.broadcast_to(index[:, None, None, None], (n, *shape)).astype(np.float32)
        D.write_latent_shard(root / f"shard{k:02d}.npz", latents=latents, labels=index % 3)
        start += n
    return root, start


def _index_dataset(D, root, **kwargs):
    args = {"batch_size": 3, "seed": 0, "shape": (1, 2, 2), "num_classes": 3}
    cfg_args = {"flip": False} | {k: kwargs.pop(k) for k in ("flip", "workers") if k in kwargs}
    return D.make_dataset(_cfg(source="latents", path=str(root), **cfg_args), **(args | kwargs))


def _ids(batches):
    return np.concatenate([b["x"][:, 0, 0, 0] for b in batches]).astype(int)


# ----------------------------------------------------------------------------------------------
# ADM crop and the folder source


@pytest.mark.parametrize(
    "size, side",
    [((300, 200), 16), ((70, 90), 32), ((64, 64), 32), ((1000, 517), 64), ((33, 47), 64)],
)
def test_adm_center_crop_matches_reference(D, size, side):
    # (300, 200)->16 halves three times, (70, 90)->32 once, (64, 64)->32 once then no resize,
    # (33, 47)->64 upsamples.
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    crop = D.adm_center_crop(image, side)
    assert crop.size == (side, side)
    np.testing.assert_array_equal(np.asarray(crop), _reference_crop(image, side))


def test_folder_images_labels_and_flips(D, folder):
    root, files = folder
    refs = {str(f): (_reference_tensor(f, 16).transpose(2, 0, 1), label) for f, label in files}
    ds = D.make_dataset(
        _cfg(source="folder", path=str(root), image_size=16, flip=True),
        batch_size=2,
        seed=0,
        shape=(3, 16, 16),
        num_classes=2,
    )
    epochs = 8
    batches = _take(ds, 5 * epochs)
    flips, seen = 0, []
    for b in batches:
        assert b["x"].shape == (2, 3, 16, 16) and b["x"].dtype == np.float32
        assert b["y"].shape == (2,) and b["y"].dtype == np.int32
        assert b["x"].min() >= -1.0 and b["x"].max() <= 1.0
        for x, y in zip(b["x"], b["y"]):
            match = [
                (f, bool(flipped))
                for f, (ref, label) in refs.items()
                for flipped, candidate in enumerate((ref, ref[..., ::-1]))
                if np.array_equal(x, candidate)
            ]
            assert len(match) == 1, "each record is one image, as is or mirrored"
            assert y == refs[match[0][0]][1], "labels follow the sorted class folders"
            seen.append(match[0][0])
            flips += match[0][1]
    for e in range(epochs):  # every epoch reads each image exactly once
        assert sorted(seen[10 * e : 10 * e + 10]) == sorted(refs)
    assert 0.3 < flips / len(seen) < 0.7  # p = 0.5 over 80 draws: 4.5 sigma either side


def test_folder_sorted_classes_and_files(D, folder):
    root, _ = folder
    src = D._FolderSource(str(root), 16)
    assert src.classes == ("ant", "bee")
    assert len(src) == 10, "notes.txt and .hidden.png are skipped; .JPG is read"
    assert src.files == sorted(src.files[:5]) + sorted(src.files[5:])
    assert list(src.labels) == [0] * 5 + [1] * 5


def test_digits_ignore_flip(D):
    images, labels = D.load_digits()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == np.float32
    assert labels.dtype == np.int32 and set(labels.tolist()) == set(range(10))
    assert images.min() == -1.0 and images.max() == 1.0
    ds = D.make_dataset(
        _cfg(source="digits", flip=True), batch_size=256, seed=3, shape=(1, 8, 8), num_classes=10
    )
    rows = {(im.tobytes(), int(y)) for im, y in zip(images, labels)}
    epoch = _take(ds, 1797 // 256)
    got = [(x.tobytes(), int(y)) for b in epoch for x, y in zip(b["x"], b["y"])]
    assert len(set(got)) > 1700 and all(r in rows for r in got), "digits are never mirrored"


def test_synthetic_deterministic_gaussian(D):
    make = lambda seed: D.make_dataset(
        _cfg(source="synthetic"), batch_size=500, seed=seed, shape=(4, 8, 8), num_classes=7
    )
    a, b, c = _take(make(0), 4), _take(make(0), 4), _take(make(1), 1)
    assert _same(a, b) and not np.array_equal(a[0]["x"], c[0]["x"])
    x = np.stack([batch["x"] for batch in a])
    y = np.concatenate([batch["y"] for batch in a])
    assert x.shape == (4, 500, 4, 8, 8) and x.dtype == np.float32
    assert abs(x.mean()) < 0.01 and abs(x.std() - 1.0) < 0.01
    assert y.dtype == np.int32 and set(y.tolist()) == set(range(7))


# ----------------------------------------------------------------------------------------------
# Order, determinism, sharding, resumption


def test_each_epoch_is_a_fresh_permutation(D, tmp_path):
    root, n = _write_index_shards(D, tmp_path / "lat")
    batches = _take(_index_dataset(D, root), 3 * (n // 3))
    ids = _ids(batches)
    epochs = ids.reshape(3, n)
    for e in epochs:
        assert sorted(e) == list(range(n))
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    labels = np.concatenate([b["y"] for b in batches])
    np.testing.assert_array_equal(labels, ids % 3)
    assert type(batches[0]["x"]) is np.ndarray and batches[0]["x"].dtype == np.float32
    assert (
        batches[0]["x"].shape == (3, 1, 2, 2) and labels.dtype == np.int32
    )  # labels stay aligned across shards


def test_same_seed_same_stream_different_seed_different(D, tmp_path):
    root, _ = _write_index_shards(D, tmp_path / "lat")
    a = _take(_index_dataset(D, root, seed=5, flip=True), 10)
    b = _take(_index_dataset(D, root, seed=5, flip=True), 10)
    c = _take(_index_dataset(D, root, seed=6, flip=True), 10)
    assert _same(a, b)
    assert not np.array_equal(_ids(a), _ids(c))


@pytest.mark.parametrize("count", [2, 3])
def test_shards_disjoint_and_covering(D, tmp_path, count):
    root, n = _write_index_shards(D, tmp_path / "lat")
    parts = []
    for index in range(count):
        size = len(range(index, n, count))
        ds = _index_dataset(D, root, batch_size=1, shard_index=index, shard_count=count)
        parts.append(set(_ids(_take(ds, size)).tolist()))
        assert len(parts[-1]) == size
    assert set().union(*parts) == set(range(n))
    assert sum(map(len, parts)) == n


def test_shards_draw_independent_noise(D, tmp_path):
    # Position j of every shard must not share its flip and posterior noise with the other shards.
    root = tmp_path / "lat"
    root.mkdir()
    moments = np.concatenate([np.zeros((8, 1, 4, 4)), np.ones((8, 1, 4, 4))], axis=1)
    D.write_latent_shard(
        root / "a.npz", moments=moments.astype(np.float32), labels=np.zeros(8, int)
    )
    args = {"batch_size": 4, "seed": 0, "shape": (1, 4, 4), "num_classes": 1, "shard_count": 2}
    cfg = _cfg(source="latents", path=str(root))
    a = _take(D.make_dataset(cfg, shard_index=0, **args), 1)[0]["x"]
    b = _take(D.make_dataset(cfg, shard_index=1, **args), 1)[0]["x"]
    assert not np.allclose(a, b)


def test_iterator_state_round_trip_across_epochs(D, tmp_path):
    root = tmp_path / "lat"
    root.mkdir()
    rng = np.random.default_rng(0)
    moments = np.concatenate(
        [rng.normal(size=(10, 2, 4, 4)), rng.uniform(0.5, 1, (10, 2, 4, 4))], 1
    )
    D.write_latent_shard(
        root / "a.npz", moments=moments.astype(np.float32), labels=np.arange(10) % 4
    )
    make = lambda: D.make_dataset(
        _cfg(source="latents", path=str(root), flip=True),
        batch_size=3,
        seed=0,
        shape=(2, 4, 4),
        num_classes=4,
    )
    it = iter(make())
    [next(it) for _ in range(2)]  # k = 2 of the 3 batches of an epoch
    state = it.get_state()
    expected = [next(it) for _ in range(5)]  # m = 5: crosses into epochs 1 and 2
    fresh = iter(make())
    fresh.set_state(state)
    assert _same(expected, [next(fresh) for _ in range(5)])


def test_orbax_checkpoint_of_the_iterator(D, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    make = lambda: D.make_dataset(
        _cfg(source="digits"), batch_size=64, seed=0, shape=(1, 8, 8), num_classes=10
    )
    it = iter(make())
    [next(it) for _ in range(30)]  # an epoch is 28 batches
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(30, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
        expected = [next(it) for _ in range(3)]
        fresh = iter(make())
        mngr.restore(
            30, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(fresh))
        )
    assert _same(expected, [next(fresh) for _ in range(3)])


def test_workers_match_in_process(D, tmp_path):
    # One worker pool costs 3-5 s here (the workers import jax); the resume test below is slow.
    root, _ = _write_index_shards(D, tmp_path / "lat")
    serial = _take(_index_dataset(D, root, flip=True), 20)
    assert _same(serial, _take(_index_dataset(D, root, flip=True, workers=2), 20))


@pytest.mark.slow
def test_workers_resume(D, tmp_path):
    root, _ = _write_index_shards(D, tmp_path / "lat")
    serial = _take(_index_dataset(D, root, flip=True), 20)
    it = iter(_index_dataset(D, root, flip=True, workers=2))
    try:
        [next(it) for _ in range(12)]  # past the 7-batch epoch
        state = it.get_state()
    finally:
        it.close()
    it = iter(_index_dataset(D, root, flip=True, workers=2))
    try:
        it.set_state(state)
        assert _same(serial[12:], [next(it) for _ in range(8)])
    finally:
        it.close()


# ----------------------------------------------------------------------------------------------
# Latents


def test_latent_moments_are_resampled_each_epoch(D, tmp_path):
    root = tmp_path / "lat"
    root.mkdir()
    rng = np.random.default_rng(0)
    # 256 records: grain's index shuffle is slow on very small data sets (ms per read at n = 4).
    n, draws = 256, 24
    mean = rng.normal(size=(n, 2, 4, 4)).astype(np.float32)
    std = rng.uniform(0.5, 2.0, (n, 2, 4, 4)).astype(np.float32)
    D.write_latent_shard(
        root / "a.npz", moments=np.concatenate([mean, std], 1), labels=np.arange(n)
    )
    ds = D.make_dataset(
        _cfg(source="latents", path=str(root), flip=False),
        batch_size=n,
        seed=0,
        shape=(2, 4, 4),
        num_classes=n,
    )
    batches = _take(ds, draws)  # one batch per epoch: every record drawn once per epoch
    x = np.stack([b["x"] for b in batches])
    y = np.stack([b["y"] for b in batches])
    order = np.argsort(y, axis=1)  # labels identify the records
    z = np.take_along_axis(x, order[:, :, None, None, None], axis=1)  # (draws, record, c, h, w)
    np.testing.assert_array_equal(np.sort(y, axis=1), np.tile(np.arange(n), (draws, 1)))
    # z = (mean + std * eps) * 0.18215 with eps ~ N(0, 1): 196,608 normalised draws
    eps = (z / SCALE - mean) / std
    assert abs(eps.mean()) < 0.01 and abs(eps.std() - 1.0) < 0.01
    se = SCALE * std / np.sqrt(draws)  # per record and element: 6 sigma
    assert np.all(np.abs(z.mean(0) - mean * SCALE) < 6 * se)
    # fresh noise every epoch: consecutive draws of a record are uncorrelated
    assert abs(np.corrcoef(eps[:-1].ravel(), eps[1:].ravel())[0, 1]) < 0.01


def test_latents_read_as_stored_and_flipped(D, tmp_path):
    root = tmp_path / "lat"
    root.mkdir()
    rng = np.random.default_rng(0)
    latents = rng.normal(size=(6, 4, 4, 4)).astype(np.float32)
    D.write_latent_shard(root / "a.npz", latents=latents[:4], labels=np.arange(4))
    np.savez_compressed(
        root / "b.npz", latents=latents[4:], labels=np.arange(4, 6)
    )  # not mmap-able
    ds = D.make_dataset(
        _cfg(source="latents", path=str(root), flip=True),
        batch_size=6,
        seed=0,
        shape=(4, 4, 4),
        num_classes=6,
    )
    flips = 0
    for b in _take(ds, 20):
        for x, y in zip(b["x"], b["y"]):
            if np.array_equal(x, latents[y]):
                continue
            np.testing.assert_array_equal(x, latents[y][..., ::-1])
            flips += 1
    assert 40 < flips < 80  # p = 0.5 over 120 draws: 3.7 sigma either side


def test_flips_read_the_mirrored_images_own_posterior(D, tmp_path):
    """With ``moments_flipped`` (``cli.prepare --flip``) a flip picks the mirrored image's
    posterior, never a mirrored latent; without ``flip`` only the original posterior is read."""
    root = tmp_path / "lat"
    root.mkdir()
    rng = np.random.default_rng(0)
    n = 8
    mean, mean_flipped = rng.normal(size=(2, n, 2, 4, 4)).astype(np.float32)
    zero = np.zeros_like(mean)  # std 0: a read gives mean * 0.18215 exactly
    D.write_latent_shard(
        root / "a.npz",
        moments=np.concatenate([mean, zero], 1),
        moments_flipped=np.concatenate([mean_flipped, zero], 1),
        labels=np.arange(n),
    )
    counts = {}
    for flip in (True, False):
        cfg = _cfg(source="latents", path=str(root), flip=flip)
        ds = D.make_dataset(cfg, batch_size=n, seed=0, shape=(2, 4, 4), num_classes=n)
        counts[flip] = 0
        for b in _take(ds, 15):
            for x, y in zip(b["x"], b["y"]):
                if np.array_equal(x, mean[y] * np.float32(SCALE)):
                    continue
                np.testing.assert_array_equal(x, mean_flipped[y] * np.float32(SCALE))
                counts[flip] += 1
    assert counts[False] == 0
    assert 40 < counts[True] < 80  # p = 0.5 over 120 draws
    with pytest.raises(D.DataError, match="moments_flipped needs moments of the same shape"):
        D.write_latent_shard(root / "b.npz", latents=mean, moments_flipped=mean, labels=np.arange(n))


def test_latent_source_memory_maps(D, tmp_path):
    root, _ = _write_index_shards(D, tmp_path / "lat")
    src = D._LatentSource(str(root), (1, 2, 2), 3)
    assert all(m.offset is not None for m in src.members)
    src[20]
    assert isinstance(src._arrays[(2, False)], np.memmap)
    import pickle

    assert pickle.loads(pickle.dumps(src))._arrays == {}  # workers re-open the maps


# ----------------------------------------------------------------------------------------------
# Errors: one line, naming the path or the value


def _npz(root, name, **arrays):
    root.mkdir(parents=True, exist_ok=True)
    np.savez(root / name, **arrays)
    return root


_F4 = np.zeros((2, 4, 4, 4), np.float32)


def _error_cases(tmp, folder_root):
    """(name, DataConfig kwargs, make_dataset kwargs, expected substring) per error."""
    some_file = tmp / "file.txt"
    some_file.write_text("x")
    (tmp / "noclasses").mkdir()
    (tmp / "emptyclass" / "cat").mkdir(parents=True)
    (tmp / "nolatents").mkdir()
    (tmp / "garbage").mkdir()
    (tmp / "garbage" / "bad.npz").write_bytes(b"not a zip")
    img = {"shape": (3, 16, 16), "num_classes": 2}
    lat = {"shape": (4, 4, 4), "num_classes": 10}
    ok = {"labels": np.arange(2)}
    return [
        ("folder path unset", {"source": "folder"}, img, "data.path is not set"),
        ("folder missing", {"source": "folder", "path": str(tmp / "nope")}, img, str(tmp / "nope")),
        ("folder is a file", {"source": "folder", "path": str(some_file)}, img, "not a directory"),
        (
            "no classes",
            {"source": "folder", "path": str(tmp / "noclasses")},
            img,
            "no class subfolders",
        ),
        (
            "empty class",
            {"source": "folder", "path": str(tmp / "emptyclass")},
            img,
            "'cat' has no images",
        ),
        (
            "class count",
            {"source": "folder", "path": folder_root, "image_size": 16},
            {"shape": (3, 16, 16), "num_classes": 10},
            "the model expects 10 classes but the folder has 2",
        ),
        (
            "image size",
            {"source": "folder", "path": folder_root, "image_size": 16},
            {"shape": (3, 32, 32), "num_classes": 2},
            "data.image_size=16",
        ),
        (
            "channels",
            {"source": "folder", "path": folder_root, "image_size": 16},
            {"shape": (4, 16, 16), "num_classes": 2},
            "expects 4",
        ),
        ("no shards", {"source": "latents", "path": str(tmp / "nolatents")}, lat, "no *.npz"),
        ("not a zip", {"source": "latents", "path": str(tmp / "garbage")}, lat, "bad.npz"),
        (
            "no data key",
            {"source": "latents", "path": str(_npz(tmp / "l1", "a.npz", **ok))},
            lat,
            "a.npz has arrays ['labels']",
        ),
        (
            "both keys",
            {
                "source": "latents",
                "path": str(_npz(tmp / "l2", "a.npz", moments=_F4, latents=_F4, **ok)),
            },
            lat,
            "exactly one of",
        ),
        (
            "no labels",
            {"source": "latents", "path": str(_npz(tmp / "l3", "a.npz", latents=_F4))},
            lat,
            "expected 'labels'",
        ),
        (
            "latent shape",
            {"source": "latents", "path": str(_npz(tmp / "l4", "a.npz", latents=_F4, **ok))},
            {"shape": (4, 32, 32), "num_classes": 10},
            "(4, 4, 4) per record, expected (4, 32, 32)",
        ),
        (
            "moment shape",
            {"source": "latents", "path": str(_npz(tmp / "l5", "a.npz", moments=_F4, **ok))},
            lat,
            "expected (8, 4, 4)",
        ),
        (
            "label count",
            {
                "source": "latents",
                "path": str(_npz(tmp / "l6", "a.npz", latents=_F4, labels=np.arange(3))),
            },
            lat,
            "3 labels for 2 records",
        ),
        (
            "label range",
            {
                "source": "latents",
                "path": str(_npz(tmp / "l7", "a.npz", latents=_F4, labels=np.array([0, 12]))),
            },
            lat,
            "labels in [0, 12], expected 0..9",
        ),
        (
            "float labels",
            {
                "source": "latents",
                "path": str(_npz(tmp / "l8", "a.npz", latents=_F4, labels=np.zeros(2))),
            },
            lat,
            "dtype float64",
        ),
        (
            "digits shape",
            {"source": "digits"},
            {"shape": (3, 8, 8), "num_classes": 10},
            "(3, 8, 8)",
        ),
        ("digits classes", {"source": "digits"}, {"shape": (1, 8, 8), "num_classes": 1000}, "1000"),
        (
            "batch too big",
            {"source": "digits"},
            {"shape": (1, 8, 8), "num_classes": 10, "batch_size": 1000, "shard_count": 2},
            "batch_size=1000",
        ),
        (
            "bad shard",
            {"source": "digits"},
            {"shape": (1, 8, 8), "num_classes": 10, "shard_index": 2, "shard_count": 2},
            "shard_index=2",
        ),
        (
            "bad seed",
            {"source": "digits"},
            {"shape": (1, 8, 8), "num_classes": 10, "seed": -1},
            "seed=-1",
        ),
        (
            "bad batch",
            {"source": "digits"},
            {"shape": (1, 8, 8), "num_classes": 10, "batch_size": 0},
            "batch_size=0",
        ),
    ]


def test_errors_are_one_line_and_name_the_culprit(D, tmp_path, folder):
    for name, cfg_kwargs, kwargs, expected in _error_cases(tmp_path, str(folder[0])):
        kwargs = {"batch_size": 1, "seed": 0} | kwargs
        with pytest.raises(D.DataError) as info:
            D.make_dataset(_cfg(**cfg_kwargs), **kwargs)
        message = str(info.value)
        assert isinstance(info.value, ValueError)
        assert expected in message, (name, message)
        assert "\n" not in message, (name, message)
        if cfg_kwargs.get("path") and name not in ("image size", "channels"):
            assert cfg_kwargs["path"] in message, (name, message)


def test_corrupt_image_raises_when_read(D, folder):
    root, _ = folder
    bad = root / "ant" / "img2.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated\n garbage")
    ds = D.make_dataset(  # construction is cheap: it does not decode
        _cfg(source="folder", path=str(root), image_size=16),
        batch_size=10,
        seed=0,
        shape=(3, 16, 16),
        num_classes=2,
    )
    with pytest.raises(D.DataError) as info:
        _take(ds, 1)
    assert str(bad) in str(info.value) and "\n" not in str(info.value)


def test_writer_rejects_bad_arguments(D, tmp_path):
    with pytest.raises(D.DataError, match="exactly one"):
        D.write_latent_shard(tmp_path / "a.npz", labels=np.arange(2))
    with pytest.raises(D.DataError, match="even number"):
        D.write_latent_shard(
            tmp_path / "a.npz", moments=np.zeros((2, 3, 4, 4)), labels=np.arange(2)
        )
    assert not list(tmp_path.iterdir())
