"""Tests of eqdisp.meanflow: (t, r) sampling, label dropout, guided velocity, the JVP target, the
loss (primal taps, stop-gradients) and the few-step sampler, on a tiny stand-in network and on the
exact average velocity of a Gaussian data set.

MeanFlow time: t = 0 data, t = 1 noise, ``z_t = (1 - t) x + t e``.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

NUM_CLASSES = 5
SHAPE = (2, 4, 4)  # c h w


def _normal(rng, shape, dtype=jnp.float32, scale=1.0):
    return jnp.asarray(scale * rng.standard_normal(shape), dtype)


class TinyNet(eqx.Module):
    """A stand-in MeanFlow network ``(x, t, h, y) -> (u, taps)``: one token per pixel, residual
    tanh blocks conditioned on ``c = tanh(features(t, h)) + label``; nonlinear in x, t and h.
    Parameters come from numpy (no PRNG programs to compile)."""

    w_in: jax.Array
    w_c: jax.Array
    table: jax.Array
    w_blocks: jax.Array
    w_out: jax.Array

    def __init__(self, rng, *, dtype=jnp.float32, dim: int = 8, depth: int = 3):
        c = SHAPE[0]
        self.w_in = _normal(rng, (c, dim), dtype, c**-0.5)
        self.w_c = _normal(rng, (4, dim), dtype)
        self.table = _normal(rng, (NUM_CLASSES + 1, dim), dtype)
        self.w_blocks = _normal(rng, (depth, dim, dim), dtype, dim**-0.5)
        self.w_out = _normal(rng, (dim, c), dtype, dim**-0.5)

    def __call__(self, x, t, h, y, *, tap_blocks=()):
        from eqdisp.models import Taps

        c, height, width = x.shape
        act = x.reshape(c, height * width).T @ self.w_in
        features = jnp.stack([t, h, jnp.sin(3 * t) * h, jnp.cos(2 * h + t)])
        cvec = jnp.tanh(features @ self.w_c) + self.table[y]
        acts = []
        for w in self.w_blocks:
            act = act + jnp.tanh(act @ w + cvec)
            acts.append(act)
        u = ((act * (1 + t * h)) @ self.w_out).T.reshape(x.shape)
        if tap_blocks:
            taps = jnp.stack([acts[i] for i in tap_blocks])
        else:
            taps = jnp.zeros((0, *act.shape), act.dtype)
        return u, Taps(blocks=taps, c=cvec)


class Counting:
    """Counts the traced calls of a network (each vmapped forward over the batch is one)."""

    def __init__(self, net):
        self.net, self.calls = net, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.net(*args, **kwargs)


def _sigmas(t, s):
    """Std of z_t = (1 - t) x + t e per coordinate, x ~ N(mu, s^2), e ~ N(0, 1)."""
    return jnp.sqrt((1 - t) ** 2 * s**2 + t**2)


def _marginal_velocity(z, t, mu, s):
    """E[e - x | z_t = z] for the Gaussian data set, one example, scalar t."""
    a, var = 1 - t, _sigmas(t, s) ** 2
    return (t - a * s**2) / var * (z - a * mu) - mu


class ExactGaussianNet(eqx.Module):
    """The exact average velocity of x ~ N(mu, s^2 I) (labels ignored).

    The marginal flow of the linear path is affine: ``phi_{t->r}(z) = (1 - r) mu +
    (sigma_r / sigma_t) (z - (1 - t) mu)`` maps N((1 - t) mu, sigma_t^2) monotonically onto
    N((1 - r) mu, sigma_r^2) and solves dz/dt = v(z, t) (``_marginal_velocity``), so
    ``u(z, r, t) = (z - phi_{t->r}(z)) / (t - r)``; at ``h = t - r = 0`` it is ``v(z, t)``.
    """

    mu: jax.Array
    s: jax.Array

    def __call__(self, x, t, h, y, *, tap_blocks=()):
        from eqdisp.models import Taps

        r = t - h
        sigma_t, sigma_r = _sigmas(t, self.s), _sigmas(r, self.s)
        z_r = (1 - r) * self.mu + sigma_r / sigma_t * (x - (1 - t) * self.mu)
        safe_h = jnp.where(h > 0, h, jnp.ones_like(h))  # no 0/0 in the unused branch's tangent
        u = jnp.where(h > 0, (x - z_r) / safe_h, _marginal_velocity(x, t, self.mu, self.s))
        return u, Taps(blocks=jnp.zeros((0, 1, 1), x.dtype), c=jnp.zeros((1,), x.dtype))


def _gaussian(rng, dtype=jnp.float32):
    mu = _normal(rng, SHAPE, dtype)
    s = jnp.asarray(rng.uniform(0.3, 1.5, SHAPE), dtype)
    return ExactGaussianNet(mu=mu, s=s)


def _data(rng, batch):
    x = _normal(rng, (batch, *SHAPE))
    return x, _labels(rng, batch)


def _labels(rng, batch, high=NUM_CLASSES):
    return jnp.asarray(rng.integers(0, high, batch), jnp.int32)


@pytest.fixture
def rng():
    """Test data from numpy: eager jax.random calls would each compile a PRNG program."""
    return np.random.default_rng(0)


def _draws(net, x, y, key, cfg):
    """The inputs `meanflow_loss` draws, recomputed from its documented key split."""
    from eqdisp.meanflow import cond_drop, guided_velocity, sample_tr

    key_time, key_noise, key_drop = jr.split(key, 3)
    t, r = sample_tr(
        key_time, x.shape[0], p_mean=cfg.p_mean, p_std=cfg.p_std,
        data_proportion=cfg.data_proportion,
    )
    e = jr.normal(key_noise, x.shape, x.dtype)
    t4 = t[:, None, None, None]
    z, v = (1 - t4) * x + t4 * e, e - x
    v_g = guided_velocity(
        net, z, t, v, y, num_classes=NUM_CLASSES, omega=cfg.omega, kappa=cfg.kappa,
        interval=cfg.guidance_interval,
    )
    y_inp, v_g = cond_drop(key_drop, y, v, v_g, num_classes=NUM_CLASSES,
                           prob=cfg.class_dropout_prob)
    return z, t, r, v, v_g, y_inp


def _sum_sq(a):
    return jnp.sum(jnp.square(a), axis=(1, 2, 3))


def _assert_trees_close(a, b, **tol):
    leaves_a = jax.tree.leaves(eqx.filter(a, eqx.is_array))
    leaves_b = jax.tree.leaves(eqx.filter(b, eqx.is_array))
    assert len(leaves_a) == len(leaves_b) > 0
    for la, lb in zip(leaves_a, leaves_b):
        np.testing.assert_allclose(la, lb, **tol)


def _tree_norm(a):
    return math.sqrt(sum(float(jnp.sum(jnp.square(x))) for x in jax.tree.leaves(
        eqx.filter(a, eqx.is_array))))


def _tree_distance(a, b):
    diffs = jax.tree.map(lambda p, q: jnp.sum(jnp.square(p - q)),
                         eqx.filter(a, eqx.is_array), eqx.filter(b, eqx.is_array))
    return math.sqrt(sum(float(d) for d in jax.tree.leaves(diffs)))


# ----------------------------------------------------------------------------------------------
# Configuration


def test_config_defaults_are_the_official_ones():
    from eqdisp.meanflow import MeanFlowConfig

    cfg = MeanFlowConfig()
    assert (cfg.p_mean, cfg.p_std, cfg.data_proportion) == (-0.4, 1.0, 0.75)
    assert (cfg.norm_p, cfg.norm_eps) == (1.0, 0.01)
    assert (cfg.omega, cfg.kappa, cfg.guidance_interval) == (1.0, 0.5, (0.0, 1.0))
    assert cfg.class_dropout_prob == 0.1
    assert cfg.effective_guidance == 2.0
    assert MeanFlowConfig(omega=0.2, kappa=0.92).effective_guidance == pytest.approx(2.5)


@pytest.mark.parametrize(
    "field, value",
    [
        ("p_mean", float("inf")),
        ("p_std", 0.0),
        ("p_std", float("nan")),
        ("data_proportion", 1.5),
        ("data_proportion", -0.1),
        ("norm_p", -1.0),
        ("norm_eps", 0.0),
        ("omega", 0.0),
        ("kappa", 1.0),
        ("kappa", -0.5),
        ("guidance_interval", (0.8, 0.2)),
        ("guidance_interval", (0.0, 1.5)),
        ("class_dropout_prob", 1.0),
    ],
)
def test_config_rejects_bad_values(field, value):
    from eqdisp.config import ConfigError
    from eqdisp.meanflow import MeanFlowConfig

    with pytest.raises(ConfigError) as info:
        MeanFlowConfig(**{field: value})
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"meanflow.{field}={value!r} is not allowed: expected ")


# ----------------------------------------------------------------------------------------------
# (t, r), label dropout, guidance


def test_sample_tr_orders_times_and_fixes_a_prefix(getkey):
    from eqdisp.meanflow import sample_tr

    for batch, prefix in ((1000, 750), (7, 5)):
        t, r = sample_tr(getkey(), batch)
        assert t.shape == r.shape == (batch,) and t.dtype == r.dtype == jnp.float32
        assert bool(jnp.all((0 < r) & (r <= t) & (t < 1)))
        assert bool(jnp.all(r[:prefix] == t[:prefix]))
        assert bool(jnp.all(r[prefix:] < t[prefix:]))


def test_sample_tr_is_logit_normal(getkey):
    from eqdisp.meanflow import sample_tr

    n = 100_000
    t, r = sample_tr(getkey(), n, data_proportion=0.0)
    logit = lambda s: np.log(s) - np.log1p(-s)
    # {t_i, r_i} are the two iid draws of pair i: 2n iid N(-0.4, 1) in logit space (SE 0.0022).
    draws = logit(np.concatenate([np.asarray(t, np.float64), np.asarray(r, np.float64)]))
    assert abs(draws.mean() - (-0.4)) < 0.012
    assert abs(draws.std() - 1.0) < 0.01
    # t is the max of two: E = mu + sigma / sqrt(pi)
    assert abs(logit(np.asarray(t, np.float64)).mean() - (-0.4 + 1 / math.sqrt(math.pi))) < 0.015
    t2, r2 = sample_tr(getkey(), 1000, p_mean=1.0, p_std=0.5, data_proportion=0.0)
    both = logit(np.concatenate([np.asarray(t2, np.float64), np.asarray(r2, np.float64)]))
    assert abs(both.mean() - 1.0) < 0.06 and abs(both.std() - 0.5) < 0.05


def test_cond_drop_drops_a_prefix_to_the_null_label_with_target_v(getkey, rng):
    from eqdisp.meanflow import cond_drop

    batch = 64
    y = _labels(rng, batch)
    v = _normal(rng, (batch, *SHAPE))
    v_g = _normal(rng, (batch, *SHAPE))
    drop = eqx.filter_jit(cond_drop)
    total = 0
    for _ in range(20):
        y_inp, target = drop(getkey(), y, v, v_g, num_classes=NUM_CLASSES)
        assert y_inp.dtype == y.dtype
        dropped = np.asarray(y_inp == NUM_CLASSES)
        n = int(dropped.sum())
        total += n
        assert dropped[:n].all() and not dropped[n:].any()  # a prefix
        np.testing.assert_array_equal(target[:n], v[:n])
        np.testing.assert_array_equal(target[n:], v_g[n:])
        np.testing.assert_array_equal(y_inp[n:], y[n:])
    # Binomial(1280, 0.1): mean 128, sd 10.7
    assert 80 < total < 176
    none, _ = drop(getkey(), y, v, v_g, num_classes=NUM_CLASSES, prob=0.0)
    np.testing.assert_array_equal(none, y)


def test_guided_velocity_formulas_interval_and_forward_count(rng):
    from eqdisp.meanflow import guided_velocity

    guided_velocity = eqx.filter_jit(guided_velocity)
    net = TinyNet(rng)
    batch = 8
    z = _normal(rng, (batch, *SHAPE))
    v = _normal(rng, (batch, *SHAPE))
    t = jnp.asarray(np.linspace(0.05, 0.95, batch), jnp.float32)
    y = _labels(rng, batch)

    @jax.jit
    def u_cfg(labels):  # h = 0, i.e. r = t
        return jax.vmap(lambda zi, ti, yi: net(zi, ti, jnp.zeros_like(ti), yi)[0])(z, t, labels)

    u_null, u_cond = u_cfg(jnp.full_like(y, NUM_CLASSES)), u_cfg(y)

    counting = Counting(net)
    out = guided_velocity(counting, z, t, v, y, num_classes=NUM_CLASSES, omega=2.0, kappa=0.0)
    assert counting.calls == 1
    np.testing.assert_allclose(out, u_null + 2.0 * (v - u_null), rtol=1e-5, atol=1e-6)

    counting = Counting(net)
    out = guided_velocity(counting, z, t, v, y, num_classes=NUM_CLASSES, omega=0.2, kappa=0.92)
    assert counting.calls == 2
    expected = 0.2 * v + 0.92 * u_cond + (1 - 0.2 - 0.92) * u_null
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)

    counting = Counting(net)
    out = guided_velocity(counting, z, t, v, y, num_classes=NUM_CLASSES, omega=1.0, kappa=0.0)
    assert counting.calls == 0
    np.testing.assert_array_equal(out, v)

    # Outside [0, 0.5] the plain velocity, inside the guided one.
    out = guided_velocity(
        net, z, t, v, y, num_classes=NUM_CLASSES, omega=1.0, kappa=0.5, interval=(0.0, 0.5)
    )
    inside = np.asarray(t <= 0.5)
    assert 0 < inside.sum() < batch
    np.testing.assert_allclose(out[~inside], v[~inside], rtol=1e-6, atol=1e-6)
    expected = v + 0.5 * u_cond - 0.5 * u_null
    np.testing.assert_allclose(out[inside], expected[inside], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# The JVP target


def test_jvp_matches_central_finite_differences(rng):
    """du/dt along (z, t, r) -> (v_g, 1, 0), against a float64 central difference with step 1e-5
    (truncation ~1e-10 relative, rounding ~1e-11: tolerance 1e-7)."""
    from eqdisp.meanflow import meanflow_jvp

    with jax.enable_x64(True):
        net = TinyNet(rng, dtype=jnp.float64)
        batch = 5
        z = _normal(rng, (batch, *SHAPE), jnp.float64)
        v_g = _normal(rng, (batch, *SHAPE), jnp.float64)
        t = jnp.asarray([0.3, 0.6, 0.9, 0.5, 0.75], jnp.float64)
        r = jnp.asarray([0.1, 0.6, 0.2, 0.0, 0.4], jnp.float64)
        y = jnp.asarray([0, 1, NUM_CLASSES, 3, 4], jnp.int32)

        @jax.jit
        def moved(eps):  # net(z + eps v_g, t + eps, h = (t + eps) - r)
            def one(zi, ti, ri, yi, vi):
                return net(zi + eps * vi, ti + eps, ti + eps - ri, yi)[0]

            return jax.vmap(one)(z, t, r, y, v_g)

        u, dudt, taps = eqx.filter_jit(meanflow_jvp)(net, z, t, r, y, v_g)
        assert u.dtype == dudt.dtype == jnp.float64 and taps.blocks.shape[:2] == (batch, 0)
        np.testing.assert_allclose(u, moved(jnp.float64(0.0)), rtol=1e-12, atol=1e-12)
        eps = jnp.float64(1e-5)
        fd = (moved(eps) - moved(-eps)) / (2 * eps)
        np.testing.assert_allclose(dudt, fd, rtol=1e-7, atol=1e-9)

        # The time terms matter: moving z alone, or t with h held fixed, gives other numbers.
        def one_z(zi, ti, ri, yi, vi):
            f = lambda zz: net(zz, ti, ti - ri, yi)[0]
            return jax.jvp(f, (zi,), (vi,))[1]

        dz_only = jax.jit(jax.vmap(one_z))(z, t, r, y, v_g)
        assert float(jnp.max(jnp.abs(dz_only - dudt))) > 1e-3
        h_fixed = jax.jit(jax.vmap(
            lambda zi, ti, ri, yi, vi: jax.jvp(
                lambda zz, tt: net(zz, tt, ti - ri, yi)[0], (zi, ti), (vi, jnp.ones_like(ti))
            )[1]
        ))(z, t, r, y, v_g)
        assert float(jnp.max(jnp.abs(h_fixed - dudt))) > 1e-3


def test_dispersive_taps_come_from_the_primal_pass(getkey, rng):
    """One jvp with has_aux gives the loss and gradient of a two-pass implementation (a separate
    plain forward for the tapped activations)."""
    from eqdisp.dispersive import dispersive_loss
    from eqdisp.meanflow import MeanFlowConfig, meanflow_jvp, meanflow_loss, meanflow_target

    cfg = MeanFlowConfig(data_proportion=0.5, class_dropout_prob=0.3)
    net = TinyNet(rng)
    batch = 8
    x, y = _data(rng, batch)
    key = getkey()
    tap_blocks, lam = (0, 2), 0.7

    def disp(z):
        return dispersive_loss(z, "infonce_l2", tau=0.5)

    @eqx.filter_jit
    @eqx.filter_value_and_grad(has_aux=True)
    def one_pass(net):
        return meanflow_loss(
            net, x, y, key=key, num_classes=NUM_CLASSES, config=cfg, disp_fn=disp,
            disp_weight=lam, tap_blocks=tap_blocks,
        )

    @eqx.filter_jit
    def two_pass(net):
        """(loss_mf, loss_disp) and the gradient of each, in one program."""
        params, static = eqx.partition(net, eqx.is_array)

        def terms(params):
            net = eqx.combine(params, static)
            z, t, r, _, v_g, y_inp = _draws(net, x, y, key, cfg)
            u, dudt, _ = meanflow_jvp(net, z, t, r, y_inp, v_g)
            err = _sum_sq(u - meanflow_target(v_g, dudt, t, r))
            loss_mf = jnp.mean(jax.lax.stop_gradient(1 / (err + 0.01)) * err)

            def plain(zi, ti, ri, yi):  # the second pass: a plain forward for the taps
                return net(zi, ti, ti - ri, yi, tap_blocks=tap_blocks)[1]

            blocks = jax.vmap(plain)(z, t, r, y_inp).blocks
            per_block = [disp(blocks[:, b].reshape(batch, -1)) for b in range(len(tap_blocks))]
            return jnp.stack([loss_mf, jnp.mean(jnp.stack(per_block))])

        values, vjp = jax.vjp(terms, params)
        (g_mf,) = vjp(jnp.asarray([1.0, 0.0]))
        (g_disp,) = vjp(jnp.asarray([0.0, 1.0]))
        return values, g_mf, g_disp

    (loss, metrics), grads = one_pass(net)
    (loss_mf, loss_disp), g_mf, g_disp = two_pass(net)
    np.testing.assert_allclose(metrics["loss_mf"], loss_mf, rtol=1e-6)
    np.testing.assert_allclose(metrics["loss_disp"], loss_disp, rtol=1e-6)
    np.testing.assert_allclose(loss, loss_mf + lam * loss_disp, rtol=1e-6)
    expected = jax.tree.map(lambda a, b: a + lam * b, g_mf, g_disp)
    _assert_trees_close(grads, expected, rtol=1e-4, atol=1e-6)
    # The dispersive gradient is large enough for that comparison to notice its absence.
    assert _tree_distance(expected, g_mf) > 1e-2 * _tree_norm(g_mf)

    with pytest.raises(ValueError, match="disp_weight"):
        meanflow_loss(net, x, y, key=key, num_classes=NUM_CLASSES, disp_fn=disp)


def test_gradient_does_not_flow_through_the_target_or_the_weight(getkey, rng):
    """grad(meanflow_loss) == grad(mean(w sum((u - u_tgt)^2))) with w and u_tgt precomputed
    constants; differentiating through them would give another gradient."""
    from eqdisp.meanflow import MeanFlowConfig, meanflow_jvp, meanflow_loss

    cfg = MeanFlowConfig(data_proportion=0.25)
    net = TinyNet(rng)
    x, y = _data(rng, 8)
    key = getkey()

    @eqx.filter_jit
    @eqx.filter_value_and_grad(has_aux=True)
    def loss_and_grad(net):
        return meanflow_loss(net, x, y, key=key, num_classes=NUM_CLASSES, config=cfg)

    @eqx.filter_jit
    def draws_and_jvp(net):
        z, t, r, v, v_g, y_inp = _draws(net, x, y, key, cfg)
        return (z, t, r, v, v_g, y_inp), meanflow_jvp(net, z, t, r, y_inp, v_g)

    (loss, metrics), grads = loss_and_grad(net)
    (z, t, r, v, v_g, y_inp), (u, dudt, _) = draws_and_jvp(net)
    assert 0 < int(jnp.sum(r < t)) < 8
    # Plain numpy: constants for the gradient below.
    u_, v_, v_g_, dudt_ = (np.asarray(a, np.float64) for a in (u, v, v_g, dudt))
    h = np.asarray(t - r, np.float64)[:, None, None, None]
    u_tgt = v_g_ - h * dudt_
    err = np.sum((u_ - u_tgt) ** 2, axis=(1, 2, 3))
    w = 1 / (err + 0.01)
    np.testing.assert_allclose(loss, np.mean(w * err), rtol=1e-5)
    np.testing.assert_allclose(metrics["loss_mf_unweighted"], np.mean(err), rtol=1e-5)
    np.testing.assert_allclose(metrics["v_loss"], np.mean(np.sum((u_ - v_) ** 2, (1, 2, 3))),
                               rtol=1e-5)
    assert float(metrics["loss_disp"]) == 0.0
    u_tgt, w = jnp.asarray(u_tgt, jnp.float32), jnp.asarray(w, jnp.float32)

    @eqx.filter_jit
    @eqx.filter_grad
    def reference(n):
        u = jax.vmap(lambda zi, ti, ri, yi: n(zi, ti, ti - ri, yi)[0])(z, t, r, y_inp)
        return jnp.mean(w * _sum_sq(u - u_tgt))

    _assert_trees_close(grads, reference(net), rtol=1e-4, atol=1e-6)

    @eqx.filter_jit
    @eqx.filter_grad
    def no_stop_gradients(n):
        u, dudt, _ = meanflow_jvp(n, z, t, r, y_inp, v_g)
        err = _sum_sq(u - (v_g - (t - r)[:, None, None, None] * dudt))
        return jnp.mean(err / (err + 0.01))

    assert _tree_distance(no_stop_gradients(net), grads) > 1e-2 * _tree_norm(grads)


# ----------------------------------------------------------------------------------------------
# Exact Gaussian toy: the identity and the sampler


def test_exact_average_velocity_satisfies_the_meanflow_identity(rng):
    """With the exact u and the *marginal* velocity as v_g, the target equals u (MeanFlow's
    identity u = v - (t - r) du/dt holds for the marginal velocity, not the conditional one)."""
    from eqdisp.meanflow import meanflow_jvp, meanflow_target

    with jax.enable_x64(True):
        net = _gaussian(rng, jnp.float64)
        t = jnp.asarray([0.9, 0.7, 0.5, 0.95, 0.3, 0.6, 1.0], jnp.float64)
        r = jnp.asarray([0.1, 0.7, 0.0, 0.5, 0.29, 0.2, 0.0], jnp.float64)
        batch = t.shape[0]
        z = _normal(rng, (batch, *SHAPE), jnp.float64, 2.0)
        y = jnp.zeros((batch,), jnp.int32)
        v_marg = jax.vmap(lambda zi, ti: _marginal_velocity(zi, ti, net.mu, net.s))(z, t)
        u, dudt, _ = eqx.filter_jit(meanflow_jvp)(net, z, t, r, y, v_marg)
        assert bool(jnp.all(jnp.isfinite(dudt)))
        np.testing.assert_allclose(meanflow_target(v_marg, dudt, t, r), u, rtol=1e-9, atol=1e-9)
        # ... and a wrong tangent (r moving with t, i.e. h held fixed) breaks it.
        wrong = jax.jit(jax.vmap(
            lambda zi, ti, ri, vi: jax.jvp(
                lambda zz, tt, rr: net(zz, tt, tt - rr, 0)[0],
                (zi, ti, ri), (vi, jnp.ones_like(ti), jnp.ones_like(ri)),
            )[1]
        ))(z, t, r, v_marg)
        bad = meanflow_target(v_marg, wrong, t, r)
        assert float(jnp.max(jnp.abs(bad - u))) > 1e-2


def test_conditional_target_is_unbiased_for_the_exact_average_velocity(getkey, rng):
    """With the conditional v = e - x the target is noisy but E[u_tgt - u] = 0: the target is
    affine in v_g, and E[v | z_t] is the marginal velocity."""
    from eqdisp.meanflow import meanflow_jvp, meanflow_target, sample_tr

    n = 20_000
    with jax.enable_x64(True):
        net = _gaussian(rng, jnp.float64)
        t, r = sample_tr(getkey(), n, data_proportion=0.0)
        t, r = np.asarray(t, np.float64), np.asarray(r, np.float64)
        x = np.asarray(net.mu) + np.asarray(net.s) * rng.standard_normal((n, *SHAPE))
        e = rng.standard_normal((n, *SHAPE))
        t4 = t[:, None, None, None]
        z, v = jnp.asarray((1 - t4) * x + t4 * e), jnp.asarray(e - x)

        @eqx.filter_jit
        def target_minus_u(net, z, t, r, v):
            u, dudt, _ = meanflow_jvp(net, z, t, r, jnp.zeros((n,), jnp.int32), v)
            return meanflow_target(v, dudt, t, r) - u

        diff = np.asarray(target_minus_u(net, z, jnp.asarray(t), jnp.asarray(r), v))
    mean, se = diff.mean(axis=0), diff.std(axis=0) / math.sqrt(n)
    assert np.all(np.abs(mean) < 5 * se)
    assert diff.std() > 0.1  # really noisy: the identity is not pointwise here


def test_loss_uses_meanflow_time_and_conditional_velocity(getkey, rng):
    """With r = t everywhere, no guidance and no dropout, the exact net predicts E[v | z_t], so
    ``loss_mf_unweighted`` is the expected conditional variance of v = e - x given
    z_t = (1 - t) x + t e: ``1 + s^2 - (t - (1 - t) s^2)^2 / sigma_t^2`` per coordinate."""
    from eqdisp.meanflow import MeanFlowConfig, meanflow_loss, sample_tr

    n = 4096
    cfg = MeanFlowConfig(data_proportion=1.0, omega=1.0, kappa=0.0, class_dropout_prob=0.0)
    net = _gaussian(rng)
    mu, s = np.asarray(net.mu, np.float64), np.asarray(net.s, np.float64)
    x = jnp.asarray(mu + s * rng.standard_normal((n, *SHAPE)), jnp.float32)
    key = getkey()

    @eqx.filter_jit
    def loss_and_times(net, x):
        loss = meanflow_loss(
            net, x, jnp.zeros((n,), jnp.int32), key=key, num_classes=NUM_CLASSES, config=cfg
        )
        return loss, sample_tr(jr.split(key, 3)[0], n, data_proportion=1.0)[0]

    (loss, metrics), t = loss_and_times(net, x)
    t4 = np.asarray(t, np.float64)[:, None, None, None]
    s2 = s**2
    var = 1 + s2 - (t4 - (1 - t4) * s2) ** 2 / ((1 - t4) ** 2 * s2 + t4**2)
    expected = var.sum(axis=(1, 2, 3))
    # err_i has mean expected_i; its spread is about sqrt(2 expected_i) (chi-square-like)
    se = math.sqrt(2 * expected.mean() / n)
    assert abs(float(metrics["loss_mf_unweighted"]) - expected.mean()) < 5 * se
    np.testing.assert_allclose(metrics["v_loss"], metrics["loss_mf_unweighted"], rtol=1e-6)
    assert float(loss) < 1.0  # err / (err + 0.01) < 1


@pytest.mark.parametrize("steps", [1, 2])
def test_sampler_recovers_the_gaussian_with_the_exact_average_velocity(rng, steps):
    from eqdisp.meanflow import meanflow_sample

    n = 20_000
    net = _gaussian(rng)
    z1 = _normal(rng, (n, *SHAPE))
    y = _labels(rng, n, NUM_CLASSES + 1)
    out = jax.jit(lambda z, y: meanflow_sample(net, z, y, steps=steps))(z1, y)
    # The exact flow maps compose, so each sample is exactly mu + s z1 ...
    np.testing.assert_allclose(out, net.mu + net.s * z1, rtol=1e-5, atol=2e-5)
    # ... and the samples have the data's moments (to Monte-Carlo error).
    mean, std = np.asarray(out).mean(axis=0), np.asarray(out).std(axis=0)
    s = np.asarray(net.s)
    assert np.all(np.abs(mean - np.asarray(net.mu)) < 5 * s / math.sqrt(n))
    assert np.all(np.abs(std / s - 1) < 5 / math.sqrt(2 * n))


def test_sampler_time_grid_one_evaluation_per_step(rng):
    from eqdisp.config import ConfigError
    from eqdisp.meanflow import meanflow_sample, time_grid

    assert time_grid(1) == (1.0, 0.0) and time_grid(2) == (1.0, 0.5, 0.0)
    assert time_grid([1, 0.8, 0]) == (1.0, 0.8, 0.0)

    def net(x, t, h, y, *, tap_blocks=()):  # u = t + 10 h everywhere: records (t, h)
        return jnp.full_like(x, t + 10 * h), None

    z1 = _normal(rng, (3, *SHAPE))
    y = jnp.zeros((3,), jnp.int32)
    for steps in (1, 2, 3, [1.0, 0.8, 0.0], [0.9, 0.5]):
        grid = time_grid(steps)
        shift = sum((a - b) * (a + 10 * (a - b)) for a, b in zip(grid, grid[1:]))
        counting = Counting(net)
        out = meanflow_sample(counting, z1, y, steps=steps)
        assert counting.calls == 1  # one traced evaluation under the scan, run once per step
        np.testing.assert_allclose(out, z1 - shift, rtol=1e-5, atol=1e-5)

    for bad in (0, [1.0], [0.0, 1.0], [1.0, 0.5, 0.5], [1.5, 0.0]):
        with pytest.raises(ConfigError, match="meanflow steps"):
            time_grid(bad)


# ----------------------------------------------------------------------------------------------
# MeanFlow as an eqdisp objective: the MF transformer, make_objective, cli.train and cli.sample


def test_mf_models_have_the_papers_sizes_and_an_h_embedder():
    """MF-B/4, MF-B/2, MF-XL/2 (reference notes §1.3): DiT backbones plus a second timestep
    embedder, no learned sigma; counted with jax.eval_shape against the DiT count plus the
    h-embedder's two linear layers."""
    import eqdisp

    def count(name, learn_sigma=False, **overrides):
        model = jax.eval_shape(
            lambda: eqdisp.make_model(name, key=jr.key(0), learn_sigma=learn_sigma, **overrides)
        )
        return sum(x.size for x in jax.tree.leaves(model) if isinstance(x, jax.ShapeDtypeStruct))

    # DiT's published count includes its fixed position embedding (256 x 1152), not a leaf here.
    assert count("DiT-XL/2", learn_sigma=True) + 256 * 1152 == 675_129_632
    for name, dim in (("B/4", 768), ("B/2", 768), ("XL/2", 1152)):
        h_embedder = (256 * dim + dim) + (dim * dim + dim)
        assert count(f"MF-{name}", class_dropout_prob=0.0) == count(f"DiT-{name}") + h_embedder
    counts = {n: count(f"MF-{n}", class_dropout_prob=0.0) for n in ("B/4", "B/2", "XL/2")}
    # XL/2 by hand: DiT-XL/2 less its position embedding and half its final projection
    # (1152 x 16 + 16), plus the h-embedder.
    dit_xl = 675_129_632 - 256 * 1152
    assert counts["XL/2"] == dit_xl - (1152 * 16 + 16) + (256 * 1152 + 1152 + 1152**2 + 1152)
    # MeanFlow's paper: 131M, 131M, 676M.
    assert [round(c / 1e6) for c in counts.values()] == [131, 131, 676]


