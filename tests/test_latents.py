"""Images → latents → train → sample → decode, on a tiny random VAE and a folder the test makes.

`cli.prepare` is checked against direct encodings of the ADM crops, killed in the middle and rerun,
fed bad input; then `cli.train` reads the manifest and `cli.sample` decodes with the run's VAE.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]
SIZES = [(40, 32), (32, 48), (70, 33), (32, 32), (100, 64), (37, 90), (64, 64), (33, 35)]


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A random VAE with 3 halvings (32px images → 4x4x4 latents) saved as a diffusers directory."""
    from safetensors.numpy import save_file

    from eqdisp.vae import AutoencoderKL, VAEConfig, vae_to_state_dict

    config = VAEConfig(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4)
    vae = AutoencoderKL(config, key=jax.random.key(0))
    root = tmp_path_factory.mktemp("vae")
    save_file(vae_to_state_dict(vae), str(root / "diffusion_pytorch_model.safetensors"))
    diffusers = {
        "_class_name": "AutoencoderKL",
        "block_out_channels": list(config.block_out_channels),
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "latent_channels": 4,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "scaling_factor": 0.18215,
    }
    (root / "config.json").write_text(json.dumps(diffusers))
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 classes, 8 images of sizes and aspect ratios that exercise the crop (some need halving)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(SIZES):
        cls = root / ["cat", "dog", "emu"][i % 3]
        cls.mkdir(exist_ok=True)
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(cls / f"{i:02d}.{'png' if i % 2 else 'jpg'}")
    return root


def _prepare(src, out, vae, **kwargs):
    from eqdisp.latents import prepare_latents

    return prepare_latents(src, out, vae=vae, resolution=32, progress=False, **kwargs)


