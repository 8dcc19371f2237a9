"""Sample a trained run into an ADM sample batch: ``python -m cli.sample RUN --num N --out samples.npz``.

Resumable: rerun the same command after a kill and only the missing batches are drawn. Sampler
options default to the run's own ``config.sampler``; each flag given overrides one field. After
the first batch it prints to stderr what the run will cost: the plan (images, batches, network
evaluations per image), the compile and first-batch times, and the estimated total.
"""

import dataclasses
import pathlib
from dataclasses import dataclass

import tyro

from eqdisp.config import OdeMethod, SamplerMode, SdeMethod, TimeGrid


@dataclass(frozen=True)
class SampleArgs:
    """Draw samples from a trained run into an ADM ``.npz`` (``arr_0`` uint8 NHWC, ``labels``)."""

    run: tyro.conf.Positional[str]
    """Run directory (or its checkpoints directory)."""
    num: int = 50_000
    """Number of images (the papers' FID-50k uses 50,000)."""
    out: str = "samples.npz"
    """Output ``.npz``; the finished batches live in ``<out>.partial/`` until it is complete."""
    mode: SamplerMode | None = None
    """Sampler: probability-flow ODE or reverse SDE (default: the run's)."""
    ode_method: OdeMethod | None = None
    """ODE solver (default: the run's)."""
    sde_method: SdeMethod | None = None
    """SDE solver (default: the run's)."""
    steps: int | None = None
    """Grid points, SiT counting (default: the run's)."""
    time_grid: TimeGrid | None = None
    """Fixed-step ODE grid: ``uniform`` or ``edm`` (default: the run's)."""
    cfg_scale: float | None = None
    """Classifier-free guidance scale; 1 = no guidance (default: the run's)."""
    cfg_interval: tuple[float, float] | None = None
    """Guide only for t in [LOW, HIGH], eqdisp time (t=1 data) (default: the run's)."""
    cfg_channels: int | None = None
    """Guide only the first N channels (3 = DiT/SiT); default: the run's."""
    ema: bool = True
    """Sample from the EMA weights (``--no-ema``: the raw weights)."""
    step: int | None = None
    """Checkpoint step (default: the latest)."""
    batch_size: int = 64
    """Images per compiled batch, split over all devices; keep it when resuming."""
    seed: int = 0
    """Seed: batch b draws its labels and noise from fold_in(key(seed), b)."""
    labels: str = "uniform"
    """``uniform`` (random, as DiT/SiT), one class number such as ``3``, or a ``.npy``/text file of NUM ints."""
    vae: str | None = None
    """SD-VAE that decodes a latent run's samples (default: the run's ``data.vae``, else its
    latents' manifest); a diffusers directory or a weight file."""
    decode_chunk: int = 4
    """Latents decoded at a time inside the sampling program (memory: ~0.2 GB each at 256px on CPU)."""
    grid: str | None = None
    """Also write a PNG grid of the first 64 images here."""
    overwrite: bool = False
    """Replace an existing output file."""


def _labels(spec: str):
    import numpy as np

    from eqdisp.eval import EvalError

    if spec == "uniform":
        return None
    if spec.lstrip("-").isdigit():
        return int(spec)
    path = pathlib.Path(spec)
    if not path.is_file():
        raise EvalError(f"--labels {spec!r}: expected 'uniform', a class number, or a file of ints")
    return np.load(path) if path.suffix == ".npy" else np.loadtxt(path, dtype=np.int64, ndmin=1)


def _decoder(config, args: SampleArgs):
    """The VAE decoder of a latent run (None for a pixel-space run)."""
    from eqdisp.eval import EvalError
    from eqdisp.latents import latent_decoder, run_vae

    if config.data.source != "latents":
        if args.vae is not None:
            raise EvalError(f"--vae {args.vae}: this run's model makes images, not latents")
        return None
    vae = args.vae or run_vae(config)
    if vae is None:
        raise EvalError(
            "this run's model makes SD-VAE latents and its config names no VAE: pass --vae PATH "
            "(e.g. a diffusers sd-vae-ft-ema directory)"
        )
    if args.decode_chunk < 1:
        raise EvalError(f"--decode-chunk {args.decode_chunk} is not allowed: expected a positive int")
    return latent_decoder(vae, chunk=args.decode_chunk)


def main(argv: list[str] | None = None) -> dict:
    args = tyro.cli(SampleArgs, prog="python -m cli.sample", args=argv)
    from eqdisp import load_checkpoint
    from eqdisp.eval import generate
    from eqdisp.sharding import initialize_distributed

    initialize_distributed()
    ckpt = load_checkpoint(args.run, args.step)
    overrides = {
        name: getattr(args, name)
        for name in (
            "mode",
            "ode_method",
            "sde_method",
            "steps",
            "time_grid",
            "cfg_scale",
            "cfg_interval",
            "cfg_channels",
        )
        if getattr(args, name) is not None
    }
    sampler = dataclasses.replace(ckpt.config.sampler, **overrides)
    dataclasses.replace(ckpt.config, sampler=sampler)  # checks it against the model (ConfigError)
    decoder = _decoder(ckpt.config, args)
    summary = generate(
        ckpt,
        num=args.num,
        out=args.out,
        sampler=sampler,
        batch_size=args.batch_size,
        seed=args.seed,
        labels=_labels(args.labels),
        use_ema=args.ema,
        grid=args.grid,
        overwrite=args.overwrite,
        decoder=decoder,
    )
    print("\n".join(f"{key:>18}: {value}" for key, value in summary.items()))
    return summary


if __name__ == "__main__":
    from cli._entry import run

    run(main)
