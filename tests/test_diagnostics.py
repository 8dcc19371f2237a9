"""Training diagnostics: the dispersive loss' floor, per-term gradient norms and their cosine, and
that computing them changes nothing about a run."""

import dataclasses
import json
import math
import os
import pathlib
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import eqdisp
from eqdisp.config import PRESETS, DispConfig, OptimConfig, RunConfig, TransportConfig

REPO = pathlib.Path(__file__).resolve().parents[1]
_VARIANTS = ("infonce_l2", "infonce_cosine", "hinge", "covariance")


# ----------------------------------------------------------------------------------------------
# The floor of each variant, against values worked out independently


def _simplex(n, dim):
    """`n` points in `dim >= n - 1` features: sqrt(n) times an orthonormal basis of the vectors
    with zero sum, so each feature has mean 0 and variance 1 over the points, every point has
    norm sqrt(n - 1) and every off-diagonal cosine is -1 / (n - 1)."""
    centred = np.eye(n) - 1.0 / n
    basis = np.linalg.svd(centred)[0][:, : n - 1]  # n x (n - 1), columns orthonormal, sum 0
    points = np.sqrt(n) * basis
    return np.pad(points, ((0, 0), (0, dim - (n - 1)))) if dim > n - 1 else points


def _loss(z, variant, **options):
    return float(eqdisp.dispersive_loss(jnp.asarray(z, jnp.float32), variant, **options))


def test_infonce_l2_floor_is_minus_log_group_and_the_gap_is_the_off_diagonal_mass():
    from eqdisp.dispersive import dispersive_floor

    n, dim, tau = 8, 32, 0.5
    assert dispersive_floor("infonce_l2", n) == -math.log(n)
    # Identical rows: every exp(-d / tau) is 1, the loss 0, the gap log n.
    assert _loss(np.ones((n, dim)), "infonce_l2", tau=tau) == 0.0
    # Orthogonal rows far apart (d = 2 * 100^2 / dim): only the diagonal is left, the floor.
    far = 100.0 * np.eye(n, dim)
    assert _loss(far, "infonce_l2", tau=tau) == pytest.approx(-math.log(n), abs=1e-6)
    # In between: gap = log(1 + (n - 1) mean_{i != j} exp(-d_ij / tau)), in float64 by hand.
    z = np.random.default_rng(0).normal(size=(n, dim)) * 0.3
    d = ((z[:, None] - z[None]) ** 2).sum(-1) / dim
    off = np.exp(-d / tau)[~np.eye(n, dtype=bool)].mean()
    gap = _loss(z, "infonce_l2", tau=tau) - dispersive_floor("infonce_l2", n)
    assert gap == pytest.approx(math.log1p((n - 1) * off), rel=1e-4)


def test_infonce_cosine_floor_is_the_regular_simplex_and_is_reached():
    from eqdisp.dispersive import dispersive_floor

    n, tau = 6, 0.5
    floor = dispersive_floor("infonce_cosine", n, tau=tau)
    # Written out: the diagonal exp(1 / tau), the rest exp(-1 / ((n - 1) tau)).
    direct = math.log((math.exp(1 / tau) + (n - 1) * math.exp(-1 / ((n - 1) * tau))) / n)
    assert floor == pytest.approx(direct, rel=1e-12) and floor > 0 > -math.log(n)
    assert _loss(_simplex(n, 10), "infonce_cosine", tau=tau) == pytest.approx(floor, rel=1e-5)
    # Gradient descent on the sphere from random points ends at the floor, never below it.
    loss = lambda z: eqdisp.dispersive_loss(z, "infonce_cosine", tau=tau)

    @jax.jit
    def descend(z):
        def step(_, z):
            z = z - 0.05 * jax.grad(loss)(z)
            return z / jnp.linalg.norm(z, axis=1, keepdims=True)

        return jax.lax.fori_loop(0, 3000, step, z)

    for seed in range(3):
        start = jr.normal(jr.key(seed), (n, 5))
        assert float(loss(start)) > floor
        assert float(loss(descend(start))) == pytest.approx(floor, abs=1e-4)


