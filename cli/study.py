"""Paired A/B studies of Dispersive Loss: ``python -m cli.study table2 --out studies/table2``.

Trains every arm of a built-in study (the paper's Tables 2-4, its two recipes, Fig. 4's models,
the three model families, bfloat16 against float32) for every seed under one fixed protocol,
samples, evaluates (FID-classifier) and analyses each run, then writes ``results.md``,
``results.html`` and ``results.json`` with per-arm means and the paired difference to the
baseline with its 95% Student-t interval, the training diagnostics and linear probes.
Resumable: rerun the same command after a kill. ``--dry-run`` prints the plan and its estimated
time; ``--interim`` summarises the seeds finished so far; ``--publish`` copies the summary and
the ledger of every finished run into a results directory, and ``--restore`` takes a ledger's
runs into a study on another machine, which then trains only the runs it lacks.
"""

import dataclasses
import pathlib
import platform
import shlex
import subprocess
import sys
from dataclasses import dataclass
from typing import Literal

import tyro


@dataclass(frozen=True)
class StudyArgs:
    """Run a built-in study into a directory (rerun to resume)."""

    study: tyro.conf.Positional[
        Literal["table2", "table3", "table4", "recipes", "models", "families", "precision"]
    ]
    """Which study."""
    out: str | None = None
    """Directory of the runs and results (default: ``studies/<study>``)."""
    steps: int | None = None
    """Training steps per run (default: the study's protocol)."""
    seeds: int | None = None
    """Paired seeds (default: the study's protocol)."""
    samples: int | None = None
    """Images sampled per run (default: the study's protocol)."""
    sampler_steps: int | None = None
    """Sampler grid points (default: the preset's sampler)."""
    jobs: int | None = None
    """Runs at a time, each pinned to its share of the cores (default: 2 where there are at least
    2 cores: two sit-tiny runs at a time, one core each, were 1.2-1.4x faster than one after the
    other on a 2-core Xeon). A run's core count is part of its identity (see `run_study`)."""
    dry_run: bool = False
    """Print the plan and its estimated time; train nothing."""
    interim: bool = False
    """Train nothing: summarise the seeds that every arm has finished so far (while the study
    runs in another process, say) into ``interim.md``, ``interim.html`` and ``interim.json``; with
    ``--publish`` and no seed complete yet, only the ledger of the finished runs."""
    probes: bool = True
    """Give each run's linear probes of the class at the tables' block (computed once from its
    final checkpoint and cached beside it)."""
    publish: str | None = None
    """Also write the summary into this directory as ``<study>.md``/``.html``/``.json`` (or
    ``<study>-interim.*``), the pages loading one shared ``plotly.min.js`` beside them, with
    ``<study>-runs.jsonl``: the ledger of every finished run (complete seeds or not), which
    ``--restore`` reads; e.g. ``analysis/results``."""
    restore: str | None = None
    """First take into ``--out`` the finished runs recorded in this ledger (``<study>-runs.jsonl``)
    or published summary (``<study>.json``) that it lacks, e.g. on a new machine:
    ``--restore analysis/results/table2-runs.jsonl``. A record counts for every run of this study
    that computes the same (config, protocol settings, seed, cores per run), so table3 and table4
    take table2's baseline and default-recipe runs; the others are skipped."""


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=pathlib.Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> dict:
    from analysis import AnalysisError

    try:
        return _main(argv)
    except AnalysisError as error:  # bad input: one line, as cli._entry does for eqdisp's errors
        sys.exit(f"error: {error}")


def _main(argv: list[str] | None) -> dict:
    args = tyro.cli(StudyArgs, prog="python -m cli.study", args=argv, description=__doc__)
    from analysis.study import (
        STUDIES,
        cores_per_run,
        estimate_seconds,
        plan,
        restore,
        run_study,
    )

    study = STUDIES[args.study]
    budget = {k: getattr(args, k) for k in ("steps", "seeds", "samples", "sampler_steps") if getattr(args, k) is not None}
    study = dataclasses.replace(study, protocol=dataclasses.replace(study.protocol, **budget))
    out = pathlib.Path(args.out or f"studies/{study.name}")
    jobs = args.jobs if args.jobs is not None else min(2, cores_per_run(1))
    if args.restore is not None:
        counts = restore(study, out, args.restore, jobs=jobs)
        print(
            f"restored from {args.restore}: {counts['restored']} run(s); {counts['present']} already "
            f"here; {counts['skipped']} skipped (no run of this study: another config, seed or "
            "core count)"
        )
    units = plan(study, out, jobs=jobs)
    left = sum(1 for _, _, r in units if r is None)
    print(f"{study.name}: {study.description}")
    print(f"protocol: {study.protocol}")
    print(f"arms: {', '.join(a.name for a in study.arms)} (baseline: {study.baseline.name})")
    print(
        f"runs: {len(units)} ({len(study.arms)} arms x {study.protocol.seeds} seeds), {left} to do, "
        f"{jobs} at a time on {cores_per_run(jobs)} core(s) each"
    )
    if args.dry_run:
        seconds = estimate_seconds(study, out, jobs=jobs)
        print(f"estimated time of the runs to do: {seconds / 3600:.1f} h ({seconds:.0f} s)")
        return {"runs": len(units), "to_do": left, "estimated_seconds": seconds}
    publish = None if args.publish is None else pathlib.Path(args.publish)
    if args.interim:
        return _interim(study, out, units, jobs, publish, args.probes)
    results = run_study(study, out, jobs=jobs)
    command = f"Command: `python -m cli.study {shlex.join(sys.argv[1:] if argv is None else argv)}`"
    header = [command, f"{_machine(jobs)}.", *_restored(results), _times(study, out, results)]
    return _write(study, out, results, header=header, name="results", publish=publish, probes=args.probes)


