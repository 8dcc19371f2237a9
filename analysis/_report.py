"""Writing analyses to disk: self-contained HTML pages (plotly.js embedded, opens offline), the
numbers as JSON, and the tabular ones as CSV next to them."""

import csv
import dataclasses
import html
import json
import os
import pathlib
import time
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

from eqdisp.io import atomic_path, write_text_atomically

from ._collect import Options, RunMetrics, analyze_dynamics, analyze_runs, run_name
from ._errors import AnalysisError
from ._figures import (
    class_pairs_vs_t,
    distance_boxes,
    metric_vs_block,
    metric_vs_step,
    metric_vs_t,
    singular_spectrum,
)
from ._metrics import DISPERSIVE_VARIANTS

KINDS: tuple[str, ...] = ("norms", "spectra", "probes", "dynamics", "report")
"""What `write_analysis` can write; each is a `python -m cli.analyze` subcommand."""

_SCALARS = (
    "norm_token",
    "norm_example",
    "effective_rank",
    "uniformity",
    *(f"disp_{v}" for v in DISPERSIVE_VARIANTS),
    "dist_same",
    "dist_diff",
    "dist_ratio",
    "uniformity_same",
    "uniformity_diff",
    "probe_accuracy",
    "probe_std",
)
_KEY_COLUMNS = {
    "norm_token": "norm / token",
    "norm_example": "norm / example",
    "effective_rank": "eff. rank",
    "uniformity": "uniformity",
    "disp_infonce_l2": "InfoNCE-L2",
    "dist_same": "dist. same class",
    "dist_diff": "dist. diff. class",
    "dist_ratio": "diff. / same",
    "probe_accuracy": "probe acc.",
}


def figures(kind: str, results: Sequence[RunMetrics]) -> list[go.Figure]:
    """The figures of one analysis (``norms``, ``spectra`` or ``probes``) of several runs."""
    if kind == "norms":
        return [
            metric_vs_block(results, "norm_example"),
            metric_vs_t(results, "norm_example"),
            metric_vs_t(results, "norm_token"),
        ]
    if kind == "spectra":
        return [
            metric_vs_t(results, "effective_rank"),
            singular_spectrum(results),
            distance_boxes(results),
            metric_vs_t(results, "uniformity"),
            *(metric_vs_t(results, f"disp_{v}") for v in DISPERSIVE_VARIANTS),
            *_class_figures(results),
        ]
    if kind == "probes":
        # Runs whose probes were skipped (not meaningful) have no accuracies: a warning instead.
        probed = [r for r in results if "probe_accuracy" in r.values]
        if not probed:
            return []
        return [metric_vs_block(probed, "probe_accuracy"), metric_vs_t(probed, "probe_accuracy")]
    raise AnalysisError(f"unknown analysis {kind!r}: expected norms, spectra or probes")


def _class_figures(results: Sequence[RunMetrics]) -> list[go.Figure]:
    """The same-/different-class figures, when the examples allowed the split."""
    if not all("dist_same" in r.values for r in results):
        return []
    return [
        class_pairs_vs_t(results, "dist"),
        metric_vs_t(results, "dist_ratio"),
        class_pairs_vs_t(results, "uniformity"),
    ]


def probe_warnings(results: Sequence[RunMetrics]) -> list[str]:
    """One line per run whose probe accuracies do not measure its representation."""
    return [
        f"{r.name}: linear probes {r.probe_note}" for r in results if r.probe_meaningful is False
    ]


def dynamics_figures(series: Sequence[Sequence[RunMetrics]]) -> list[go.Figure]:
    """The figures of the metrics across the checkpoints of each run."""
    keys = [
        k
        for k in ("norm_example", "effective_rank", "uniformity", "probe_accuracy")
        if all(k in m.values for run in series for m in run)
    ]
    return [metric_vs_step(series, k) for k in keys]


