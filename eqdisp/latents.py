"""ImageNet in latent space: images → SD-VAE posteriors on disk, and latents → images.

``prepare_latents`` (``python -m cli.prepare``) turns an ImageNet-layout image folder into the shards
the ``latents`` data source reads (layout: `eqdisp.data`), plus ``manifest.json``:

```
OUT/manifest.json          settings, classes, VAE file and hash, count, finished or not
OUT/latents-00000.npz      labels (n,), moments (n, 2C, h, w) = [mean ‖ std], unscaled,
OUT/latents-00001.npz      and with --flip moments_flipped: the mirrored image's posterior
```

Each image is ADM-centre-cropped (`eqdisp.data.adm_center_crop`), scaled to [-1, 1] and encoded;
the posterior is stored, not a sample of it, so training resamples it every epoch (DiT/SiT
resample every step; REPA stores the same moments). Shard ``k`` holds the images
``k * shard_size ...`` in the folder's sorted order and is written atomically, so a killed job
rerun with the same command encodes only the missing shards: no record is duplicated or dropped.

The SD-VAE latent scale 0.18215 (`eqdisp.data.LATENT_SCALE`) is applied in exactly two places:
where the data source draws ``z = (mean + std * eps) * 0.18215``, and where `LatentDecoder` divides
the sampler's output by it before decoding.
"""

import concurrent.futures
import dataclasses
import hashlib
import json
import math
import os
import pathlib
import sys
import time
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float

from .config import DataConfig, ExperimentConfig
from .data import (
    LATENT_SCALE,
    DataError,
    _FolderSource,
    _npz_members,
    to_unit_range,
    write_latent_shard,
)
from .io import write_text_atomically

MANIFEST = "manifest.json"
_FORMAT = "eqdisp-latents"
_VERSION = 1
_SHARD = "latents-{:05d}.npz"


# ----------------------------------------------------------------------------------------------
# The manifest


@dataclasses.dataclass(frozen=True)
class LatentManifest:
    """What a prepared latent directory holds and how it was made (``OUT/manifest.json``)."""

    resolution: int
    """Side of the centre-cropped images that were encoded."""
    latent_channels: int
    """Channels of a latent (4 for the SD-VAE)."""
    latent_size: int
    """Side of a latent (resolution / the VAE's downsampling factor, 8 for the SD-VAE)."""
    classes: tuple[str, ...]
    """Class folder names; label ``i`` is ``classes[i]``."""
    count: int
    """Images encoded (records), once complete."""
    shard_size: int
    """Records per shard (the last may hold fewer)."""
    flip: bool
    """Whether each shard also holds the mirrored images' posteriors (``moments_flipped``)."""
    vae: str
    """The VAE weights used (absolute path at preparation time)."""
    vae_sha256: str
    """Hash of the VAE's files (`vae_fingerprint`)."""
    source: str
    """The image folder (absolute path at preparation time)."""
    complete: bool = False
    """True once every shard is written."""
    shards_done: int = 0
    """Shards written when the manifest was last updated."""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def shards(self) -> int:
        return math.ceil(self.count / self.shard_size)

    def describe(self) -> str:
        return (
            f"{self.count} images at {self.resolution}px from {self.source}, "
            f"{self.shards_done} of {self.shards} shards written"
        )

    def settings(self) -> dict[str, Any]:
        """What a rerun must share with the run that started the directory."""
        skip = ("complete", "shards_done", "vae")  # the VAE may move; its hash may not change
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


def read_manifest(path: str | os.PathLike) -> LatentManifest | None:
    """The manifest of a prepared latent directory, or None when it has none (shards written by
    other tools are read without one).

    **Raises:** `DataError` (one line) for an unreadable or foreign manifest.
    """
    file = pathlib.Path(path) / MANIFEST
    if not file.is_file():
        return None
    try:
        raw = json.loads(file.read_text())
        if raw.get("format") != _FORMAT or raw.get("version") != _VERSION:
            raise ValueError(f"format {raw.get('format')!r} version {raw.get('version')!r}")
        fields = {f.name for f in dataclasses.fields(LatentManifest)}
        values = {k: v for k, v in raw.items() if k in fields}
        values["classes"] = tuple(values["classes"])
        return LatentManifest(**values)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(
            f"{file} is not a manifest written by cli.prepare "
            f"(expected format {_FORMAT!r} version {_VERSION}): {e}"
        ) from None