def test_h_enters_the_conditioning_of_mf_models_only(getkey):
    import eqdisp

    model = eqdisp.make_model(
        "MF-T/2", input_size=8, in_channels=1, num_classes=10, learn_sigma=False,
        class_dropout_prob=0.0, key=getkey(),
    )
    t, y = jnp.float32(0.7), jnp.int32(3)
    c0 = model.condition(t, y)
    assert jnp.array_equal(c0, model.condition(t, y, h=jnp.float32(0.0)))
    c1 = model.condition(t, y, h=jnp.float32(0.3))
    want = model.t_embedder(t) + model.h_embedder(jnp.float32(0.3)) + model.y_embedder(y)
    np.testing.assert_allclose(c1, want, rtol=1e-6)
    assert not jnp.allclose(c0, c1)
    sit = eqdisp.make_model("SiT-T/2", input_size=8, in_channels=1, num_classes=10, key=getkey())
    assert sit.h_embedder is None
    with pytest.raises(ValueError, match="h is only for family='MF' models"):
        sit.condition(t, y, h=jnp.float32(0.3))


def test_mf_configs_are_checked_at_the_boundary():
    from eqdisp.config import ConfigError, DispConfig, ExperimentConfig, ModelConfig, SamplerConfig

    ok = ModelConfig("MF-T/2", input_size=8, in_channels=1, learn_sigma=False, class_dropout_prob=0.0)
    for bad, match in (
        ({"model": ModelConfig("MF-T/2", learn_sigma=True, class_dropout_prob=0.0)}, "model.learn_sigma"),
        ({"model": ModelConfig("MF-T/2", learn_sigma=False)}, "model.class_dropout_prob=0.1"),
        ({"model": ok, "disp": DispConfig(contrastive="independent")}, "disp.contrastive"),
        ({"model": ok, "sampler": SamplerConfig(cfg_scale=1.5)}, "sampler.cfg_scale=1.5"),
    ):
        with pytest.raises(ConfigError, match=match):
            ExperimentConfig(**bad)


