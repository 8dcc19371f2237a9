"""Training data: deterministic, resumable Grain pipelines over four sources.

``make_dataset`` turns a ``DataConfig`` into an infinite ``grain.IterDataset`` of batches
``{"x": float32 (batch, c, h, w), "y": int32 (batch,)}``. The pipeline is

```
MapDataset.source(src).seed(seed)[shard_index::shard_count].shuffle()
    .random_map(augment).batch(batch_size, drop_remainder=True).repeat()
```

so every epoch is a fresh permutation (grain shuffles epoch ``e`` with ``seed + e``), every record
gets its own augmentation RNG for every epoch (grain keys it by the position in the repeated
stream), the processes of a multi-host run read disjoint shards, and rebuilding the pipeline with
the same arguments gives the same batches. ``iter(ds)`` is a ``grain.DatasetIterator``: its
``get_state()``/``set_state()`` (or ``grain.checkpoint.CheckpointSave/CheckpointRestore`` inside an
orbax ``Composite``) resume the stream exactly.

Sources (``DataConfig.source``):

- ``digits``: scikit-learn's bundled 1,797 8x8 digits, (1, 8, 8) in [-1, 1], labels 0..9. No flips:
  digits are not mirror-symmetric (a flipped 2 is not a 2), so ``DataConfig.flip`` is ignored.
- ``synthetic``: ``SYNTHETIC_SIZE`` Gaussian records of the model's shape with uniform labels,
  a pure function of ``(seed, index)`` (smoke tests and benchmarks of the big presets).
- ``folder``: an ImageNet-layout folder ``path/<class>/<image>`` (classes sorted by name give the
  labels 0..K-1, files sorted by path; ``.jpg .jpeg .png .webp .bmp`` in any case; nested folders
  inside a class are included, as torchvision's ``ImageFolder`` does; names starting with ``.``
  are skipped). Each image is decoded as RGB, ADM-centre-cropped to ``image_size``
  (``adm_center_crop``), flipped with probability 0.5 when ``flip``, and scaled to [-1, 1] exactly as
  ``ToTensor`` + ``Normalize(0.5, 0.5)`` do.
- ``latents``: precomputed SD-VAE latents, in the layout below.

Latent layout: ``path`` is a directory of ``*.npz`` shards (read in sorted order), written by
``write_latent_shard`` or ``np.savez`` (uncompressed, so that the arrays are memory-mapped straight
out of the zip and a data set larger than RAM is fine). Each shard holds ``labels: int (n,)`` and
exactly one of

- ``moments: float (n, 2C, H, W)``: ``[mean ‖ std]`` of the VAE posterior, **unscaled**, as REPA's
  ``dataset_tools.py encode`` stores them (``std = exp(0.5 * clamp(logvar, -30, 20))``). Every read
  draws ``z = (mean + std * eps) * 0.18215`` with the record's RNG, so the posterior is resampled
  every epoch as DiT/SiT/REPA resample it every step;
- ``latents: float (n, C, H, W)``: already sampled **and already multiplied by 0.18215**, i.e. what
  the model sees (used as is).

A ``moments`` shard may also hold ``moments_flipped``, the posterior of the mirrored image (what
``cli.prepare --flip`` writes): then ``flip`` picks it for half of the reads instead of mirroring
the latent, which is exactly DiT/SiT's "flip the image, then encode".

A directory written by ``cli.prepare`` also holds ``manifest.json`` (`eqdisp.latents`): the
source refuses a directory whose preparation has not finished.

Float16 shards are accepted and read as float32. Compressed shards (``np.savez_compressed``) still
work, but each process then holds the whole array of that shard in memory.

Flipping latents without ``moments_flipped``: DiT/SiT flip the *image* before encoding; ``flip``
then mirrors the latent along its width, which is only an approximation of encoding the mirrored
image (the SD-VAE is not exactly flip-equivariant). REPA uses no flip at all (its authors found the gap negligible); set
``flip=False`` for REPA's pipeline.
"""

import dataclasses
import os
import pathlib
import struct
import zipfile
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np
from jaxtyping import Float, Int, UInt8
from PIL import Image

from .config import DataConfig
from .io import atomic_path

