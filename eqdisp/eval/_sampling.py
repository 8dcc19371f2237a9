"""Draw N samples from a trained run into an ADM sample batch, resumably.

The output is what the ADM evaluator (and `eqdisp.eval.evaluate`) reads: an uncompressed ``.npz``
with ``arr_0``, uint8 ``(N, H, W, C)``, quantised as DiT/SiT do (``trunc(clip(127.5 x + 128))``,
`eqdisp.images.to_uint8`), plus ``labels``, the int32 class of each sample (ADM ignores it).

Determinism and resuming: batch ``b`` draws its labels, its initial noise and its SDE noise from
``fold_in(key(seed), b)`` only, so a batch is the same whether it is drawn in one go, after a
resume, or on another number of devices (up to floating-point differences between device
layouts). Each finished batch is written atomically to ``<out>.partial/batch_<b>.npz`` next to
a ``state.json`` that records everything the images depend on; rerunning the same command after a
kill (even SIGKILL) draws only the missing batches, and refuses to mix in batches of a different
run, sampler, seed or batch size. The final file is streamed from the batch files (a 50k x 256 x
256 x 3 batch never sits in memory) and the partial directory is removed.

Latent models: `decoder` maps the model's outputs to images in [-1, 1], channels first, and runs
inside the compiled sampling program, e.g. ``lambda z: vae.decode(z / 0.18215)``. Without one, the
model's outputs are quantised as they are (right for pixel models such as ``sit-tiny``).
"""

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import sys
import time
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .._config_json import config_to_dict
from ..config import SamplerConfig
from ..families import make_objective
from ..images import save_grid, to_uint8
from ..io import write_text_atomically
from ..objective import AbstractObjective
from ..sharding import batch_sharding, make_mesh, replicated
from ._npz import EvalError, iter_npz, write_npz

Decoder = Callable[[Float[Array, "batch c h w"]], Float[Array, "batch c2 h2 w2"]]
"""Model outputs (e.g. latents) to images in [-1, 1], channels first; JAX-traceable."""

_STATE = "state.json"


def partial_dir(out: str | os.PathLike) -> pathlib.Path:
    """The directory of finished batches of an unfinished `generate` call writing `out`."""
    out = pathlib.Path(out)
    return out.with_name(out.name + ".partial")


@eqx.filter_jit
def _sample_batch(
    model: eqx.Module,
    key: PRNGKeyArray,
    y: Int[Array, " batch"],
    *,
    objective: AbstractObjective,
    config: SamplerConfig,
    shape: tuple[int, int, int],
    sharding: jax.sharding.Sharding,
    decoder: Decoder | None,
) -> Float[Array, "batch c h w"]:
    key_noise, key_sde = jr.split(key)
    x = jr.normal(key_noise, (y.shape[0], *shape), jnp.float32)
    x = jax.lax.with_sharding_constraint(x, sharding)
    out = objective.draw_samples(model, x, y, key=key_sde, config=config)
    return out if decoder is None else decoder(out)


class _Progress:
    """A one-line progress report with images/s and ETA (rewritten in place on a terminal)."""

    def __init__(self, total: int, done: int, enabled: bool):
        self.total, self.done, self.enabled = total, done, enabled
        self.tty = sys.stderr.isatty()
        self.start = time.perf_counter()
        self.timed_images, self.timed_seconds = 0, 0.0
        self.last_print = 0.0

    def update(self, images: int, seconds: float) -> None:
        # The program is compiled before the first batch, so every batch's time is sampling time.
        self.done += images
        self.timed_images += images
        self.timed_seconds += seconds
        if not self.enabled:
            return
        now = time.perf_counter()
        if not self.tty and now - self.last_print < 10 and self.done < self.total:
            return
        self.last_print = now
        rate = self.rate
        eta = (self.total - self.done) / rate if rate else float("nan")
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if rate else "?"
        line = (
            f"sampling {self.done:>7}/{self.total} {100 * self.done / self.total:5.1f}% "
            f"{rate:8.2f} img/s  ETA {eta_text}"
        )
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)
        if self.tty and self.done >= self.total:
            print(file=sys.stderr)

    @property
    def rate(self) -> float:
        if self.timed_seconds > 0:
            return self.timed_images / self.timed_seconds
        elapsed = time.perf_counter() - self.start
        return self.done / elapsed if elapsed > 0 and self.done else 0.0


