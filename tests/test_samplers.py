"""Tests of eqdisp.samplers: ODE/SDE solvers against the analytic Gaussian flow, CFG, step counting.

The analytic case: the Linear path between x0 ~ N(0, I) and x1 ~ N(mu, s^2 I) has marginals
x_t ~ N(t mu, (1-t)^2 + t^2 s^2) and the exact velocity
v(x, t) = mu + (t s^2 - (1 - t)) / ((1 - t)^2 + t^2 s^2) (x - t mu); its flow map at t = 1 is
x -> mu + s x.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

MU = (1.0, -0.5, 2.0, 0.0)
S = (0.5, 1.0, 1.5, 0.8)


def _exact_fields(path_name, mu, s, x, t):
    """Exact (velocity, noise, score) of the Gaussian case on any path."""
    from eqdisp.transport import make_path

    path = make_path(path_name)
    alpha, sigma = path.alpha(t), path.sigma(t)
    var = alpha**2 * s**2 + sigma**2
    r = x - alpha * mu
    data = mu + alpha * s**2 / var * r
    noise = sigma / var * r
    velocity = path.d_alpha(t) * data + path.d_sigma(t) * noise
    return velocity, noise, -r / var


class GaussianModel(eqx.Module):
    """A stand-in network for the Gaussian case: one example ``(c, h, w)``, label ignored."""

    mu: jax.Array
    s: jax.Array
    path: str = eqx.field(static=True, default="Linear")
    prediction: str = eqx.field(static=True, default="velocity")
    num_classes: int = eqx.field(static=True, default=10)

    def __call__(self, x, t, y, *, key=None):
        velocity, noise, score = _exact_fields(self.path, self.mu, self.s, x, t)
        return {"velocity": velocity, "noise": noise, "score": score}[self.prediction]


def _gaussian_model(**kw):
    mu = jnp.asarray(MU, jnp.float32).reshape(4, 1, 1)
    s = jnp.asarray(S, jnp.float32).reshape(4, 1, 1)
    return GaussianModel(mu, s, **kw)


def _linear_velocity(x, t):
    # Vector state (..., 4): the exact Linear-path velocity.
    mu, s = jnp.asarray(MU, jnp.float32), jnp.asarray(S, jnp.float32)
    var = (1 - t) ** 2 + t**2 * s**2
    return mu + (t * s**2 - (1 - t)) / var * (x - t * mu)


# The flow map is affine, so pushing the points 0 and 1 gives it exactly: x1(0) = mu, x1(1) = mu + s.
_X0 = jnp.stack([jnp.zeros(4, jnp.float32), jnp.ones(4, jnp.float32)])
_EXPECTED = np.stack([np.array(MU), np.array(MU) + np.array(S)])


def _flow_error(method, steps):
    from eqdisp.samplers import integrate_ode

    x1 = integrate_ode(_linear_velocity, _X0, t0=0.0, t1=1.0, steps=steps, method=method)
    return float(np.max(np.abs(np.asarray(x1) - _EXPECTED)))


def test_heun_50_steps_recovers_gaussian():
    assert _flow_error("heun", 50) < 1e-2


def test_dopri5_recovers_gaussian():
    from eqdisp.samplers import solve_ode

    x1, stats = solve_ode(
        _linear_velocity, _X0, t0=0.0, t1=1.0, steps=50, method="dopri5", rtol=1e-6, atol=1e-7
    )
    np.testing.assert_allclose(x1, _EXPECTED, atol=1e-4)
    assert int(stats.num_steps) >= int(stats.num_accepted_steps) > 0


@pytest.mark.parametrize("method, order", [("euler", 1), ("heun", 2)])
def test_convergence_order(method, order):
    # steps counts grid points: 1 + n points = n steps. Doubling n divides the error by 2^order.
    errors = [_flow_error(method, 1 + n) for n in (16, 32, 64)]
    ratios = [errors[i] / errors[i + 1] for i in range(2)]
    for r in ratios:
        assert 2**order * 0.85 < r < 2**order * 1.15, (errors, ratios)


def test_step_counting_and_grid():
    from eqdisp.samplers import solve_ode

    # Heun (trapezoid) is exact for v = t: x(t1) = x(t0) + (t1^2 - t0^2) / 2.
    x1, stats = solve_ode(lambda x, t: jnp.ones_like(x) * t, jnp.zeros(()), t0=0.2, t1=0.9, steps=8)
    np.testing.assert_allclose(x1, (0.9**2 - 0.2**2) / 2, rtol=1e-6)
    assert (int(stats.num_steps), int(stats.nfe)) == (7, 14)  # SiT: N points, N-1 steps, 2(N-1) NFE
    _, stats = solve_ode(lambda x, t: x, jnp.zeros(()), t0=0.0, t1=1.0, steps=250, method="euler")
    assert (int(stats.num_steps), int(stats.nfe)) == (249, 249)


def test_dopri5_nfe_count():
    from eqdisp.samplers import solve_ode

    calls = []

    def v(x, t):
        jax.debug.callback(lambda: calls.append(1), ordered=True)
        return -x * jnp.cos(3 * t) + jnp.sin(t)

    _, stats = solve_ode(v, jnp.ones(3), t0=0.0, t1=5.0, steps=2, method="dopri5")
    jax.effects_barrier()
    assert int(stats.nfe) == len(calls)


def test_pytree_state():
    from eqdisp.samplers import integrate_ode

    x0 = {"a": jnp.ones(2, jnp.float32), "b": jnp.zeros((), jnp.float32)}

    def v(x, t):
        return {"a": -x["a"], "b": jnp.ones_like(x["b"])}

    for method in ("heun", "dopri5"):
        x1 = integrate_ode(v, x0, t0=0.0, t1=1.0, steps=101, method=method, rtol=1e-6)
        np.testing.assert_allclose(x1["a"], np.exp(-1.0), rtol=1e-4)
        np.testing.assert_allclose(x1["b"], 1.0, rtol=1e-5)


def test_integrate_ode_compiles_once():
    from eqdisp.samplers import integrate_ode

    traces = []

    def v(x, t):
        traces.append(1)
        return -x

    integrate_ode(v, jnp.ones(3), t0=0.0, t1=1.0, steps=10)
    n = len(traces)
    assert n == 2  # one scan body, two stages
    integrate_ode(v, 2 * jnp.ones(3), t0=0.0, t1=1.0, steps=10)
    assert len(traces) == n


# ----------------------------------------------------------------------------------------------
# The entry point and the SDE


def _sample(model, x, config, transport_cfg=None, key=None, y=None):
    from eqdisp.config import TransportConfig
    from eqdisp.samplers import sample
    from eqdisp.transport import make_transport

    transport = make_transport(transport_cfg or TransportConfig())
    y = jnp.zeros(x.shape[0], jnp.int32) if y is None else y
    key = jax.random.key(0) if key is None else key
    return sample(model, x, y, key=key, transport=transport, config=config)


@pytest.mark.parametrize(
    "path, prediction", [("Linear", "velocity"), ("GVP", "noise"), ("VP", "score")]
)
def test_sample_ode_with_prediction_conversions(path, prediction):
    from eqdisp.config import SamplerConfig, TransportConfig
    from eqdisp.transport import make_transport

    tcfg = TransportConfig(path=path, prediction=prediction)
    model = _gaussian_model(path=path, prediction=prediction)
    t0, t1 = make_transport(tcfg).sample_interval()
    p = make_transport(tcfg).path
    mu, s = np.array(MU), np.array(S)

    def moments(t):  # mean and std of x_t
        a, sg = float(p.alpha(t)), float(p.sigma(t))
        return a * mu, np.sqrt(a**2 * s**2 + sg**2)

    x = jnp.asarray([[0.0] * 4, [1.0] * 4], jnp.float32).reshape(2, 4, 1, 1)
    config = SamplerConfig(ode_method="dopri5", rtol=1e-6, atol=1e-7)
    out = np.asarray(_sample(model, x, config, tcfg)).reshape(2, 4)
    (m0, c0), (m1, c1) = moments(t0), moments(t1)
    expected = m1 + c1 / c0 * (np.array([[0.0] * 4, [1.0] * 4]) - m0)
    np.testing.assert_allclose(out, expected, atol=2e-4)


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_sde_recovers_gaussian(method, getkey):
    from eqdisp.config import SamplerConfig

    # 20000 samples per dimension: standard errors s/sqrt(N) for the mean and s/sqrt(2N) for the std.
    # Tolerance: 4 standard errors plus 0.01 for the bias of 249 steps and the noise-free "Mean" last
    # step (measured with 2e5 samples: |mean bias| < 2e-3, std bias -0.002 to -0.0073).
    n = 20_000
    x = jax.random.normal(getkey(), (n, 4, 1, 1))
    config = SamplerConfig(
        mode="sde", sde_method=method, steps=250, diffusion_form="sigma", last_step="Mean"
    )
    out = np.asarray(_sample(_gaussian_model(), x, config, key=getkey())).reshape(n, 4)
    mu, s = np.array(MU), np.array(S)
    assert np.all(np.abs(out.mean(0) - mu) < 4 * s / np.sqrt(n) + 0.01), out.mean(0) - mu
    assert np.all(np.abs(out.std(0) - s) < 4 * s / np.sqrt(2 * n) + 0.01), out.std(0) - s


def test_sde_is_deterministic_given_key_and_uses_noise(getkey):
    from eqdisp.config import SamplerConfig

    x = jax.random.normal(getkey(), (8, 4, 1, 1))
    config = SamplerConfig(mode="sde", steps=20)
    a = _sample(_gaussian_model(), x, config, key=jax.random.key(1))
    b = _sample(_gaussian_model(), x, config, key=jax.random.key(1))
    c = _sample(_gaussian_model(), x, config, key=jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


class CountingModel(eqx.Module):
    """Counts its calls while being traced (a Python side effect: runs once per trace, not per step)."""

    mu: jax.Array
    num_classes: int = eqx.field(static=True, default=10)

    def __call__(self, x, t, y, *, key=None):
        _TRACE_CALLS.append(1)
        return self.mu - x


_TRACE_CALLS: list[int] = []


@pytest.mark.parametrize(
    "kw, calls_per_trace",
    [
        ({"mode": "ode"}, 2),  # Heun: two stages in the scan body
        ({"mode": "sde", "sde_method": "euler"}, 2),  # one drift in the body, one in the last step
        ({"mode": "sde", "sde_method": "heun"}, 3),  # SiT would call the model 4 and 6 times
    ],
)
def test_sample_compiles_once_and_calls_model_once_per_drift(kw, calls_per_trace, getkey):
    from eqdisp.config import SamplerConfig

    model = CountingModel(jnp.zeros((4, 1, 1), jnp.float32))
    config = SamplerConfig(steps=10, **kw)
    _TRACE_CALLS.clear()
    _sample(model, jax.random.normal(getkey(), (3, 4, 1, 1)), config)
    assert len(_TRACE_CALLS) == calls_per_trace
    model2 = CountingModel(jnp.ones((4, 1, 1), jnp.float32))  # new values, same structure
    _sample(model2, jax.random.normal(getkey(), (3, 4, 1, 1)), config, key=getkey())
    assert len(_TRACE_CALLS) == calls_per_trace


# ----------------------------------------------------------------------------------------------
# Last steps, on a linear drift


@pytest.mark.parametrize("last_step", ["none", "Mean", "Euler", "Tweedie"])
def test_last_step_formulas(last_step, getkey):
    from eqdisp.samplers import integrate_sde
    from eqdisp.transport import LinearPath

    path = LinearPath()
    a, b = 0.5, -2.0

    def velocity_and_score(x, t):
        return (a + t) * x, b * x

    # "increasing-decreasing" has w(0) = sin(0)^2 = 0, so the one stochastic step (at t0 = 0, dt = t1)
    # is the deterministic x + v(x, 0) dt; what follows is the last step alone.
    t1, h = 0.96, 0.04
    x0 = jax.random.normal(getkey(), (5,))
    out = integrate_sde(
        velocity_and_score,
        x0,
        key=getkey(),
        path=path,
        t0=0.0,
        t1=t1,
        steps=2,
        diffusion_form="increasing-decreasing",
        diffusion_norm=1.0,
        last_step=last_step,
        last_step_size=h,
    )
    x = x0 + a * x0 * np.float32(t1)
    w = np.sin(np.pi * t1) ** 2
    expected = {
        "none": x,
        "Mean": x + ((a + t1) * x + w * b * x) * h,
        "Euler": x + (a + t1) * x * h,
        "Tweedie": x / t1 + (1 - t1) ** 2 / t1 * b * x,
    }[last_step]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_diffusion_forms():
    from eqdisp.samplers import diffusion_coefficient
    from eqdisp.transport import LinearPath, VPPath

    t, n = 0.3, 2.0
    expected = {
        "constant": n,
        "SBDM": n * 0.7 / 0.3,
        "sigma": n * 0.7,
        "linear": n * 0.7,
        "decreasing": 0.25 * (n * np.cos(np.pi * t) + 1) ** 2,
        "increasing-decreasing": n * np.sin(np.pi * t) ** 2,
    }
    for form, value in expected.items():
        np.testing.assert_allclose(
            diffusion_coefficient(LinearPath(), form, t, norm=n), value, rtol=1e-6
        )
    beta = 0.1 + 0.7 * 19.9
    np.testing.assert_allclose(diffusion_coefficient(VPPath(), "SBDM", t), beta / 2, rtol=1e-6)


def test_sbdm_singular_raises_one_line(getkey):
    from eqdisp.config import ConfigError, SamplerConfig, TransportConfig

    x = jax.random.normal(getkey(), (2, 4, 1, 1))
    config = SamplerConfig(mode="sde", diffusion_form="SBDM", steps=10)
    with pytest.raises(ConfigError, match="SBDM") as info:
        _sample(_gaussian_model(), x, config)
    assert "\n" not in str(info.value)
    # With an explicit sample_eps the SDE starts away from the singularity and works.
    out = _sample(_gaussian_model(), x, config, TransportConfig(sample_eps=0.01))
    assert np.all(np.isfinite(out))


def test_score_singular_at_t1_raises(getkey):
    from eqdisp.config import ConfigError, SamplerConfig

    # Velocity/Linear without a last step ends at t = 1, where the score is 0/0; Heun evaluates it there.
    x = jax.random.normal(getkey(), (2, 4, 1, 1))
    config = SamplerConfig(mode="sde", sde_method="heun", last_step="none", steps=10)
    with pytest.raises(ConfigError, match="singular at t=1.0"):
        _sample(_gaussian_model(), x, config)
    # Euler-Maruyama never evaluates t1 without a last step.
    out = _sample(_gaussian_model(), x, SamplerConfig(mode="sde", last_step="none", steps=10))
    assert np.all(np.isfinite(out))


# ----------------------------------------------------------------------------------------------
# Classifier-free guidance


class LabelModel(eqx.Module):
    """Output depends on x, t and the label; the null label is ``num_classes``."""

    w: jax.Array
    num_classes: int = eqx.field(static=True, default=10)

    def __call__(self, x, t, y, *, key=None):
        scale = (y + 1).astype(jnp.float32) * self.w
        return jnp.tanh(x) * scale + t


def _cfg_inputs(getkey):
    model = LabelModel(jnp.linspace(0.5, 2.0, 5, dtype=jnp.float32).reshape(5, 1, 1))
    x = jax.random.normal(getkey(), (3, 5, 2, 2))
    y = jnp.asarray([0, 4, 7], jnp.int32)
    cond = jax.vmap(lambda xi, yi: model(xi, 0.5, yi))(x, y)
    uncond = jax.vmap(lambda xi: model(xi, 0.5, jnp.asarray(10)))(x)
    return model, x, y, cond, uncond


def test_cfg_scale_one_is_conditional(getkey):
    from eqdisp.samplers import cfg_velocity

    model, x, y, cond, _ = _cfg_inputs(getkey)
    out = cfg_velocity(model, x, 0.5, y, scale=1.0, null_label=10, channels=3, interval=(0.3, 1.0))
    np.testing.assert_array_equal(out, cond)


@pytest.mark.parametrize("channels", [None, 3])
def test_cfg_channels(channels, getkey):
    from eqdisp.samplers import cfg_velocity

    model, x, y, cond, uncond = _cfg_inputs(getkey)
    out = cfg_velocity(model, x, 0.5, y, scale=1.5, null_label=10, channels=channels)
    guided = uncond + 1.5 * (cond - uncond)
    k = 5 if channels is None else channels
    np.testing.assert_allclose(out[:, :k], guided[:, :k], rtol=1e-6)
    np.testing.assert_array_equal(out[:, k:], cond[:, k:])
    assert not np.allclose(out[:, :k], cond[:, :k])


def test_cfg_interval(getkey):
    from eqdisp.samplers import cfg_velocity

    model, x, y, _, _ = _cfg_inputs(getkey)

    @jax.jit
    def run(t):
        return cfg_velocity(model, x, t, y, scale=4.0, null_label=10, interval=(0.3, 1.0))

    conditional = jax.vmap(model, in_axes=(0, None, 0))
    for t, inside in [(0.1, False), (0.29, False), (0.3, True), (0.8, True), (1.0, True)]:
        t = jnp.asarray(t, jnp.float32)
        cond = conditional(x, t, y)
        out = run(t)
        if inside:
            assert not np.allclose(out, cond, atol=1e-2)
        else:  # equal up to jit-versus-eager rounding of tanh
            np.testing.assert_allclose(out, cond, rtol=1e-6, atol=1e-6)


def test_sample_with_cfg_uses_null_label_from_model(getkey):
    from eqdisp.config import SamplerConfig

    model, x, y, _, _ = _cfg_inputs(getkey)
    plain = _sample(model, x, SamplerConfig(steps=5), y=y)
    guided = _sample(model, x, SamplerConfig(steps=5, cfg_scale=2.0, cfg_channels=3), y=y)
    assert np.all(np.isfinite(guided))
    # The stand-in is channel-wise, so unguided channels follow the conditional trajectory.
    np.testing.assert_allclose(guided[:, 3:], plain[:, 3:], rtol=1e-6)
    assert not np.allclose(guided[:, :3], plain[:, :3])


def test_cfg_with_a_real_model(getkey):
    """On a SiT model: scale 1 is the conditional model; guidance mixes cond and null as stated."""
    import eqdisp
    from eqdisp.samplers import cfg_velocity

    model = eqdisp.make_model("SiT-T/2", input_size=8, in_channels=4, num_classes=10, key=getkey())
    leaves, tree = jax.tree.flatten(eqx.filter(model, eqx.is_inexact_array))
    keys = jax.random.split(getkey(), len(leaves))
    leaves = [leaf + 0.05 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys)]
    model = eqx.combine(jax.tree.unflatten(tree, leaves), model)  # off the zero init
    x = jax.random.normal(getkey(), (4, 4, 8, 8))
    y = jnp.array([0, 3, 5, 9])
    t = jnp.asarray(0.3)
    cond = jax.vmap(lambda xi, yi: model(xi, t, yi))(x, y)
    uncond = jax.vmap(lambda xi: model(xi, t, jnp.asarray(10)))(x)
    one = cfg_velocity(model, x, t, y, scale=1.0, null_label=10)
    assert jnp.array_equal(one, cond)
    guided = cfg_velocity(model, x, t, y, scale=4.0, null_label=10, channels=3)
    assert jnp.allclose(guided[:, :3], uncond[:, :3] + 4.0 * (cond[:, :3] - uncond[:, :3]), atol=1e-5)
    # The doubled batch may block its matmuls differently: equal up to float rounding.
    assert jnp.allclose(guided[:, 3:], cond[:, 3:], atol=1e-5)
    assert not jnp.allclose(guided[:, :3], cond[:, :3])
