"""A study's results as data (JSON), a markdown table and a plotly page."""

import dataclasses
import html
import json
import math
import pathlib
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

from ._plan import Study
from ._stats import mean_std, paired_interval

_LEVEL = 0.95


def _block_value(result: dict, key: str, block: int) -> float | None:
    values = result["analysis"].get(key)
    return None if values is None or block > len(values) else values[block - 1]


def summarize(study: Study, results: Sequence[dict], *, real: dict | None = None) -> dict:
    """Per arm: mean ± std over seeds of FID-classifier, precision, recall and the representation
    numbers at the paper's block (depth // 4); the paired FID difference to the baseline with its
    two-sided 95% Student-t interval over seeds, and the relative change of the means (as the paper
    writes it: ``(arm - baseline) / baseline``)."""
    by_arm = {a.name: sorted((r for r in results if r["arm"] == a.name), key=lambda r: r["seed"]) for a in study.arms}
    base = by_arm[study.baseline.name]
    depth_block = max(1, len(base[0]["analysis"].get("norm_token", [0] * 4)) // 4) if base else 1
    rows = []
    for arm in study.arms:
        runs = by_arm[arm.name]
        fid = [r["fid"] for r in runs]
        flags = arm.flags if arm.preset is None else (arm.preset, *arm.flags)
        row = {"arm": arm.name, "flags": " ".join(flags), "seeds": len(runs)}
        row["fid_mean"], row["fid_std"] = mean_std(fid)
        for key in ("precision", "recall"):
            values = [r[key] for r in runs if r.get(key) is not None]
            row[f"{key}_mean"] = mean_std(values)[0] if values else None
        for key in ("norm_token", "effective_rank", "uniformity"):
            values = [v for r in runs if (v := _block_value(r, key, depth_block)) is not None]
            row[f"{key}_mean"] = mean_std(values)[0] if values else None
        for key in sorted({k for r in runs for k in r["diagnostics"]}):
            row[key] = mean_std([r["diagnostics"][key] for r in runs if key in r["diagnostics"]])[0]
        if arm is not study.baseline:
            seeds = {r["seed"] for r in runs} & {r["seed"] for r in base}
            ours = [r["fid"] for r in runs if r["seed"] in seeds]
            theirs = [r["fid"] for r in base if r["seed"] in seeds]
            paired = paired_interval(ours, theirs, level=_LEVEL)
            row["fid_diff"] = dataclasses.asdict(paired)
            base_mean = mean_std(theirs)[0]
            row["fid_relative"] = paired.mean / base_mean if base_mean else math.nan
        rows.append(row)
    return {
        "study": study.name,
        "description": study.description,
        "protocol": dataclasses.asdict(study.protocol),
        "analysis_block": depth_block,
        "interval": f"two-sided {int(_LEVEL * 100)}% Student-t interval of the mean paired difference over seeds",
        "real_digits": real,
        "arms": rows,
    }


def _fmt(x: float | None, digits: int = 3) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown(summary: dict, *, header: Sequence[str] = ()) -> str:
    """The summary as a markdown page: protocol, then one row per arm."""
    p = summary["protocol"]
    lines = [f"# Study `{summary['study']}`", "", summary["description"], "", *header, ""]
    protocol = (
        f"Protocol (fixed before any result): preset `{p['preset']}`, {p['steps']} steps, "
        f"{p['seeds']} paired seeds, {p['samples']} samples per run, FID-classifier against "
        f"`{p['reference']}`, representation numbers at block {summary['analysis_block']} "
        f"(mean over the analysis t grid, {p['examples']} examples)."
    )
    lines += [protocol, f"Differences: arm − baseline per seed; {summary['interval']}."]
    if summary.get("real_digits"):
        real = summary["real_digits"]
        lines.append(
            f"Real digits at the same count ({real['count']} images the feature classifier "
            f"trained on, none in the reference): FID-classifier {real['fid']:.3f}."
        )
    lines += [
        "",
        "| arm | seeds | FID-classifier | Δ vs baseline [95% CI] | relative | precision | recall | norm/token | eff. rank |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["arms"]:
        diff = row.get("fid_diff")
        delta = (
            f"{diff['mean']:+.3f} [{_fmt(diff['low'])}, {_fmt(diff['high'])}]"
            + (" *" if diff["low"] > 0 or diff["high"] < 0 else "")
            if diff
            else "—"
        )
        relative = f"{100 * row['fid_relative']:+.1f}%" if "fid_relative" in row else "—"
        lines.append(
            f"| {row['arm']} | {row['seeds']} | {_fmt(row['fid_mean'])} ± {_fmt(row['fid_std'])} | "
            f"{delta} | {relative} | {_fmt(row['precision_mean'])} | {_fmt(row['recall_mean'])} | "
            f"{_fmt(row['norm_token_mean'])} | {_fmt(row['effective_rank_mean'], 2)} |"
        )
    lines += ["", "`*`: the interval excludes 0. Lower FID is better."]
    return "\n".join(lines) + "\n"


def figure(study: Study, results: Sequence[dict]) -> go.Figure:
    """FID-classifier of every run: one column per arm, one point per seed, seeds joined across arms."""
    fig = go.Figure()
    arms = [a.name for a in study.arms]
    for seed in sorted({r["seed"] for r in results}):
        runs = {r["arm"]: r["fid"] for r in results if r["seed"] == seed}
        fig.add_trace(
            go.Scatter(
                x=[a for a in arms if a in runs], y=[runs[a] for a in arms if a in runs],
                mode="lines+markers", name=f"seed {seed}", opacity=0.7,
            )
        )
    means = [np.mean([r["fid"] for r in results if r["arm"] == a]) for a in arms]
    fig.add_trace(go.Scatter(x=arms, y=means, mode="markers", name="mean", marker={"size": 14, "symbol": "x", "color": "black"}))
    fig.update_layout(title=f"{study.name}: FID-classifier per seed (paired)", yaxis_title="FID-classifier", xaxis_title="arm")
    return fig


def curves(study: Study, out: pathlib.Path, key: str = "loss_diff") -> go.Figure:
    """`key` from each run's metrics.jsonl over steps, averaged over seeds per arm."""
    fig = go.Figure()
    for arm in study.arms:
        series = []
        for seed in range(study.protocol.seeds):
            file = study.run_dir(out, arm, seed) / "metrics.jsonl"
            if file.is_file():
                rows = [json.loads(l) for l in file.read_text().splitlines()]
                series.append([r.get(key, math.nan) for r in rows])
        if series:
            n = min(len(s) for s in series)
            mean = np.nanmean(np.array([s[:n] for s in series], dtype=float), axis=0)
            window = max(1, n // 50)
            smooth = np.convolve(mean, np.ones(window) / window, mode="valid")
            fig.add_trace(go.Scatter(x=np.arange(window, n + 1), y=smooth, mode="lines", name=arm.name))
    fig.update_layout(title=f"{key} over training (mean over seeds, moving average)", xaxis_title="step", yaxis_title=key)
    return fig


def write_results(
    study: Study,
    out: pathlib.Path,
    summary: dict,
    results: Sequence[dict],
    *,
    header: Sequence[str] = (),
    name: str = "results",
) -> list[pathlib.Path]:
    """``{name}.json`` (summary + every run), ``{name}.md`` and a self-contained ``{name}.html``."""
    files = [out / f"{name}.json", out / f"{name}.md", out / f"{name}.html"]
    files[0].write_text(json.dumps({**summary, "runs": list(results)}, indent=2) + "\n")
    page = markdown(summary, header=header)
    files[1].write_text(page)
    body = [f"<pre>{html.escape(page)}</pre>"]
    for i, fig in enumerate([figure(study, results), curves(study, out, "loss_diff"), curves(study, out, "loss_disp")]):
        body.append(fig.to_html(full_html=False, include_plotlyjs=i == 0))
    files[2].write_text(f"<html><head><meta charset='utf-8'><title>{study.name}</title></head><body>{''.join(body)}</body></html>")
    return files
