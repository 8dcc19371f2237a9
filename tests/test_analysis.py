"""Tests of `analysis/` and `python -m cli.analyze`: known answers, then a tiny end-to-end run."""

import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# ----------------------------------------------------------------------------------------------
# Known answers of the reductions


def test_block_norms_of_constructed_taps():
    import eqdisp
    from analysis import block_norms

    # Example e, block k, token s holds the vector (3, 4, 0, ...) * (k + 1) * (e + 1) * (s + 1).
    batch, depth, tokens, dim = 3, 2, 4, 5
    unit = jnp.zeros((dim,), jnp.float32).at[0].set(3.0).at[1].set(4.0)
    e = jnp.arange(1, batch + 1, dtype=jnp.float32)[:, None, None, None]
    k = jnp.arange(1, depth + 1, dtype=jnp.float32)[None, :, None, None]
    s = jnp.arange(1, tokens + 1, dtype=jnp.float32)[None, None, :, None]
    blocks = unit * e * k * s
    taps = jax.vmap(lambda b: eqdisp.Taps(blocks=b, c=jnp.zeros((dim,), jnp.float32)))(blocks)
    per_token, per_example = block_norms(taps.blocks)
    # per token: 5 k e s averaged over e in 1..3 (mean 2) and s in 1..4 (mean 2.5)
    np.testing.assert_allclose(per_token, [5 * 1 * 2 * 2.5, 5 * 2 * 2 * 2.5], rtol=1e-6)
    # per example: 5 k e sqrt(1 + 4 + 9 + 16), averaged over e
    np.testing.assert_allclose(
        per_example, [5 * k_ * 2 * math.sqrt(30) for k_ in (1, 2)], rtol=1e-6
    )


def test_effective_rank_of_orthogonal_matrix_is_its_rank():
    from analysis import effective_rank, singular_values

    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(12, 12)))
    s = singular_values(jnp.asarray(q, jnp.float32), center=False)
    np.testing.assert_allclose(s, np.ones(12), atol=1e-5)
    assert float(effective_rank(s)) == pytest.approx(12.0, rel=1e-5)
    # 5 orthonormal rows of a 12-d space, padded with 3 zero rows: rank 5.
    rows = jnp.asarray(np.concatenate([q[:5], np.zeros((3, 12))]), jnp.float32)
    assert float(effective_rank(singular_values(rows, center=False))) == pytest.approx(
        5.0, rel=1e-4
    )
    # Singular values match NumPy's on a generic (centred) matrix.
    z = np.random.default_rng(1).normal(size=(6, 3, 4)).astype(np.float32)
    flat = z.reshape(6, -1)
    expected = np.linalg.svd(flat - flat.mean(0), compute_uv=False)
    np.testing.assert_allclose(singular_values(jnp.asarray(z))[:6], expected, rtol=1e-4, atol=1e-4)


def test_small_singular_values_are_accurate():
    # Prescribed singular values 4, 1, 1e-2, 1e-3, 0, 0: float32 SVD is accurate to ~1e-7 of the
    # largest, while square roots of Gram eigenvalues are off by ~1e-3 at the small end.
    from analysis import singular_values

    rng = np.random.default_rng(0)
    n, tokens, dim = 6, 5, 8
    u, _ = np.linalg.qr(rng.normal(size=(n, n)))
    v, _ = np.linalg.qr(rng.normal(size=(tokens * dim, n)))
    a = (u * np.array([4.0, 1.0, 1e-2, 1e-3, 0.0, 0.0])) @ v.T
    z = a.astype(np.float32)
    expected = np.linalg.svd(z.astype(np.float64), compute_uv=False)
    got = singular_values(jnp.asarray(z.reshape(n, tokens, dim)), center=False)
    np.testing.assert_allclose(got, expected, rtol=0, atol=4e-6)
    # Centred, and with more examples than features (D < batch: zeros past D).
    wide = rng.normal(size=(9, 2, 2)).astype(np.float32)
    flat = wide.reshape(9, -1).astype(np.float64)
    expected = np.linalg.svd(flat - flat.mean(0), compute_uv=False)
    got = singular_values(jnp.asarray(wide))
    assert got.shape == (9,)
    np.testing.assert_allclose(got[:4], expected, rtol=1e-5, atol=4e-6)
    np.testing.assert_array_equal(got[4:], 0.0)


