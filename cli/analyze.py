"""Analyse trained runs' block representations: ``python -m cli.analyze {norms,spectra,probes,dynamics,report} RUN [RUN ...]``.

Each subcommand writes ``<out>/<name>.html`` (self-contained, opens offline), ``<name>.json`` (all
numbers) and ``<name>.csv`` (a table) and prints their paths. Several runs are overlaid, all
analysed on the same examples, noise and times.

Linear probes (``probes``, ``report``) run the model on the null label by default
(``--probe-labels null``: the classifier-free-guidance label, so the model sees no class and a
probe must infer it from x_t). That is meaningful only for a run trained with label dropout
(``model.class_dropout_prob > 0``); for one trained without, the page shows a warning instead of
accuracies. ``--probe-labels true`` feeds the true class (accuracies near 1.0 then reflect the
conditioning, and the page says so).
"""

import dataclasses
import pathlib
import sys
from typing import Annotated, ClassVar

import tyro

from analysis import Options

_Flat = tyro.conf.arg(name="")  # Options' fields are top-level flags: --t, --examples, ...


@dataclasses.dataclass(frozen=True)
class _Command:
    runs: tyro.conf.Positional[tuple[pathlib.Path, ...]]
    """Run directories (one or several; the first one's data is used for all)."""
    options: Annotated[Options, _Flat] = Options()
    out: pathlib.Path | None = None
    """Output directory (default: <first run>/analysis)."""
    kind: ClassVar[str]

    def run(self) -> list[pathlib.Path]:
        from analysis import write_analysis

        return write_analysis(self.kind, self.runs, self.options, out=self.out, **self._extra())

    def _extra(self) -> dict:
        return {"step": getattr(self, "step", None)}


@dataclasses.dataclass(frozen=True)
class Norms(_Command):
    """Mean L2 norm of each block's representation (per token, per example) over t (paper Fig. 3)."""

    kind: ClassVar[str] = "norms"
    step: int | None = None
    """Checkpoint step to analyse (default: the latest)."""


@dataclasses.dataclass(frozen=True)
class Spectra(_Command):
    """Pairwise distances (also split into same-class / different-class pairs), singular values,
    effective rank, uniformity and dispersive-loss values per block and t."""

    kind: ClassVar[str] = "spectra"
    step: int | None = None
    """Checkpoint step to analyse (default: the latest)."""


@dataclasses.dataclass(frozen=True)
class Probes(_Command):
    """Cross-validated linear probes of the class label from each block (pooled over tokens) at each t."""

    kind: ClassVar[str] = "probes"
    step: int | None = None
    """Checkpoint step to analyse (default: the latest)."""


@dataclasses.dataclass(frozen=True)
class Dynamics(_Command):
    """Norms and spectra across every saved checkpoint of each run (representation change during training)."""

    kind: ClassVar[str] = "dynamics"

    def _extra(self) -> dict:
        return {}


@dataclasses.dataclass(frozen=True)
class Report(_Command):
    """One page with norms, spectra, probes (and dynamics), plus a table of key numbers."""

    kind: ClassVar[str] = "report"
    step: int | None = None
    """Checkpoint step to analyse (default: the latest)."""
    dynamics: bool = True
    """Include the training dynamics (every saved checkpoint)."""

    def _extra(self) -> dict:
        return {"step": self.step, "dynamics": self.dynamics}


def parse(argv: list[str] | None = None) -> _Command:
    """The parsed subcommand (a `Norms`, `Spectra`, `Probes`, `Dynamics` or `Report`)."""
    return tyro.cli(
        Norms | Spectra | Probes | Dynamics | Report, prog="python -m cli.analyze", args=argv
    )


def main(argv: list[str] | None = None) -> int:
    """Parse, analyse, write; user errors print one line and return 1."""
    from analysis import AnalysisError
    from eqdisp.errors import USER_ERRORS

    try:
        written = parse(argv).run()
    except (AnalysisError, *USER_ERRORS) as error:  # bad input: one line, no traceback
        print(f"error: {error}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
