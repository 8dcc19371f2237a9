"""Encode an ImageNet-layout folder into SD-VAE latents: ``python -m cli.prepare SRC OUT --vae PATH``.

Writes the shards that ``cli.train ... --data.source latents --data.path OUT`` reads, and
``OUT/manifest.json``, from which training takes the input size, channels and classes. Resumable:
rerun the same command after a kill and only the missing shards are encoded.
"""

from dataclasses import dataclass

import tyro


@dataclass(frozen=True)
class PrepareArgs:
    """Encode ``SRC/<class>/<image>`` into ``OUT`` (labels: sorted class folders)."""

    src: tyro.conf.Positional[str]
    """Image folder in the ImageNet layout."""
    out: tyro.conf.Positional[str]
    """Output directory of latent shards (a rerun resumes it)."""
    vae: str
    """SD-VAE weights: a diffusers directory (config.json + diffusion_pytorch_model.safetensors)
    or a .safetensors / .bin / .pt file (e.g. stabilityai/sd-vae-ft-ema)."""
    resolution: int = 256
    """Side of the ADM centre crop that is encoded (latents are resolution/8)."""
    flip: bool = False
    """Also encode each mirrored image (DiT/SiT flip before encoding); training picks one per read."""
    batch_size: int = 32
    """Images per encoder call, split over all local devices."""
    shard_size: int = 1024
    """Images per shard file."""


def main(argv: list[str] | None = None) -> dict:
    args = tyro.cli(PrepareArgs, prog="python -m cli.prepare", args=argv, description=__doc__)
    from eqdisp.latents import prepare_latents
    from eqdisp.sharding import initialize_distributed

    initialize_distributed()
    summary = prepare_latents(
        args.src,
        args.out,
        vae=args.vae,
        resolution=args.resolution,
        flip=args.flip,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
    )
    print("\n".join(f"{key:>18}: {value}" for key, value in summary.items()))
    return summary


if __name__ == "__main__":
    from cli._entry import run

    run(main)
