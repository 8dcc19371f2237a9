"""Tests of eqdisp.transport: path coefficients, conversions, intervals, the training loss."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

PATHS = ("Linear", "GVP", "VP")
TIMES = (0.1, 0.3, 0.5, 0.7, 0.9)


def _closed_forms(name: str, t: float) -> tuple[float, float, float, float]:
    """(alpha, sigma, d_alpha, d_sigma) in float64 from the formulas of SiT's path.py."""
    if name == "Linear":
        return t, 1 - t, 1.0, -1.0
    if name == "GVP":
        c, s = math.cos(math.pi * t / 2), math.sin(math.pi * t / 2)
        return s, c, math.pi / 2 * c, -math.pi / 2 * s
    smin, smax = 0.1, 20.0
    m = -0.25 * (1 - t) ** 2 * (smax - smin) - 0.5 * (1 - t) * smin
    dm = 0.5 * (1 - t) * (smax - smin) + 0.5 * smin
    alpha, sigma = math.exp(m), math.sqrt(1 - math.exp(2 * m))
    return alpha, sigma, alpha * dm, -math.exp(2 * m) * dm / sigma


@pytest.mark.parametrize("name", PATHS)
def test_coefficients_match_closed_forms(name):
    from eqdisp.transport import make_path

    path = make_path(name)
    ts = jnp.asarray(TIMES, jnp.float32)
    expected = np.array([_closed_forms(name, t) for t in TIMES]).T
    got = [path.alpha(ts), path.sigma(ts), path.d_alpha(ts), path.d_sigma(ts)]
    for g, e in zip(got, expected):
        assert g.shape == ts.shape and g.dtype == jnp.float32
        np.testing.assert_allclose(g, e, rtol=2e-5, atol=1e-6)
    alpha, sigma, d_alpha, d_sigma = expected
    np.testing.assert_allclose(path.d_log_alpha(ts), d_alpha / alpha, rtol=2e-5)
    w_sb = d_alpha / alpha * sigma**2 - sigma * d_sigma
    np.testing.assert_allclose(path.w_sb(ts), w_sb, rtol=2e-5)
    x = jnp.linspace(-1.0, 1.0, 6, dtype=jnp.float32)
    np.testing.assert_allclose(path.drift(x, ts[1]), -d_alpha[1] / alpha[1] * x, rtol=2e-5)


def test_simplified_forms():
    from eqdisp.transport import LinearPath, VPPath

    t = jnp.asarray(0.25, jnp.float32)
    np.testing.assert_allclose(LinearPath().w_sb(t), 3.0)  # (1 - t) / t
    beta = 0.1 + 0.75 * (20.0 - 0.1)
    np.testing.assert_allclose(VPPath().w_sb(t), beta / 2, rtol=1e-6)  # SiT's VP override
    np.testing.assert_allclose(VPPath().d_log_alpha(t), beta / 2, rtol=1e-6)


@pytest.mark.parametrize("name", PATHS)
def test_derivatives_match_autodiff(name):
    from eqdisp.transport import make_path

    path = make_path(name)
    for t in TIMES:
        t = jnp.asarray(t, jnp.float32)
        np.testing.assert_allclose(path.d_alpha(t), jax.grad(path.alpha)(t), rtol=1e-4)
        np.testing.assert_allclose(path.d_sigma(t), jax.grad(path.sigma)(t), rtol=1e-4)


def _gaussian_fields(path, mu, s, x, t):
    """Exact score, E[x0 | x_t] and velocity E[u_t | x_t] for x1 ~ N(mu, s^2), x0 ~ N(0, 1)."""
    alpha, sigma = path.alpha(t), path.sigma(t)
    var = alpha**2 * s**2 + sigma**2
    r = x - alpha * mu
    score = -r / var
    noise = sigma / var * r
    data = mu + alpha * s**2 / var * r
    velocity = path.d_alpha(t) * data + path.d_sigma(t) * noise
    return score, noise, velocity


@pytest.mark.parametrize("name", PATHS)
def test_conversions_exact_gaussian_and_inverse(name, getkey):
    from eqdisp.transport import make_path

    path = make_path(name)
    mu = jnp.asarray([0.5, -1.0, 2.0], jnp.float32)
    s = jnp.asarray([0.3, 1.0, 2.0], jnp.float32)
    x = jax.random.normal(getkey(), (3,))
    for t in TIMES:
        t = jnp.asarray(t, jnp.float32)
        score, noise, velocity = _gaussian_fields(path, mu, s, x, t)
        tol = {"rtol": 1e-4, "atol": 1e-5}
        np.testing.assert_allclose(path.velocity_to_score(velocity, x, t), score, **tol)
        np.testing.assert_allclose(path.velocity_to_noise(velocity, x, t), noise, **tol)
        np.testing.assert_allclose(path.score_to_velocity(score, x, t), velocity, **tol)
        np.testing.assert_allclose(path.noise_to_velocity(noise, x, t), velocity, **tol)
        # Round trips on arbitrary (non-Gaussian) fields.
        v = jax.random.normal(getkey(), (3,))
        np.testing.assert_allclose(
            path.score_to_velocity(path.velocity_to_score(v, x, t), x, t), v, **tol
        )
        np.testing.assert_allclose(
            path.noise_to_velocity(path.velocity_to_noise(v, x, t), x, t), v, **tol
        )


