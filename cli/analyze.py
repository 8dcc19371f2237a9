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
from typing import Literal

import tyro


@dataclasses.dataclass(frozen=True)
class _Common:
    runs: tyro.conf.Positional[tuple[pathlib.Path, ...]]
    """Run directories (one or several; the first one's data is used for all)."""
    t: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    """Times of the grid in [0, 1] (SiT convention: 0 = pure noise, 1 = clean data)."""
    examples: int = 256
    """Number of data examples (identical for every run)."""
    blocks: str = "all"
    """Blocks, 1-based: 'all', 'quarter', 'last' or a list such as '1,3'."""
    data: Literal["config", "digits", "synthetic", "folder", "latents"] = "config"
    """Data source: the first run's own ('config', without flips) or another one."""
    data_path: str | None = None
    """Directory of a 'folder' or 'latents' data source."""
    out: pathlib.Path | None = None
    """Output directory (default: <first run>/analysis)."""
    ema: bool = True
    """Analyse the EMA weights (--no-ema: the raw optimizer weights)."""
    seed: int = 0
    """Seed of the examples, the noise and the probes' folds."""
    batch_size: int = 64
    """Examples per forward pass."""
    progress: bool = True
    """Show a progress bar on stderr."""
    unconditional: bool = False
    """Feed the null label instead of the class for the norms and spectra (the probes' label is
    --probe-labels); needs a run trained with model.class_dropout_prob > 0."""

    def _options(self, **extra):
        from analysis import Options

        return Options(
            t=self.t,
            examples=self.examples,
            blocks=self.blocks,
            ema=self.ema,
            seed=self.seed,
            batch_size=self.batch_size,
            data=self.data,
            data_path=self.data_path,
            progress=self.progress,
            unconditional=self.unconditional,
            **extra,
        )

    def run(self) -> list[pathlib.Path]:
        from analysis import write_analysis

        kind = type(self).__name__.lower()
        kwargs = {"step": getattr(self, "step", None)} if kind != "dynamics" else {}
        if kind == "report":
            kwargs["dynamics"] = self.dynamics
        return write_analysis(
            kind, self.runs, self._options(**self._extra()), out=self.out, **kwargs
        )

    def _extra(self) -> dict:
        return {}


@dataclasses.dataclass(frozen=True)
class Norms(_Common):
    """Mean L2 norm of each block's representation (per token, per example) over t (paper Fig. 3)."""

    step: int | None = None
    """Checkpoint step to analyse (default: the latest)."""


@dataclasses.dataclass(frozen=True)
class Spectra(_Common):
    """Pairwise distances (also split into same-class / different-class pairs), singular values,
    effective rank, uniformity and dispersive-loss values per block and t."""

    step: int | None = None
    """Checkpoint step to analyse (default: the latest)."""
    tau: float = 0.5
    """Temperature of the InfoNCE dispersive values."""
    group_size: int | None = 16
    """Group size of the dispersive values (divides --examples); None: one group."""

    def _extra(self) -> dict:
        return {"tau": self.tau, "group_size": self.group_size}


@dataclasses.dataclass(frozen=True)
class Probes(_Common):
    """Cross-validated linear probes of the class label from each block (pooled over tokens) at each t."""

    step: int | None = None
    """Checkpoint step to analyse (default: the latest)."""
    folds: int = 5
    """Stratified cross-validation folds."""
    probe_labels: Literal["null", "true"] = "null"
    """Label the model is fed for the probes: 'null' (the CFG null label: the model sees no class;
    needs a run trained with model.class_dropout_prob > 0, else a warning replaces the accuracies)
    or 'true' (the class itself: the blocks carry it from the conditioning, accuracies near 1.0)."""

    def _extra(self) -> dict:
        return {"folds": self.folds, "probe_labels": self.probe_labels}


@dataclasses.dataclass(frozen=True)
class Dynamics(_Common):
    """Norms and spectra across every saved checkpoint of each run (representation change during training)."""


@dataclasses.dataclass(frozen=True)
class Report(_Common):
    """One page with norms, spectra, probes (and dynamics), plus a table of key numbers."""

    step: int | None = None
    """Checkpoint step to analyse (default: the latest)."""
    dynamics: bool = True
    """Include the training dynamics (every saved checkpoint)."""
    tau: float = 0.5
    """Temperature of the InfoNCE dispersive values."""
    group_size: int | None = 16
    """Group size of the dispersive values (divides --examples); None: one group."""
    folds: int = 5
    """Stratified cross-validation folds of the probes."""
    probe_labels: Literal["null", "true"] = "null"
    """Label the model is fed for the probes: 'null' (the CFG null label: the model sees no class;
    needs a run trained with model.class_dropout_prob > 0, else a warning replaces the accuracies)
    or 'true' (the class itself: the blocks carry it from the conditioning, accuracies near 1.0)."""

    def _extra(self) -> dict:
        return {
            "tau": self.tau,
            "group_size": self.group_size,
            "folds": self.folds,
            "probe_labels": self.probe_labels,
        }


def parse(argv: list[str] | None = None) -> _Common:
    """The parsed subcommand (a `Norms`, `Spectra`, `Probes`, `Dynamics` or `Report`)."""
    return tyro.cli(
        Norms | Spectra | Probes | Dynamics | Report, prog="python -m cli.analyze", args=argv
    )


def main(argv: list[str] | None = None) -> int:
    """Parse, analyse, write; user errors print one line and return 1."""
    from analysis import AnalysisError
    from eqdisp.errors import USER_ERRORS

    command = parse(argv)
    try:
        written = command.run()
    except (AnalysisError, *USER_ERRORS) as error:  # bad input: one line, no traceback
        print(f"error: {error}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