LATENT_SCALE = 0.18215
"""SD-VAE latent scale factor (DiT/SiT/REPA; no shift)."""

SYNTHETIC_SIZE = 10_000
"""Records of the ``synthetic`` source (one epoch)."""

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
"""File extensions (case-insensitive) read from a ``folder`` source."""


class DataError(ValueError):
    """The data cannot feed the model. The message is one line meant for the user."""


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


# ----------------------------------------------------------------------------------------------
# Bundled digits


def load_digits() -> tuple[Float[np.ndarray, "n 1 8 8"], Int[np.ndarray, " n"]]:
    """scikit-learn's 1,797 handwritten digits (UCI), as images in [-1, 1] and labels 0..9.

    **Returns:**

    ``(images, labels)``: float32 ``(1797, 1, 8, 8)`` in [-1, 1] and int32 ``(1797,)``.
    """
    from sklearn.datasets import load_digits as _load

    bunch = _load()
    images = (bunch.images.astype(np.float32) / 16.0) * 2.0 - 1.0
    return images[:, None], bunch.target.astype(np.int32)


# ----------------------------------------------------------------------------------------------
# Sources: random-access, deterministic, picklable (Grain worker processes get a copy), and with a
# stable repr (Grain's DataLoader compares reprs when it restores a checkpoint).


class _DigitsSource:
    threads = 0  # in memory: threads only add GIL contention (Grain's advice)

    def __init__(self):
        self.images, self.labels = load_digits()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"x": self.images[index], "y": self.labels[index]}

    def __repr__(self) -> str:
        return f"DigitsSource(n={len(self)})"


class _SyntheticSource:
    threads = 0

    def __init__(self, shape: tuple[int, int, int], num_classes: int, seed: int):
        self.shape, self.num_classes, self.seed = shape, num_classes, seed

    def __len__(self) -> int:
        return SYNTHETIC_SIZE

    def __getitem__(self, index: int) -> dict[str, Any]:
        # A pure function of (seed, index): any process, any order, any resume reads the same record.
        rng = np.random.default_rng([self.seed, int(index)])
        y = np.int32(rng.integers(self.num_classes))
        return {"x": rng.standard_normal(self.shape, dtype=np.float32), "y": y}

    def __repr__(self) -> str:
        return (
            f"SyntheticSource(shape={self.shape}, num_classes={self.num_classes}, seed={self.seed})"
        )


def _check_dir(path: str | None, source: str) -> pathlib.Path:
    if path is None:
        raise DataError(f"data.path is not set: the {source!r} source needs a directory")
    p = pathlib.Path(path)
    if not p.exists():
        raise DataError(f"data.path={path} does not exist")
    if not p.is_dir():
        raise DataError(f"data.path={path} is not a directory")
    return p


def adm_center_crop(image: Image.Image, size: int) -> Image.Image:
    """ADM's centre crop (``guided_diffusion/image_datasets.py: center_crop_arr``), used by DiT/SiT
    for training and by REPA's ``center-crop-dhariwal`` preprocessing.

    While the short side is at least ``2 * size`` the image is halved (``//2``) with a BOX filter,
    which antialiases far better than one big bicubic step; then the short side is resized to
    ``size`` with BICUBIC (sizes rounded with ``round()``), and the ``size x size`` centre is cut at
    floor offsets.

    **Arguments:**

    - `image`: a PIL image (any mode; DiT converts to RGB first).
    - `size`: the side of the output.

    **Returns:**

    A ``size x size`` PIL image of the same mode.
    """
    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return Image.fromarray(arr[top : top + size, left : left + size])


def to_unit_range(image: UInt8[np.ndarray, "h w 3"]) -> Float[np.ndarray, "3 h w"]:
    """uint8 HWC RGB -> float32 CHW in [-1, 1], with the float32 arithmetic of torchvision's
    ``ToTensor`` (``/ 255``) followed by ``Normalize(0.5, 0.5)`` (``(x - 0.5) / 0.5``)."""
    x = image.astype(np.float32) / np.float32(255.0)
    return ((x - np.float32(0.5)) / np.float32(0.5)).transpose(2, 0, 1)


