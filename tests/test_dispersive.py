"""Tests of eqdisp.dispersive: naive float64 NumPy references, properties and edge cases.

Tolerances: the library computes in float32 from Gram matrices, the references in float64 from
explicit pairs, so agreement is to float32 rounding: rtol 1e-5, atol 1e-6 on O(1) losses.
"""

import dataclasses
import inspect
import math

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest

import eqdisp.config
from eqdisp.dispersive import VARIANTS, contrastive_loss, dispersive_loss, pairwise_sq_dists

LOSSES = [v for v in VARIANTS if v != "none"]
RTOL, ATOL = 1e-5, 1e-6
VAR_EPS = 1e-5  # the documented variance eps of the covariance variants


# ----------------------------------------------------------------------------------------------
# Naive float64 references: explicit pairs and explicit D x D matrices, no Gram tricks.


def _groups(z, group_size):
    z = np.asarray(z, np.float64).reshape(len(z), -1)
    g = len(z) if group_size is None else group_size
    return [z[s : s + g] for s in range(0, len(z), g)]


def _ref_dist(a, b):
    return np.sum((a - b) ** 2) / a.size


def _ref_cos(a, b):
    return np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))


def _ref_standardise(x):
    x = x - x.mean(axis=0)
    return x / np.sqrt((x**2).mean(axis=0) + VAR_EPS)


def _ref_disp_group(x, variant, tau, margin):
    n, dim = x.shape
    pairs = [(x[i], x[j]) for i in range(n) for j in range(n)]
    if variant == "infonce_l2":
        return np.log(np.mean([np.exp(-_ref_dist(a, b) / tau) for a, b in pairs]))
    if variant == "infonce_cosine":
        return np.log(np.mean([np.exp(_ref_cos(a, b) / tau) for a, b in pairs]))
    if variant == "hinge":
        return np.mean([max(0.0, margin - _ref_dist(a, b)) ** 2 for a, b in pairs])
    if variant == "covariance":
        a = _ref_standardise(x)
        cov = a.T @ a / n  # D x D
        return np.sum(cov**2) / dim**2
    raise AssertionError(variant)


def ref_dispersive(z, variant, *, tau=0.5, group_size=None, margin=1.0):
    return np.mean([_ref_disp_group(x, variant, tau, margin) for x in _groups(z, group_size)])


def _ref_con_group(x, y, variant, tau, margin, w):
    n, dim = x.shape
    if variant == "covariance":
        c = _ref_standardise(x).T @ _ref_standardise(y) / n  # D x D cross-correlation
        off = c - np.diag(np.diag(c))
        return np.mean((1 - np.diag(c)) ** 2) + w * np.sum(off**2) / dim**2
    losses = []
    for i in range(n):
        if variant == "infonce_l2":
            d = np.array([_ref_dist(x[i], y[j]) for j in range(n)])
        elif variant == "infonce_cosine":
            d = np.array([-_ref_cos(x[i], y[j]) for j in range(n)])
        if variant.startswith("infonce"):
            losses.append(d[i] / tau + np.log(np.sum(np.exp(-d / tau))))
        elif variant == "hinge":
            neg = [max(0.0, margin - _ref_dist(x[i], y[j])) ** 2 for j in range(n) if j != i]
            losses.append(_ref_dist(x[i], y[i]) ** 2 + (np.mean(neg) if neg else 0.0))
    return np.mean(losses)


def ref_contrastive(
    z, z_pos, variant, *, tau=0.5, group_size=None, margin=1.0, offdiag_weight=0.005
):
    groups = zip(_groups(z, group_size), _groups(z_pos, group_size))
    return np.mean([_ref_con_group(x, y, variant, tau, margin, offdiag_weight) for x, y in groups])


def _views(getkey, shape=(12, 3, 4)):
    z = jax.random.normal(getkey(), shape)
    return z, z + 0.7 * jax.random.normal(getkey(), shape)


# ----------------------------------------------------------------------------------------------
# Against the references