def _times(study, out: pathlib.Path, results: list[dict]) -> str:
    from analysis.study import wall_time

    times = wall_time(study, out, results)
    untimed = times["untimed"]
    left_out = f"{untimed} run(s) restored without an end time"
    span = (
        f"Wall time: {times['busy'] / 3600:.2f} h with a run in progress (from the runs' result "
        f"files; pauses between invocations excluded), between {times['first']} and "
        f"{times['last']}" + (f", leaving out {left_out}" if untimed else "")
        if times["first"] is not None
        else f"Wall time: unknown, {left_out}"
    )
    return f"{span}; sum of the runs' times: {times['runs'] / 3600:.2f} h."


def _restored(results: list[dict]) -> list[str]:
    """A header line per ledger that some of `results` were restored from (`--restore`)."""
    sources: dict[str, list[dict]] = {}
    for result in results:
        if "restored_from" in result:
            sources.setdefault(result["restored_from"], []).append(result)
    lines = []
    for source, restored in sources.items():
        other = [r for r in restored if "made_as" in r]
        made_as = sorted({f"{r['made_as']['arm']} as {r['arm']}" for r in other})
        lines.append(
            f"Restored: {len(restored)} of these {len(results)} runs from `{source}` (made where that "
            "file was written; the summary reads their numbers from their records)"
            + (
                f"; {len(other)} of them {'is' if len(other) == 1 else 'are'} another study's identical "
                f"run{'s' * (len(other) > 1)} ({', '.join(made_as)}), "
                "not counted in the wall time"
                if other else ""
            )
            + "."
        )
    return lines


def _write(
    study, out: pathlib.Path, results: list[dict], *, header: list[str], name: str,
    publish: pathlib.Path | None, probes: bool, finished: list[dict] | None = None,
) -> dict:
    """Summarise `results` into `name`.md/.html/.json (and into `publish`, with the ledger of the
    `finished` runs, default `results`), with the real digits' FID-classifier, the secondary
    FID-classifier against all digits (when the protocol's reference is another) and, with
    `probes`, each run's linear probes."""
    from analysis.study import SECONDARY_REFERENCE, real_digits_fid, summarize, write_results

    real, secondary = real_digits_fid(out, study.protocol), None
    if study.protocol.reference != SECONDARY_REFERENCE:
        secondary = real_digits_fid(out, study.protocol, SECONDARY_REFERENCE)
    runs = _augmented(study, out, results if finished is None else finished, probes)
    chosen = {(r["arm"], r["seed"]) for r in results}
    results = [r for r in runs if (r["arm"], r["seed"]) in chosen]
    summary = summarize(study, results, real=real, secondary=secondary)
    stem = study.name if name == "results" else f"{study.name}-{name}"
    copy = None if publish is None else (publish, stem)
    files = write_results(study, out, summary, results, header=header, name=name, publish=copy)
    if publish is not None:
        files.append(_write_ledger(study, out, runs, publish))
    print("\n".join(str(f) for f in files))
    return summary


def _augmented(study, out: pathlib.Path, runs: list[dict], probes: bool) -> list[dict]:
    """`runs` with the secondary FID-classifier (when the protocol's reference is another) and,
    with `probes`, the linear probes."""
    from analysis.study import SECONDARY_REFERENCE, with_probes, with_secondary_fid

    if study.protocol.reference != SECONDARY_REFERENCE:
        runs = with_secondary_fid(study, out, runs)
    return with_probes(study, out, runs) if probes else runs


def _write_ledger(study, out: pathlib.Path, runs: list[dict], publish: pathlib.Path) -> pathlib.Path:
    from analysis.study import ledger, write_ledger

    return write_ledger(publish / f"{study.name}-runs.jsonl", ledger(study, out, runs))


def _machine(jobs: int) -> str:
    from analysis.study import cores_per_run
    from eqdisp.bench import cpu_info

    cpu = cpu_info()
    return (
        f"Commit: `{_commit()}`; machine: {cpu.get('model')} ({', '.join(cpu.get('isa', []))}), "
        f"{cpu.get('cores')} cores, {platform.system()}; {jobs} run(s) at a time on "
        f"{cores_per_run(jobs)} core(s) each"
    )


def _interim(
    study, out: pathlib.Path, units: list, jobs: int, publish: pathlib.Path | None, probes: bool
) -> dict:
    """The summary of the seeds every arm has finished (pairs are only complete within a seed);
    before there is one, with `publish`, only the ledger of the runs finished so far."""
    from analysis import AnalysisError

    unfinished = {seed for seed, _, result in units if result is None}
    seeds = sorted({seed for seed, _, _ in units} - unfinished)
    finished = [result for *_, result in units if result is not None]
    if not seeds:
        if publish is None or not finished:
            raise AnalysisError(f"{out}: no seed has finished in every arm yet: nothing to summarise")
        path = _write_ledger(study, out, _augmented(study, out, finished, probes), publish)
        print(f"no seed has finished in every arm yet: wrote only the ledger of {len(finished)} run(s)\n{path}")
        return {"ledger": str(path), "runs": len(finished)}
    results = [result for seed, _, result in units if seed in seeds]
    header = [
        (
            f"**Interim**: seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))} ({len(seeds)} of "
            f"{study.protocol.seeds}) finished in every arm; {len(finished)} of {len(units)} runs done."
        ),
        f"The runs were made on the study's commit and machine; this summary on: {_machine(jobs)}.",
        *_restored(results),
        _times(study, out, results),
    ]
    return _write(
        study, out, results, header=header, name="interim", publish=publish, probes=probes,
        finished=finished,
    )


if __name__ == "__main__":
    from cli._entry import run

    run(main)