def _write_manifest(directory: pathlib.Path, manifest: LatentManifest) -> None:
    text = json.dumps({"format": _FORMAT, "version": _VERSION, **dataclasses.asdict(manifest)}, indent=2)
    write_text_atomically(directory / MANIFEST, text)


def vae_fingerprint(path: str | os.PathLike) -> str:
    """SHA-256 over a VAE's files: the file itself, or for a directory its ``config.json`` and
    weight files (``*.safetensors``, ``*.bin``, ``*.pt``, ``*.pth``, also in a ``vae/``
    subfolder), names included, in sorted order."""
    path = pathlib.Path(path)
    if path.is_file():
        files = [path]
    else:
        files = sorted(
            f
            for folder in (path, path / "vae")
            if folder.is_dir()
            for f in folder.iterdir()
            if f.is_file() and (f.name == "config.json" or f.suffix in (".safetensors", ".bin", ".pt", ".pth"))
        )
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.relative_to(path).as_posix().encode() if f != path else b"")
        with open(f, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Preparing a folder


def _encoder(vae, mesh: jax.sharding.Mesh):
    """A compiled ``images -> [mean ‖ std]`` over the batch, split over the devices of `mesh`."""
    batch = NamedSharding(mesh, P("batch"))

    @eqx.filter_jit
    def encode(vae, x: Float[Array, "batch 3 h w"]) -> Float[Array, "batch c2 h8 w8"]:
        x = jax.lax.with_sharding_constraint(x, batch)
        mean, std = jax.vmap(vae.encode)(x)
        return jnp.concatenate([mean, std], axis=1)

    def run(images: np.ndarray) -> np.ndarray:
        return np.asarray(encode(vae, jax.device_put(images, batch)))

    return run


def _progress(done: int, total: int, start_done: int, start: float) -> str:
    elapsed = time.perf_counter() - start
    rate = (done - start_done) / elapsed if elapsed > 0 else 0.0
    eta = (total - done) / rate if rate else float("nan")
    eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if rate else "?"
    return f"encoding {done:>8}/{total} {100 * done / total:5.1f}% {rate:7.2f} img/s  ETA {eta_text}"


def prepare_latents(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    vae: str | os.PathLike,
    resolution: int = 256,
    flip: bool = False,
    batch_size: int = 32,
    shard_size: int = 1024,
    progress: bool = True,
) -> dict:
    """Encode an ImageNet-layout folder into SD-VAE posterior shards for the ``latents`` source.

    **Arguments:**

    - `src`: the folder, ``src/<class>/<image>``; labels are the sorted class indices.
    - `out`: the output directory (created; a rerun of the same call resumes it).
    - `vae`: the SD-VAE weights (`eqdisp.vae.load_vae`: a diffusers directory or a weight file).
    - `resolution`: side of the ADM centre crop; a multiple of the VAE's downsampling factor (8).
    - `flip`: also store the posterior of each mirrored image (flipped before encoding, as
      DiT/SiT do), which training then picks for half of the reads.
    - `batch_size`: images per compiled call, split over this process's devices (rounded up to a
      multiple of their number); the last batch of a shard is padded, so one program serves all.
    - `shard_size`: images per shard file.
    - `progress`: print images/s and ETA to stderr.

    Multi-process runs split the shards between processes (shard ``k`` goes to process
    ``k mod count``); process 0 writes the manifest.

    **Returns:** a summary dict: ``out``, ``images``, ``classes``, ``shards``, ``encoded`` (images
    encoded by this call), ``seconds``, ``images_per_second``.

    **Raises:** `DataError` (one line) for a missing VAE file, an empty or malformed folder, an
    unreadable image (named; the shards written so far are kept), or an `out` made with other
    settings.
    """
    from .vae import load_vae

    for name, value in (("batch_size", batch_size), ("shard_size", shard_size)):
        if value < 1:
            raise DataError(f"{name}={value!r} is not allowed: expected a positive int")
    vae_path = pathlib.Path(vae).expanduser().absolute()
    if not vae_path.exists():
        raise DataError(f"--vae {vae}: no such file or directory (the SD-VAE weights to encode with)")
    images = _FolderSource(str(src), resolution)
    out = pathlib.Path(out)
    main = jax.process_index() == 0

    model = load_vae(vae_path)
    factor = model.config.downsampling_factor
    if resolution <= 0 or resolution % factor:
        raise DataError(
            f"resolution={resolution!r} is not allowed: expected a positive multiple of the VAE's "
            f"downsampling factor {factor}"
        )
    manifest = LatentManifest(
        resolution=resolution,
        latent_channels=model.config.latent_channels,
        latent_size=resolution // factor,
        classes=images.classes,
        count=len(images),
        shard_size=shard_size,
        flip=flip,
        vae=str(vae_path),
        vae_sha256=vae_fingerprint(vae_path),
        source=str(pathlib.Path(src).absolute()),
    )
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} is a file, expected a directory for the latent shards")
    previous = read_manifest(out) if out.is_dir() else None
    if previous is None and out.is_dir() and any(out.iterdir()):
        raise DataError(f"{out} exists and was not made by cli.prepare: choose another OUT")
    if previous is not None:
        old, new = previous.settings(), manifest.settings()
        changed = [f"{k} {old[k]!r} (now {new[k]!r})" for k in new if old[k] != new[k]]
        if changed:
            changed = [c if len(c) < 120 else c[:117] + "..." for c in changed]
            raise DataError(
                f"{out} was made with other settings: {'; '.join(changed)}; use another OUT"
            )
    if main:
        out.mkdir(parents=True, exist_ok=True)
        _write_manifest(out, manifest)

    def finished(shard: int) -> bool:
        file = out / _SHARD.format(shard)
        if not file.is_file():
            return False
        try:
            members = _npz_members(file)
        except (OSError, ValueError) as e:
            raise DataError(f"{file} cannot be read ({e}): delete it and rerun") from None
        rows = min(shard_size, manifest.count - shard * shard_size)
        moments = members.get("moments")
        return moments is not None and moments.shape[0] == rows and ("moments_flipped" in members) == flip

    mine = [k for k in range(manifest.shards) if k % jax.process_count() == jax.process_index()]
    todo = [k for k in mine if not finished(k)]
    devices = jax.local_devices()
    mesh = jax.sharding.Mesh(np.asarray(devices), ("batch",))
    per_call = math.ceil(batch_size / len(devices)) * len(devices)
    encode = _encoder(model, mesh)
    total = manifest.count
    done = total - sum(min(shard_size, total - k * shard_size) for k in todo)
    start, start_done, last_print = time.perf_counter(), done, 0.0
    if progress and main and done:
        print(f"resuming {out}: {done} of {total} images already encoded", file=sys.stderr)

    with concurrent.futures.ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        for shard in todo:
            first = shard * shard_size
            rows = range(first, min(first + shard_size, total))
            parts, flipped = [], []
            for begin in range(rows.start, rows.stop, per_call):
                index = range(begin, min(begin + per_call, rows.stop))
                crops = np.stack(list(pool.map(images.read, index)))
                batch = np.stack([to_unit_range(c) for c in crops])
                pad = per_call - len(index)
                if pad:
                    batch = np.concatenate([batch, np.zeros((pad, *batch.shape[1:]), batch.dtype)])
                parts.append(encode(batch)[: len(index)])
                if flip:
                    flipped.append(encode(np.ascontiguousarray(batch[..., ::-1]))[: len(index)])
                done += len(index)
                now = time.perf_counter()
                if progress and (now - last_print > 10 or done == total):
                    last_print = now
                    print(_progress(done, total, start_done, start), file=sys.stderr, flush=True)
            write_latent_shard(
                out / _SHARD.format(shard),
                moments=np.concatenate(parts),
                moments_flipped=np.concatenate(flipped) if flip else None,
                labels=images.labels[rows.start : rows.stop],
            )
            if main:
                done_shards = sum(1 for k in range(manifest.shards) if (out / _SHARD.format(k)).is_file())
                _write_manifest(out, dataclasses.replace(manifest, shards_done=done_shards))

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("eqdisp.prepare_latents")
    seconds = time.perf_counter() - start
    if main:
        missing = [k for k in range(manifest.shards) if not finished(k)]
        if missing:  # another process failed: leave the manifest unfinished
            raise DataError(f"{out}: shards {missing[:5]} were not written; rerun the same command")
        _write_manifest(out, dataclasses.replace(manifest, complete=True, shards_done=manifest.shards))
    encoded = done - start_done
    return {
        "out": str(out),
        "images": total,
        "classes": manifest.num_classes,
        "shards": manifest.shards,
        "encoded": encoded,
        "seconds": round(seconds, 1),
        "images_per_second": round(encoded / seconds, 2) if encoded and seconds > 0 else None,
    }


