"""Benchmarks that print figures (never assert): train-step speed and MFU, dispersive overhead, sampling.

MFU is measured against a matmul peak timed in the same process, in the step's compute dtype (a
2048x2048 matmul on CPU, 8192x8192 on an accelerator), so a noisy machine moves both numbers
together. Model FLOPs are counted by XLA from the compiled step
(``cost_analysis``, for unrolled blocks only: XLA counts a scan body once) and analytically (3x the
forward's matmul FLOPs, the convention of the PyTorch reference figures); GFLOP/s and MFU use the
analytic count. Every result records the CPU it was measured on (`cpu_info`); `format_figures`
turns a result into the lines ``python -m cli.bench`` prints.
"""

import re
import resource
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

from ._cpu import cpu_info
from .config import ConfigError, DispConfig, OptimConfig, SamplerConfig, TransportConfig
from .models import make_model, parse_model_name
from .samplers import sample
from .train import init_train_state, make_optimizer, make_train_step
from .transport import make_transport

_UNITS = (
    (r"images_per_s", "img/s"),
    (r"gflop_s", "GFLOP/s"),
    (r"gflop_per_image", "GFLOP/img"),
    (r"gib", "GiB"),
    (r"mib", "MiB"),
    (r"gbytes", "GB"),
    (r"^ms_", "ms"),
    (r"(^|_)s(_|$)", "s"),  # compile_s, step_s_median, step_s_median_on, ...
)
"""The unit of a figure, from its key (the first pattern that matches)."""


def _with_unit(key: str, value: object) -> str:
    if value is None:
        return "n/a"
    unit = next((unit for pattern, unit in _UNITS if re.search(pattern, key)), "")
    return f"{value} {unit}" if unit else str(value)


def format_figures(figures: dict) -> str:
    """The figures of a benchmark as aligned ``key: value unit`` lines, the CPU first.

    A nested dict is flattened to one line per entry, ``memory_gib.temporaries: 0.21 GiB``, in
    its key's unit; None reads ``n/a``.
    """
    lines = {}
    if "cpu" in figures:
        cpu = figures["cpu"]
        isa = f" ({', '.join(cpu['isa'])})" if cpu["isa"] else ""
        cores = f", {cpu['cores']} cores" if cpu["cores"] else ""
        lines["cpu"] = f"{cpu['model']}{isa}{cores}"
    for key, value in figures.items():
        if key == "cpu":
            continue
        if isinstance(value, dict):
            for name, entry in value.items():
                lines[f"{key}.{name}"] = _with_unit(key, entry)
        else:
            lines[key] = _with_unit(key, value)
    width = max(map(len, lines))
    return "\n".join(f"{key:>{width}}: {text}" for key, text in lines.items())


def matmul_peak(size: int | None = None, repeats: int = 10, dtype: str = "float32") -> float:
    """Median GFLOP/s of a ``size x size`` matmul on the default device (random data, never zeros).

    ``size`` defaults to 2048 on CPU and 8192 elsewhere (large enough to fill a GPU).
    """
    if size is None:
        size = 2048 if jax.default_backend() == "cpu" else 8192
    a = jr.normal(jr.key(0), (size, size), dtype)
    b = jr.normal(jr.key(1), (size, size), dtype)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


def analytic_flops_per_image(name: str, input_size: int = 32, in_channels: int = 4) -> float:
    """Training FLOPs per image: 3x the forward's matmul FLOPs (forward + 2x for the backward)."""
    spec = parse_model_name(name)
    tokens = (input_size // spec.patch_size) ** 2
    dim = spec.dim
    per_block = 2 * tokens * dim * (3 * dim + dim + 8 * dim)  # qkv, proj, MLP (4x, two layers)
    per_block += 2 * 2 * tokens * tokens * dim  # q k^T and attention x v
    per_block += 2 * dim * 6 * dim  # adaLN modulation
    embed = 2 * tokens * in_channels * spec.patch_size**2 * dim
    final = 2 * tokens * dim * spec.patch_size**2 * 2 * in_channels + 2 * dim * 2 * dim
    return 3.0 * (spec.depth * per_block + embed + final)


def _timed(fn: Callable[[], object], steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times


class _Program(NamedTuple):
    run: Callable[[], object]
    """One train step, carrying the state from step to step."""
    compile_s: float
    cost: dict
    """XLA's cost analysis (a while loop's body is counted once)."""
    memory: Any
    """XLA's memory analysis."""


def _compile(step, state, x, y) -> _Program:
    """The train step compiled once for these arguments, and what XLA says of the program."""
    start = time.perf_counter()
    with warnings.catch_warnings():  # the batch is donated too; no output can reuse it
        warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
        program = step.lower(state, x, y).compile()
    compile_s = time.perf_counter() - start
    compiled = program.compiled  # equinox wraps jax's Compiled
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, list) else cost) or {}
    holder = {"state": state}

    def run():
        # Fresh copies each step: the step donates its inputs.
        holder["state"], metrics = program(holder["state"], x + 0.0, y + 0)
        return metrics

    return _Program(run, compile_s, cost, compiled.memory_analysis())