def test_the_objective_is_meanflows_loss_with_the_papers_dispersive_term(getkey):
    """`training_loss` of an MF model equals `meanflow_loss` with `dispersive_loss` on the same
    block, for the same key; the sampler counts grid points as SiT does (2 = one step)."""
    import eqdisp
    from eqdisp.config import PRESETS, SamplerConfig
    from eqdisp.meanflow import MeanFlow, meanflow_loss

    cfg = PRESETS["meanflow-tiny"][1]
    objective = eqdisp.make_objective(cfg)
    assert isinstance(objective, MeanFlow) and objective.config == cfg.meanflow
    model = eqdisp.make_model(cfg.model, key=getkey())
    x, y = jr.normal(getkey(), (16, 1, 8, 8)), jr.randint(getkey(), (16,), 0, 10)
    key = getkey()
    loss, metrics = eqdisp.training_loss(model, x, y, key=key, objective=objective, disp=cfg.disp)
    blocks = cfg.disp.block_indices(model.depth)

    def net(x, t, h, y, *, tap_blocks):
        return model.forward_with_taps(x, t, y, h=h, tap_blocks=tap_blocks)

    disp = lambda z: eqdisp.dispersive_loss(z, "infonce_l2", tau=0.5, group_size=16)  # noqa: E731
    want, parts = meanflow_loss(
        net, x, y, key=key, num_classes=10, config=cfg.meanflow, disp_fn=disp,
        disp_weight=cfg.disp.weight, tap_blocks=blocks,
    )
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
    for name in ("loss_disp", "loss_mf_unweighted", "v_loss"):  # the last two are logged
        np.testing.assert_allclose(float(metrics[name]), float(parts[name]), rtol=1e-5)
    assert objective.sampler_evaluations(SamplerConfig(steps=2)) == 1
    assert objective.describe_sampler(SamplerConfig(steps=3)) == (
        "MeanFlow, 3 grid points = 2 steps = 2 evaluations each"
    )
    assert objective.model_time(0.25) == 0.75  # eqdisp's t = 1 is data, MeanFlow's is noise


