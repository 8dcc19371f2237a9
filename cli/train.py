"""Train a diffusion/flow model with Dispersive Loss: ``python -m cli.train sit-tiny [--disp.variant hinge ...]``."""

import sys

import tyro

from eqdisp.config import PRESETS, ConfigError


def main(argv: list[str] | None = None) -> None:
    cfg = tyro.extras.overridable_config_cli(PRESETS, args=argv)
    from eqdisp.train import train

    summary = train(cfg)
    print("wrote", ", ".join(f"{k}: {v}" for k, v in summary.items()))


if __name__ == "__main__":
    try:
        main()
    except ConfigError as error:
        sys.exit(f"error: {error}")
