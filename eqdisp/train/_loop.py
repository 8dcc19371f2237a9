"""The training loop: resumable, sharded, stopped cleanly by SIGTERM/SIGINT or a non-finite loss.

Running the same configuration again with the same ``train.out`` continues from the newest
checkpoint; the per-step keys are ``fold_in(key, step)`` and the data iterator is checkpointed
with the state, so a resumed run equals an uninterrupted one bit for bit.
"""

import dataclasses
import json
import math
import pathlib
import signal
import sys
import time

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from ..config import ConfigError, ExperimentConfig
from ..data import make_dataset
from ..images import save_grid
from ..models import make_model
from ..objective import draw_samples, make_objective
from ..sharding import global_batch, initialize_distributed, make_mesh, shard_state
from ._checkpoint import Checkpointer, config_to_dict
from ._step import TrainState, init_train_state, make_optimizer, make_train_step


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

    def report(self, step: int, metrics: dict[str, float], images_per_second: float, eta: float):
        if not self.enabled:
            return
        record = {"step": step, **metrics, "images_per_second": round(images_per_second, 2)}
        self.log.write(json.dumps(record) + "\n")
        self.log.flush()
        shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        line = f"step {step:>7d}/{self.total}  {shown}  img/s={images_per_second:.1f}  eta={eta:.0f}s"
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", flush=True)

    def close(self):
        if self.enabled:
            if self.tty:
                print(flush=True)
            self.log.close()


def _check_resumable(saved: ExperimentConfig, cfg: ExperimentConfig, out: pathlib.Path) -> None:
    # Only the run length may change between a run and its resumption.
    ignore = {"steps", "log_every", "sample_every", "checkpoint_every", "keep", "sample_count"}
    for section in dataclasses.fields(cfg):
        old, new = getattr(saved, section.name), getattr(cfg, section.name)
        for field in dataclasses.fields(new):
            if section.name == "train" and field.name in ignore:
                continue
            a, b = getattr(old, field.name), getattr(new, field.name)
            if a != b:
                raise ConfigError(
                    f"{section.name}.{field.name}={b!r} differs from the checkpoint's {a!r} in {out}: "
                    "use another train.out for a different experiment"
                )


def _write_samples(state: TrainState, cfg: ExperimentConfig, transport, path: pathlib.Path) -> None:
    count = cfg.train.sample_count
    y = jnp.arange(count, dtype=jnp.int32) % cfg.model.num_classes
    shape = (count, cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size)
    key_noise, key_sde = jr.split(jr.key(cfg.train.seed + 1))  # the same noise at every grid
    x_init = jr.normal(key_noise, shape)
    images = draw_samples(
        state.ema_model, x_init, y, key=key_sde, objective=transport, config=cfg.sampler
    )
    if jax.process_index() == 0:
        save_grid(np.asarray(images), path, columns=min(count, max(cfg.model.num_classes, 8)))


def train(cfg: ExperimentConfig) -> dict:
    """Train (or resume) ``cfg`` and write checkpoints, metrics and sample grids to ``cfg.train.out``.

    **Returns:**

    A summary dict: steps, time, images/s, the last metrics and the paths written.

    **Raises:**

    ``TrainingError`` if the loss becomes NaN/inf (the last good checkpoint is kept), and
    ``ConfigError`` if ``cfg`` cannot resume the checkpoint found in ``train.out``.
    """
    initialize_distributed()
    run = cfg.train
    out = pathlib.Path(run.out)
    main_process = jax.process_index() == 0
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
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
    transport = make_objective(cfg)
    optimizer = make_optimizer(cfg.optim)
    state = init_train_state(make_model(cfg.model, key=key_model), optimizer, key=key_train)
    state = shard_state(state, mesh)

    checkpointer = Checkpointer(out / "checkpoints", keep=run.keep)
    start_step = checkpointer.latest_step() or 0
    if start_step:
        _check_resumable(checkpointer.read_config(start_step), cfg, out)
        state = checkpointer.restore(state, step=start_step, data_iterator=data_iter)
        if main_process:
            print(f"resuming {out} from step {start_step}", flush=True)
    elif main_process:
        (out / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))

    step_fn = make_train_step(optimizer, transport, cfg.disp, ema_decay=cfg.optim.ema_decay, mesh=mesh)
    progress = _Progress(run.steps, out / "metrics.jsonl", enabled=main_process)
    last_metrics: dict[str, float] = {}
    saved_step = start_step
    start = time.perf_counter()
    window = [start, 0]  # time of the last report, steps since

    def consume(step: int, metrics: dict) -> None:
        """Read one step's metrics on the host: stop on NaN/inf, report every ``log_every``."""
        nonlocal last_metrics
        values = {k: float(v) for k, v in metrics.items()}
        if not all(math.isfinite(v) for v in values.values()):
            bad = ", ".join(f"{k}={v}" for k, v in values.items() if not math.isfinite(v))
            raise TrainingError(
                f"non-finite loss at step {step} ({bad}): training stopped; the last good "
                f"checkpoint is step {saved_step} in {out / 'checkpoints'}"
            )
        last_metrics = values
        window[1] += 1
        if step % run.log_every == 0 or step == run.steps:
            now = time.perf_counter()
            rate = window[1] * run.batch_size / max(now - window[0], 1e-9)
            window[:] = [now, 0]
            progress.report(step, values, rate, (run.steps - step) * run.batch_size / rate)

    step = start_step
    try:
        with _StopSignal() as stop:
            previous = None  # the last step's metrics, read one step late so the host never waits
            while step < run.steps and stop.received is None:
                batch = global_batch(next(data_iter), mesh)
                state, metrics = step_fn(state, batch["x"], batch["y"])
                step += 1
                if previous is not None:
                    consume(*previous)
                previous = (step, metrics)
                if step % run.checkpoint_every == 0 and step < run.steps:
                    consume(*previous)  # only a state whose loss is finite is saved
                    previous = None
                    checkpointer.save(step, state, config=cfg, data_iterator=data_iter)
                    saved_step = step
                if run.sample_every and step % run.sample_every == 0 and step < run.steps:
                    _write_samples(state, cfg, transport, out / f"samples_{step:07d}.png")
            if previous is not None:
                consume(*previous)
            if step > saved_step:
                checkpointer.save(step, state, config=cfg, data_iterator=data_iter, force=True)
                saved_step = step
            checkpointer.wait()
            interrupted = stop.received
    finally:
        progress.close()
        checkpointer.close()
    elapsed = time.perf_counter() - start

    summary: dict = {
        "out": str(out),
        "step": step,
        "seconds": round(elapsed, 1),
        "images_per_second": round((step - start_step) * run.batch_size / max(elapsed, 1e-9), 1),
        **{k: round(v, 5) for k, v in last_metrics.items()},
        "checkpoint": str(out / "checkpoints" / str(saved_step)),
    }
    if interrupted is not None:
        summary["stopped_by"] = signal.Signals(interrupted).name
    elif run.sample_count:
        grid = out / "samples.png"
        _write_samples(state, cfg, transport, grid)
        summary["samples"] = str(grid)
    if main_process:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
