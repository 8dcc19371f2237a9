"""Convert a PyTorch SiT/DiT/REPA/Dispersive-Loss checkpoint into an eqdisp run:
``python -m cli.convert CKPT OUT_RUN --model SiT-XL/2 [--weights ema|model] [--vae PATH]``.

The run (one checkpoint at step 0: model and EMA the converted weights, a fresh optimizer) is
read by ``cli.sample``, ``cli.analyze``, ``cli.evaluate`` and ``cli.train --train.init-from``.
No torch needed.
"""

import json
from dataclasses import dataclass
from typing import Literal

import tyro


@dataclass(frozen=True)
class ConvertArgs:
    """Convert a released or trained PyTorch checkpoint into an eqdisp run directory."""

    ckpt: tyro.conf.Positional[str]
    """The checkpoint: a bare state dict (the SiT/DiT releases), a training checkpoint
    ``{model, ema, opt, args}`` (SiT, DiT, Dispersive Loss, REPA), or a ``.safetensors`` or
    ``.npz`` state dict."""
    out_run: tyro.conf.Positional[str]
    """The run directory to create (must not exist, or be empty)."""
    model: str | None = None
    """Model name, e.g. ``SiT-XL/2`` or ``DiT-XL/2``; default: the checkpoint's ``args.model``."""
    weights: Literal["ema", "model"] = "ema"
    """Entry of a training checkpoint: the EMA weights (what the papers sample from) or the raw
    ones."""
    vae: str | None = None
    """SD-VAE weights that decode the model's latents (stored in the run config)."""
    time_convention: Literal["auto", "sit", "repa"] = "auto"
    """``auto`` recognises REPA by its projectors or training arguments; ``repa`` forces REPA's
    convention (t=1 noise), e.g. for a REPA state dict exported without its projectors."""


def main(argv: list[str] | None = None) -> dict:
    args = tyro.cli(ConvertArgs, prog="python -m cli.convert", args=argv)
    from eqdisp.convert import CONVERSION_FILE, convert_checkpoint

    run = convert_checkpoint(
        args.ckpt,
        args.out_run,
        args.model,
        weights=args.weights,
        vae=args.vae,
        time_convention=None if args.time_convention == "auto" else args.time_convention,
    )
    report = json.loads((run / CONVERSION_FILE).read_text())
    skipped = report["skipped"]
    lines = {
        "run": str(run),
        "model": report["model"],
        "parameters": f"{report['parameters']:,}",
        "read": report["kind"] + (f", entry {report['entry']!r}" if report["entry"] else ""),
        "time convention": report["time_convention"],
        "pos_embed diff": f"{report['pos_embed_max_abs_diff']:.3g} (max abs, from eqdisp's table)",
        "skipped keys": f"{len(skipped)} ({', '.join(skipped)})" if skipped else "none",
    }
    if report["renamed"]:
        lines["renamed"] = report["renamed"]
    print("\n".join(f"{key:>16}: {value}" for key, value in lines.items()))
    return report


if __name__ == "__main__":
    from cli._entry import run

    run(main)
