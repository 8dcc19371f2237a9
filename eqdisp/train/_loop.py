"""The training loop: resumable, sharded, stopped cleanly by SIGTERM/SIGINT or a non-finite loss.

Running the same configuration again continues from the newest readable checkpoint in
``train.out``; the per-step keys are ``fold_in(key, step)`` and the data iterator is checkpointed
with the state, so a resumed run equals an uninterrupted one bit for bit. A run is identified by
its configuration, not by its path: a run directory may be moved, copied or named another way
(relative, absolute, with a trailing slash) and still resumes, and options that cannot change the
trajectory (`RESUMABLE_CHANGES`) may differ on resumption.
"""

import dataclasses
import json
import math
import os
import pathlib
import shutil
import signal
import sys
import time
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import PyTree

from ..config import ConfigError, ExperimentConfig, ModelConfig
from ..data import make_dataset
from ..families import make_objective
from ..images import save_grid
from ..io import write_text_atomically
from ..latents import latent_decoder, run_vae
from ..models import make_model, resolve_dtype
from ..sharding import global_batch, initialize_distributed, make_mesh, shard_state
from ._checkpoint import Checkpointer, CheckpointError, _one_line, config_to_dict, load_checkpoint
from ._step import TrainState, init_train_state, make_diagnostics, make_optimizer, make_train_step

RESUMABLE_CHANGES: dict[str, tuple[str, ...] | None] = {
    "sampler": None,  # every field: sampling reads the weights, it does not change them
    "data": ("vae",),  # decodes samples; the latents are read as they are
    "train": (
        "out",
        "steps",
        "log_every",
        "diagnostics_every",
        "sample_count",
        "sample_every",
        "sample_seconds",
        "checkpoint_every",
        "keep",
        "resume_step",
        "init_from",
    ),
}
"""The options that may change when a run resumes (None: the whole section); every other field
must equal the checkpoint's, since it would change the trajectory."""

_ABANDONED = "abandoned-checkpoints"


class TrainingError(RuntimeError):
    """Training stopped (e.g. a non-finite loss); the message is one line for the user."""


class _StopSignal:
    """Turn SIGTERM/SIGINT into a flag checked between steps, so the loop can checkpoint and exit."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals cannot be caught here
                pass
        return self

    def _handle(self, signum, frame):
        if self.received is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _Progress:
    """One updating line on a terminal, plain log lines otherwise (and always in the JSONL file)."""

    def __init__(self, total: int, log_path: pathlib.Path, enabled: bool):
        self.total, self.enabled = total, enabled
        self.tty = sys.stdout.isatty()
        self.log = log_path.open("a") if enabled else None

    def report(
        self,
        step: int,
        metrics: dict[str, float],
        images_per_second: float,
        eta: float,
        diagnostics: dict[str, float | None],
    ):
        if not self.enabled:
            return
        rate = round(images_per_second, 2)
        self.record(step, {**metrics, **diagnostics, "images_per_second": rate})
        shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        # The dispersive loss' distance to its floor where this step measured it: small numbers.
        for k, v in diagnostics.items():
            if k.startswith("disp_gap/") and v is not None:
                shown += f" {k}={v:.3g}"
        line = f"step {step:>7d}/{self.total}  {shown}  img/s={images_per_second:.1f}  eta={eta:.0f}s"
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", flush=True)

    def record(self, step: int, values: dict[str, float | None]):
        """Write one row to the JSONL file only (a diagnostics step between two reports)."""
        if self.enabled:
            self.log.write(json.dumps({"step": step, **values}) + "\n")
            self.log.flush()

    def close(self):
        if self.enabled:
            if self.tty:
                print(flush=True)
            self.log.close()


def _trim_metrics(path: pathlib.Path, step: int) -> None:
    """Drop the rows after `step` (written by the run that resumes from there) and torn lines."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            pass  # a line cut short by a kill
    write_text_atomically(path, "".join(f"{line}\n" for line in kept))


