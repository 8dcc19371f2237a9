"""A study's results as data (JSON), a markdown table and a plotly page."""

import dataclasses
import html
import json
import math
import pathlib
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

from eqdisp.io import write_text_atomically

from ._plan import Study
from ._stats import mean_std, paired_interval

_LEVEL = 0.95


def _block_value(result: dict, key: str, block: int) -> float | None:
    values = result["analysis"].get(key)
    return None if values is None or block > len(values) else values[block - 1]


def _paired(row: dict, runs: list[dict], base: list[dict] | None, value, prefix: str) -> None:
    """Into `row`: mean ± std of ``value(run)`` over seeds and, unless this is the baseline
    (`base` None), the paired difference to the baseline over the seeds both have, with its
    interval, and the relative change of the means."""
    row[f"{prefix}_mean"], row[f"{prefix}_std"] = mean_std([value(r) for r in runs])
    if base is None:
        return
    seeds = {r["seed"] for r in runs} & {r["seed"] for r in base}
    ours = [value(r) for r in runs if r["seed"] in seeds]
    theirs = [value(r) for r in base if r["seed"] in seeds]
    paired = paired_interval(ours, theirs, level=_LEVEL)
    row[f"{prefix}_diff"] = dataclasses.asdict(paired)
    base_mean = mean_std(theirs)[0]
    row[f"{prefix}_relative"] = paired.mean / base_mean if base_mean else math.nan


def _half_noise(t: Sequence[float]) -> int:
    """The index of the grid time nearest 0.5 (half noise)."""
    return min(range(len(t)), key=lambda k: abs(t[k] - 0.5))


def _probe_mid(result: dict) -> float:
    """The probe's accuracy at half noise."""
    probe = result["probe"]
    return probe["accuracy"][_half_noise(probe["t"])]