def test_uniformity_matches_numpy():
    from analysis import uniformity

    z = np.random.default_rng(0).normal(size=(20, 4, 8)).astype(np.float32)
    x = z.reshape(20, -1).astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    i, j = np.triu_indices(20, k=1)
    expected = np.log(np.mean(np.exp(-2.0 * np.sum((x[i] - x[j]) ** 2, axis=1))))
    assert float(uniformity(jnp.asarray(z))) == pytest.approx(expected, rel=1e-5)


def test_distance_quantiles_and_dispersive_values():
    import eqdisp
    from analysis import DISPERSIVE_VARIANTS, dispersive_values, pairwise_distance_quantiles

    z = np.random.default_rng(0).normal(size=(16, 2, 3)).astype(np.float32)
    flat = z.reshape(16, -1).astype(np.float64)
    i, j = np.triu_indices(16, k=1)
    d = np.sum((flat[i] - flat[j]) ** 2, axis=1) / 6
    expected = np.quantile(d, [0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0])
    np.testing.assert_allclose(pairwise_distance_quantiles(jnp.asarray(z)), expected, rtol=1e-4)
    values = dispersive_values(jnp.asarray(z), tau=0.5, group_size=8)
    for v, got in zip(DISPERSIVE_VARIANTS, values):
        want = eqdisp.dispersive_loss(jnp.asarray(z), v, tau=0.5, group_size=8)
        assert float(got) == pytest.approx(float(want), rel=1e-6)


def _numpy_class_pairs(z, labels, kind):
    """Independent formula: the pairs i < j of one kind, their distances / D and on the sphere."""
    x = z.reshape(z.shape[0], -1).astype(np.float64)
    i, j = np.triu_indices(x.shape[0], k=1)
    keep = (labels[i] == labels[j]) if kind == "same" else (labels[i] != labels[j])
    i, j = i[keep], j[keep]
    dist = np.sum((x[i] - x[j]) ** 2, axis=1) / x.shape[1]
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    sphere = np.sum((unit[i] - unit[j]) ** 2, axis=1)
    return dist, sphere


def test_class_pair_metrics_match_numpy():
    from analysis import (
        PAIR_KINDS,
        QUANTILE_LEVELS,
        class_distance_means,
        class_distance_quantiles,
        class_uniformity,
    )

    rng = np.random.default_rng(0)
    z = rng.normal(size=(14, 3, 4)).astype(np.float32)
    labels = np.array([0, 2, 1, 0, 0, 2, 1, 1, 1, 0, 2, 1, 0, 0])
    means = class_distance_means(jnp.asarray(z), jnp.asarray(labels))
    quantiles = class_distance_quantiles(jnp.asarray(z), jnp.asarray(labels))
    unif = class_uniformity(jnp.asarray(z), jnp.asarray(labels))
    assert means.shape == (2,) and quantiles.shape == (2, len(QUANTILE_LEVELS))
    for row, kind in enumerate(PAIR_KINDS):
        dist, sphere = _numpy_class_pairs(z, labels, kind)
        assert float(means[row]) == pytest.approx(dist.mean(), rel=1e-5)
        np.testing.assert_allclose(quantiles[row], np.quantile(dist, QUANTILE_LEVELS), rtol=1e-4)
        expected = np.log(np.mean(np.exp(-2.0 * sphere)))
        assert float(unif[row]) == pytest.approx(expected, rel=1e-5)
    # Unnormalised, another temperature.
    dist, _ = _numpy_class_pairs(z, labels, "diff")
    raw = dist * z[0].size  # undo the / D
    got = class_uniformity(jnp.asarray(z), jnp.asarray(labels), t=0.01, normalize=False)
    assert float(got[1]) == pytest.approx(np.log(np.mean(np.exp(-0.01 * raw))), rel=1e-5)