# ----------------------------------------------------------------------------------------------
# Configs and decoding


def fit_config_to_latents(cfg: ExperimentConfig, data: DataConfig | None = None) -> ExperimentConfig:
    """`cfg` with the model's input size, channels and classes (and ``data.vae`` when unset) taken
    from the manifest of the ``latents`` directory of `data` (default: ``cfg.data``); unchanged
    for other sources or without a manifest.

    `cli.train` applies this to the presets *before* the command line's overrides, with the data
    options of the command line, so a preset fits prepared data without extra flags while
    explicit flags still win (and are then checked against the shards)."""
    data = cfg.data if data is None else data
    if data.source != "latents" or data.path is None or not pathlib.Path(data.path).is_dir():
        return cfg
    manifest = read_manifest(data.path)
    if manifest is None:
        return cfg
    model = dataclasses.replace(
        cfg.model,
        input_size=manifest.latent_size,
        in_channels=manifest.latent_channels,
        num_classes=manifest.num_classes,
    )
    data = cfg.data if cfg.data.vae is not None else dataclasses.replace(cfg.data, vae=manifest.vae)
    return dataclasses.replace(cfg, model=model, data=data)


def run_vae(cfg: ExperimentConfig) -> str | None:
    """The VAE that decodes a run's samples: ``data.vae``, else the latent manifest's; None for a
    pixel-space run or when neither names one."""
    if cfg.data.source != "latents":
        return None
    if cfg.data.vae is not None:
        return cfg.data.vae
    if cfg.data.path is not None and pathlib.Path(cfg.data.path).is_dir():
        manifest = read_manifest(cfg.data.path)
        return None if manifest is None else manifest.vae
    return None