def test_hinge_and_covariance_floors():
    from eqdisp.dispersive import dispersive_floor

    n, dim, margin = 8, 16, 0.7
    # Hinge: the diagonal d_ii = 0 costs margin^2 each; pairs beyond the margin cost nothing.
    assert dispersive_floor("hinge", n, margin=margin) == pytest.approx(margin**2 / n)
    far = 10.0 * np.eye(n, dim)
    assert _loss(far, "hinge", margin=margin) == pytest.approx(margin**2 / n, rel=1e-6)
    assert _loss(np.zeros((n, dim)), "hinge", margin=margin) == pytest.approx(margin**2, rel=1e-6)
    # Covariance: 1 / (n - 1) at the simplex (unit-variance features; the 1e-5 BatchNorm epsilon
    # lowers it by the factor (1 / (1 + 1e-5))^2), 1 / D when D < n - 1 features carry it.
    eps_factor = (1 / (1 + 1e-5)) ** 2
    assert dispersive_floor("covariance", n) == pytest.approx(1 / (n - 1))
    # (Every feature must vary: a constant one standardises to 0 but still counts in D.)
    at_simplex = _loss(np.tile(_simplex(n, n - 1), 2), "covariance")
    assert at_simplex == pytest.approx(eps_factor / (n - 1), rel=1e-5)
    narrow = _simplex(n, n - 1)[:, :3]  # 3 of the orthonormal zero-sum columns
    assert dispersive_floor("covariance", n, features=3) == pytest.approx(1 / 3)
    assert _loss(narrow, "covariance") == pytest.approx(eps_factor / 3, rel=1e-5)
    # Random data lies above every floor.
    z = np.random.default_rng(1).normal(size=(4 * n, dim))
    for variant in _VARIANTS:
        floor = dispersive_floor(variant, n, tau=0.5, margin=margin, features=dim)
        assert _loss(z, variant, group_size=n, margin=margin) > floor, variant


def test_floor_of_groups_of_one_and_bad_arguments():
    from eqdisp.dispersive import dispersive_floor

    z = np.random.default_rng(2).normal(size=(4, 5))
    for variant in _VARIANTS:
        value = _loss(z, variant, group_size=1, tau=0.25, margin=0.5)
        floor = dispersive_floor(variant, 1, tau=0.25, margin=0.5)
        assert value == pytest.approx(floor, rel=1e-6, abs=1e-7), variant
    assert dispersive_floor("none", 16) == 0.0
    with pytest.raises(ValueError, match=r"^group=0 is not allowed: expected a positive") as error:
        dispersive_floor("infonce_l2", 0)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=r"unknown dispersive loss variant 'l2'"):
        dispersive_floor("l2", 16)


# ----------------------------------------------------------------------------------------------
# The diagnostics function, against gradients computed by hand


def _state(key, *, at_init=False):
    model = eqdisp.make_model(
        "SiT-T/2", input_size=8, in_channels=1, num_classes=10, learn_sigma=False, key=key
    )
    if not at_init:  # off the adaLN-Zero init, so every parameter gets a gradient
        params, static = eqx.partition(model, eqx.is_inexact_array)
        leaves, tree = jax.tree.flatten(params)
        keys = jr.split(jr.key(1), len(leaves))
        leaves = [leaf + 0.02 * jr.normal(k, leaf.shape) for leaf, k in zip(leaves, keys)]
        model = eqx.combine(jax.tree.unflatten(tree, leaves), static)
    optimizer = eqdisp.make_optimizer(OptimConfig())
    state = eqdisp.init_train_state(model, optimizer, key=jr.key(7))
    return eqx.tree_at(lambda s: s.step, state, jnp.asarray(5, jnp.int32))


def _batch(key, n=16):
    key_x, key_y = jr.split(key)
    return jr.normal(key_x, (n, 1, 8, 8)), jr.randint(key_y, (n,), 0, 10)