def test_class_pair_metrics_known_answers():
    from analysis import class_distance_means, class_distance_quantiles, class_uniformity

    # Two classes at two fixed points a = (1, 0, ...) and b = (0, 2, 0, ...), D = 6: same-class
    # pairs are at distance 0, different-class pairs at ||a - b||^2 / D = 5 / 6; on the sphere
    # a and b are orthogonal unit vectors, at squared distance 2.
    a = np.zeros((2, 3), np.float32)
    a[0, 0] = 1.0
    b = np.zeros((2, 3), np.float32)
    b[0, 1] = 2.0
    labels = np.array([0, 1, 1, 0, 0, 1, 0])
    z = jnp.asarray(np.stack([a if y == 0 else b for y in labels]))
    y = jnp.asarray(labels)
    np.testing.assert_allclose(class_distance_means(z, y), [0.0, 5 / 6], rtol=1e-6, atol=1e-7)
    quantiles = np.asarray(class_distance_quantiles(z, y))
    np.testing.assert_allclose(quantiles[0], 0.0, atol=1e-7)
    np.testing.assert_allclose(quantiles[1], 5 / 6, rtol=1e-6)
    np.testing.assert_allclose(class_uniformity(z, y), [0.0, -4.0], rtol=1e-6, atol=1e-6)
    # A kind with no pair: NaN (every label distinct: no same-class pair; one class: no other).
    distinct = class_distance_means(z, jnp.arange(7))
    assert np.isnan(distinct[0]) and np.isfinite(distinct[1])
    one = class_uniformity(z, jnp.zeros(7, jnp.int32))
    assert np.isfinite(one[0]) and np.isnan(one[1])
    assert np.all(np.isnan(class_distance_quantiles(z, jnp.zeros(7, jnp.int32))[1]))


def test_class_pair_metrics_permutation_invariant():
    from analysis import class_distance_means, class_distance_quantiles, class_uniformity

    rng = np.random.default_rng(1)
    z = rng.normal(size=(12, 2, 5)).astype(np.float32)
    labels = rng.integers(0, 3, size=12)
    perm = rng.permutation(12)
    relabel = np.array([2, 0, 1])[labels]  # renaming the classes changes no pair's kind
    for fn in (class_distance_means, class_distance_quantiles, class_uniformity):
        ref = fn(jnp.asarray(z), jnp.asarray(labels))
        np.testing.assert_allclose(
            fn(jnp.asarray(z[perm]), jnp.asarray(labels[perm])), ref, rtol=1e-5
        )
        np.testing.assert_allclose(fn(jnp.asarray(z), jnp.asarray(relabel)), ref, rtol=1e-6)


def test_probes_separable_and_shuffled():
    from analysis import probe_accuracy

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 30)
    centres = rng.normal(size=(4, 16)) * 10.0
    features = centres[labels] + rng.normal(size=(120, 16))
    mean, _ = probe_accuracy(features, labels, folds=5, seed=0)
    assert mean > 0.99
    shuffled, _ = probe_accuracy(features, rng.permutation(labels), folds=5, seed=0)
    assert shuffled < 0.45  # chance is 0.25
    assert probe_accuracy(features, labels, seed=3) == probe_accuracy(features, labels, seed=3)


def test_model_time_maps_sit_time_to_dit_steps():
    """DiT runs are noised at the same fraction of their step range (step 0 is the data end)."""
    import eqdisp

    transport, diffusion = eqdisp.make_transport(eqdisp.TransportConfig()), eqdisp.make_diffusion()
    assert [transport.model_time(t) for t in (0.0, 0.3, 1.0)] == [0.0, 0.3, 1.0]
    assert [diffusion.model_time(t) for t in (0.0, 0.5, 0.9, 1.0)] == [999.0, 500.0, 100.0, 0.0]


