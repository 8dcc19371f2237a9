"""Train a diffusion/flow model with Dispersive Loss: ``python -m cli.train sit-tiny [--disp.variant hinge ...]``."""

import tyro

from eqdisp.config import PRESETS


def main(argv: list[str] | None = None) -> None:
    cfg = tyro.extras.overridable_config_cli(PRESETS, prog="python -m cli.train", args=argv)
    from eqdisp.train import train

    summary = train(cfg)
    print("\n".join(f"{key:>18}: {value}" for key, value in summary.items()))


if __name__ == "__main__":
    from cli._entry import run

    run(main)