def test_conversions_finite_at_t0_for_linear():
    from eqdisp.transport import LinearPath

    x = jnp.asarray([0.5, -2.0], jnp.float32)
    v = jnp.asarray([1.0, 3.0], jnp.float32)
    # At t = 0, x_t is the noise: score -x and noise x, whatever the velocity.
    np.testing.assert_allclose(LinearPath().velocity_to_score(v, x, 0.0), -x)
    np.testing.assert_allclose(LinearPath().velocity_to_noise(v, x, 0.0), x)


@pytest.mark.parametrize("name", PATHS)
def test_interpolate(name, getkey):
    from eqdisp.transport import interpolate, make_path

    path = make_path(name)
    x0, x1 = jax.random.normal(getkey(), (2, 2, 3, 3))
    t = jnp.asarray(0.4, jnp.float32)
    x_t, u_t = interpolate(path, x0, x1, t)
    a, s, da, ds = _closed_forms(name, 0.4)
    np.testing.assert_allclose(x_t, a * x1 + s * x0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(u_t, da * x1 + ds * x0, rtol=1e-5, atol=1e-6)
    # u_t is d x_t / dt along the pair.
    _, tangent = jax.jvp(lambda t: interpolate(path, x0, x1, t)[0], (t,), (jnp.ones_like(t),))
    np.testing.assert_allclose(tangent, u_t, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", PATHS)
@pytest.mark.parametrize("prediction", ("velocity", "noise", "score"))
@pytest.mark.parametrize("weight", ("none", "velocity", "likelihood"))
def test_training_loss_zero_at_target(name, prediction, weight, getkey):
    from eqdisp.transport import interpolate, make_path, training_loss, training_target

    path = make_path(name)
    x0, x1 = jax.random.normal(getkey(), (2, 4, 2, 2))
    t = jnp.asarray(0.6, jnp.float32)
    target = training_target(path, prediction, x0, x1, t)
    kw = {"path": path, "prediction": prediction, "loss_weight": weight}
    loss = training_loss(target, x0, x1, t, **kw)
    assert loss.shape == () and loss.dtype == jnp.float32
    assert float(loss) < 1e-10
    assert float(training_loss(target + 0.1, x0, x1, t, **kw)) > 0
    if prediction == "velocity":
        np.testing.assert_allclose(target, interpolate(path, x0, x1, t)[1])


def test_training_loss_hand_computation(getkey):
    from eqdisp.transport import LinearPath, interpolate, training_loss

    path = LinearPath()
    x0, x1 = jax.random.normal(getkey(), (2, 3, 2, 2))
    t = 0.25
    delta = jnp.linspace(-1.0, 1.0, 12, dtype=jnp.float32).reshape(3, 2, 2)
    mean_sq = float(jnp.mean(delta**2))

    u_t = interpolate(path, x0, x1, t)[1]
    np.testing.assert_allclose(u_t, x1 - x0, rtol=1e-6)
    loss = training_loss(
        u_t + delta, x0, x1, t, path=path, prediction="velocity", loss_weight="likelihood"
    )
    np.testing.assert_allclose(loss, mean_sq, rtol=1e-6)  # weights are ignored for velocity

    # Linear: w_sb = (1 - t) / t, sigma = 1 - t; "velocity" weight 1/t^2, "likelihood" 1/(t (1 - t)).
    kw = {"path": path, "prediction": "noise"}
    np.testing.assert_allclose(
        training_loss(x0 + delta, x0, x1, t, **kw, loss_weight="none"), mean_sq, rtol=1e-6
    )
    np.testing.assert_allclose(
        training_loss(x0 + delta, x0, x1, t, **kw, loss_weight="velocity"), 16 * mean_sq, rtol=1e-5
    )
    np.testing.assert_allclose(
        training_loss(x0 + delta, x0, x1, t, **kw, loss_weight="likelihood"),
        mean_sq / (0.25 * 0.75),
        rtol=1e-5,
    )
    # Score: w (out sigma + x0)^2 with out = -x0 / sigma + delta gives w sigma^2 delta^2.
    out = -x0 / 0.75 + delta
    np.testing.assert_allclose(
        training_loss(out, x0, x1, t, path=path, prediction="score", loss_weight="none"),
        0.75**2 * mean_sq,
        rtol=1e-5,
    )


def test_training_loss_vmaps_to_sit_batch_mean(getkey):
    from eqdisp.config import TransportConfig
    from eqdisp.transport import make_transport

    transport = make_transport(TransportConfig())
    x0, x1, out = jax.random.normal(getkey(), (3, 8, 4, 2, 2))
    t = transport.sample_train_time(getkey(), (8,))
    per_example = jax.vmap(transport.loss)(out, x0, x1, t)
    assert per_example.shape == (8,)
    u = x1 - x0  # Linear
    np.testing.assert_allclose(jnp.mean(per_example), jnp.mean((out - u) ** 2), rtol=1e-6)


def _cfg(**kw):
    from eqdisp.config import TransportConfig

    return TransportConfig(**kw)


@pytest.mark.parametrize(
    "kw, train, ode, sde_sigma, sde_sbdm, sde_none",
    [
        ({}, (0, 1), (0, 1), (0, 0.96), (0, 0.96), (0, 1)),
        ({"path": "GVP"}, (0, 1), (0, 1), (0, 0.96), (0, 0.96), (0, 1)),
        # SiT ignores given eps for velocity Linear/GVP in training and the ODE; eqdisp too.
        (
            {"train_eps": 0.1, "sample_eps": 0.01},
            (0, 1),
            (0, 1),
            (0, 0.96),
            (0.01, 0.96),
            (0, 0.99),
        ),
        (
            {"prediction": "noise"},
            (1e-3, 1 - 1e-3),
            (1e-3, 1 - 1e-3),
            (1e-3, 0.96),
            (1e-3, 0.96),
            (1e-3, 1 - 1e-3),
        ),
        (
            {"path": "GVP", "prediction": "score"},
            (1e-3, 1 - 1e-3),
            (1e-3, 1 - 1e-3),
            (1e-3, 0.96),
            (1e-3, 0.96),
            (1e-3, 1 - 1e-3),
        ),
        ({"path": "VP"}, (0, 1 - 1e-5), (0, 1 - 1e-3), (0, 0.96), (0, 0.96), (0, 1 - 1e-3)),
        (
            {"path": "VP", "prediction": "noise"},
            (0, 1 - 1e-5),
            (0, 1 - 1e-3),
            (0, 0.96),
            (0, 0.96),
            (0, 1 - 1e-3),
        ),
    ],
)
def test_intervals_reproduce_sit_table(kw, train, ode, sde_sigma, sde_sbdm, sde_none):
    from eqdisp.transport import make_transport, sample_interval, train_interval

    cfg = _cfg(**kw)

    def close(a, b):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)

    close(train_interval(cfg), train)
    close(sample_interval(cfg), ode)
    close(sample_interval(cfg, sde=True, diffusion_form="sigma", last_step_size=0.04), sde_sigma)
    close(sample_interval(cfg, sde=True, diffusion_form="SBDM", last_step_size=0.04), sde_sbdm)
    close(sample_interval(cfg, sde=True, last_step_size=0.0), sde_none)
    transport = make_transport(cfg)
    close(transport.train_interval, train)
    close(transport.sample_interval(sde=True, last_step_size=0.04), sde_sigma)


def test_eps_resolved_independently():
    from eqdisp.transport import resolve_eps

    # SiT's create_transport would set sample_eps to None here (its "None" bug).
    assert resolve_eps(_cfg(path="VP", train_eps=1e-4)) == (1e-4, 1e-3)
    assert resolve_eps(_cfg(prediction="score", train_eps=1e-2)) == (1e-2, 1e-3)
    assert resolve_eps(_cfg(prediction="score", sample_eps=1e-2)) == (1e-3, 1e-2)
    assert resolve_eps(_cfg()) == (0.0, 0.0)


def test_sample_time(getkey):
    from eqdisp.transport import make_transport, sample_time

    t = sample_time(getkey(), (1000,), (0.2, 0.7))
    assert t.shape == (1000,) and t.dtype == jnp.float32
    assert float(t.min()) >= 0.2 and float(t.max()) < 0.7
    assert abs(float(t.mean()) - 0.45) < 0.02  # 4.5 standard errors (0.144 / sqrt(1000))
    t = make_transport(_cfg(prediction="noise")).sample_train_time(getkey(), (5, 2))
    assert t.shape == (5, 2) and float(t.min()) >= 1e-3


@pytest.mark.parametrize("name", PATHS)
@pytest.mark.parametrize("prediction", ("velocity", "noise", "score"))
def test_model_velocity_and_score(name, prediction, getkey):
    from eqdisp.transport import make_transport

    transport = make_transport(_cfg(path=name, prediction=prediction))
    path = transport.path
    mu = jnp.asarray([0.5, -1.0], jnp.float32)
    s = jnp.asarray([0.3, 2.0], jnp.float32)
    x = jax.random.normal(getkey(), (2,))
    t = jnp.asarray(0.35, jnp.float32)
    score, noise, velocity = _gaussian_fields(path, mu, s, x, t)
    out = {"velocity": velocity, "noise": noise, "score": score}[prediction]
    tol = {"rtol": 1e-4, "atol": 1e-5}
    np.testing.assert_allclose(transport.model_velocity(out, x, t), velocity, **tol)
    np.testing.assert_allclose(transport.model_score(out, x, t), score, **tol)
    v, sc = transport.velocity_and_score(out, x, t)
    np.testing.assert_allclose(v, velocity, **tol)
    np.testing.assert_allclose(sc, score, **tol)


def test_make_path_rejects_unknown():
    from eqdisp.transport import make_path

    # The runtime type checker (tests) rejects it first; without it the ValueError names the field.
    with pytest.raises((ValueError, TypeError), match="cosine"):
        make_path("cosine")