def _setup(
    name: str,
    batch: int,
    disp: DispConfig,
    dtype: str = "float32",
    block_impl: str = "auto",
    attention: str = "auto",
    remat: str = "auto",
    bf16_mode: str = "auto",
):
    if disp.active and disp.group_size is not None and batch % disp.group_size:
        raise ConfigError(
            f"disp.group_size={disp.group_size} is not allowed: expected a divisor of --batch {batch}"
        )
    key_model, key_state, key_x = jr.split(jr.key(0), 3)
    model = make_model(
        name,
        key=key_model,
        dtype=dtype,
        block_impl=block_impl,
        attention=attention,
        remat=remat,
        bf16_mode=bf16_mode,
    )
    optimizer = make_optimizer(OptimConfig())
    state = init_train_state(model, optimizer, key=key_state)
    step = make_train_step(optimizer, make_transport(TransportConfig()), disp, ema_decay=0.9999)
    x = jr.normal(key_x, (batch, 4, 32, 32), jnp.float32)
    y = jnp.arange(batch, dtype=jnp.int32) % 1000
    return state, step, x, y


def bench_step(
    name: str,
    batch: int,
    *,
    disp: DispConfig = DispConfig(),
    dtype: str = "float32",
    block_impl: str = "auto",
    attention: str = "auto",
    remat: str = "auto",
    bf16_mode: str = "auto",
    steps: int = 5,
    warmup: int = 2,
) -> dict:
    """Compile time, median step time, images/s, FLOPs, GFLOP/s, MFU and memory of one train step."""
    peak = matmul_peak(dtype=dtype)
    state, step, x, y = _setup(name, batch, disp, dtype, block_impl, attention, remat, bf16_mode)
    model = state.model  # the "auto" choices, resolved
    block_impl, attention, remat = model.block_impl, model.blocks.attention_impl, model.remat
    program = _compile(step, state, x, y)
    memory = program.memory
    _timed(program.run, warmup)
    before = resource.getrusage(resource.RUSAGE_SELF)
    times = _timed(program.run, steps)
    after = resource.getrusage(resource.RUSAGE_SELF)
    step_s = statistics.median(times)
    flops_xla = float(program.cost.get("flops", 0.0)) / batch if program.cost else float("nan")
    flops_analytic = analytic_flops_per_image(name)
    achieved = flops_analytic * batch / step_s / 1e9
    gib = 2.0**30
    device = jax.devices()[0]
    device_peak = (device.memory_stats() or {}).get("peak_bytes_in_use")
    return {
        "model": name,
        "batch": batch,
        "variant": disp.variant if disp.active else "none",
        "dtype": dtype,
        "bf16_mode": model.bf16_mode if dtype == "bfloat16" else None,
        "block_impl": block_impl,
        "attention": attention,
        "remat": remat,
        "device": device.device_kind,
        "compile_s": round(program.compile_s, 2),
        "step_s_median": round(step_s, 4),
        "step_s_min": round(min(times), 4),
        "step_s_max": round(max(times), 4),
        "images_per_s": round(batch / step_s, 3),
        "gflop_per_image_analytic": round(flops_analytic / 1e9, 2),
        # XLA counts a while loop's body once, so its count is only meaningful for unrolled blocks.
        "gflop_per_image_xla": round(flops_xla / 1e9, 2) if block_impl == "unroll" else None,
        "achieved_gflop_s": round(achieved, 1),
        "matmul_peak_gflop_s": round(peak, 1),
        "mfu": round(achieved / peak, 3),
        # The kernel's share: XLA:CPU allocates a step's temporaries afresh, and with glibc's
        # malloc every large one is a new mapping whose pages the kernel faults in and zeroes.
        "system_s_per_step": round((after.ru_stime - before.ru_stime) / steps, 3),
        "page_faults_per_step": round((after.ru_minflt - before.ru_minflt) / steps),
        "memory_gib": {
            "arguments": round(memory.argument_size_in_bytes / gib, 3),
            "outputs": round(memory.output_size_in_bytes / gib, 3),
            "temporaries": round(memory.temp_size_in_bytes / gib, 3),
            "process_peak_rss": round(
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3
            ),
            "device_peak": round(device_peak / gib, 3) if device_peak is not None else None,
        },
        "cpu": cpu_info(),
    }


