"""Figure builders: NumPy results in, a `plotly.graph_objects.Figure` out (the caller writes it).

Styling is shared: a block has one colour in every figure, a run one line dash and marker.
Time axes say which way SiT's t runs (0 = noise, 1 = data).
"""

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from ._collect import RunMetrics
from ._errors import AnalysisError

T_AXIS = "t  (SiT: 0 = pure noise → 1 = clean data)"
"""The label of every time axis."""

LABELS: dict[str, str] = {
    "norm_token": "mean L2 norm per token",
    "norm_example": "mean L2 norm per example (flattened)",
    "effective_rank": "effective rank (centred batch matrix)",
    "uniformity": "uniformity, log mean exp(-2||z_i - z_j||²) (lower: more uniform)",
    "probe_accuracy": "linear probe accuracy (cross-validated)",
    "disp_infonce_l2": "Dispersive Loss, InfoNCE-L2",
    "disp_infonce_cosine": "Dispersive Loss, InfoNCE-cosine",
    "disp_hinge": "Dispersive Loss, hinge",
    "disp_covariance": "Dispersive Loss, covariance",
    "dist_same": "mean ||z_i - z_j||² / D, same-class pairs",
    "dist_diff": "mean ||z_i - z_j||² / D, different-class pairs",
    "dist_ratio": "different-class / same-class mean distance (1: class-blind)",
    "uniformity_same": "uniformity over same-class pairs (lower: more spread)",
    "uniformity_diff": "uniformity over different-class pairs (lower: more spread)",
}
"""Axis titles of the scalar metrics in `RunMetrics.values`."""

PAIR_TITLES: dict[str, str] = {
    "dist": "Mean pairwise squared distance ||z_i - z_j||² / D (log axis)",
    "uniformity": "Uniformity log mean exp(-2||z_i - z_j||²) on the unit sphere",
}
"""The metrics `class_pairs_vs_t` splits into same-class and different-class pairs."""

_PAIR_COLORS = {"same": qualitative.Set1[1], "diff": qualitative.Set1[0]}
_PAIR_NAMES = {"same": "same class", "diff": "different class"}
_DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")
_SYMBOLS = ("circle", "square", "diamond", "triangle-up", "x", "star")


def block_color(block: int) -> str:
    """The colour of a 1-based block number in every figure."""
    palette = qualitative.Plotly + qualitative.D3
    return palette[(block - 1) % len(palette)]


def _run_style(i: int) -> dict:
    return {"dash": _DASHES[i % len(_DASHES)]}


def _label(key: str) -> str:
    return LABELS.get(key, key)


def _check_key(results: Sequence[RunMetrics], key: str) -> None:
    if not results:
        raise AnalysisError("no results to plot")
    for r in results:
        if key not in r.values:
            raise AnalysisError(f"{r.name}: metric {key!r} was not computed")


def _block_name(r: RunMetrics, b: int) -> str:
    return f"block {b}" + (" (dispersed)" if b in r.disp_blocks else "")


def metric_vs_t(results: Sequence[RunMetrics], key: str, *, title: str | None = None) -> go.Figure:
    """One scalar metric against the time t: one trace per run and block.

    **Arguments:**

    - `results`: one `RunMetrics` per run (the same t grid is not required).
    - `key`: a scalar metric of `RunMetrics.values`, e.g. ``"norm_example"``.
    - `title`: the figure title (default: the metric's label).

    **Returns:** the figure; traces are named ``"<run> · block <b>"``.
    """
    _check_key(results, key)
    fig = go.Figure()
    for i, r in enumerate(results):
        values = np.asarray(r.values[key])
        for j, b in enumerate(r.blocks):
            fig.add_trace(
                go.Scatter(
                    x=list(r.t),
                    y=values[:, j].tolist(),
                    mode="lines+markers",
                    name=f"{r.name} · {_block_name(r, b)}",
                    legendgroup=r.name,
                    line={"color": block_color(b), **_run_style(i)},
                    marker={"symbol": _SYMBOLS[i % len(_SYMBOLS)]},
                )
            )
    if key == "dist_ratio":
        fig.add_hline(y=1.0, line_dash="dot", line_color="grey")
    if key == "probe_accuracy" and results[0].chance is not None:
        fig.add_hline(
            y=results[0].chance,
            line_dash="dot",
            line_color="grey",
            annotation_text="majority class",
            annotation_position="bottom right",
        )
    fig.update_layout(
        title=title or _label(key),
        xaxis_title=T_AXIS,
        yaxis_title=_label(key),
        legend_title="run · block",
        template="plotly_white",
    )
    return fig