def _diagnostics(state, x, y, disp):
    from eqdisp.train._step import make_diagnostics

    transport = eqdisp.make_transport(TransportConfig())
    out = make_diagnostics(transport, disp)(state, x, y)
    return {k: float(v) for k, v in out.items()}


def _by_hand(state, x1, y, *, block, tau, group):
    """SiT's loss and InfoNCE-L2 on the 0-based `block`, written out with the train step's key,
    and their gradients by `jax.grad`."""
    model = state.model
    key_noise, key_time, key_drop, _ = jr.split(jr.fold_in(state.key, state.step), 4)
    x0 = jr.normal(key_noise, x1.shape)
    t = jr.uniform(key_time, (x1.shape[0],))

    def run(m):
        x_t = t[:, None, None, None] * x1 + (1 - t[:, None, None, None]) * x0
        forward = lambda a, b, c, k: m.forward_with_taps(a, b, c, key=k)  # every block tapped
        return jax.vmap(forward)(x_t, t, y, jr.split(key_drop, x1.shape[0]))

    def diffusion(m):
        out, _ = run(m)
        return jnp.mean((out - (x1 - x0)) ** 2)

    def dispersive(m):
        z = run(m)[1].blocks[:, block].reshape(x1.shape[0] // group, group, -1)
        d = jnp.sum((z[:, :, None] - z[:, None]) ** 2, axis=-1) / z.shape[-1]
        per_group = jax.nn.logsumexp(-d / tau, axis=(1, 2)) - math.log(group**2)
        return jnp.mean(per_group)

    grad = lambda f: eqx.filter_jit(eqx.filter_grad(f))(model)
    return float(eqx.filter_jit(dispersive)(model)), grad(diffusion), grad(dispersive)


def _flat(grads, block):
    """The gradient on the parameters shared with the 0-based `block`, and on the rest."""
    shared = [grads.x_embedder, grads.t_embedder, grads.y_embedder]
    shared_leaves = [a.ravel() for a in jax.tree.leaves(shared)]
    shared_leaves += [a[: block + 1].ravel() for a in jax.tree.leaves(grads.blocks)]
    rest = [a[block + 1 :].ravel() for a in jax.tree.leaves(grads.blocks)]
    rest += [a.ravel() for a in jax.tree.leaves(grads.final_layer)]
    return np.concatenate(shared_leaves), np.concatenate(rest)


def test_gradient_norms_and_cosine_match_jax_grad_of_each_term(getkey):
    state, (x, y) = _state(getkey()), _batch(getkey())
    disp = DispConfig(blocks="2", weight=0.5, tau=0.5, group_size=8)
    out = _diagnostics(state, x, y, disp)
    loss_disp, g_diff, g_disp = _by_hand(state, x, y, block=1, tau=0.5, group=8)
    diff_shared, diff_rest = _flat(g_diff, 1)
    disp_shared, disp_rest = _flat(g_disp, 1)
    # "Shared" is exactly where the dispersive gradient lives.
    assert not np.any(disp_rest) and np.abs(diff_rest).sum() > 0
    all_diff = np.concatenate(_flat(g_diff, 1))
    cos = diff_shared @ disp_shared / (np.linalg.norm(diff_shared) * np.linalg.norm(disp_shared))
    expected = {
        "disp_gap/b2": loss_disp + math.log(8),
        "grad_norm_diff": np.linalg.norm(all_diff),
        "grad_norm_diff/b2": np.linalg.norm(diff_shared),
        "grad_norm_disp_unweighted/b2": np.linalg.norm(disp_shared),
        "grad_norm_disp/b2": 0.5 * np.linalg.norm(disp_shared),
    }
    assert sorted(out) == sorted([*expected, "grad_cos/b2"])
    for name, value in expected.items():
        assert out[name] == pytest.approx(float(value), rel=2e-4), name
    assert out["grad_cos/b2"] == pytest.approx(float(cos), abs=2e-4)


def test_lambda_scales_only_the_weighted_norm_and_blocks_share_it(getkey):
    state, (x, y) = _state(getkey()), _batch(getkey())
    half = _diagnostics(state, x, y, DispConfig(blocks="2,5", weight=0.5, group_size=8))
    one = _diagnostics(state, x, y, DispConfig(blocks="2,5", weight=1.0, group_size=8))
    for b in (2, 5):
        assert -1.0 <= half[f"grad_cos/b{b}"] <= 1.0
        assert half[f"grad_cos/b{b}"] == one[f"grad_cos/b{b}"]
        raw = half[f"grad_norm_disp_unweighted/b{b}"]
        assert raw == one[f"grad_norm_disp_unweighted/b{b}"] and raw > 0
        # lambda / n_blocks: each block's term is half of the averaged regulariser.
        assert half[f"grad_norm_disp/b{b}"] == pytest.approx(0.25 * raw, rel=1e-6)
        assert one[f"grad_norm_disp/b{b}"] == pytest.approx(0.5 * raw, rel=1e-6)
    # Block 5 shares more of the backbone with the diffusion term than block 2 does.
    assert half["grad_norm_diff/b5"] > half["grad_norm_diff/b2"]
    assert half["grad_norm_diff"] > half["grad_norm_diff/b5"]


def test_at_the_adaln_zero_init_the_cosine_is_zero_not_nan(getkey):
    # The zero final layer stops the diffusion gradient before the backbone; the dispersive one
    # reaches it through the embedders and the zero-initialised gates.
    state, (x, y) = _state(getkey(), at_init=True), _batch(getkey())
    out = _diagnostics(state, x, y, DispConfig(group_size=8))
    assert out["grad_norm_diff/b1"] == 0.0 and out["grad_norm_diff"] > 0
    assert out["grad_norm_disp/b1"] > 0 and out["grad_cos/b1"] == 0.0


def test_baselines_measure_the_papers_term(getkey):
    from eqdisp.train._step import diagnostic_disp

    state, (x, y) = _state(getkey()), _batch(getkey())
    none = _diagnostics(state, x, y, DispConfig(variant="none", weight=0.0))
    zero = _diagnostics(state, x, y, DispConfig(weight=0.0))
    assert none == zero and sorted(none)[0] == "disp_gap/b1"  # block depth // 4 = 1 of 6
    assert diagnostic_disp(DispConfig(variant="none", weight=0.0)) == DispConfig()
    assert diagnostic_disp(DispConfig(weight=0.0)) == DispConfig()
    assert diagnostic_disp(DispConfig(variant="hinge", weight=0.0)).weight == 0.5
    assert diagnostic_disp(DispConfig(variant="hinge", weight=2.0)).weight == 2.0
    # A group size that does not divide the batch (allowed for a baseline): one group.
    odd = _diagnostics(state, x[:12], y[:12], DispConfig(variant="none", group_size=16))
    whole = _diagnostics(state, x[:12], y[:12], DispConfig(group_size=None))
    assert odd == whole


def test_contrastive_variants_report_gradients_without_a_gap(getkey):
    state, (x, y) = _state(getkey()), _batch(getkey())
    disp = DispConfig(variant="hinge", contrastive="independent", group_size=8)
    out = _diagnostics(state, x, y, disp)
    assert "disp_gap/b1" not in out and out["grad_norm_disp/b1"] > 0
    assert all(math.isfinite(v) for v in out.values())


def test_diagnostics_do_not_depend_on_the_device_layout():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, str(REPO / "tests" / "diagnostics_worker.py"), "2"]  # fsdp 2
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert sorted(out["plain"]) == sorted(out["mesh"])
    for name, value in out["plain"].items():  # 4 data x 2 fsdp devices; reductions reorder
        assert out["mesh"][name] == pytest.approx(value, rel=1e-4, abs=1e-6), name