def bench_disp(name: str, batch: int, *, disp: DispConfig = DispConfig(), rounds: int = 5) -> dict:
    """The same step with the dispersive term on and off, interleaved; the time ratio on / off.

    Wall time on a shared CPU varies by a few % between rounds, so a 1% question needs many
    rounds (``rounds=40`` for SiT-S/2). The compiled programs' temporary memory and XLA's count
    of bytes accessed (loop bodies counted once) are exact and tell what the term adds.
    """
    programs = {}
    for label, config in (("off", DispConfig(variant="none")), ("on", disp)):
        state, step, x, y = _setup(name, batch, config)
        programs[label] = _compile(step, state, x, y)
        _timed(programs[label].run, 2)
    times = {"off": [], "on": []}
    for _ in range(rounds):
        for label in ("off", "on"):
            times[label] += _timed(programs[label].run, 1)
    ratios = [on / off for on, off in zip(times["on"], times["off"])]
    off, on = programs["off"], programs["on"]
    return {
        "model": name,
        "batch": batch,
        "variant": disp.variant,
        "blocks": disp.blocks,
        "rounds": rounds,
        "step_s_median_off": round(statistics.median(times["off"]), 4),
        "step_s_median_on": round(statistics.median(times["on"]), 4),
        "ratio_on_off_min": round(min(ratios), 4),
        "ratio_on_off_median": round(statistics.median(ratios), 4),
        "ratio_on_off_max": round(max(ratios), 4),
        "temporaries_mib_off": round(off.memory.temp_size_in_bytes / 2**20, 1),
        "temporaries_mib_on": round(on.memory.temp_size_in_bytes / 2**20, 1),
        "xla_gbytes_accessed_off": round(off.cost.get("bytes accessed", float("nan")) / 1e9, 3),
        "xla_gbytes_accessed_on": round(on.cost.get("bytes accessed", float("nan")) / 1e9, 3),
        "cpu": cpu_info(),
    }


def bench_sample(
    name: str,
    batch: int,
    *,
    steps: int = 250,
    method: str = "heun",
    evals: int = 0,
    dtype: str = "float32",
    bf16_mode: str = "auto",
) -> dict:
    """Milliseconds per network evaluation and images/s of the ODE sampler.

    With ``evals > 0`` only that many grid points are integrated and the full ``steps`` run is
    extrapolated (the cost per evaluation does not depend on the position on the grid).
    """
    model = make_model(name, key=jr.key(0), dtype=dtype, bf16_mode=bf16_mode)
    transport = make_transport(TransportConfig())
    grid = evals if evals else steps
    config = SamplerConfig(ode_method=method, steps=grid)
    x = jr.normal(jr.key(1), (batch, 4, 32, 32), jnp.float32)
    y = jnp.arange(batch, dtype=jnp.int32) % 1000
    run = eqx.filter_jit(
        lambda m, x: sample(m, x, y, key=jr.key(2), transport=transport, config=config)
    )
    start = time.perf_counter()
    jax.block_until_ready(run(model, x))
    first_s = time.perf_counter() - start
    seconds = statistics.median(_timed(lambda: run(model, x), 3))
    per_step = {"euler": 1, "heun": 2}[method]
    nfe = per_step * (grid - 1)
    ms_per_nfe = 1000 * seconds / nfe
    full_nfe = per_step * (steps - 1)
    return {
        "model": name,
        "batch": batch,
        "dtype": dtype,
        "bf16_mode": model.bf16_mode if dtype == "bfloat16" else None,
        "method": method,
        "steps": steps,
        "nfe": full_nfe,
        "measured_grid_points": grid,
        "first_call_s": round(first_s, 2),
        "ms_per_nfe": round(ms_per_nfe, 2),
        "images_per_s": round(batch / (ms_per_nfe * full_nfe / 1000), 4),
        "cpu": cpu_info(),
    }


