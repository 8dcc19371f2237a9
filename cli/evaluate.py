"""Evaluate an ADM sample batch: ``python -m cli.evaluate samples.npz --ref digits``.

Prints FID, sFID, Inception Score and precision/recall (ADM evaluator conventions) and writes them
as JSON next to the samples (``samples.metrics.json``). ``--features classifier`` (default) gives
FID-classifier, the number eqdisp's CPU experiments on the bundled digits report; it is not
comparable with the papers' FID-Inception (``--features inception``).
"""

import pathlib
import sys
from dataclasses import dataclass
from typing import Literal

import tyro


@dataclass(frozen=True)
class EvaluateArgs:
    """FID, sFID, IS and precision/recall of a sample batch against a reference."""

    samples: tyro.conf.Positional[str]
    """ADM sample batch: ``.npz`` with ``arr_0`` uint8 (N, H, W, C)."""
    ref: str = "digits"
    """Reference: ``digits`` (all 1,797 bundled digits), ``digits-test`` (the 297 the classifier did not
    train on), an ADM reference batch ``.npz`` (``arr_0`` and/or ``mu``, ``sigma``, ``mu_s``, ``sigma_s``), or an
    image folder (ImageNet layout, ADM centre crop to the samples' size)."""
    features: Literal["classifier", "inception"] = "classifier"
    """Feature extractor: the bundled-digits classifier (FID-classifier) or Inception-v3 (FID)."""
    inception_weights: str | None = None
    """Inception-v3 weight file, for ``--features inception``."""
    batch_size: int = 256
    """Images per feature-extractor call."""
    limit: int | None = None
    """Evaluate only the first N samples."""
    cache: bool = True
    """Cache the reference statistics in the user's cache directory."""
    json: str | None = None
    """Where to write the JSON (default: next to the samples, ``<samples>.metrics.json``)."""


def main(argv: list[str] | None = None) -> dict:
    args = tyro.cli(EvaluateArgs, prog="python -m cli.evaluate", args=argv)
    from eqdisp.eval import evaluate, format_report, write_report

    result = evaluate(
        args.samples,
        args.ref,
        features=args.features,
        inception_weights=args.inception_weights,
        batch_size=args.batch_size,
        cache=args.cache,
        limit=args.limit,
        log=lambda message: print(message, file=sys.stderr),
    )
    samples = pathlib.Path(args.samples)
    report = pathlib.Path(args.json) if args.json else samples.with_name(samples.stem + ".metrics.json")
    write_report(result, report)
    print(format_report(result))
    print(f"wrote {report}")
    return result


if __name__ == "__main__":
    from cli._entry import run

    run(main)