def test_prepare_writes_the_posteriors_of_the_adm_crops(folder, vae_dir, tmp_path):
    from eqdisp.data import _FolderSource, to_unit_range
    from eqdisp.latents import read_manifest, vae_fingerprint
    from eqdisp.vae import load_vae

    out = tmp_path / "lat"
    summary = _prepare(folder, out, vae_dir, flip=True, batch_size=3, shard_size=5)
    assert summary["images"] == 8 and summary["shards"] == 2 and summary["encoded"] == 8
    manifest = read_manifest(out)
    assert manifest.complete and manifest.shards_done == 2
    assert manifest.classes == ("cat", "dog", "emu") and manifest.latent_size == 4
    assert manifest.vae_sha256 == vae_fingerprint(vae_dir) and manifest.flip

    source, vae = _FolderSource(str(folder), 32), load_vae(vae_dir)
    crops = np.stack([to_unit_range(source.read(i)) for i in range(8)])
    mean, std = jax.vmap(vae.encode)(jnp.asarray(crops))
    mean_f, std_f = jax.vmap(vae.encode)(jnp.asarray(crops[..., ::-1]))
    shards = [np.load(out / f"latents-{k:05d}.npz") for k in range(2)]
    assert [len(s["labels"]) for s in shards] == [5, 3]
    moments = np.concatenate([s["moments"] for s in shards])
    flipped = np.concatenate([s["moments_flipped"] for s in shards])
    labels = np.concatenate([s["labels"] for s in shards])
    np.testing.assert_array_equal(labels, source.labels)
    # Batches of 3 padded to 3 vs. one batch of 8: the same per-example program up to rounding.
    np.testing.assert_allclose(moments, np.concatenate([mean, std], 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(flipped, np.concatenate([mean_f, std_f], 1), rtol=1e-5, atol=1e-5)
    assert not np.allclose(moments, flipped, atol=1e-3)

    again = _prepare(folder, out, vae_dir, flip=True, batch_size=3, shard_size=5)
    assert again["encoded"] == 0  # finished: nothing to redo


def test_prepare_bad_input_is_one_line(folder, vae_dir, tmp_path):
    from eqdisp.data import DataError

    with pytest.raises(DataError, match=r"--vae .*nowhere: no such file"):
        _prepare(folder, tmp_path / "a", tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no class subfolders"):
        _prepare(tmp_path / "empty", tmp_path / "a", vae_dir)
    with pytest.raises(DataError, match="resolution=36 is not allowed: .*factor 8"):
        from eqdisp.latents import prepare_latents

        prepare_latents(folder, tmp_path / "a", vae=vae_dir, resolution=36, progress=False)

    out = tmp_path / "b"
    _prepare(folder, out, vae_dir, shard_size=4)
    with pytest.raises(DataError, match=r"made with other settings: shard_size 4 \(now 5\)"):
        _prepare(folder, out, vae_dir, shard_size=5)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="was not made by cli.prepare"):
        _prepare(folder, tmp_path / "c", vae_dir)

    broken = tmp_path / "broken"
    (broken / "cat").mkdir(parents=True)
    Image.new("RGB", (40, 40)).save(broken / "cat" / "good.png")
    (broken / "cat" / "bad.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(DataError) as info:
        _prepare(broken, tmp_path / "d", vae_dir)
    message = str(info.value)
    assert "bad.jpg" in message and "\n" not in message


def test_a_killed_prepare_resumes_without_duplicates_then_trains_and_samples(folder, vae_dir, tmp_path):
    """SIGKILL after the first shard, rerun, then cli.train (model sized by the manifest) and
    cli.sample decoding with the run's VAE."""
    # Big images after the first shard (decoding and halving them takes a while), so that the
    # kill lands in the middle of the job.
    folder = tmp_path / "images"
    rng = np.random.default_rng(1)
    for i in range(10):
        (folder / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        side = 32 if i < 3 else 3000
        gradient = np.linspace(0, 255, side, dtype=np.uint8)[None, :, None] + rng.integers(0, 9, 3, dtype=np.uint8)
        Image.fromarray(np.broadcast_to(gradient, (side, side, 3))).save(folder / f"c{i % 3}" / f"{i}.png")
    whole = tmp_path / "whole"
    _prepare(folder, whole, vae_dir, shard_size=2)

    out = tmp_path / "lat"
    command = [
        sys.executable, "-m", "cli.prepare", str(folder), str(out), "--vae", str(vae_dir),
        "--resolution", "32", "--shard-size", "2", "--batch-size", "1",
    ]
    proc = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (out / "latents-00000.npz").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = sorted(p.name for p in out.glob("latents-*.npz"))
    assert 1 <= len(written) < 5, written  # killed in the middle
    from eqdisp.latents import read_manifest

    assert not read_manifest(out).complete
    from eqdisp.data import DataError, _LatentSource

    with pytest.raises(DataError, match="its preparation has not finished"):
        _LatentSource(str(out), (4, 4, 4), 3)

    rerun = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "already encoded" in rerun.stderr
    for k in range(5):
        a, b = np.load(whole / f"latents-{k:05d}.npz"), np.load(out / f"latents-{k:05d}.npz")
        np.testing.assert_array_equal(a["labels"], b["labels"])
        np.testing.assert_allclose(a["moments"], b["moments"], rtol=1e-5, atol=1e-6)
    assert read_manifest(out).complete

    # The preset's model is sized from the manifest: 4x4x4 latents, 3 classes, no extra flags.
    run = tmp_path / "run"
    train = subprocess.run(
        [
            sys.executable, "-m", "cli.train", "sit-tiny", "--data.source", "latents",
            "--data.path", str(out), "--train.out", str(run), "--train.steps", "2",
            "--train.batch-size", "8", "--disp.group-size", "4", "--train.sample-count", "0",
        ],
        env=_env(), capture_output=True, text=True, timeout=600,
    )
    assert train.returncode == 0, train.stderr[-2000:]
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["input_size"] == 4 and config["model"]["in_channels"] == 4
    assert config["model"]["num_classes"] == 3
    assert config["data"]["vae"] == str(vae_dir.absolute())

    sample = subprocess.run(
        [
            sys.executable, "-m", "cli.sample", str(run), "--num", "8", "--batch-size", "4",
            "--steps", "3", "--out", str(tmp_path / "s.npz"),
        ],
        env=_env(), capture_output=True, text=True, timeout=600,
    )
    assert sample.returncode == 0, sample.stderr[-2000:]
    with np.load(tmp_path / "s.npz") as npz:
        assert npz["arr_0"].shape == (8, 32, 32, 3) and npz["arr_0"].dtype == np.uint8

    # ... and FID against the image folder, with an Inception of random weights (the chain, not
    # the number, is under test: the real weights are a file the user brings).
    from eqdisp.eval import InceptionV3FID, model_to_state_dict

    weights = tmp_path / "inception.npz"
    np.savez(weights, **model_to_state_dict(InceptionV3FID(key=jax.random.key(0))))
    evaluate = subprocess.run(
        [
            sys.executable, "-m", "cli.evaluate", str(tmp_path / "s.npz"), "--ref", str(folder),
            "--features", "inception", "--inception-weights", str(weights), "--no-cache",
        ],
        env=_env(), capture_output=True, text=True, timeout=600,
    )
    assert evaluate.returncode == 0, evaluate.stderr[-2000:]
    metrics = json.loads((tmp_path / "s.metrics.json").read_text())
    assert np.isfinite(metrics["fid"]) and metrics["fid"] > 0, metrics