def bench_vae(
    batch: int = 4, resolution: int = 256, *, config: Any = None, steps: int = 3
) -> dict:
    """Encode and decode images/s of the SD-VAE (random weights), compile times and memory.

    **Arguments:**

    - `batch`: images per call (`jax.vmap` over `AutoencoderKL.encode` / `decode`).
    - `resolution`: image side; latents are `resolution / 8` (a multiple of the config's
      downsampling factor).
    - `config`: a `eqdisp.vae.VAEConfig`; default the SD-VAE's.
    - `steps`: timed calls of each (after one warm-up call).

    FLOPs are XLA's count of the compiled program (every layer is unrolled, so nothing is
    missed). Memory: XLA's compiled-program figures (parameters are the arguments; the
    activations the temporaries) and the process's peak RSS so far.
    """
    from .vae import AutoencoderKL, VAEConfig

    config = VAEConfig() if config is None else config
    factor = config.downsampling_factor
    if batch < 1:
        raise ConfigError(f"--batch {batch} is not allowed: expected >= 1")
    if resolution < factor or resolution % factor:
        raise ConfigError(
            f"--resolution {resolution} is not allowed: expected a positive multiple of {factor}"
        )
    vae = AutoencoderKL(config, key=jr.key(0))
    images = jr.uniform(jr.key(1), (batch, config.in_channels, resolution, resolution),
                        jnp.float32, -1.0, 1.0)  # fmt: skip
    side = resolution // factor
    latents = jr.normal(jr.key(2), (batch, config.latent_channels, side, side), jnp.float32)
    encode = eqx.filter_jit(lambda v, x: jax.vmap(v.encode)(x))
    decode = eqx.filter_jit(lambda v, z: jax.vmap(v.decode)(z))
    figures: dict[str, Any] = {
        "model": "sd-vae" if config == VAEConfig() else repr(config),
        "batch": batch,
        "resolution": resolution,
        "latent_shape": [config.latent_channels, side, side],
        "device": jax.devices()[0].device_kind,
    }
    memory = {}
    gib = 2.0**30
    for name, fn, x in (("encode", encode, images), ("decode", decode, latents)):
        start = time.perf_counter()
        compiled = fn.lower(vae, x).compile()
        figures[f"{name}_compile_s"] = round(time.perf_counter() - start, 2)
        analysis = compiled.compiled.memory_analysis()
        cost = compiled.compiled.cost_analysis()
        cost = (cost[0] if isinstance(cost, list) else cost) or {}
        flops = float(cost.get("flops", float("nan"))) / batch  # no loops: XLA counts all of it
        memory[f"{name}_temporaries"] = round(analysis.temp_size_in_bytes / gib, 3)
        memory[f"{name}_arguments"] = round(analysis.argument_size_in_bytes / gib, 3)
        _timed(lambda: compiled(vae, x), 1)
        times = _timed(lambda: compiled(vae, x), steps)
        seconds = statistics.median(times)
        figures[f"{name}_s_median"] = round(seconds, 4)
        figures[f"{name}_images_per_s"] = round(batch / seconds, 3)
        figures[f"{name}_gflop_per_image_xla"] = round(flops / 1e9, 2)
        figures[f"{name}_achieved_gflop_s"] = round(flops * batch / seconds / 1e9, 1)
    device_peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    memory["process_peak_rss"] = round(peak_rss, 3)
    memory["device_peak"] = round(device_peak / gib, 3) if device_peak is not None else None
    figures["memory_gib"] = memory
    figures["cpu"] = cpu_info()
    return figures
