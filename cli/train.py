"""Train a diffusion/flow model with Dispersive Loss: ``python -m cli.train sit-tiny [--disp.variant hinge ...]``.

Running the same command again resumes from the newest readable checkpoint of ``--train.out``.

Exit status: 0 when the run reached ``--train.steps`` (or already had); 1 with a one-line
``error:`` for bad input, a non-finite loss or a checkpoint that cannot be written; 128 + the
signal number when SIGTERM (143) or SIGINT (130) stopped it after saving a checkpoint, so that a
scheduler sees a preempted job, not a finished one.
"""

import signal
import sys

import tyro

from eqdisp.config import PRESETS


def _parse(presets: dict, argv: list[str] | None):
    return tyro.extras.overridable_config_cli(
        presets, prog="python -m cli.train", args=argv, description=__doc__
    )


def main(argv: list[str] | None = None) -> dict:
    cfg = _parse(PRESETS, argv)
    from eqdisp.latents import fit_config_to_latents
    from eqdisp.train import train

    if fit_config_to_latents(cfg) != cfg:
        # Prepared latents: their manifest sets the model's input, channels and classes under
        # the command line's own flags, which still win (and are checked against the shards).
        fitted = {name: (doc, fit_config_to_latents(c, cfg.data)) for name, (doc, c) in PRESETS.items()}
        cfg = _parse(fitted, argv)

    summary = train(cfg)
    print("\n".join(f"{key:>18}: {value}" for key, value in summary.items()))
    if "stopped_by" in summary:
        sig = signal.Signals[summary["stopped_by"]]
        print(
            f"preempted by {sig.name} at step {summary['step']}: checkpoint {summary['checkpoint']} "
            f"saved; run the same command to resume (exit status {128 + sig.value})",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(128 + sig.value)
    return summary


if __name__ == "__main__":
    from cli._entry import run

    run(main)