@pytest.mark.parametrize("group_size", [None, 4])
@pytest.mark.parametrize("variant", LOSSES)
def test_dispersive_matches_reference(getkey, variant, group_size):
    z, _ = _views(getkey)
    # margin 2.5 > typical d ~ 2 so that the hinge is active on most pairs.
    kwargs = dict(tau=0.7, group_size=group_size, margin=2.5)
    out = dispersive_loss(z, variant, **kwargs)
    assert out.dtype == jnp.float32 and out.shape == ()
    np.testing.assert_allclose(out, ref_dispersive(z, variant, **kwargs), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("group_size", [None, 4])
@pytest.mark.parametrize("variant", LOSSES)
def test_contrastive_matches_reference(getkey, variant, group_size):
    z, z_pos = _views(getkey)
    kwargs = dict(tau=0.7, group_size=group_size, margin=2.5, offdiag_weight=0.3)
    out = contrastive_loss(z, z_pos, variant, **kwargs)
    assert out.dtype == jnp.float32 and out.shape == ()
    ref = ref_contrastive(z, z_pos, variant, **kwargs)
    np.testing.assert_allclose(out, ref, rtol=RTOL, atol=ATOL)


def test_pairwise_sq_dists(getkey):
    z = jax.random.normal(getkey(), (7, 5))
    zn = np.asarray(z, np.float64)
    ref = ((zn[:, None, :] - zn[None, :, :]) ** 2).sum(-1)
    d = pairwise_sq_dists(z)
    assert d.dtype == jnp.float32
    np.testing.assert_allclose(d, ref, rtol=RTOL, atol=ATOL)
    assert np.all(np.diagonal(d) == 0.0)


# ----------------------------------------------------------------------------------------------
# Invariances


@pytest.mark.parametrize("variant", LOSSES)
def test_permutation_invariance(getkey, variant):
    z, z_pos = _views(getkey)
    perm = jax.random.permutation(getkey(), z.shape[0])
    np.testing.assert_allclose(
        dispersive_loss(z[perm], variant), dispersive_loss(z, variant), rtol=1e-6, atol=ATOL
    )
    np.testing.assert_allclose(
        contrastive_loss(z[perm], z_pos[perm], variant),
        contrastive_loss(z, z_pos, variant),
        rtol=1e-6,
        atol=ATOL,
    )


@pytest.mark.parametrize("variant", ["infonce_l2", "hinge", "covariance"])
def test_translation_invariance(getkey, variant):
    z, z_pos = _views(getkey)
    shift = jax.random.normal(getkey(), z.shape[1:])
    np.testing.assert_allclose(
        dispersive_loss(z + shift, variant), dispersive_loss(z, variant), rtol=RTOL, atol=ATOL
    )
    np.testing.assert_allclose(
        contrastive_loss(z + shift, z_pos + shift, variant),
        contrastive_loss(z, z_pos, variant),
        rtol=RTOL,
        atol=ATOL,
    )


# ----------------------------------------------------------------------------------------------
# Known values


def test_known_values(getkey):
    n, dim = 16, 10
    same = jnp.broadcast_to(jax.random.normal(getkey(), (dim,)), (n, dim))
    assert abs(float(dispersive_loss(same, "infonce_l2"))) <= ATOL  # log mean exp(0)
    np.testing.assert_allclose(dispersive_loss(same, "infonce_cosine"), 2.0, rtol=RTOL)  # 1/tau
    np.testing.assert_allclose(dispersive_loss(same, "hinge", margin=1.5), 1.5**2, rtol=RTOL)
    assert float(dispersive_loss(same, "covariance")) <= 1e-12  # centring rounding only
    # Far-apart points: only the i = j terms survive, giving the floor -log n (per group).
    spread = 100.0 * jax.random.normal(getkey(), (n, dim))
    np.testing.assert_allclose(dispersive_loss(spread, "infonce_l2"), -math.log(n), rtol=RTOL)
    grouped = dispersive_loss(spread, "infonce_l2", group_size=4)
    np.testing.assert_allclose(grouped, -math.log(4), rtol=RTOL)
    np.testing.assert_allclose(dispersive_loss(spread, "hinge"), 1.0 / n, rtol=RTOL)  # i = j only
    # A group of one has nothing to disperse from (DispLoss#2: batch size 1 gives 0).
    assert float(dispersive_loss(spread, "infonce_l2", group_size=1)) == 0.0


def test_covariance_range(getkey):
    # (1/D^2) sum Cov^2 lies in [1/(n-1), 1]: rank <= n-1 with trace D, and |Cov_mn| <= 1.
    n, dim = 8, 64
    z = jax.random.normal(getkey(), (n, dim))
    assert 1.0 / (n - 1) - ATOL <= float(dispersive_loss(z, "covariance")) <= 1.0
    # All features +-u: every |Cov_mn| = var / (var + eps) ~ 1 (unit scale: eps is negligible).
    signs = jnp.sign(jax.random.normal(getkey(), (dim,)))
    one_direction = jnp.outer(jax.random.normal(getkey(), (n,)), signs)
    np.testing.assert_allclose(dispersive_loss(one_direction, "covariance"), 1.0, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# Extreme inputs at SiT-B/2 size: D = 256 tokens x 768 = 196,608, a group of 16


@pytest.mark.parametrize("variant", LOSSES)
def test_extreme_inputs_at_sit_size(getkey, variant):
    shape = (16, 256, 768)
    # Unit-variance features sit at d ~ 2, outside the default hinge margin 1 (zero gradient, see
    # below); margin 4 makes the hinge act on them.
    kwargs = dict(group_size=16, margin=4.0 if variant == "hinge" else 1.0)

    @jax.jit
    def values_and_grads(z, z_pos):
        disp = jax.value_and_grad(lambda z: dispersive_loss(z, variant, **kwargs))(z)
        con = jax.value_and_grad(
            lambda z, z_pos: contrastive_loss(z, z_pos, variant, **kwargs), argnums=(0, 1)
        )(z, z_pos)
        return disp, con

    noise = jax.random.normal(getkey(), shape)
    noise_pos = noise + 0.1 * jax.random.normal(getkey(), shape)
    row = jnp.broadcast_to(jax.random.normal(getkey(), shape[1:]), shape)
    cases = {
        "std 1": (noise, noise_pos),
        "std 10": (10.0 * noise, 10.0 * noise_pos),
        "std 100": (100.0 * noise, 100.0 * noise_pos),
        "identical rows": (row, row),
        "zeros": (jnp.zeros(shape), jnp.zeros(shape)),
    }
    for name, (z, z_pos) in cases.items():
        out = values_and_grads(z, z_pos)
        assert all(jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(out)), name
        if name == "std 1":
            (_, disp_grad), (_, (con_grad, _)) = out
            assert jnp.any(disp_grad != 0.0) and jnp.any(con_grad != 0.0)


def test_default_hinge_margin_inactive_for_unit_variance(getkey):
    z = jax.random.normal(getkey(), (16, 256, 768))
    loss, grad = jax.value_and_grad(lambda z: dispersive_loss(z, "hinge"))(z)
    np.testing.assert_allclose(loss, 1.0 / 16, rtol=RTOL)  # diagonal terms only
    np.testing.assert_allclose(grad, 0.0, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Gradient descent disperses


def _mean_pairwise(m):
    n = m.shape[0]
    return float(jnp.sum(m) / (n * (n - 1)))  # diagonal excluded (it is 0)


def _effective_rank(z):
    s = jnp.linalg.svd(z - jnp.mean(z, axis=0), compute_uv=False)
    p = s / jnp.sum(s)
    return float(jnp.exp(-jnp.sum(p * jnp.log(p + 1e-12))))


def _descend(z, variant, lr, steps=50):
    grad = jax.jit(jax.grad(lambda z: dispersive_loss(z, variant)))
    for _ in range(steps):
        z = z - lr * grad(z)
    return z


@pytest.mark.parametrize("variant, lr", [("infonce_l2", 2.0), ("hinge", 10.0)])
def test_descent_spreads_l2(getkey, variant, lr):
    z0 = 0.1 * jax.random.normal(getkey(), (16, 8))
    z1 = _descend(z0, variant, lr)
    assert _mean_pairwise(pairwise_sq_dists(z1)) > 4 * _mean_pairwise(pairwise_sq_dists(z0))


def test_descent_spreads_cosine(getkey):
    direction = jax.random.normal(getkey(), (8,))
    z0 = direction + 0.1 * jax.random.normal(getkey(), (16, 8))
    z1 = _descend(z0, "infonce_cosine", lr=2.0)

    def cosine_distance(z):
        u = z / jnp.linalg.norm(z, axis=1, keepdims=True)
        return _mean_pairwise(1.0 - u @ u.T)

    assert cosine_distance(z1) > 4 * cosine_distance(z0)


def test_descent_decorrelates_covariance(getkey):
    # Nearly rank-one features: every pair of features is strongly correlated.
    z0 = jnp.outer(jax.random.normal(getkey(), (16,)), jax.random.normal(getkey(), (8,)))
    z0 = z0 + 0.1 * jax.random.normal(getkey(), (16, 8))
    z1 = _descend(z0, "covariance", lr=2.0)
    assert float(dispersive_loss(z1, "covariance")) < 0.5 * float(dispersive_loss(z0, "covariance"))
    assert _effective_rank(z1) > 1.5 * _effective_rank(z0)


# ----------------------------------------------------------------------------------------------
# Dtypes, errors, the baseline, type checking, config agreement


@pytest.mark.parametrize("variant", LOSSES)
def test_bfloat16_input_accumulates_in_float32(getkey, variant):
    z, z_pos = _views(getkey, (16, 64, 32))
    z, z_pos = z.astype(jnp.bfloat16), z_pos.astype(jnp.bfloat16)
    as_f32 = lambda x: x.astype(jnp.float32)  # the same values, exactly representable in f32
    for out, ref in [
        (dispersive_loss(z, variant), dispersive_loss(as_f32(z), variant)),
        (contrastive_loss(z, z_pos, variant), contrastive_loss(as_f32(z), as_f32(z_pos), variant)),
    ]:
        assert out.dtype == jnp.float32
        np.testing.assert_allclose(out, ref, rtol=RTOL, atol=ATOL)


def test_errors(getkey):
    z = jax.random.normal(getkey(), (12, 3))
    with pytest.raises(ValueError, match="'infonce_l3'"):
        dispersive_loss(z, "infonce_l3")
    with pytest.raises(ValueError, match="'infonce_l3'"):
        contrastive_loss(z, z, "infonce_l3")
    with pytest.raises(ValueError, match="group_size=5 .* 12"):
        dispersive_loss(z, group_size=5)
    with pytest.raises(ValueError, match="group_size=5 .* 12"):
        contrastive_loss(z, z, group_size=5)
    with pytest.raises(ValueError, match="group_size=0"):
        dispersive_loss(z, group_size=0)


def test_none_is_zero_with_zero_gradient(getkey):
    z = jax.random.normal(getkey(), (12, 3))
    assert dispersive_loss(z, "none").dtype == jnp.float32
    assert float(dispersive_loss(z, "none")) == 0.0
    assert float(contrastive_loss(z, z, "none")) == 0.0
    assert np.all(jax.grad(lambda z: dispersive_loss(z, "none"))(z) == 0.0)
    assert np.all(jax.grad(lambda z: contrastive_loss(z, 2.0 * z, "none"))(z) == 0.0)


def test_runtime_type_checks_are_active(getkey):
    z = jax.random.normal(getkey(), (12, 3))
    with pytest.raises(jaxtyping.TypeCheckError):
        pairwise_sq_dists(z[:, 0])  # 1-D, expected (n, feature)
    with pytest.raises(jaxtyping.TypeCheckError):
        contrastive_loss(z, z[:6])  # the two views disagree on the batch size
    with pytest.raises(jaxtyping.TypeCheckError):
        dispersive_loss(jnp.ones((12, 3), jnp.int32))  # not a float array


def test_defaults_match_config():
    fields = {f.name: f.default for f in dataclasses.fields(eqdisp.config.DispConfig)}
    for fn in (dispersive_loss, contrastive_loss):
        for name, param in inspect.signature(fn).parameters.items():
            if name in fields and name != "group_size":  # None here; the config's 16 is the paper's
                assert param.default == fields[name], (fn.__name__, name)