def test_meanflow_tiny_trains_resumes_and_samples_in_one_and_two_steps(tmp_path):
    """The CLI unchanged: cli.train meanflow-tiny (3 + 2 steps, resumed) and cli.sample with
    2 and 3 grid points (1- and 2-step MeanFlow)."""
    import json
    import pathlib
    import subprocess
    import sys

    repo = pathlib.Path(__file__).resolve().parents[1]
    run = tmp_path / "mf"

    def cli(*args):
        proc = subprocess.run(
            [sys.executable, "-m", *args], cwd=repo, capture_output=True, text=True, timeout=900
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    common = ("--train.out", str(run), "--train.sample-count", "0", "--train.batch-size", "16")
    cli("cli.train", "meanflow-tiny", "--train.steps", "3", *common)
    cli("cli.train", "meanflow-tiny", "--train.steps", "5", *common)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows and all("loss_mf_unweighted" in row and "v_loss" in row for row in rows)
    for points in ("2", "3"):
        out = tmp_path / f"samples-{points}.npz"
        proc = cli("cli.sample", str(run), "--num", "8", "--out", str(out), "--steps", points)
        assert f"MeanFlow, {points} grid points" in proc.stdout + proc.stderr
        images = np.load(out)["arr_0"]
        assert images.shape == (8, 8, 8, 1) and images.dtype == np.uint8