class _FolderSource:
    threads = 4  # PIL decodes with the GIL released

    def __init__(self, path: str | None, image_size: int):
        root = _check_dir(path, "folder")
        classes = sorted(
            e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")
        )
        if not classes:
            raise DataError(
                f"data.path={path} has no class subfolders: expected the layout path/<class>/<image>"
            )
        files: list[str] = []
        labels: list[int] = []
        for label, name in enumerate(classes):
            found = sorted(
                str(f)
                for f in (root / name).rglob("*")
                if f.suffix.lower() in IMAGE_EXTENSIONS
                and not f.name.startswith(".")
                and f.is_file()
            )
            if not found:
                raise DataError(
                    f"data.path={path}: class folder {name!r} has no images "
                    f"({', '.join(IMAGE_EXTENSIONS)})"
                )
            files += found
            labels += [label] * len(found)
        self.path, self.image_size, self.classes = str(path), image_size, tuple(classes)
        self.files = files
        self.labels = np.asarray(labels, dtype=np.int32)

    def __len__(self) -> int:
        return len(self.files)

    def read(self, index: int) -> UInt8[np.ndarray, "h w 3"]:
        """The ADM centre crop of image `index`, uint8 RGB."""
        file = self.files[index]
        try:
            with Image.open(file) as image:
                return np.asarray(adm_center_crop(image.convert("RGB"), self.image_size))
        except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError... for bad files
            raise DataError(
                f"data.path={self.path}: cannot read image {file}: {_one_line(e)}"
            ) from None

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"x": to_unit_range(self.read(index)), "y": self.labels[index]}

    def __repr__(self) -> str:
        return (
            f"ImageFolderSource(path={self.path!r}, image_size={self.image_size}, "
            f"classes={len(self.classes)}, n={len(self)})"
        )


def iter_image_folder(
    path: str | os.PathLike, image_size: int, batch_size: int
) -> Iterator[UInt8[np.ndarray, "batch h w 3"]]:
    """An ImageNet-layout folder as uint8 NHWC batches of ADM centre crops, in file order.

    This is how an image folder becomes a reference batch for ``eqdisp.eval.evaluate``.
    """
    source = _FolderSource(str(path), image_size)
    for start in range(0, len(source), batch_size):
        stop = min(start + batch_size, len(source))
        yield np.stack([source.read(i) for i in range(start, stop)])


# ----------------------------------------------------------------------------------------------
# Latent shards


