"""The training loop: data, steps, metrics, and a sample grid at the end."""

import dataclasses
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from ..config import ExperimentConfig
from ..data import epoch_batches, load_dataset
from ..images import save_grid
from ..models import make_model
from ..samplers import sample
from ..transport import make_transport
from ._step import init_train_state, make_optimizer, make_train_step


def _batches(images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int):
    epoch = 0
    while True:
        for indices in epoch_batches(len(images), batch_size, seed=seed, epoch=epoch):
            yield images[indices], labels[indices]
        epoch += 1


def train(cfg: ExperimentConfig) -> dict:
    """Train ``cfg`` from scratch and write metrics and a sample grid to ``cfg.train.out``.

    **Returns:**

    A summary dict: final metrics, images/s, and the paths written.
    """
    out = pathlib.Path(cfg.train.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))

    images, labels = load_dataset(cfg.data)
    key_model, key_train, key_sample = jr.split(jr.key(cfg.train.seed), 3)
    model = make_model(cfg.model, key=key_model)
    transport = make_transport(cfg.transport)
    optimizer = make_optimizer(cfg.optim)
    state = init_train_state(model, optimizer, key=key_train)
    step_fn = make_train_step(optimizer, transport, cfg.disp, ema_decay=cfg.optim.ema_decay)

    batches = _batches(images, labels, cfg.train.batch_size, cfg.train.seed)
    metrics_path = out / "metrics.jsonl"
    pending = None  # metrics leave the device one step late, so the host never waits on the step
    start = time.perf_counter()
    window_start, window_steps = start, 0
    with metrics_path.open("w") as log:
        for step in range(1, cfg.train.steps + 1):
            x, y = next(batches)
            state, metrics = step_fn(state, jnp.asarray(x), jnp.asarray(y))
            window_steps += 1
            if pending is not None:
                _report(log, *pending)
                pending = None
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                now = time.perf_counter()
                rate = window_steps * cfg.train.batch_size / (now - window_start)
                window_start, window_steps = now, 0
                pending = (step, metrics, rate)
        if pending is not None:
            _report(log, *jax.block_until_ready(pending))
    elapsed = time.perf_counter() - start

    summary = {
        "steps": cfg.train.steps,
        "seconds": round(elapsed, 1),
        "images_per_second": round(cfg.train.steps * cfg.train.batch_size / max(elapsed, 1e-9), 1),
        "metrics": str(metrics_path),
    }
    if cfg.train.sample_count:
        count = cfg.train.sample_count
        y = jnp.arange(count, dtype=jnp.int32) % cfg.model.num_classes
        shape = (count, cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size)
        key_noise, key_sde = jr.split(key_sample)
        x_init = jr.normal(key_noise, shape)
        samples = sample(
            state.ema_model, x_init, y, key=key_sde, transport=transport, config=cfg.sampler
        )
        grid = out / "samples.png"
        save_grid(np.asarray(samples), grid, columns=cfg.model.num_classes)
        summary["samples"] = str(grid)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _report(log, step: int, metrics: dict, images_per_second: float) -> None:
    values = {name: float(value) for name, value in metrics.items()}
    record = {"step": step, **values, "images_per_second": round(images_per_second, 2)}
    log.write(json.dumps(record) + "\n")
    log.flush()
    shown = " ".join(f"{name}={value:.4f}" for name, value in values.items())
    print(f"step {step:>7d}  {shown}  img/s={images_per_second:.1f}", flush=True)