# ----------------------------------------------------------------------------------------------
# In the training loop


def _tiny(out, disp=None, **run):
    _, cfg = PRESETS["sit-tiny"]
    defaults = dict(
        steps=6, batch_size=16, out=str(out), log_every=1, checkpoint_every=3, sample_count=0
    )
    cfg = dataclasses.replace(cfg, train=RunConfig(**{**defaults, **run}))
    return cfg if disp is None else dataclasses.replace(cfg, disp=disp)


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(out):
    state = eqdisp.load_checkpoint(out).state
    return jax.tree.leaves(eqx.filter(state, eqx.is_inexact_array))


_DIAGNOSTIC = ("disp_gap/", "grad_norm_disp", "grad_norm_diff", "grad_cos/")


def test_diagnostics_change_nothing_and_resume_exactly(tmp_path):
    eqdisp.train(_tiny(tmp_path / "diag", diagnostics_every=2, log_every=3))
    eqdisp.train(_tiny(tmp_path / "plain", diagnostics_every=0))
    # Diagnostics off, then switched on when the run resumes (they cannot change a trajectory).
    eqdisp.train(_tiny(tmp_path / "split", steps=4, diagnostics_every=0))
    eqdisp.train(_tiny(tmp_path / "split", diagnostics_every=2, log_every=3))

    plain = _weights(tmp_path / "plain")
    for run in ("diag", "split"):
        leaves = _weights(tmp_path / run)
        assert all(bool(jnp.array_equal(a, b)) for a, b in zip(plain, leaves, strict=True)), run

    diag, plain_rows, split = (_rows(tmp_path / r) for r in ("diag", "plain", "split"))
    # Rows at the log steps (3, 6) and the diagnostics steps (2, 4, 6); the latter hold them.
    assert [r["step"] for r in diag] == [2, 3, 4, 6]
    for row in diag:
        measured = sorted(k for k in row if k.startswith(_DIAGNOSTIC))
        assert bool(measured) == (row["step"] % 2 == 0)
        train_values = {k: v for k, v in row.items() if not k.startswith(_DIAGNOSTIC)}
        same_step = plain_rows[row["step"] - 1]
        assert all(same_step[k] == v for k, v in train_values.items() if k != "images_per_second")
    assert {"disp_gap/b1", "grad_cos/b1", "grad_norm_diff", "grad_norm_disp/b1"} <= set(diag[-1])
    assert "images_per_second" not in diag[0] and "images_per_second" in diag[1]
    resumed = {r["step"]: r for r in split if r["step"] > 4}
    assert sorted(resumed) == [6] and "grad_cos/b1" in resumed[6]
    drop_rate = lambda r: {k: v for k, v in r.items() if k != "images_per_second"}
    assert drop_rate(resumed[6]) == drop_rate(diag[-1])


def test_weight_zero_and_none_train_and_measure_identically(tmp_path):
    none = DispConfig(variant="none", weight=0.0)
    eqdisp.train(_tiny(tmp_path / "none", disp=none, steps=2, diagnostics_every=1))
    zero = DispConfig(weight=0.0)
    eqdisp.train(_tiny(tmp_path / "zero", disp=zero, steps=2, diagnostics_every=1))
    a, b = _weights(tmp_path / "none"), _weights(tmp_path / "zero")
    assert all(bool(jnp.array_equal(x, y)) for x, y in zip(a, b, strict=True))
    drop_rate = lambda r: {k: v for k, v in r.items() if k != "images_per_second"}
    rows_none, rows_zero = _rows(tmp_path / "none"), _rows(tmp_path / "zero")
    assert [drop_rate(r) for r in rows_none] == [drop_rate(r) for r in rows_zero]
    assert all("disp_gap/b1" in r and r["loss_disp"] == 0.0 for r in rows_none)


def test_diagnostics_every_is_checked():
    from eqdisp.config import ConfigError

    message = r"^train.diagnostics_every=-1 is not allowed: expected an int >= 0$"
    with pytest.raises(ConfigError, match=message):
        RunConfig(diagnostics_every=-1)