def metric_vs_block(
    results: Sequence[RunMetrics], key: str = "norm_example", *, title: str | None = None
) -> go.Figure:
    """A metric against the block, averaged over the t grid: one trace per run (paper Fig. 3).

    **Returns:** the figure; the blocks each run's Dispersive Loss regularised are marked.
    """
    _check_key(results, key)
    fig = go.Figure()
    for i, r in enumerate(results):
        mean = np.asarray(r.values[key]).mean(axis=0)
        fig.add_trace(
            go.Scatter(
                x=list(r.blocks),
                y=mean.tolist(),
                mode="lines+markers",
                name=r.name,
                line={"color": qualitative.Dark2[i % len(qualitative.Dark2)], **_run_style(i)},
                marker={"symbol": _SYMBOLS[i % len(_SYMBOLS)], "size": 9},
            )
        )
        for b in r.disp_blocks:
            fig.add_vline(
                x=b,
                line_dash="dot",
                line_color="grey",
                annotation_text=f"{r.name}: dispersive loss",
                annotation_position="top",
            )
    ts = ", ".join(f"{t:g}" for t in results[0].t)
    fig.update_layout(
        title=title or f"{_label(key)} by block (mean over t = {ts})",
        xaxis={"title": "block (1-based)", "dtick": 1},
        yaxis_title=_label(key),
        template="plotly_white",
    )
    return fig


def class_pairs_vs_t(
    results: Sequence[RunMetrics], metric: str = "dist", *, columns: int = 3
) -> go.Figure:
    """A metric over same-class pairs against the same metric over different-class pairs, as a
    function of t: one subplot per block, runs overlaid (a run is a line dash and marker, a pair
    kind a colour).

    **Arguments:**

    - `results`: one `RunMetrics` per run, with ``<metric>_same`` and ``<metric>_diff``.
    - `metric`: ``dist`` (mean squared distance / D, on a log axis: runs whose scales differ by
      orders of magnitude stay readable, and the gap between the two kinds is their ratio) or
      ``uniformity`` (`PAIR_TITLES`).
    - `columns`: subplots per row.

    **Returns:** the figure; traces are named ``"<run> · same class"`` and
    ``"<run> · different class"``, one per block subplot (the legend shows the first).
    """
    if metric not in PAIR_TITLES:
        raise AnalysisError(
            f"metric={metric!r} is not allowed: expected one of " + ", ".join(PAIR_TITLES)
        )
    for kind in ("same", "diff"):
        _check_key(results, f"{metric}_{kind}")
    blocks = sorted({b for r in results for b in r.blocks})
    cols = min(columns, len(blocks))
    rows = -(-len(blocks) // cols)
    titles = []
    for b in blocks:
        by = [r.name for r in results if b in r.disp_blocks]
        titles.append(f"block {b}" + (f" (dispersed: {', '.join(by)})" if by else ""))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, shared_xaxes=True)
    for i, r in enumerate(results):
        for j, b in enumerate(r.blocks):
            k = blocks.index(b)
            for kind in ("same", "diff"):
                fig.add_trace(
                    go.Scatter(
                        x=list(r.t),
                        y=np.asarray(r.values[f"{metric}_{kind}"])[:, j].tolist(),
                        mode="lines+markers",
                        name=f"{r.name} · {_PAIR_NAMES[kind]}",
                        legendgroup=f"{r.name} · {kind}",
                        showlegend=k == 0,
                        line={"color": _PAIR_COLORS[kind], **_run_style(i)},
                        marker={"symbol": _SYMBOLS[i % len(_SYMBOLS)]},
                    ),
                    row=k // cols + 1,
                    col=k % cols + 1,
                )
    fig.update_layout(
        title=f"{PAIR_TITLES[metric]}: same-class vs different-class pairs, per block",
        legend_title="run · pairs",
        template="plotly_white",
        height=max(350, 300 * rows),
    )
    fig.update_xaxes(title_text="t  (0 = noise → 1 = data)", row=rows)
    if metric == "dist":
        fig.update_yaxes(type="log")
    return fig


