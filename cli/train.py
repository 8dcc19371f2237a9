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


def main(argv: list[str] | None = None) -> dict:
    cfg = tyro.extras.overridable_config_cli(
        PRESETS, prog="python -m cli.train", args=argv, description=__doc__
    )
    from eqdisp.train import train

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