def test_parse_blocks_and_options_errors():
    from analysis import AnalysisError, Options, parse_blocks

    assert parse_blocks("all", 6) == (1, 2, 3, 4, 5, 6)
    assert parse_blocks("quarter", 6) == (1,)
    assert parse_blocks("3,1,3", 6) == (1, 3)
    assert parse_blocks("last", 6) == (6,)
    with pytest.raises(AnalysisError, match=r"blocks='1,7' is not allowed: .* between 1 and the model depth 6"):
        parse_blocks("1,7", 6)
    with pytest.raises(AnalysisError, match=r"blocks='first' is not allowed: expected 'quarter'"):
        parse_blocks("first", 6)
    with pytest.raises(AnalysisError, match="t=1.5"):
        Options(t=(0.5, 1.5))
    with pytest.raises(AnalysisError, match="group_size"):
        Options(examples=20, group_size=16)
    with pytest.raises(AnalysisError, match="probe_labels='gold'"):
        Options(probe_labels="gold")
    assert Options().probe_labels == "null"


# ----------------------------------------------------------------------------------------------
# End to end on two tiny run directories


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from analysis_runs import make_run

    root = tmp_path_factory.mktemp("runs")
    make_run(root / "base", variant="none", steps=(1, 2), seed=1)
    make_run(root / "disp", variant="infonce_l2", steps=(2,), seed=2)
    make_run(root / "nodrop", variant="none", steps=(1,), seed=3, class_dropout_prob=0.0)
    return root


def _page(path):
    """A written page, with the trace names plotly escaped (its JSON encoder writes `·` as
    `\\u00b7` unless orjson is installed) put back as text."""
    return path.read_text().replace("\\u00b7", "·")


def _argv(kind, runs, out, *extra):
    return [
        kind,
        str(runs / "base"),
        str(runs / "disp"),
        "--out",
        str(out),
        "--examples",
        "32",
        "--t",
        "0.2",
        "0.8",
        "--group-size",
        "8",
        "--folds",
        "2",
        "--no-progress",
        *extra,
    ]


def test_cli_report_end_to_end(runs, tmp_path, capsys):
    from cli.analyze import main

    assert main(_argv("report", runs, tmp_path)) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / f"report.{ext}") for ext in ("html", "json", "csv")]
    page = _page(tmp_path / "report.html")
    assert not re.findall(r"<script[^>]*src=", page) and len(page) > 3e6  # plotly.js embedded
    assert page.count('class="plotly-graph-div"') >= 10  # norms, spectra, probes, dynamics
    data = json.loads((tmp_path / "report.json").read_text())
    assert [r["name"] for r in data["runs"]] == ["base", "disp"]
    base, disp = data["runs"]
    assert (
        base["variant"] == "none" and disp["variant"] == "infonce_l2" and disp["disp_blocks"] == [1]
    )
    assert np.asarray(base["values"]["norm_example"]).shape == (2, 6)
    assert np.asarray(base["values"]["probe_accuracy"]).shape == (2, 6)
    assert [m["step"] for m in data["dynamics"][0]] == [1, 2]
    assert len(data["key_numbers"]) == 2 * 6
    # Identical inputs: the two runs differ (different weights), each run's blocks differ.
    assert not np.allclose(base["values"]["norm_example"], disp["values"]["norm_example"])
    for run in ("base", "disp"):
        for b in range(1, 7):
            assert (
                page.count(f'"name":"{run} \\u00b7 block {b}') > 0 or f"{run} · block {b}" in page
            )
    csv_lines = (tmp_path / "report.csv").read_text().splitlines()
    assert csv_lines[0].startswith("run,variant,step,block") and len(csv_lines) == 13
    # The same-/different-class split, per t and block, in the JSON, CSV, table and figures.
    for run in (base, disp):
        v = {k: np.asarray(x) for k, x in run["values"].items()}
        assert v["dist_same"].shape == v["dist_diff"].shape == (2, 6)
        assert v["dist_quantiles_same"].shape == (2, 6, 7)
        assert v["uniformity_same"].shape == v["uniformity_diff"].shape == (2, 6)
        np.testing.assert_allclose(v["dist_ratio"], v["dist_diff"] / v["dist_same"], rtol=1e-6)
    assert {"dist_same", "dist_diff", "dist_ratio"} <= set(data["key_numbers"][0])
    assert {"dist_same", "dist_diff", "dist_ratio"} <= set(csv_lines[0].split(","))
    assert "diff. / same" in page and "base · same class" in page
    assert "same-class vs different-class pairs, per block" in page
    # Probes default to the null label, said on the page and in the JSON; no warning here.
    note = "probed with the null label: the model saw no class"
    assert base["probe_labels"] == "null" and base["probe_meaningful"] is True
    assert base["probe_note"] == note and note in page and "class='warning'" not in page