@dataclasses.dataclass(frozen=True)
class _Member:
    """Where one array of an ``.npz`` lies: ``offset`` into the file when it is stored uncompressed
    (memory-mappable), else ``None``."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    offset: int | None


def _npz_members(file: pathlib.Path) -> dict[str, _Member]:
    """Read only the headers of the arrays of an ``.npz`` (no array data)."""
    members = {}
    with zipfile.ZipFile(file) as zf, open(file, "rb") as raw:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with zf.open(info) as f:  # handles compressed members too
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                header_len = f.tell() if info.compress_type == zipfile.ZIP_STORED else None
            offset = None
            if header_len is not None:
                # Local file header: 30 bytes, then the name and an extra field of the lengths
                # stored at bytes 26..30 (they can differ from the central directory's).
                raw.seek(info.header_offset)
                name_len, extra_len = struct.unpack("<HH", raw.read(30)[26:30])
                offset = info.header_offset + 30 + name_len + extra_len + header_len
            members[info.filename[: -len(".npy")]] = _Member(shape, dtype, fortran, offset)
    return members


class _LatentSource:
    threads = 4  # page faults on memory-mapped shards release the GIL

    def __init__(self, path: str | None, shape: tuple[int, int, int], num_classes: int):
        root = _check_dir(path, "latents")
        from .latents import read_manifest  # the manifest module reads this one's shards

        manifest = read_manifest(root)
        if manifest is not None and not manifest.complete:
            raise DataError(
                f"data.path={path}: its preparation has not finished ({manifest.describe()}); "
                "rerun the same cli.prepare command to complete it"
            )
        files = sorted(root.glob("*.npz"))
        if not files:
            raise DataError(f"data.path={path} has no *.npz latent shards")
        self.path, self.shape = str(path), shape
        self.files = [str(f) for f in files]
        self.keys: list[str] = []  # "moments" or "latents", per shard
        self.flipped: list[_Member | None] = []  # "moments_flipped", per shard
        self.members: list[_Member] = []
        labels, counts = [], []
        where = f"data.path={path}: latent shard"
        for file in files:
            try:
                members = _npz_members(file)
                kinds = [k for k in ("moments", "latents") if k in members]
                if len(kinds) != 1 or "labels" not in members:
                    raise DataError(
                        f"{where} {file.name} has arrays {sorted(members)}: expected 'labels' "
                        "and exactly one of 'moments' (mean ‖ std) and 'latents'"
                    )
                with np.load(file) as npz:  # labels are small: keep them in memory
                    y = npz["labels"]
            except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
                if isinstance(e, DataError):
                    raise
                raise DataError(f"{where} {file.name} cannot be read: {_one_line(e)}") from None
            key, member = kinds[0], members[kinds[0]]
            flipped = members.get("moments_flipped")
            if flipped is not None and (key != "moments" or flipped.shape != member.shape):
                raise DataError(
                    f"{where} {file.name} has 'moments_flipped' of shape {tuple(flipped.shape)}: "
                    f"expected it only beside 'moments', with the same shape "
                    f"{tuple(member.shape)}"
                )
            c, h, w = shape
            expect = (2 * c, h, w) if key == "moments" else shape
            if len(member.shape) != 4 or tuple(member.shape[1:]) != expect:
                raise DataError(
                    f"{where} {file.name} has {key!r} of shape {tuple(member.shape)}, i.e. "
                    f"{tuple(member.shape[1:])} per record, expected {expect} for the model's "
                    f"inputs {shape}"
                    + (" ([mean ‖ std] doubles the channels)" if key == "moments" else "")
                )
            if not np.issubdtype(member.dtype, np.floating):
                raise DataError(
                    f"{where} {file.name} has {key!r} of dtype {member.dtype}, expected float"
                )
            if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
                raise DataError(
                    f"{where} {file.name} has 'labels' of shape {y.shape} and dtype {y.dtype}, "
                    "expected integers of shape (n,)"
                )
            if len(y) != member.shape[0]:
                raise DataError(
                    f"{where} {file.name} has {len(y)} labels for {member.shape[0]} records"
                )
            if len(y) and (y.min() < 0 or y.max() >= num_classes):
                raise DataError(
                    f"{where} {file.name} has labels in [{y.min()}, {y.max()}], expected 0..{num_classes - 1} "
                    f"for the model's {num_classes} classes"
                )
            self.keys.append(key)
            self.members.append(member)
            self.flipped.append(flipped)
            labels.append(y.astype(np.int32))
            counts.append(len(y))
        self.labels = np.concatenate(labels)
        self.starts = np.cumsum([0] + counts[:-1])  # (shard, row) of a record by searchsorted
        self._arrays: dict[tuple[int, bool], np.ndarray] = {}  # opened lazily, per process

    def __getstate__(self):
        # Worker processes re-open the memory maps instead of receiving pickled array data.
        return {**self.__dict__, "_arrays": {}}

    def _array(self, shard: int, flipped: bool = False) -> np.ndarray:
        array = self._arrays.get((shard, flipped))
        if array is None:
            member = (self.flipped if flipped else self.members)[shard]
            name = "moments_flipped" if flipped else self.keys[shard]
            if member.offset is not None:
                array = np.memmap(
                    self.files[shard],
                    dtype=member.dtype,
                    mode="r",
                    offset=member.offset,
                    shape=member.shape,
                    order="F" if member.fortran_order else "C",
                )
            else:
                with np.load(self.files[shard]) as npz:
                    array = npz[name]
            self._arrays[(shard, flipped)] = array
        return array

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        # A copy, not a view: nothing downstream should hold on to the memory map.
        i = index - self.starts[shard]
        row = np.array(self._array(shard)[i], dtype=np.float32)
        y = self.labels[index]
        if self.keys[shard] == "latents":
            return {"x": row, "y": y}
        c = self.shape[0]
        record = {"mean": row[:c], "std": row[c:], "y": y}
        if self.flipped[shard] is not None:
            row = np.array(self._array(shard, flipped=True)[i], dtype=np.float32)
            record |= {"mean_flipped": row[:c], "std_flipped": row[c:]}
        return record

    def __repr__(self) -> str:
        return f"LatentShardSource(path={self.path!r}, shards={len(self.files)}, n={len(self)})"


def write_latent_shard(
    path: str | os.PathLike,
    *,
    moments: Float[np.ndarray, "n c2 h w"] | None = None,
    latents: Float[np.ndarray, "n c h w"] | None = None,
    labels: Int[np.ndarray, " n"],
    moments_flipped: Float[np.ndarray, "n c2 h w"] | None = None,
) -> None:
    """Write one shard of a ``latents`` source (layout in the module docstring).

    The file is written uncompressed (so that readers memory-map it) and atomically (a temporary
    file renamed into place), so a crashed encoding job never leaves a half-written shard.

    **Arguments:**

    - `path`: the shard file; it should end in ``.npz`` to be found by the reader.
    - `moments`: ``[mean ‖ std]`` of the VAE posterior, unscaled (REPA's layout).
    - `latents`: sampled latents already multiplied by 0.18215. Give exactly one of the two.
    - `labels`: the class of every record.
    - `moments_flipped`: with `moments`, the posterior of each mirrored image (read for flips).
    """
    if (moments is None) == (latents is None):
        raise DataError(f"write_latent_shard({path}): give exactly one of moments= and latents=")
    if moments is not None and moments.shape[1] % 2:
        raise DataError(
            f"write_latent_shard({path}): moments have {moments.shape[1]} channels, expected an "
            "even number ([mean ‖ std])"
        )
    if moments_flipped is not None and (moments is None or moments_flipped.shape != moments.shape):
        raise DataError(
            f"write_latent_shard({path}): moments_flipped needs moments of the same shape"
        )
    arrays = {"moments": moments} if moments is not None else {"latents": latents}
    if moments_flipped is not None:
        arrays["moments_flipped"] = moments_flipped
    if len(labels) != len(next(iter(arrays.values()))):
        raise DataError(
            f"write_latent_shard({path}): {len(labels)} labels for a different number of records"
        )
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, labels=labels, **arrays)


# ----------------------------------------------------------------------------------------------
# Augmentation and the pipeline


@dataclasses.dataclass(frozen=True)
class _Augment:
    """Per-record randomness, from the record's own Grain RNG: first the flip coin (if ``flip``),
    then the posterior noise of a ``moments`` record."""

    flip: bool

    def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        flip = self.flip and rng.random() < 0.5
        if flip and "mean_flipped" in record:  # the mirrored image's own posterior
            flip = False
            record = {**record, "mean": record["mean_flipped"], "std": record["std_flipped"]}
        if "mean" in record:
            eps = rng.standard_normal(record["mean"].shape, dtype=np.float32)
            x = (record["mean"] + record["std"] * eps) * np.float32(LATENT_SCALE)
        else:
            x = record["x"]
        if flip:
            x = np.ascontiguousarray(x[..., ::-1])  # mirror the width axis
        return {"x": x, "y": record["y"]}


def _validate(cfg: DataConfig, src: Any, shape: tuple[int, int, int], num_classes: int) -> None:
    """Check the source against what the model expects (the latent source checks its own shards)."""
    if cfg.source == "digits":
        if shape != (1, 8, 8):
            raise DataError(
                f"data.source='digits' gives (1, 8, 8) images but the model expects {shape} "
                "(model.in_channels, model.input_size)"
            )
        if num_classes != 10:
            raise DataError(
                f"data.source='digits' has 10 classes but the model expects {num_classes}"
            )
    elif cfg.source == "folder":
        if shape[0] != 3:
            raise DataError(
                f"data.source='folder' gives RGB images (3 channels) but the model expects "
                f"{shape[0]} (model.in_channels)"
            )
        if shape[1:] != (cfg.image_size, cfg.image_size):
            raise DataError(
                f"data.image_size={cfg.image_size} does not match the model, which expects "
                f"{shape[1]}x{shape[2]} inputs (model.input_size)"
            )
        if len(src.classes) != num_classes:
            raise DataError(
                f"data.path={cfg.path}: the model expects {num_classes} classes but the folder "
                f"has {len(src.classes)}"
            )


def make_dataset(
    cfg: DataConfig,
    *,
    batch_size: int,
    seed: int,
    shape: tuple[int, int, int],
    num_classes: int,
    shard_index: int = 0,
    shard_count: int = 1,
) -> grain.IterDataset:
    """The infinite, deterministic, resumable stream of training batches of ``cfg``.

    **Arguments:**

    - `cfg`: the data configuration (source, path, image size, flips, worker processes).
    - `batch_size`: examples per batch **in this process** (the global batch over ``shard_count``).
    - `seed`: the run seed, in [0, 2**32); it fixes the order of every epoch and every augmentation.
    - `shape`: ``(c, h, w)`` of the model's input; the source is checked against it.
    - `num_classes`: the model's number of classes; the labels are checked against it.
    - `shard_index`, `shard_count`: this process's disjoint share of the records
      (multi-host: ``jax.process_index()``, ``jax.process_count()``).

    **Returns:**

    A ``grain.IterDataset`` yielding ``{"x": float32 (batch_size, c, h, w), "y": int32 (batch_size,)}``
    forever (epochs end at ``drop_remainder`` batch boundaries and are reshuffled). ``iter()`` gives a
    ``grain.DatasetIterator``; checkpoint it with ``grain.checkpoint.CheckpointSave(it)`` /
    ``CheckpointRestore(iter(make_dataset(...same arguments...)))`` in an orbax ``Composite``
    (or ``get_state()``/``set_state()``). Close it with ``it.close()`` when ``workers > 0``. Keep
    ``cfg.workers`` and ``batch_size`` fixed across a resume.

    **Raises:**

    ``DataError`` (a ``ValueError``) with a one-line message when the source is missing, broken, or
    does not match ``shape``/``num_classes``.
    """
    if batch_size <= 0:
        raise DataError(f"batch_size={batch_size} is not allowed: expected a positive int")
    if not 0 <= seed < 2**32:
        raise DataError(f"seed={seed} is not allowed: expected an int in [0, 2**32)")
    if not 0 <= shard_index < shard_count:
        raise DataError(
            f"shard_index={shard_index} is not allowed: expected 0 <= shard_index < shard_count={shard_count}"
        )
    shape = tuple(int(s) for s in shape)
    if cfg.source == "digits":
        src = _DigitsSource()
    elif cfg.source == "synthetic":
        src = _SyntheticSource(shape, num_classes, seed)
    elif cfg.source == "folder":
        src = _FolderSource(cfg.path, cfg.image_size)
    elif cfg.source == "latents":
        src = _LatentSource(cfg.path, shape, num_classes)
    else:  # DataConfig validates the choice; this guards a config built around it
        raise DataError(f"data.source={cfg.source!r} is not allowed")
    _validate(cfg, src, shape, num_classes)

    records = len(range(shard_index, len(src), shard_count))
    if records < batch_size:
        raise DataError(
            f"data.source={cfg.source!r}: shard {shard_index} of {shard_count} has {records} records, "
            f"fewer than the per-process batch_size={batch_size}"
        )
    ds = grain.MapDataset.source(src).seed(seed)[shard_index::shard_count].shuffle()
    # Flips are meaningless for digits (not mirror-symmetric) and synthetic noise.
    flip = cfg.flip and cfg.source in ("folder", "latents")
    if flip or cfg.source == "latents":
        # Grain keys a record's RNG by (op seed, position in the repeated stream). Give each shard its
        # own op seed: with one shared seed, position j of every shard would draw the same flip and
        # the same posterior noise, correlating the global batch across processes.
        shard_seed = int(np.random.SeedSequence([seed, shard_index]).generate_state(1)[0])
        ds = ds.random_map(_Augment(flip), seed=shard_seed)
    # repeat() after batch(): batches never straddle epochs, and each epoch is reshuffled.
    ds = ds.batch(batch_size, drop_remainder=True).repeat()
    # The prefetch buffer holds whole batches: keep it small (a 256px ImageNet batch is 200 MB).
    threads = src.threads
    it_ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(2, threads))
    )
    if cfg.workers > 0:
        from absl import flags

        # grain reads an absl flag in mp_prefetch; outside absl.app.run that raises
        # UnparsedFlagAccessError (eqdisp's CLIs are tyro, not absl).
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.workers))
    return it_ds