def distance_boxes(results: Sequence[RunMetrics]) -> go.Figure:
    """Distribution of pairwise squared distances / D per block: one subplot per t, one box trace
    per run (a box per block, from the quantiles: whiskers at 5% and 95%)."""
    _check_key(results, "dist_quantiles")
    ts = results[0].t
    fig = make_subplots(
        rows=1, cols=len(ts), subplot_titles=[f"t = {t:g}" for t in ts], shared_yaxes=True
    )
    for i, r in enumerate(results):
        q = np.asarray(r.values["dist_quantiles"])  # (t, block, 7): 0, 5, 25, 50, 75, 95, 100 %
        for k in range(min(len(ts), q.shape[0])):
            fig.add_trace(
                go.Box(
                    x=list(r.blocks),
                    lowerfence=q[k, :, 1].tolist(),
                    q1=q[k, :, 2].tolist(),
                    median=q[k, :, 3].tolist(),
                    q3=q[k, :, 4].tolist(),
                    upperfence=q[k, :, 5].tolist(),
                    name=r.name,
                    legendgroup=r.name,
                    showlegend=k == 0,
                    offsetgroup=r.name,
                    marker_color=qualitative.Dark2[i % len(qualitative.Dark2)],
                ),
                row=1,
                col=k + 1,
            )
    fig.update_layout(
        title="Pairwise squared distance ||z_i - z_j||² / D per block (box: quartiles, whiskers: 5–95%)",
        boxmode="group",
        template="plotly_white",
    )
    fig.update_xaxes(title_text="block", dtick=1)
    return fig


def singular_spectrum(results: Sequence[RunMetrics], *, t_index: int | None = None) -> go.Figure:
    """Normalised singular values `s_k / sum(s)` of the centred batch matrix (log scale) at one t
    (default: the middle of the grid): one trace per run and block."""
    _check_key(results, "singular_values")
    fig = go.Figure()
    for i, r in enumerate(results):
        k = len(r.t) // 2 if t_index is None else t_index
        s = np.asarray(r.values["singular_values"])[k]  # (block, n)
        for j, b in enumerate(r.blocks):
            p = s[j] / max(s[j].sum(), 1e-30)
            p = p[p > 1e-7 * p.max()] if p.max() > 0 else p
            fig.add_trace(
                go.Scatter(
                    x=list(range(1, p.size + 1)),
                    y=p.tolist(),
                    mode="lines",
                    name=f"{r.name} · {_block_name(r, b)}",
                    legendgroup=r.name,
                    line={"color": block_color(b), **_run_style(i)},
                )
            )
    t = results[0].t[len(results[0].t) // 2 if t_index is None else t_index]
    fig.update_layout(
        title=f"Singular value spectrum of the batch representation matrix (t = {t:g})",
        xaxis={"title": "index k", "type": "log"},
        yaxis={"title": "s_k / Σ s", "type": "log"},
        template="plotly_white",
    )
    return fig


def metric_vs_step(series: Sequence[Sequence[RunMetrics]], key: str) -> go.Figure:
    """A metric (mean over the t grid) across the checkpoints of each run: one trace per run and
    block, x = training step."""
    fig = go.Figure()
    for i, run in enumerate(series):
        _check_key(run, key)
        first = run[0]
        steps = [m.step for m in run]
        for j, b in enumerate(first.blocks):
            y = [float(np.asarray(m.values[key])[:, j].mean()) for m in run]
            fig.add_trace(
                go.Scatter(
                    x=steps,
                    y=y,
                    mode="lines+markers",
                    name=f"{first.name} · {_block_name(first, b)}",
                    legendgroup=first.name,
                    line={"color": block_color(b), **_run_style(i)},
                    marker={"symbol": _SYMBOLS[i % len(_SYMBOLS)]},
                )
            )
    fig.update_layout(
        title=f"{_label(key)} during training (mean over the t grid)",
        xaxis_title="training step",
        yaxis_title=_label(key),
        template="plotly_white",
    )
    return fig


__all__ = [
    "LABELS",
    "T_AXIS",
    "PAIR_TITLES",
    "block_color",
    "class_pairs_vs_t",
    "distance_boxes",
    "metric_vs_block",
    "metric_vs_step",
    "metric_vs_t",
    "singular_spectrum",
]