def _duration(seconds: float) -> str:
    """``41.2 s``, ``3 min 40 s`` or ``1 h 45 min``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {rest} s"
    return f"{minutes // 60} h {minutes % 60} min"


def _run_identity(ckpt, use_ema: bool) -> dict:
    config = config_to_dict(ckpt.config)
    del config["train"]["out"]  # a run is its config, not its path: a moved run still resumes
    text = json.dumps(config, sort_keys=True)
    return {
        "checkpoint_step": int(ckpt.step),
        "config_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "weights": "ema" if use_ema else "raw",
    }


def _labels_for(
    labels: np.ndarray | None, num_classes: int, key: PRNGKeyArray, start: int, batch: int
) -> np.ndarray:
    if labels is None:  # uniform random labels, as DiT/SiT's sample_ddp.py
        return np.asarray(jr.randint(key, (batch,), 0, num_classes, dtype=jnp.int32))
    part = labels[start : start + batch]
    return np.concatenate([part, np.zeros(batch - len(part), np.int32)])  # pad the last batch


def generate(
    run,
    *,
    num: int,
    out: str | os.PathLike,
    sampler: SamplerConfig | None = None,
    batch_size: int = 64,
    seed: int = 0,
    labels: Int[np.ndarray, " num"] | int | None = None,
    use_ema: bool = True,
    step: int | None = None,
    decoder: Decoder | None = None,
    grid: str | os.PathLike | None = None,
    grid_count: int = 64,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Sample `num` images from a run and write them as an ADM sample batch ``.npz``.

    **Arguments:**

    - `run`: a run directory (or its checkpoints directory), or an `eqdisp.Checkpoint`.
    - `num`: how many images.
    - `out`: the ``.npz`` to write (``arr_0`` uint8 NHWC, ``labels`` int32).
    - `sampler`: the sampler; None uses the run's own ``config.sampler``.
    - `batch_size`: images per compiled batch (global, split over all devices; must be divisible
      by the device count). The last batch is padded to full size and the extra images dropped,
      so one program serves the whole run. Part of the images' identity: keep it when resuming.
    - `seed`: batch ``b`` uses ``fold_in(key(seed), b)`` for its labels and noise.
    - `labels`: None for uniform random labels (DiT/SiT), an int for one class, or `num` ints.
    - `use_ema`: sample from the EMA weights (DiT/SiT/REPA do) or the raw ones.
    - `step`: the checkpoint step of a run directory (default: the latest).
    - `decoder`: model outputs to images in [-1, 1] (latent models); None for pixel models.
    - `grid`: also write a PNG grid of the first `grid_count` images there.
    - `overwrite`: replace an existing `out`; otherwise an existing `out` is an error.
    - `progress`: print to stderr, after the first batch, one line with the plan and its
      estimated total time (``sampling 10000 images in 157 batches of 64 (ODE heun, 250 grid
      points = 498 evaluations each); compile 38.1 s, first batch 4.02 s; estimated total 10 min
      50 s``), then images/s and ETA.

    **Returns:** a summary dict: ``out``, ``num``, ``shape``, ``batches``, ``resumed_batches``,
    ``seconds``, ``images_per_second`` (sampling only, without the compilation), ``grid``.

    **Raises:** `EvalError` for bad arguments, an existing output, or a partial directory of a
    different sampling run; `eqdisp.CheckpointError` for a bad run directory.
    """
    from ..train import Checkpoint, load_checkpoint

    out = pathlib.Path(out)
    if num < 1:
        raise EvalError(f"num={num!r} is not allowed: expected a positive int")
    if batch_size < 1:
        raise EvalError(f"batch_size={batch_size!r} is not allowed: expected a positive int")
    devices = jax.device_count()
    if batch_size % devices:
        raise EvalError(
            f"batch_size={batch_size} is not allowed: expected a multiple of the device count {devices}"
        )
    if out.exists() and not overwrite:
        raise EvalError(f"{out} exists: delete it, pass another output path, or overwrite it")
    ckpt = run if isinstance(run, Checkpoint) else load_checkpoint(run, step)
    cfg = ckpt.config
    sampler = cfg.sampler if sampler is None else sampler
    num_classes = cfg.model.num_classes
    if labels is not None:
        given = np.full(num, labels, np.int64) if np.ndim(labels) == 0 else np.asarray(labels)
        if given.shape != (num,) or not np.issubdtype(given.dtype, np.integer):
            raise EvalError(f"labels must be one int or {num} ints, got {given.dtype}{list(given.shape)}")
        if given.min() < 0 or given.max() >= num_classes:
            raise EvalError(f"labels must lie in [0, {num_classes}), got {given.min()}..{given.max()}")
        labels = given.astype(np.int32)

    identity = {
        "num": num,
        "batch_size": batch_size,
        "seed": seed,
        "sampler": dataclasses.asdict(sampler),
        "labels": "uniform" if labels is None else hashlib.sha256(labels.tobytes()).hexdigest(),
        "decoder": None
        if decoder is None
        else getattr(decoder, "identity", None)
        or getattr(decoder, "__qualname__", type(decoder).__name__),
        **_run_identity(ckpt, use_ema),
    }
    identity["sampler"]["cfg_interval"] = list(sampler.cfg_interval)
    writer = jax.process_index() == 0
    partial = partial_dir(out)
    state_file = partial / _STATE
    if state_file.is_file():
        saved = json.loads(state_file.read_text())
        for name, value in identity.items():
            if saved.get(name) != value:
                raise EvalError(
                    f"{partial} holds batches of another sampling run ({name} was {saved.get(name)!r}, "
                    f"now {value!r}): rerun with the same settings to resume, or delete it"
                )
    elif writer:
        partial.mkdir(parents=True, exist_ok=True)
        write_text_atomically(state_file, json.dumps(identity, indent=2))

    batches = -(-num // batch_size)

    def batch_file(b: int) -> pathlib.Path:
        return partial / f"batch_{b:06d}.npz"

    todo = [b for b in range(batches) if not batch_file(b).is_file()]
    resumed = batches - len(todo)
    mesh = make_mesh()
    sharding = batch_sharding(mesh)
    model = ckpt.ema if use_ema else ckpt.model
    params, static = eqx.partition(model, eqx.is_array)
    model = eqx.combine(jax.device_put(params, replicated(mesh)), static)
    objective = make_objective(cfg)
    shape = (cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size)
    root = jr.key(seed)
    bar = _Progress(num, min(resumed * batch_size, num), progress and writer)
    if progress and writer and resumed:
        print(f"resuming: {resumed}/{batches} batches already in {partial}", file=sys.stderr)
    static = dict(
        objective=objective, config=sampler, shape=shape, sharding=sharding, decoder=decoder
    )
    program = None
    for b in todo:
        key_labels, key_batch = jr.split(jr.fold_in(root, b))
        y = _labels_for(labels, num_classes, key_labels, b * batch_size, batch_size)
        y_sharded = jax.device_put(jnp.asarray(y), sharding)
        if program is None:
            # Compiled ahead of the first batch, so the first batch times sampling alone and the
            # estimate below is (compile time) + (batches left) x (first batch time).
            tick = time.perf_counter()
            program = _sample_batch.lower(model, key_batch, y_sharded, **static).compile()
            compile_s = time.perf_counter() - tick
        tick = time.perf_counter()
        images = program(model, key_batch, y_sharded, **static)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            images = multihost_utils.process_allgather(images, tiled=True)
        valid = min(batch_size, num - b * batch_size)
        pixels = to_uint8(np.asarray(images, np.float32))[:valid]
        if writer:
            write_npz(batch_file(b), {"images": pixels, "labels": y[:valid]})
        seconds = time.perf_counter() - tick
        if b == todo[0] and progress and writer:
            left = f", {len(todo)} left" if resumed else ""
            estimate = _duration(compile_s + len(todo) * seconds)
            print(
                f"sampling {num} images in {batches} batches of {batch_size}{left} "
                f"({objective.describe_sampler(sampler)}); compile {_duration(compile_s)}, "
                f"first batch {seconds:.2f} s; estimated total {estimate}",
                file=sys.stderr,
                flush=True,
            )
        bar.update(valid, seconds)

    if writer:
        first = np.load(batch_file(0))["images"]
        final_shape = (num, *first.shape[1:])
        all_labels = np.concatenate([np.load(batch_file(b))["labels"] for b in range(batches)])
        chunks = (np.load(batch_file(b))["images"] for b in range(batches))
        write_npz(out, {"arr_0": (final_shape, np.uint8, chunks), "labels": all_labels.astype(np.int32)})
        if grid is not None:
            head = next(iter_npz(out, "arr_0", min(grid_count, num)))
            floats = (head.astype(np.float32) - np.float32(127.5)) / np.float32(127.5)
            save_grid(floats.transpose(0, 3, 1, 2), grid, columns=min(16, len(head)))
        shutil.rmtree(partial)
    else:
        final_shape = None  # only the writing process assembles the file
    return {
        "out": str(out),
        "num": num,
        "shape": None if final_shape is None else list(final_shape),
        "batches": batches,
        "resumed_batches": resumed,
        "seconds": round(time.perf_counter() - bar.start, 3),
        "images_per_second": round(bar.rate, 3),
        "grid": None if grid is None else str(grid),
    }


__all__ = ["Decoder", "generate", "partial_dir"]