def test_figures_one_trace_per_run_and_block(runs):
    from analysis import Options, analyze_runs, figures, metric_vs_t, singular_spectrum

    opts = Options(t=(0.5,), examples=32, blocks="1,3", group_size=8, folds=2, progress=False)
    results = analyze_runs([runs / "base", runs / "disp"], opts)
    fig = metric_vs_t(results, "effective_rank")
    assert [tr.name for tr in fig.data] == [
        "base · block 1",
        "base · block 3",
        "disp · block 1 (dispersed)",
        "disp · block 3",
    ]
    assert len(singular_spectrum(results).data) == 4
    norms = figures("norms", results)
    assert len(norms[0].data) == 2  # by block: one trace per run
    assert all(len(f.data) == 4 for f in norms[1:])
    # Same inputs for every run: analysing a run twice gives the same numbers.
    again = analyze_runs([runs / "base"], opts)[0]
    np.testing.assert_array_equal(again.values["norm_token"], results[0].values["norm_token"])


def test_unconditional_feeds_the_null_label_and_needs_a_trained_one(runs):
    import dataclasses

    from analysis import AnalysisError, Options
    from analysis._collect import collect, load_inputs, load_run

    run = load_run(runs / "base")
    opts = Options(t=(0.5,), examples=32, blocks="1", group_size=8, folds=2, progress=False)
    inputs = load_inputs(run.config, opts)
    unconditional = dataclasses.replace(opts, unconditional=True)
    cond = collect(run, inputs, opts, analyses=("norms",))
    uncond = collect(run, inputs, unconditional, analyses=("norms",))
    # Same inputs, another label: the block outputs move (the label enters through adaLN).
    assert not np.allclose(cond.values["norm_example"], uncond.values["norm_example"])

    model_cfg = dataclasses.replace(run.config.model, class_dropout_prob=0.0)
    config = dataclasses.replace(run.config, model=model_cfg)
    with pytest.raises(AnalysisError, match="class_dropout_prob=0"):
        collect(dataclasses.replace(run, config=config), inputs, unconditional, analyses=("norms",))


def test_class_pair_figure_one_trace_per_run_block_and_kind(runs):
    from analysis import Options, analyze_runs, class_pairs_vs_t

    opts = Options(t=(0.3, 0.7), examples=32, blocks="1,3", group_size=8, progress=False)
    results = analyze_runs([runs / "base", runs / "disp"], opts, analyses=("norms", "spectra"))
    fig = class_pairs_vs_t(results, "dist")
    assert [tr.name for tr in fig.data] == [
        f"{run} · {kind}"
        for run in ("base", "disp")
        for _ in (1, 3)
        for kind in ("same class", "different class")
    ]
    assert sum(bool(tr.showlegend) for tr in fig.data) == 4  # legend once per run and kind
    assert [a.text for a in fig.layout.annotations] == ["block 1 (dispersed: disp)", "block 3"]
    assert len(class_pairs_vs_t(results, "uniformity").data) == 8