class LatentDecoder(eqx.Module):
    """Sampler outputs (scaled latents) to images in [-1, 1]: ``vae.decode(z / 0.18215)``, run
    `chunk` images at a time inside the sampling program so that memory stays bounded (a 256px
    decode holds ~0.2 GB of activations per image on CPU)."""

    vae: eqx.Module
    chunk: int = eqx.field(static=True)
    identity: str = eqx.field(static=True)
    """Names the weights (their hash) in the identity of a resumable sampling job."""

    def __call__(self, z: Float[Array, "batch c h w"]) -> Float[Array, "batch 3 hh ww"]:
        return jax.lax.map(self.vae.decode, z / LATENT_SCALE, batch_size=self.chunk)


def latent_decoder(path: str | os.PathLike, *, chunk: int = 4) -> LatentDecoder:
    """Load the VAE at `path` as a `LatentDecoder` (`eqdisp.vae.load_vae` formats)."""
    from .vae import load_vae

    path = pathlib.Path(path).expanduser()
    if not path.exists():
        raise DataError(f"VAE {path}: no such file or directory")
    return LatentDecoder(load_vae(path), chunk, f"sd-vae sha256:{vae_fingerprint(path)}")


__all__ = [
    "MANIFEST",
    "LatentDecoder",
    "LatentManifest",
    "fit_config_to_latents",
    "latent_decoder",
    "prepare_latents",
    "read_manifest",
    "run_vae",
    "vae_fingerprint",
]