def summarize(
    study: Study,
    results: Sequence[dict],
    *,
    real: dict | None = None,
    secondary: dict | None = None,
) -> dict:
    """Per arm: mean ± std over seeds of FID-classifier, precision, recall and the representation
    numbers at the paper's block (depth // 4); the paired FID difference to the baseline with its
    two-sided 95% Student-t interval over seeds, and the relative change of the means (as the paper
    writes it: ``(arm - baseline) / baseline``).

    `real` is `real_digits_fid` against the protocol's reference. When the results carry
    ``fid_secondary`` (`with_secondary_fid`), the same paired numbers are given for it too (as
    ``fid2_*``), and `secondary` is `real_digits_fid` against its reference. When every result
    carries a ``probe`` (`with_probes`), each row gets the mean probe accuracy per time
    (``probe_accuracy``) and the paired numbers of the accuracy at half noise (``probe_mid_*``).
    """
    by_arm = {a.name: sorted((r for r in results if r["arm"] == a.name), key=lambda r: r["seed"]) for a in study.arms}
    base = by_arm[study.baseline.name]
    depth_block = max(1, len(base[0]["analysis"].get("norm_token", [0] * 4)) // 4) if base else 1
    has_secondary = bool(results) and all("fid_secondary" in r for r in results)
    has_probes = bool(results) and all(r.get("probe") for r in results)
    rows = []
    for arm in study.arms:
        runs = by_arm[arm.name]
        flags = arm.flags if arm.preset is None else (arm.preset, *arm.flags)
        row = {"arm": arm.name, "flags": " ".join(flags), "seeds": len(runs)}
        paired_with = None if arm is study.baseline else base
        _paired(row, runs, paired_with, lambda r: r["fid"], "fid")
        if has_secondary:
            _paired(row, runs, paired_with, lambda r: r["fid_secondary"], "fid2")
        if has_probes:
            row["probe_accuracy"] = np.mean([r["probe"]["accuracy"] for r in runs], axis=0).tolist()
            _paired(row, runs, paired_with, _probe_mid, "probe_mid")
        for key in ("precision", "recall"):
            values = [r[key] for r in runs if r.get(key) is not None]
            row[f"{key}_mean"] = mean_std(values)[0] if values else None
        for key in ("norm_token", "effective_rank", "uniformity"):
            values = [v for r in runs if (v := _block_value(r, key, depth_block)) is not None]
            row[f"{key}_mean"] = mean_std(values)[0] if values else None
        for key in sorted({k for r in runs for k in r["diagnostics"]}):
            row[key] = mean_std([r["diagnostics"][key] for r in runs if key in r["diagnostics"]])[0]
        rows.append(row)
    return {
        "study": study.name,
        "description": study.description,
        "protocol": dataclasses.asdict(study.protocol),
        "analysis_block": depth_block,
        "interval": f"two-sided {int(_LEVEL * 100)}% Student-t interval of the mean paired difference over seeds",
        "real_digits": real,
        "secondary": secondary if has_secondary else None,
        "probe": (
            {k: results[0]["probe"][k] for k in ("t", "block", "chance")} if has_probes else None
        ),
        "arms": rows,
    }


def _fmt(x: float | None, digits: int = 3) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _delta(row: dict, prefix: str) -> str:
    diff = row.get(f"{prefix}_diff")
    if not diff:
        return "—"
    low, high = _fmt(diff["low"]), _fmt(diff["high"])
    if not low:  # one seed: no interval
        return f"{diff['mean']:+.3f}"
    star = " *" if diff["low"] > 0 or diff["high"] < 0 else ""
    return f"{diff['mean']:+.3f} [{low}, {high}]{star}"


def _spread(row: dict, prefix: str) -> str:
    """Mean ± std over seeds (the mean alone for one seed)."""
    mean, std = _fmt(row[f"{prefix}_mean"]), _fmt(row[f"{prefix}_std"])
    return f"{mean} ± {std}" if std else mean


def _relative(row: dict, prefix: str) -> str:
    key = f"{prefix}_relative"
    return f"{100 * row[key]:+.1f}%" if key in row else "—"


def _real_line(real: dict, *, within_reference: bool) -> str:
    """What real digits score: a floor only when the classifier sees them as it sees the reference."""
    line = f"Real digits at the same count ({real['count']} images the feature classifier trained on"
    if within_reference:
        return line + f", all in this reference): FID-classifier {real['fid']:.3f}, what reproducing the training data scores."
    line += f", none in the reference): FID-classifier {real['fid']:.3f}."
    ours, theirs = real.get("confidence_real"), real.get("confidence_reference")
    if ours is not None and theirs is not None:
        line += (
            f" The classifier's mean largest class probability is {ours:.3f} on them and "
            f"{theirs:.3f} on the reference"
        )
        line += (
            ": it is surer of the digits it trained on, so its features of them lie off the "
            "reference's distribution and this line is no floor (a model's samples can score "
            "better). Read the table as paired differences."
            if ours > theirs
            else "."
        )
    return line


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
        lines.append(_real_line(summary["real_digits"], within_reference=False))
    lines += [
        "",
        "| arm | seeds | FID-classifier | Δ vs baseline [95% CI] | relative | precision | recall | norm/token | eff. rank |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["arms"]:
        lines.append(
            f"| {row['arm']} | {row['seeds']} | {_spread(row, 'fid')} | "
            f"{_delta(row, 'fid')} | {_relative(row, 'fid')} | {_fmt(row['precision_mean'])} | "
            f"{_fmt(row['recall_mean'])} | {_fmt(row['norm_token_mean'])} | "
            f"{_fmt(row['effective_rank_mean'], 2)} |"
        )
    if summary.get("secondary"):
        second = summary["secondary"]
        lines += [
            "",
            f"## Secondary: FID-classifier against `{second['reference']}` (chosen after interim results)",
            "",
            f"Not part of the protocol: the same samples against `{second['reference']}`"
            + (
                " (all 1,797 digits, the data every arm trains on, as ImageNet FIDs are taken "
                "against training images)"
                if second["reference"] == "digits"
                else ""
            )
            + ". It was added when interim results showed the held-out reference "
            "(297 images for a 64-dimensional feature covariance) to be dominated by its own noise; "
            "the primary table above stays the pre-registered result.",
            _real_line(second, within_reference=True),
            "",
            "| arm | seeds | FID-classifier | Δ vs baseline [95% CI] | relative |",
            "|---|---|---|---|---|",
        ]
        for row in summary["arms"]:
            lines.append(
                f"| {row['arm']} | {row['seeds']} | {_spread(row, 'fid2')} | "
                f"{_delta(row, 'fid2')} | {_relative(row, 'fid2')} |"
            )
    lines += ["", "`*`: the interval excludes 0. Lower FID is better."]
    lines += _diagnostics_table(summary)
    lines += _probes_table(summary)
    return "\n".join(lines) + "\n"


def _probes_table(summary: dict) -> list[str]:
    """Linear-probe accuracy per arm and time, with the paired difference at half noise."""
    probe = summary.get("probe")
    if not probe:
        return []
    t = probe["t"]
    mid = t[_half_noise(t)]
    lines = [
        "",
        f"## Linear probes of the class at block {probe['block']}",
        "",
        (
            "Cross-validated linear probes of the class from the block's output (pooled over "
            "tokens), the model fed the null label (it sees no class; every run learned the null "
            "label through label dropout); the same examples and noise for every run; chance (the "
            f"largest class) {probe['chance']:.3f}. Computed after the runs from their final "
            f"checkpoints. Δ: paired, at t = {mid}."
        ),
        "",
        "| arm | " + " | ".join(f"t = {x}" for x in t) + f" | Δ at t = {mid} [95% CI] |",
        "|---|" + "---|" * (len(t) + 1),
    ]
    for row in summary["arms"]:
        cells = " | ".join(_fmt(a) for a in row["probe_accuracy"])
        lines.append(f"| {row['arm']} | {cells} | {_delta(row, 'probe_mid')} |")
    return lines


_DIAGNOSTIC_COLUMNS = (
    ("disp_gap", "loss above its floor", 4),
    ("grad_norm_disp", "‖g_disp‖ (λ-weighted)", 4),
    ("grad_norm_diff", "‖g_diff‖", 4),
    ("grad_cos", "cos(g_disp, g_diff)", 3),
)


def _diagnostics_table(summary: dict) -> list[str]:
    """One row per arm and regularised block: the training diagnostics (mean over the last tenth
    of each run, then over seeds) on the parameters that block shares with the diffusion loss."""
    rows = []
    for row in summary["arms"]:
        blocks = sorted({k.split("/")[1] for k in row if k.startswith("grad_norm_diff/")}, key=lambda b: int(b[1:]))
        for block in blocks:
            cells = [_fmt(row.get(f"{key}/{block}"), digits) for key, _, digits in _DIAGNOSTIC_COLUMNS]
            rows.append(f"| {row['arm']} | {block[1:]} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return [
        "",
        "## Training diagnostics",
        "",
        (
            "At the regularised block (a baseline: the paper's InfoNCE-L2 at its default block, "
            "measured, not trained), from `metrics.jsonl`: the mean over the last tenth of each "
            "run, then over seeds. The gradients are those each loss sends into the parameters "
            "the block shares with the diffusion loss. The floor of InfoNCE is −log(group); the "
            "contrastive variants have none they settle at, so no gap."
        ),
        "",
        "| arm | block | " + " | ".join(title for _, title, _ in _DIAGNOSTIC_COLUMNS) + " |",
        "|---|---|" + "---|" * len(_DIAGNOSTIC_COLUMNS),
        *rows,
    ]


def figure(study: Study, results: Sequence[dict], key: str = "fid", title: str = "FID-classifier") -> go.Figure:
    """``result[key]`` of every run: one column per arm, one point per seed, seeds joined across arms."""
    fig = go.Figure()
    arms = [a.name for a in study.arms]
    for seed in sorted({r["seed"] for r in results}):
        runs = {r["arm"]: r[key] for r in results if r["seed"] == seed}
        fig.add_trace(
            go.Scatter(
                x=[a for a in arms if a in runs], y=[runs[a] for a in arms if a in runs],
                mode="lines+markers", name=f"seed {seed}", opacity=0.7,
            )
        )
    means = [np.mean([r[key] for r in results if r["arm"] == a]) for a in arms]
    fig.add_trace(go.Scatter(x=arms, y=means, mode="markers", name="mean", marker={"size": 14, "symbol": "x", "color": "black"}))
    fig.update_layout(title=f"{study.name}: {title} per seed (paired)", yaxis_title=title, xaxis_title="arm")
    return fig


CURVES = ("loss_diff", "loss_disp", "disp_gap/*", "grad_norm_disp/*", "grad_cos/*")
"""The metrics drawn over training; a key ending in ``/*`` takes each arm's first regularised
block (``disp_gap/b1``)."""


def curve_rows(rows: Sequence[dict]) -> list[dict]:
    """The ``step`` and the `CURVES` keys of metrics rows, as a run's ledger record keeps them."""
    wanted = tuple(key[:-1] if key.endswith("/*") else key for key in CURVES)

    def keep(name: str) -> bool:
        return name == "step" or any(name == w or (w.endswith("/") and name.startswith(w)) for w in wanted)

    return [{k: v for k, v in row.items() if keep(k)} for row in rows]


def metrics_rows(run_dir: pathlib.Path) -> list[dict]:
    """The rows of the run's ``metrics.jsonl`` (none when it has none)."""
    file = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in file.read_text().splitlines()] if file.is_file() else []


def _run_metrics(study: Study, out: pathlib.Path, result: dict) -> list[dict]:
    """The run's metrics rows: its ``metrics.jsonl``, else (a run restored from a ledger) those its
    record carries."""
    return metrics_rows(study.result_dir(out, result)) or result.get("metrics", [])


def curves(
    study: Study, out: pathlib.Path, results: Sequence[dict], key: str = "loss_diff"
) -> go.Figure:
    """`key` (one of `CURVES`) from each run of `results`, over its logged steps, averaged over
    seeds per arm (a moving average when there are many rows); each arm's legend says over how
    many seeds."""
    fig = go.Figure()
    for arm in study.arms:
        series, steps = [], None
        for result in sorted((r for r in results if r["arm"] == arm.name), key=lambda r: r["seed"]):
            rows = _run_metrics(study, out, result)
            name = _first_key(rows, key)
            if rows and name is not None:
                series.append([r.get(name, math.nan) for r in rows])
                steps = [r.get("step", i + 1) for i, r in enumerate(rows)]
        if series:
            n = min(len(s) for s in series)
            mean = np.nanmean(np.array([s[:n] for s in series], dtype=float), axis=0)
            window = max(1, n // 50)
            smooth = np.convolve(mean, np.ones(window) / window, mode="valid")
            label = f"{arm.name} ({len(series)} seed{'s' if len(series) > 1 else ''})"
            fig.add_trace(go.Scatter(x=steps[window - 1 : n], y=smooth, mode="lines", name=label))
    label = f"{key[:-2]} (first regularised block)" if key.endswith("/*") else key
    fig.update_layout(title=f"{label} over training (mean over seeds, moving average)", xaxis_title="step", yaxis_title=label)
    return fig


def _first_key(rows: list[dict], key: str) -> str | None:
    if not key.endswith("/*"):
        return key
    names = sorted({k for r in rows for k in r if k.startswith(key[:-1])}, key=lambda k: int(k.rsplit("/b", 1)[1]))
    return names[0] if names else None


def write_results(
    study: Study,
    out: pathlib.Path,
    summary: dict,
    results: Sequence[dict],
    *,
    header: Sequence[str] = (),
    name: str = "results",
    publish: tuple[pathlib.Path, str] | None = None,
) -> list[pathlib.Path]:
    """``{name}.json`` (summary + every run), ``{name}.md`` and a self-contained ``{name}.html``
    of the study whose runs are in `out`, written into `out`; with ``publish = (directory,
    name)`` also a copy there whose page loads ``plotly.min.js`` from its own directory (written
    there when missing), so that several pages kept together (``analysis/results``) share one
    copy. The figures are built once for both."""
    page = markdown(summary, header=header)
    figures = [figure(study, results)]
    if summary.get("secondary"):
        reference = summary["secondary"]["reference"]
        figures.append(figure(study, results, "fid_secondary", f"FID-classifier vs {reference}"))
    figures += [curves(study, out, results, key) for key in CURVES]

    def write(to: pathlib.Path, name: str, plotly_beside: bool) -> list[pathlib.Path]:
        to.mkdir(parents=True, exist_ok=True)
        files = [to / f"{name}.json", to / f"{name}.md", to / f"{name}.html"]
        write_text_atomically(files[0], json.dumps({**summary, "runs": list(results)}, indent=2) + "\n")
        write_text_atomically(files[1], page)
        if plotly_beside and not (to / "plotly.min.js").is_file():
            import plotly.offline

            write_text_atomically(to / "plotly.min.js", plotly.offline.get_plotlyjs())
        embed = "directory" if plotly_beside else True
        body = [f"<pre>{html.escape(page)}</pre>"] + [
            fig.to_html(full_html=False, include_plotlyjs=embed if i == 0 else False)
            for i, fig in enumerate(figures)
        ]
        write_text_atomically(
            files[2],
            f"<html><head><meta charset='utf-8'><title>{study.name}</title></head><body>{''.join(body)}</body></html>"
        )
        return files

    return write(out, name, False) + (write(*publish, True) if publish is not None else [])