def write_html(
    path: str | os.PathLike,
    figs: Sequence[go.Figure],
    *,
    title: str,
    intro: str = "",
    table: str = "",
    warnings: Sequence[str] = (),
) -> pathlib.Path:
    """One self-contained HTML page: a title, warnings, an intro paragraph, a table, then the
    figures.

    plotly.js is embedded once (with the first figure), so the page opens offline.

    **Arguments:**

    - `path`: the HTML file to write (its directory is created).
    - `figs`: the figures, in order.
    - `title`: the page title; `intro` (plain text) and `table` (HTML) go above the figures.
    - `warnings`: plain-text lines shown in a red box under the title.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = [
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        (
            "<style>body{font-family:sans-serif;margin:2em;max-width:1400px}"
            "table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
            "th{background:#f3f3f3}tr.disp td{font-weight:bold}"
            ".warning{border:3px solid #c00;background:#fee;padding:0.5em 1em;margin:1em 0}"
            "</style></head><body>"
        ),
        f"<h1>{html.escape(title)}</h1>",
    ]
    for line in warnings:
        parts.append(f"<div class='warning'><strong>Warning</strong>: {html.escape(line)}</div>")
    if intro:
        parts.append(f"<p>{html.escape(intro)}</p>")
    if table:
        parts.append(table)
    for i, fig in enumerate(figs):
        parts.append(fig.to_html(full_html=False, include_plotlyjs=i == 0))
    parts.append("</body></html>\n")
    write_text_atomically(path, "\n".join(parts))
    return path


def key_numbers(results: Sequence[RunMetrics]) -> list[dict]:
    """One row per run and block: the main metrics averaged over the t grid."""
    rows = []
    for r in results:
        for j, b in enumerate(r.blocks):
            row = {
                "run": r.name,
                "variant": r.variant,
                "step": r.step,
                "block": b,
                "dispersed": b in r.disp_blocks,
            }
            for key in _KEY_COLUMNS:
                if key in r.values:
                    row[key] = float(np.asarray(r.values[key])[:, j].mean())
            if r.probe_labels is not None:
                row["probe_labels"] = r.probe_labels
                row["probe_meaningful"] = r.probe_meaningful
            rows.append(row)
    return rows


def key_numbers_html(rows: Sequence[dict]) -> str:
    """The key-number rows as an HTML table (dispersed blocks in bold)."""
    cols = [k for k in _KEY_COLUMNS if any(k in r for r in rows)]
    head = "".join(f"<th>{h}</th>" for h in ("run", "variant", "step", "block"))
    head += "".join(f"<th>{html.escape(_KEY_COLUMNS[k])}</th>" for k in cols)
    body = []
    for r in rows:
        cells = [
            html.escape(str(r["run"])),
            html.escape(r["variant"]),
            str(r["step"]),
            f"{r['block']}{' *' if r['dispersed'] else ''}",
        ]
        cells += [f"{r[k]:.4g}" if k in r else "" for k in cols]
        cls = " class='disp'" if r["dispersed"] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return (
        "<h2>Key numbers (mean over the t grid; * = block regularised by the run's Dispersive Loss)</h2>"
        f"<table><tr>{head}</tr>{''.join(body)}</table>"
    )


def _long_rows(results: Sequence[RunMetrics]) -> list[dict]:
    rows = []
    for r in results:
        for i, t in enumerate(r.t):
            for j, b in enumerate(r.blocks):
                row = {"run": r.name, "variant": r.variant, "step": r.step, "t": t, "block": b}
                row |= {k: float(np.asarray(r.values[k])[i, j]) for k in _SCALARS if k in r.values}
                if r.probe_labels is not None:
                    row["probe_labels"] = r.probe_labels
                    row["probe_meaningful"] = r.probe_meaningful
                rows.append(row)
    return rows


def _write_csv(path: pathlib.Path, rows: Sequence[dict]) -> pathlib.Path:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _intro(options: Options, results: Sequence[RunMetrics], elapsed: float | None = None) -> str:
    weights = "EMA" if options.ema else "raw (optimizer)"
    ts = ", ".join(f"{t:g}" for t in options.t)
    data = "each run's data configuration" if options.data == "config" else options.data
    text = (
        f"{len(results)} run(s): "
        + "; ".join(
            f"{r.name} (step {r.step}, dispersive loss: {r.variant}"
            + (f" on block {','.join(map(str, r.disp_blocks))}" if r.disp_blocks else "")
            + ")"
            for r in results
        )
        + f". {weights} weights; the same {options.examples} examples of {data} (seed {options.seed}), "
        f"the same noise and the same times t = {ts} for every run (SiT convention: t = 0 is pure "
        "noise, t = 1 is clean data). Distances are squared L2 divided by the feature size D; "
        f"dispersive values use tau = {options.tau:g}, groups of {options.group_size}. "
        "Same-class / different-class splits take the examples' data labels over all pairs of the "
        "examples (the t grid gives them per noise level). "
        + (
            "Norms and spectra: models fed the null label (unconditional)."
            if options.unconditional
            else "Norms and spectra: models fed the true class label, as in training "
            "(--unconditional feeds the null label)."
        )
    )
    notes = dict.fromkeys(r.probe_note for r in results if r.probe_meaningful)
    if notes:
        text += " Linear probes: " + "; ".join(notes) + "."
    if elapsed is not None:
        text += f" Computed in {elapsed:.1f} s."
    return text


def _dump_json(path: pathlib.Path, payload: dict) -> pathlib.Path:
    write_text_atomically(path, json.dumps(payload, indent=1) + "\n")
    return path


def default_out(paths: Sequence[str | os.PathLike]) -> pathlib.Path:
    """The default output directory: ``analysis/`` inside the first run directory."""
    first = pathlib.Path(paths[0]).absolute()
    if first.name == "checkpoints":
        first = first.parent
    return first / "analysis"


def write_analysis(
    kind: str,
    paths: Sequence[str | os.PathLike],
    options: Options | None = None,
    *,
    out: str | os.PathLike | None = None,
    step: int | None = None,
    dynamics: bool = True,
) -> list[pathlib.Path]:
    """Compute one analysis of one or several runs and write ``<out>/<kind>.{html,json,csv}``.

    **Arguments:**

    - `kind`: one of `KINDS`: ``norms``, ``spectra``, ``probes`` (the latest checkpoint of each
      run, overlaid), ``dynamics`` (every checkpoint of each run) or ``report`` (one page with
      norms, spectra, probes, a key-numbers table and, when `dynamics`, the training dynamics).
    - `paths`: run directories; all are analysed on identical inputs.
    - `options`: times, examples, blocks, data, seeds (`Options`; None: the defaults).
    - `out`: output directory (default: `default_out(paths)`).
    - `step`: analyse this step instead of the latest (not for ``dynamics``).
    - `dynamics`: include the training dynamics in the ``report``.

    **Returns:** the paths written.

    **Raises:** `AnalysisError`, `eqdisp.CheckpointError` or `eqdisp.DataError`, one line each.
    """
    options = Options() if options is None else options
    if kind not in KINDS:
        raise AnalysisError(f"unknown analysis {kind!r}: expected one of {', '.join(KINDS)}")
    if not paths:
        raise AnalysisError("no run directory given")
    out = pathlib.Path(out) if out is not None else default_out(paths)
    names = ", ".join(run_name(pathlib.Path(p)) for p in paths)
    start = time.perf_counter()
    meta = {"kind": kind, "options": dataclasses.asdict(options)}
    if kind == "dynamics":
        series = analyze_dynamics(paths, options)
        figs = dynamics_figures(series)
        elapsed = time.perf_counter() - start
        rows = [row for run in series for row in _long_rows(run)]
        payload = meta | {"runs": [[m.to_dict() for m in run] for run in series]}
        intro = _intro(options, [run[-1] for run in series], elapsed)
        title = f"Representation dynamics during training: {names}"
    elif kind == "report":
        results = analyze_runs(paths, options, step=step)
        figs = [f for k in ("norms", "spectra", "probes") for f in figures(k, results)]
        payload = meta | {"runs": [r.to_dict() for r in results]}
        if dynamics:
            series = analyze_dynamics(paths, options, known=results)
            figs += dynamics_figures(series)
            payload["dynamics"] = [[m.to_dict() for m in run] for run in series]
        elapsed = time.perf_counter() - start
        rows = key_numbers(results)
        payload["key_numbers"] = rows
        intro = _intro(options, results, elapsed)
        title = f"Representation analysis: {names}"
    else:
        analyses = ("norms",) if kind == "norms" else ("norms", kind)
        results = analyze_runs(paths, options, analyses=analyses, step=step)
        figs = figures(kind, results)
        elapsed = time.perf_counter() - start
        rows = _long_rows(results)
        payload = meta | {"runs": [r.to_dict() for r in results]}
        intro = _intro(options, results, elapsed)
        title = f"{kind.capitalize()} of block representations: {names}"
    out.mkdir(parents=True, exist_ok=True)
    table = key_numbers_html(rows) if kind == "report" else ""
    warnings = probe_warnings(results) if kind != "dynamics" else []
    written = [
        write_html(
            out / f"{kind}.html", figs, title=title, intro=intro, table=table, warnings=warnings
        ),
        _dump_json(out / f"{kind}.json", payload),
        _write_csv(out / f"{kind}.csv", rows),
    ]
    return written


__all__ = [
    "KINDS",
    "default_out",
    "dynamics_figures",
    "figures",
    "key_numbers",
    "key_numbers_html",
    "probe_warnings",
    "write_analysis",
    "write_html",
]