def _check_resumable(saved: ExperimentConfig, cfg: ExperimentConfig, where: pathlib.Path) -> None:
    for section in dataclasses.fields(cfg):
        free = RESUMABLE_CHANGES.get(section.name, ())
        if free is None:
            continue
        old, new = getattr(saved, section.name), getattr(cfg, section.name)
        for field in dataclasses.fields(new):
            a, b = getattr(old, field.name), getattr(new, field.name)
            if field.name not in free and a != b:
                raise ConfigError(
                    f"{section.name}.{field.name}={b!r} differs from the checkpoint's {a!r} in "
                    f"{where}: use another train.out for a different experiment"
                )


def _prepare_out(out: pathlib.Path) -> pathlib.Path | None:
    """Create the run directory and check it can be written; return the topmost directory this
    created (to remove if the start fails), or None when it existed."""
    missing = [p for p in (out, *out.parents) if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        if missing and missing[-1].is_dir():
            shutil.rmtree(missing[-1], ignore_errors=True)
        reason = error.strerror or _one_line(error, 200)
        raise ConfigError(
            f"train.out={str(out)!r} is not allowed: it cannot be written ({reason})"
        ) from None
    return missing[-1] if missing else None


def _committed_steps(directory: pathlib.Path) -> list[int]:
    if not directory.is_dir():
        return []
    with Checkpointer(directory, read_only=True) as ckpt:
        return ckpt.all_steps()


def _resume(
    directory: pathlib.Path,
    steps: list[int],
    cfg: ExperimentConfig,
    state: TrainState,
    data_iter,
    announce: bool,
) -> tuple[int, TrainState | None]:
    """Find the step to resume from and restore it (None when ``train.steps`` is already reached).

    Tries ``train.resume_step`` if given, else the newest checkpoint, then older ones if it cannot
    be read (each fallback announced in one line). A config that cannot resume is a ConfigError
    at once: an older checkpoint of the same directory would not fit either.
    """
    run = cfg.train
    if run.resume_step is not None:
        if run.resume_step not in steps:
            raise ConfigError(
                f"train.resume_step={run.resume_step} is not allowed: expected one of the steps "
                f"checkpointed in {directory} ({', '.join(map(str, steps))})"
            )
        candidates = [run.resume_step]
    else:
        candidates = steps[::-1]
    failures = []
    with Checkpointer(directory, read_only=True) as ckpt:
        for step in candidates:
            try:
                _check_resumable(ckpt.read_config(step), cfg, directory.parent)
                if run.steps <= step:
                    return step, None
                return step, ckpt.restore(state, step=step, data_iterator=data_iter)
            except CheckpointError as error:
                failures.append(f"step {step}: {error}")
                if run.resume_step is None and announce and step != candidates[-1]:
                    print(f"checkpoint {step} cannot be read ({error}); trying an older one", flush=True)
    raise CheckpointError(
        f"{directory}: no readable checkpoint to resume from ({'; '.join(failures)}); "
        "pass train.resume_step, or another train.out to start afresh"
    )


# What must agree between a run and the weights it starts from; the rest (compute dtype, block
# and attention implementations, label dropout) does not change the parameters' meaning.
_ARCHITECTURE = ("name", "input_size", "in_channels", "num_classes", "learn_sigma", "time_convention")


def _init_from(state: TrainState, cfg: ExperimentConfig, *, announce: bool) -> TrainState:
    """`state` with the model and EMA weights of the run or checkpoint ``train.init_from``; the
    optimizer state stays fresh and the step at 0 (fine-tuning, not resuming)."""
    source = load_checkpoint(cfg.train.init_from)
    where = f"train.init_from={cfg.train.init_from}"
    differ = [
        f"model.{name}={getattr(cfg.model, name)!r} there {getattr(source.config.model, name)!r}"
        for name in _ARCHITECTURE
        if getattr(cfg.model, name) != getattr(source.config.model, name)
    ]
    if differ:
        raise ConfigError(f"{where}: its model differs from this run's: {'; '.join(differ)}")

    def weights_into(target: PyTree, weights: PyTree) -> PyTree:
        arrays, rest = eqx.partition(target, eqx.is_array)
        leaves, treedef = jax.tree.flatten(arrays)
        theirs = jax.tree.leaves(eqx.filter(weights, eqx.is_array))
        if len(theirs) != len(leaves) or any(a.shape != b.shape for a, b in zip(leaves, theirs)):
            raise ConfigError(f"{where}: its arrays do not fit {cfg.model.name}")
        return eqx.combine(jax.tree.unflatten(treedef, theirs), rest)

    state = eqx.tree_at(
        lambda s: (s.model, s.ema),
        state,
        (weights_into(state.model, source.state.model), weights_into(state.ema, source.state.ema)),
    )
    if announce:
        print(
            f"initialised the weights and their EMA from {cfg.train.init_from} (its step "
            f"{source.step}); optimizer fresh, starting at step 0",
            flush=True,
        )
    return state


def _set_aside(directory: pathlib.Path, steps: list[int], out: pathlib.Path) -> None:
    """Move the checkpoints after the resumed step out of orbax's way (the run will write them
    again), keeping them for the user to inspect or delete."""
    target = out / _ABANDONED
    target.mkdir(exist_ok=True)
    for step in steps:
        name = str(step)
        while (target / name).exists():
            name += "-again"
        os.replace(directory / str(step), target / name)
    print(
        f"checkpoints {', '.join(map(str, steps))} moved to {target} (the run continues from an "
        "older step and will write them again)",
        flush=True,
    )


@eqx.filter_jit
def _sample_chunk(model, x_init, y, key, objective, config):
    return objective.draw_samples(model, x_init, y, key=key, config=config)


@eqx.filter_jit
def _evaluate(model, x, t, y):
    return jax.vmap(model)(x, t, y)


def _seconds_per_image(model, cfg: ExperimentConfig, objective, x, y) -> float | None:
    """What one image of the grid costs: a timed network evaluation on a batch, times the
    sampler's evaluations (twice with guidance); None for an adaptive sampler."""
    nfe = objective.sampler_evaluations(cfg.sampler)
    if nfe is None:
        return None
    t = jnp.full((x.shape[0],), 0.5, jnp.float32)
    jax.block_until_ready(_evaluate(model, x, t, y))  # compile
    tick = time.perf_counter()
    jax.block_until_ready(_evaluate(model, x, t, y))
    per_evaluation = (time.perf_counter() - tick) / x.shape[0]
    return per_evaluation * nfe * (2 if cfg.sampler.cfg_scale != 1.0 else 1)


def _write_samples(
    state: TrainState, cfg: ExperimentConfig, objective, path: pathlib.Path, stop: "_StopSignal"
) -> int:
    """Draw the run's sample grid in batches of 8 within ``train.sample_seconds``: as many images
    as a timed network evaluation says fit, and no batch more once the batches drawn say the
    rest would not. Returns the number of images written (0 if a signal arrived first)."""
    run, sampler = cfg.train, cfg.sampler
    main_process = jax.process_index() == 0
    decoder = None
    if cfg.data.source == "latents":
        vae = run_vae(cfg)
        if vae is None:
            if main_process:
                print("sample grid: skipped, since data.vae names no VAE to decode latents", flush=True)
            return 0
        decoder = eqx.filter_jit(latent_decoder(vae))
    count, chunk = run.sample_count, min(run.sample_count, 8)
    y = jnp.arange(count, dtype=jnp.int32) % cfg.model.num_classes
    shape = (count, cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size)
    key_noise, key_sde = jr.split(jr.key(run.seed + 1))  # the same noise at every grid
    x_init = jr.normal(key_noise, shape)
    model = state.ema_model
    per_image = _seconds_per_image(model, cfg, objective, x_init[:chunk], y[:chunk])
    if per_image is not None and count * per_image > run.sample_seconds:
        count = max(1, int(run.sample_seconds / per_image))
        chunk = min(chunk, count)
        if main_process:
            print(
                f"sample grid: {count} of {run.sample_count} images, since all would take "
                f"~{run.sample_count * per_image:.0f} s here (a timed network evaluation) > "
                f"train.sample_seconds={run.sample_seconds:g}",
                flush=True,
            )
    if main_process:
        estimate = f", ~{count * per_image:.0f} s" if per_image is not None else ""
        print(
            f"sample grid: {count} image{'s' * (count != 1)} in batches of {chunk}{estimate}, "
            f"{objective.describe_sampler(sampler)} (train.sample_count 0 skips it)",
            flush=True,
        )
    parts, start = [], time.perf_counter()
    for first in range(0, count, chunk):
        if stop.received is not None:
            break
        rows = slice(first, first + chunk)
        xs, ys = x_init[rows], y[rows]
        pad = chunk - xs.shape[0]  # the last batch is padded so one program serves every batch
        if pad:
            xs = jnp.concatenate([xs, jnp.zeros((pad, *xs.shape[1:]), xs.dtype)])
            ys = jnp.concatenate([ys, jnp.zeros((pad,), ys.dtype)])
        images = _sample_chunk(model, xs, ys, jr.fold_in(key_sde, first), objective, sampler)
        if decoder is not None:
            images = decoder(images)
        parts.append(np.asarray(images)[: chunk - pad])
        done = sum(len(p) for p in parts)
        elapsed = time.perf_counter() - start
        eta = elapsed / done * (count - done)
        if main_process:
            print(f"sample grid: {done}/{count} images, {elapsed:.0f} s, eta {eta:.0f} s", flush=True)
        if done < count and elapsed + eta > run.sample_seconds:
            if main_process:
                print(
                    f"sample grid: stopped at {done} of {count} images, since all would take "
                    f"~{elapsed + eta:.0f} s > train.sample_seconds={run.sample_seconds:g}",
                    flush=True,
                )
            break
    if not parts:
        return 0
    images = np.concatenate(parts)
    if main_process:
        save_grid(images, path, columns=min(len(images), max(cfg.model.num_classes, 8)))
    return len(images)


def _describe_dtype(model: ModelConfig) -> str:
    dtype = resolve_dtype(model)
    return f"{dtype} (dtype auto)" if model.dtype == "auto" else dtype


def _describe_devices() -> str:
    devices = jax.devices()
    backend = jax.default_backend()
    what = f"{os.cpu_count()} cores" if backend == "cpu" else ", ".join(sorted({d.device_kind for d in devices}))
    where = f"{len(devices)} {backend} device{'s' * (len(devices) > 1)}"
    if jax.process_count() > 1:
        where += f" in {jax.process_count()} processes"
    return f"{where} ({what})"


def train(cfg: ExperimentConfig) -> dict:
    """Train (or resume) ``cfg`` and write checkpoints, metrics and sample grids to ``cfg.train.out``.

    **Returns:**

    A summary dict: steps, time, images/s, the last metrics and the paths written; with
    ``stopped_by`` (the signal's name) when SIGTERM/SIGINT stopped the run after a checkpoint, and
    ``already_done`` when ``train.steps`` was already reached (nothing is written then).

    **Raises:**

    ``TrainingError`` if the loss becomes NaN/inf (the last good checkpoint is kept),
    ``ConfigError`` if ``cfg`` cannot resume the checkpoint found in ``train.out`` or
    ``train.out`` cannot be written, and ``CheckpointError`` if no checkpoint there can be read
    or one cannot be written (a full disk: what it left is removed, the last complete one kept).
    """
    initialize_distributed()
    run = cfg.train
    out = pathlib.Path(run.out)
    main_process = jax.process_index() == 0
    if out.exists() and not out.is_dir():
        raise ConfigError(f"train.out={run.out!r} is not allowed: it is a file, expected a directory")
    if run.batch_size % jax.process_count():
        raise ConfigError(
            f"train.batch_size={run.batch_size} is not allowed: expected a multiple of the "
            f"{jax.process_count()} processes"
        )
    if run.batch_size % jax.device_count():
        raise ConfigError(
            f"train.batch_size={run.batch_size} is not allowed: expected a multiple of the "
            f"{jax.device_count()} devices"
        )
    local_batch = run.batch_size // jax.process_count()
    shape = (cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size)
    dataset = make_dataset(
        cfg.data,
        batch_size=local_batch,
        seed=run.seed,
        shape=shape,
        num_classes=cfg.model.num_classes,
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
    )
    data_iter = iter(dataset)

    mesh = make_mesh(run.fsdp)
    key_model, key_train = jr.split(jr.key(run.seed))
    objective = make_objective(cfg)
    optimizer = make_optimizer(cfg.optim)
    state = init_train_state(make_model(cfg.model, key=key_model), optimizer, key=key_train)
    directory = out / "checkpoints"
    steps = _committed_steps(directory)
    if run.init_from is not None and not steps:
        state = _init_from(state, cfg, announce=main_process)
    state = shard_state(state, mesh)

    start_step = 0
    if steps:
        start_step, restored = _resume(directory, steps, cfg, state, data_iter, main_process)
        if restored is None:
            if main_process:
                print(f"{out} is already at step {start_step} (train.steps={run.steps}): nothing to do")
            summary_file = out / "summary.json"
            summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
            return {**summary, "out": str(out), "step": start_step, "already_done": True}
        state = restored

    created = _prepare_out(out) if main_process else None
    checkpointer = None
    try:
        if main_process:
            newer = [s for s in steps if s > start_step]
            if newer:
                _set_aside(directory, newer, out)
            if start_step:
                print(f"resuming {out} from step {start_step}", flush=True)
            else:
                write_text_atomically(out / "config.json", json.dumps(config_to_dict(cfg), indent=2))
            _trim_metrics(out / "metrics.jsonl", start_step)
        checkpointer = Checkpointer(directory, keep=run.keep)
        step_fn = make_train_step(
            optimizer,
            objective,
            cfg.disp,
            ema_decay=cfg.optim.ema_decay,
            ema_warmup=cfg.optim.ema_warmup,
            mesh=mesh,
        )
        # Compiled only if this session reaches a diagnostics step (a multiple of `every`).
        every = run.diagnostics_every
        diag_fn = None
        if every and run.steps // every > start_step // every:
            diag_fn = make_diagnostics(objective, cfg.disp, mesh=mesh)
        batch = global_batch(next(data_iter), mesh)
        params = sum(x.size for x in jax.tree.leaves(eqx.filter(state.model, eqx.is_inexact_array)))
        if main_process:
            print(
                f"compiling the train step of {cfg.model.name} ({params / 1e6:.2f}M parameters, "
                f"batch {run.batch_size}, {_describe_dtype(cfg.model)}) for {_describe_devices()}",
                flush=True,
            )
        tick = time.perf_counter()
        with warnings.catch_warnings():  # the batch is donated too; no output can reuse it
            warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
            step_fn = step_fn.lower(state, batch["x"], batch["y"]).compile()
        compile_seconds = time.perf_counter() - tick
        diag_note = ""
        if diag_fn is not None:
            tick = time.perf_counter()
            diag_fn = diag_fn.lower(state, batch["x"], batch["y"]).compile()
            diag_seconds = time.perf_counter() - tick
            compile_seconds += diag_seconds
            diag_note = f" (diagnostics every {every} steps: {diag_seconds:.1f} s of it)"
        if main_process:
            print(f"compiled in {compile_seconds:.1f} s{diag_note}", flush=True)
    except BaseException:
        if checkpointer is not None:
            checkpointer.close()
        if created is not None:  # a failed start leaves nothing behind
            shutil.rmtree(created, ignore_errors=True)
        raise

    progress = _Progress(run.steps, out / "metrics.jsonl", enabled=main_process)
    last_metrics: dict[str, float] = {}
    saved_step = start_step
    start = time.perf_counter()
    window = [start, 0]  # time of the last report, steps since

    def consume(step: int, metrics: dict, diagnostics: dict) -> None:
        """Read one step's metrics on the host: stop on NaN/inf, report every ``log_every``,
        and write a row whenever the step has diagnostics."""
        nonlocal last_metrics
        values = {k: float(v) for k, v in metrics.items()}
        # Diagnostics never stop a run (they do not change it); a non-finite one is written null.
        extra = {k: float(v) for k, v in diagnostics.items()}
        extra = {k: v if math.isfinite(v) else None for k, v in extra.items()}
        if not all(math.isfinite(v) for v in values.values()):
            bad = ", ".join(f"{k}={v}" for k, v in values.items() if not math.isfinite(v))
            raise TrainingError(
                f"non-finite loss at step {step} ({bad}): training stopped; the last good "
                f"checkpoint is step {saved_step} in {directory}"
            )
        last_metrics = values
        window[1] += 1
        if step % run.log_every == 0 or step == run.steps:
            now = time.perf_counter()
            rate = window[1] * run.batch_size / max(now - window[0], 1e-9)
            window[:] = [now, 0]
            progress.report(step, values, rate, (run.steps - step) * run.batch_size / rate, extra)
        elif extra:
            progress.record(step, {**values, **extra})

    def checkpoint(step: int, *, force: bool = False) -> None:
        nonlocal saved_step
        checkpointer.save(step, state, config=cfg, data_iterator=data_iter, force=force)
        saved_step = step

    step = start_step
    interrupted = None
    grid = None
    try:
        with _StopSignal() as stop:
            previous = None  # the last step's metrics, read one step late so the host never waits
            while step < run.steps and stop.received is None:
                if step > start_step:
                    batch = global_batch(next(data_iter), mesh)
                diagnostics = {}
                if diag_fn is not None and (step + 1) % every == 0:
                    # Dispatched before the step, which donates the state and the batch it reads.
                    diagnostics = diag_fn(state, batch["x"], batch["y"])
                state, metrics = step_fn(state, batch["x"], batch["y"])
                step += 1
                if previous is not None:
                    consume(*previous)
                previous = (step, metrics, diagnostics)
                if step % run.checkpoint_every == 0 and step < run.steps:
                    consume(*previous)  # only a state whose loss is finite is saved
                    previous = None
                    checkpoint(step)
                if run.sample_every and step % run.sample_every == 0 and step < run.steps:
                    _write_samples(state, cfg, objective, out / f"samples_{step:07d}.png", stop)
            if previous is not None:
                consume(*previous)
            if step > saved_step:
                checkpoint(step, force=True)
            checkpointer.wait()
            elapsed = time.perf_counter() - start
            if stop.received is None and run.sample_count:
                grid = out / "samples.png"
                if not _write_samples(state, cfg, objective, grid, stop):
                    grid = None
            interrupted = stop.received
    finally:
        progress.close()
        checkpointer.close()

    summary: dict = {
        "out": str(out),
        "step": step,
        "seconds": round(elapsed, 1),
        "compile_seconds": round(compile_seconds, 1),
        "images_per_second": round((step - start_step) * run.batch_size / max(elapsed, 1e-9), 1),
        **{k: round(v, 5) for k, v in last_metrics.items()},
        "checkpoint": str(directory / str(saved_step)),
    }
    if grid is not None:
        summary["samples"] = str(grid)
    if interrupted is not None:
        summary["stopped_by"] = signal.Signals(interrupted).name
    if main_process:
        write_text_atomically(out / "summary.json", json.dumps(summary, indent=2))
    return summary