def test_probe_features_follow_probe_labels_not_unconditional(runs):
    """Null-label probes see the null-label forward whether the metrics' forward was conditional
    (the probes run their own) or unconditional (they reuse it); likewise for true labels."""
    import dataclasses

    from analysis import Options
    from analysis._collect import collect, load_inputs, load_run

    run = load_run(runs / "base")
    opts = Options(t=(0.5,), examples=32, blocks="2", group_size=8, folds=2, progress=False)
    inputs = load_inputs(run.config, opts)

    def accuracy(**kw):
        m = collect(run, inputs, dataclasses.replace(opts, **kw), analyses=("probes",))
        return m.values["probe_accuracy"], m.values["probe_std"]

    null = accuracy(probe_labels="null")
    true = accuracy(probe_labels="true")
    np.testing.assert_array_equal(null, accuracy(probe_labels="null", unconditional=True))
    np.testing.assert_array_equal(true, accuracy(probe_labels="true", unconditional=True))
    assert not np.array_equal(null, true)


def test_probes_default_to_null_label_and_warn_without_label_dropout(runs, tmp_path):
    from analysis import PROBE_NOTES
    from cli.analyze import main

    argv = [
        "probes",
        str(runs / "base"),
        str(runs / "nodrop"),
        "--examples",
        "32",
        "--t",
        "0.5",
        "--blocks",
        "1,2",
        "--folds",
        "2",
        "--no-progress",
    ]
    assert main([*argv, "--out", str(tmp_path / "null")]) == 0
    data = json.loads((tmp_path / "null" / "probes.json").read_text())
    page = _page(tmp_path / "null" / "probes.html")
    base, nodrop = data["runs"]
    assert data["options"]["probe_labels"] == "null"
    # Trained with label dropout: null-label probes, said so.
    assert base["probe_labels"] == "null" and base["probe_meaningful"] is True
    assert base["probe_note"] == PROBE_NOTES["null"] and PROBE_NOTES["null"] in page
    assert np.asarray(base["values"]["probe_accuracy"]).shape == (1, 2)
    # Trained without: no accuracies, a prominent warning instead, marked in the JSON and CSV.
    assert nodrop["probe_meaningful"] is False and nodrop["probe_note"] == PROBE_NOTES["untrained"]
    assert "probe_accuracy" not in nodrop["values"] and "not meaningful" in nodrop["probe_note"]
    warning = re.search(r"<div class='warning'>(.*?)</div>", page)
    assert warning and "nodrop: linear probes not meaningful" in warning.group(1)
    assert "class_dropout_prob=0" in warning.group(1)
    assert "nodrop · block" not in page and "base · block 1" in page  # only base is plotted
    csv_text = (tmp_path / "null" / "probes.csv").read_text()
    assert "nodrop,none,1,0.5,1," in csv_text and ",null,False" in csv_text

    # --probe-labels true: every run probed with its class, accuracies shown with a warning each.
    assert main([*argv, "--out", str(tmp_path / "true"), "--probe-labels", "true"]) == 0
    data = json.loads((tmp_path / "true" / "probes.json").read_text())
    page = _page(tmp_path / "true" / "probes.html")
    for r in data["runs"]:
        assert r["probe_labels"] == "true" and r["probe_meaningful"] is False
        assert r["probe_note"] == PROBE_NOTES["true"]
        assert np.asarray(r["values"]["probe_accuracy"]).shape == (1, 2)
    assert page.count("class='warning'") == 2 and "nodrop · block 1" in page


@pytest.mark.parametrize(
    "argv, message",
    [
        (["norms", "{tmp}"], "not a run directory"),
        (["norms", "{tmp}/missing"], "no such run directory"),
        (["norms", "{runs}/base", "--blocks", "9"], "blocks='9' is not allowed"),
        (["probes", "{runs}/base", "--data", "folder", "--data-path", "{tmp}"], "{tmp}"),
        (["dynamics"], "no run directory given"),
    ],
)
def test_cli_errors_are_one_line(runs, tmp_path, capsys, argv, message):
    from cli.analyze import main

    argv = [a.format(tmp=tmp_path, runs=runs) for a in argv]
    assert main([*argv, "--no-progress", "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert message.format(tmp=tmp_path) in err
