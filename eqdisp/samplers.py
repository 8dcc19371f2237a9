"""Samplers of SiT's transports: probability-flow ODE, reverse SDE, classifier-free guidance.

Time runs forward from noise (``t0``) to data (``t1``); the convention is written down once, in
:mod:`eqdisp.transport`. Step counting is SiT's (``transport/transport.py``, ``Sampler.sample_ode``
and ``Sampler.sample_sde``): ``steps`` counts the points of the float32 grid
``linspace(t0, t1, steps)``, so the ODE takes ``steps - 1`` steps (Heun: ``2 (steps - 1)`` network
evaluations) and the SDE ``steps - 1`` stochastic steps plus one last deterministic step.

Every sampler is one compiled program. Fixed grids (Euler, Heun, the SDE) are a ``lax.scan``; the
adaptive ODE solver is diffrax's ``Dopri5``. Why not diffrax's ``Heun`` with ``StepTo`` for the
fixed grids too: measured on a 2-core CPU (Heun, 250 grid points, a 3-layer width-256 MLP velocity
on a 256 x 16 batch), the scan compiled and ran the first time in 0.4-0.5 s against 1.3-1.5 s,
then ran in 208 ms against 302 ms (diffrax also computes an error estimate and does bookkeeping),
with results equal to 2e-7; and the scan states SiT's grid semantics directly.

Networks follow the library's model convention, ``model(x, t, y, *, key=None)`` on one example;
samplers vmap it over the batch. The lower-level integrators take plain functions ``f(x, t)`` of the
whole state and a scalar ``t``.
"""

import functools
import math
from collections.abc import Callable
from typing import Any, Literal

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray, PyTree, Real

from .config import ConfigError, DiffusionForm, LastStep, SamplerConfig, TimeGrid
from .transport import AbstractPath, GVPPath, LinearPath, Transport

VelocityFn = Callable[[Any, Float[Array, ""]], Any]
"""``v(x, t) -> dx/dt``: ``x`` an array or PyTree, ``t`` a scalar float32 time."""

VelocityScoreFn = Callable[[Float[Array, "*x"], Float[Array, ""]], tuple[Array, Array]]
"""``f(x, t) -> (velocity, score)``, both from one network evaluation."""


# ----------------------------------------------------------------------------------------------
# ODE


class OdeStats(eqx.Module):
    """What an ODE solve cost.

    - `num_steps`: steps attempted (fixed grids: ``steps - 1``; dopri5: accepted + rejected).
    - `num_accepted_steps`: steps accepted.
    - `nfe`: evaluations of the velocity. Exact for ``euler``/``heun``; for ``dopri5`` it is
      ``6 num_steps + 1`` (six new stages per attempted step, first-same-as-last, plus one initial
      evaluation; counted with a callback on diffrax 0.7, see the tests). It will not match
      torchdiffeq's count, whose error norm and initial step differ.
    """

    num_steps: Int[Array, ""]
    num_accepted_steps: Int[Array, ""]
    nfe: Int[Array, ""]


EDM_SIGMAS: tuple[float, float, float] = (0.002, 80.0, 7.0)
"""``(sigma_min, sigma_max, rho)`` of the EDM grid (Karras et al. 2022; flow_matching's
``edm_time_discretization.py``)."""


def edm_time_grid(steps: int) -> Float[np.ndarray, " steps"]:
    """The EDM grid as times of the Linear path (flow_matching's ``get_time_discretization``).

    ``steps - 1`` noise levels ``sigma_i = (a + i / (steps - 2) (b - a))^rho`` with
    ``a = sigma_max^(1/rho)``, ``b = sigma_min^(1/rho)``, then ``sigma = 0``; each becomes the
    time ``t = 1 / (1 + sigma)`` where the path's ``sigma_t / alpha_t = (1 - t) / t`` equals it.
    Computed in float64, returned as float32: from ``1/81`` to ``1/1.002``, then ``1``.
    """
    if steps < 3:
        raise ConfigError(
            f"steps={steps!r} is not allowed: expected an int >= 3 for the edm grid (grid points)"
        )
    sigma_min, sigma_max, rho = EDM_SIGMAS
    i = np.arange(steps - 1, dtype=np.float64)
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = np.append((a + i / (steps - 2) * (b - a)) ** rho, 0.0)
    return (1.0 - np.clip(sigmas / (1.0 + sigmas), 0.0, 1.0)).astype(np.float32)


def _grid(
    t0: float, t1: float, steps: int, kind: TimeGrid = "uniform"
) -> Float[Array, " steps"]:
    if steps < 2:
        raise ConfigError(f"steps={steps!r} is not allowed: expected an int >= 2 (grid points)")
    if kind == "uniform":
        return jnp.linspace(t0, t1, steps, dtype=jnp.float32)
    if kind != "edm":
        raise ConfigError(
            f"sampler.time_grid={kind!r} is not allowed: expected 'uniform' or 'edm'"
        )
    ts = edm_time_grid(steps)
    if not (t0 <= ts[0] and ts[-1] <= t1):
        raise ConfigError(
            f"the edm grid [{ts[0]:g}, {ts[-1]:g}] is not allowed on the interval ({t0}, {t1}): "
            "expected an interval that contains it"
        )
    return jnp.asarray(ts)


def _add(x, h, k):
    """``x + h * k`` on PyTrees (keeps each leaf's dtype; ``h`` is a float32 scalar)."""
    return jtu.tree_map(lambda a, b: a + (h * b).astype(a.dtype), x, k)


def _check_ode_args(method: str, t0: float, t1: float) -> None:
    if method not in ("euler", "heun", "dopri5"):
        raise ConfigError(
            f"sampler.ode_method={method!r} is not allowed: expected 'euler', 'heun' or 'dopri5'"
        )
    if not t0 < t1:
        raise ConfigError(f"ODE interval ({t0}, {t1}) is not allowed: expected t0 < t1")


@eqx.filter_jit
def solve_ode(
    v: VelocityFn,
    x0: PyTree[Float[Array, "..."]],
    *,
    t0: float,
    t1: float,
    steps: int,
    method: Literal["euler", "heun", "dopri5"] = "heun",
    atol: float = 1e-6,
    rtol: float = 1e-3,
    max_steps: int = 4096,
    grid: TimeGrid = "uniform",
) -> tuple[PyTree[Float[Array, "..."]], OdeStats]:
    """Like :func:`integrate_ode`, and also returns what the solve cost as an :class:`OdeStats`."""
    _check_ode_args(method, t0, t1)
    if method == "dopri5":
        term = diffrax.ODETerm(lambda t, x, args: v(x, t))
        sol = diffrax.diffeqsolve(
            term,
            diffrax.Dopri5(),
            t0,
            t1,
            dt0=None,
            y0=x0,
            stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
            saveat=diffrax.SaveAt(t1=True),
            max_steps=max_steps,
        )
        x1 = jtu.tree_map(lambda a: a[-1], sol.ys)
        num_steps = jnp.asarray(sol.stats["num_steps"], jnp.int32)
        accepted = jnp.asarray(sol.stats["num_accepted_steps"], jnp.int32)
        return x1, OdeStats(num_steps, accepted, 6 * num_steps + 1)

    # Fixed grid: step through the grid points themselves, as torchdiffeq's fixed-grid solvers do
    # (h = t_{i+1} - t_i of the float32 linspace; the second Heun stage is evaluated at t_{i+1}).
    ts = _grid(t0, t1, steps, grid)

    def euler_step(x, t_pair):
        t_a, t_b = t_pair
        return _add(x, t_b - t_a, v(x, t_a)), None

    def heun_step(x, t_pair):
        # Explicit trapezoid (torchdiffeq's heun2): k1 = f(t, x), k2 = f(t + h, x + h k1).
        t_a, t_b = t_pair
        h = t_b - t_a
        k1 = v(x, t_a)
        k2 = v(_add(x, h, k1), t_b)
        return _add(x, h / 2, jtu.tree_map(lambda a, b: a + b, k1, k2)), None

    step = heun_step if method == "heun" else euler_step
    x1, _ = jax.lax.scan(step, x0, (ts[:-1], ts[1:]))
    n = jnp.asarray(steps - 1, jnp.int32)
    return x1, OdeStats(n, n, n * (2 if method == "heun" else 1))


def integrate_ode(
    v: VelocityFn,
    x0: PyTree[Float[Array, "..."]],
    *,
    t0: float,
    t1: float,
    steps: int,
    method: Literal["euler", "heun", "dopri5"] = "heun",
    atol: float = 1e-6,
    rtol: float = 1e-3,
    max_steps: int = 4096,
    grid: TimeGrid = "uniform",
) -> PyTree[Float[Array, "..."]]:
    """Integrate ``dx/dt = v(x, t)`` from ``t0`` to ``t1`` and return ``x(t1)``.

    **Arguments:**

    - `v`: the velocity, a function of the state (array or PyTree) and a scalar float32 time. Pass
      the same function object each time (or an ``eqx.Module``/``eqx.Partial``) to reuse the
      compilation.
    - `x0`: the state at ``t0``.
    - `t0`, `t1`: the interval, ``t0 < t1`` (from :func:`eqdisp.transport.sample_interval`).
    - `steps`: grid points of the float32 ``linspace(t0, t1, steps)`` (SiT's counting): ``euler``
      and ``heun`` take ``steps - 1`` steps through those points (``heun``: ``2 (steps - 1)``
      evaluations). Ignored by ``dopri5``.
    - `method`: ``euler``, ``heun`` (explicit trapezoid, second order) or ``dopri5`` (adaptive,
      diffrax ``Dopri5`` with ``PIDController(rtol, atol)`` and diffrax's initial step).
    - `atol`, `rtol`: tolerances of ``dopri5``.
    - `max_steps`: the most steps ``dopri5`` may take before it raises.
    - `grid`: the points of ``euler`` and ``heun``: ``uniform`` (the ``linspace`` above) or
      ``edm`` (:func:`edm_time_grid` of ``steps`` points, which ``[t0, t1]`` must contain).

    **Returns:**

    ``x(t1)``, with the structure of ``x0``. :func:`solve_ode` also returns the step and evaluation
    counts.
    """
    return solve_ode(
        v,
        x0,
        t0=t0,
        t1=t1,
        steps=steps,
        method=method,
        atol=atol,
        rtol=rtol,
        max_steps=max_steps,
        grid=grid,
    )[0]


# ----------------------------------------------------------------------------------------------
# SDE


def diffusion_coefficient(
    path: AbstractPath, form: DiffusionForm, t: Real[ArrayLike, ""], *, norm: float = 1.0
) -> Float[Array, ""]:
    """SiT's diffusion coefficient ``w(t)`` (``--diffusion-form``, ``norm``: ``--diffusion-norm``).

    ``constant``: n; ``SBDM``: n w_sb(t) (infinite at t = 0 on Linear/GVP); ``sigma``: n sigma_t
    (SiT's CLI default); ``linear``: n (1 - t); ``decreasing``: (n cos(pi t) + 1)^2 / 4;
    ``increasing-decreasing``: n sin^2(pi t) (SiT misspells this key, so it raises there).
    """
    t = jnp.asarray(t, jnp.float32)
    if form == "constant":
        return jnp.full_like(t, norm)
    if form == "SBDM":
        return norm * path.w_sb(t)
    if form == "sigma":
        return norm * path.sigma(t)
    if form == "linear":
        return norm * (1 - t)
    if form == "decreasing":
        return 0.25 * (norm * jnp.cos(math.pi * t) + 1) ** 2
    if form == "increasing-decreasing":
        return norm * jnp.sin(math.pi * t) ** 2
    raise ConfigError(
        f"sampler.diffusion_form={form!r} is not allowed: expected one of 'constant', 'SBDM', "
        "'sigma', 'linear', 'decreasing', 'increasing-decreasing'"
    )


def _check_sde_args(method, last_step, t0, t1, last_step_size) -> None:
    if method not in ("euler", "heun"):
        raise ConfigError(
            f"sampler.sde_method={method!r} is not allowed: expected 'euler' or 'heun'"
        )
    if last_step not in ("none", "Mean", "Tweedie", "Euler"):
        raise ConfigError(
            f"sampler.last_step={last_step!r} is not allowed: "
            "expected one of 'none', 'Mean', 'Tweedie', 'Euler'"
        )
    if not t0 < t1:
        raise ConfigError(f"SDE interval ({t0}, {t1}) is not allowed: expected t0 < t1")
    if last_step != "none" and not last_step_size > 0:
        raise ConfigError(
            f"sampler.last_step_size={last_step_size!r} is not allowed: "
            f"expected > 0 with last_step={last_step!r}"
        )


def _check_diffusion_finite(path, form, norm, times) -> None:
    for t in times:
        with jax.ensure_compile_time_eval():
            w = diffusion_coefficient(path, form, t, norm=norm)
            finite = bool(jnp.isfinite(w))
        if not finite:
            hint = ""
            if form == "SBDM" and isinstance(path, (LinearPath, GVPPath)):
                hint = (
                    f": SBDM is singular at t=0 on the {type(path).__name__} and SiT's sample_eps "
                    "is 0 for velocity models; set transport.sample_eps > 0 or use another form"
                )
            raise ConfigError(f"sampler.diffusion_form={form!r} gives w(t={t}) = {float(w)}{hint}")


@eqx.filter_jit
def integrate_sde(
    velocity_and_score: VelocityScoreFn,
    x0: Float[Array, "*x"],
    *,
    key: PRNGKeyArray,
    path: AbstractPath,
    t0: float,
    t1: float,
    steps: int,
    method: Literal["euler", "heun"] = "euler",
    diffusion_form: DiffusionForm = "sigma",
    diffusion_norm: float = 1.0,
    last_step: LastStep = "Mean",
    last_step_size: float = 0.04,
) -> Float[Array, "*x"]:
    """Simulate SiT's SDE ``dx = [v + w s] dt + sqrt(2 w) dW`` forward from ``t0`` to ``t1``.

    **Arguments:**

    - `velocity_and_score`: ``f(x, t) -> (v, s)``, the velocity and score of the whole state from
      one network evaluation (:meth:`eqdisp.transport.Transport.velocity_and_score`).
    - `x0`: the state at ``t0`` (Gaussian noise).
    - `key`: the PRNG key of the Brownian increments.
    - `path`: the interpolant (for ``w(t)`` and the Tweedie step).
    - `t0`, `t1`: the interval, from ``Transport.sample_interval(sde=True, ...)``; ``t1 = 1 -
      last_step_size`` with a last step.
    - `steps`: grid points of the float32 ``linspace(t0, t1, steps)``; ``steps - 1`` stochastic
      steps over ``t[:-1]`` with the constant ``dt = t[1] - t[0]`` (as SiT).
    - `method`: ``euler`` (Euler-Maruyama: ``x <- x + f(x, t) dt + sqrt(2 w(t) dt) eps``) or
      ``heun`` (SiT's stochastic Heun: ``x^ = x + sqrt(2 w(t) dt) eps``, ``K1 = f(x^, t)``,
      ``K2 = f(x^ + dt K1, t + dt)``, ``x <- x^ + dt (K1 + K2) / 2``).
    - `diffusion_form`, `diffusion_norm`: ``w(t)``, see :func:`diffusion_coefficient`.
    - `last_step`: the deterministic step at ``t1`` with size ``h = last_step_size``: ``Mean``
      (``x + f(x, t1) h``), ``Euler`` (``x + v(x, t1) h``), ``Tweedie``
      (``x / alpha + sigma^2 / alpha * s(x, t1)``, ``h`` unused) or ``none`` (identity; the interval
      should then end at ``1 - sample_eps``).

    **Returns:**

    The final state, shaped like `x0`.

    The drift ``f = v + w s`` uses one network evaluation (SiT evaluates it twice). Raises
    ``ConfigError`` if ``w`` is not finite where it is used (``SBDM`` at
    ``t = 0``).
    """
    _check_sde_args(method, last_step, t0, t1, last_step_size)
    ts = _grid(t0, t1, steps)
    dt = ts[1] - ts[0]
    needs_t1 = method == "heun" or last_step == "Mean"
    _check_diffusion_finite(path, diffusion_form, diffusion_norm, (t0, t1) if needs_t1 else (t0,))

    def w(t):
        return diffusion_coefficient(path, diffusion_form, t, norm=diffusion_norm)

    def drift(x, t):
        v, s = velocity_and_score(x, t)
        return v + w(t) * s

    def em_step(x, inputs):
        t, step_key = inputs
        eps = jax.random.normal(step_key, x.shape, x.dtype)
        mean = x + drift(x, t) * dt
        return mean + jnp.sqrt(2 * w(t)) * jnp.sqrt(dt) * eps, None

    def heun_step(x, inputs):
        t, step_key = inputs
        eps = jax.random.normal(step_key, x.shape, x.dtype)
        x_hat = x + jnp.sqrt(2 * w(t)) * jnp.sqrt(dt) * eps
        k1 = drift(x_hat, t)
        k2 = drift(x_hat + dt * k1, t + dt)
        return x_hat + 0.5 * dt * (k1 + k2), None

    step = heun_step if method == "heun" else em_step
    keys = jax.random.split(key, steps - 1)
    x, _ = jax.lax.scan(step, x0, (ts[:-1], keys))

    # SiT evaluates the last step at t1 itself, not at the float32 grid's last point.
    t_last = jnp.asarray(t1, jnp.float32)
    h = last_step_size
    if last_step == "Mean":
        return x + drift(x, t_last) * h
    if last_step == "Euler":
        return x + velocity_and_score(x, t_last)[0] * h
    if last_step == "Tweedie":
        alpha, sigma = path.alpha(t_last), path.sigma(t_last)
        return x / alpha + sigma**2 / alpha * velocity_and_score(x, t_last)[1]
    return x


# ----------------------------------------------------------------------------------------------
# Classifier-free guidance


def cfg_velocity(
    model: Callable[..., Float[Array, "c h w"]],
    x: Float[Array, "batch c h w"],
    t: Real[ArrayLike, ""],
    y: Int[Array, " batch"],
    *,
    scale: float,
    null_label: int,
    channels: int | None = None,
    interval: tuple[float, float] = (0.0, 1.0),
) -> Float[Array, "batch c h w"]:
    """The classifier-free-guided network output of a batch at one time ``t``.

    ``g = u + scale (c - u)``, with ``c = model(x, t, y)`` and ``u = model(x, t, null_label)``
    evaluated together as one doubled batch (DiT/SiT's ``forward_with_cfg``). For a velocity model
    this is the guided velocity; for noise/score models it guides that output (the conversions to a
    velocity are affine, so this equals guiding the velocity).

    **Arguments:**

    - `model`: ``model(x, t, y, *, key=None)`` on one example.
    - `x`, `t`, `y`: the batch, the (shared) time and the labels.
    - `scale`: the guidance scale; exactly 1 runs only the conditional model (no doubled batch).
    - `null_label`: the unconditional label (``num_classes``).
    - `channels`: guide only channels ``[:channels]``; the others keep the conditional output. ``3``
      reproduces DiT/SiT (a GLIDE leftover there; of their two halves eqdisp keeps the conditional
      one, so the other channels are the conditional output), ``None`` guides all (REPA).
    - `interval`: guide only when ``low <= t <= high`` in eqdisp time (t = 1 is data); elsewhere the
      plain conditional forward runs. REPA's ``guidance_high = 0.7`` (REPA time, 1 = noise) is
      ``(0.3, 1.0)``.

    **Returns:**

    The (guided) output for the batch.

    The interval test is a ``lax.cond`` on the batch's single ``t``, outside the per-example vmap,
    so the unguided branch really skips the unconditional half (a cond inside a vmap becomes a
    select and runs both). Each evaluation decides at its own ``t``; REPA's Heun corrector decides
    at the step's start.
    """

    t = jnp.asarray(t, jnp.float32)

    def forward(x_b, y_b):
        return jax.vmap(lambda xi, yi: model(xi, t, yi))(x_b, y_b)

    if scale == 1.0:
        return forward(x, y)

    def guided(x):
        null = jnp.full_like(y, null_label)
        out = forward(jnp.concatenate([x, x]), jnp.concatenate([y, null]))
        cond, uncond = jnp.split(out, 2)
        g = uncond + scale * (cond - uncond)
        if channels is None:
            return g
        return jnp.concatenate([g[:, :channels], cond[:, channels:]], axis=1)

    low, high = interval
    if low <= 0.0 and high >= 1.0:
        return guided(x)
    return jax.lax.cond((t >= low) & (t <= high), guided, lambda x: forward(x, y), x)


# ----------------------------------------------------------------------------------------------
# The entry point


def _check_conversions_finite(transport: Transport, times: tuple[float, ...], sde: bool) -> None:
    # The prediction-type conversions are affine in (out, x); probe them at the end points.
    for t in times:
        with jax.ensure_compile_time_eval():
            ones = jnp.ones((), jnp.float32)
            v, s = transport.velocity_and_score(ones, ones, t)
            finite = bool(jnp.isfinite(v)) and (not sde or bool(jnp.isfinite(s)))
        if not finite:
            need = "score" if sde else "velocity"
            raise ConfigError(
                f"the {need} of a {transport.config.prediction} model on the "
                f"{transport.config.path} path is singular at t={t}: "
                "use a last step or set transport.sample_eps > 0"
            )


@eqx.filter_jit
def sample(
    model: Callable[..., Float[Array, "c h w"]],
    x_init: Float[Array, "batch c h w"],
    y: Int[Array, " batch"],
    *,
    key: PRNGKeyArray,
    transport: Transport,
    config: SamplerConfig,
    null_label: int | None = None,
) -> Float[Array, "batch c h w"]:
    """Draw samples: integrate noise ``x_init`` (at ``t0``) to data with SiT's ODE or SDE sampler.

    **Arguments:**

    - `model`: ``model(x, t, y, *, key=None)`` on one example; it outputs what ``transport``
      predicts.
    - `x_init`: Gaussian noise, one per sample.
    - `y`: class labels.
    - `key`: PRNG key of the SDE's noise (unused by the ODE).
    - `transport`: gives the interval (:meth:`~eqdisp.transport.Transport.sample_interval`) and
      turns the network output into velocity and score.
    - `config`: solver, steps, tolerances, SDE diffusion and last step, and guidance
      (``cfg_scale``, ``cfg_channels``, ``cfg_interval``; see :func:`cfg_velocity`).
    - `null_label`: the unconditional label; defaults to ``model.num_classes``.

    **Returns:**

    The samples at the end of the interval (data), shaped like ``x_init``.

    One compiled program per (model structure, shapes, transport, config).
    """
    if null_label is None:
        null_label = getattr(model, "num_classes", None)
        if null_label is None and config.cfg_scale != 1.0:
            raise ConfigError(
                "null_label=None is not allowed: the model has no num_classes; pass null_label"
            )
    guide = functools.partial(
        cfg_velocity,
        model,
        scale=config.cfg_scale,
        null_label=-1 if null_label is None else int(null_label),
        channels=config.cfg_channels,
        interval=tuple(config.cfg_interval),
    )

    def network(x, t):
        out = guide(x, t, y)
        if out.shape != x.shape:
            raise ValueError(f"the model output has shape {out.shape[1:]}, expected {x.shape[1:]}")
        return out.astype(x.dtype)

    if config.mode == "ode":
        t0, t1 = transport.sample_interval(sde=False)
        _check_conversions_finite(transport, (t0, t1), sde=False)

        def velocity(x, t):
            return transport.model_velocity(network(x, t), x, t)

        return integrate_ode(
            velocity,
            x_init,
            t0=t0,
            t1=t1,
            steps=config.steps,
            method=config.ode_method,
            atol=config.atol,
            rtol=config.rtol,
            grid=config.time_grid,
        )

    # SiT: "last_step None" sets the last-step size to 0, so the interval ends at 1 - sample_eps.
    last_step_size = 0.0 if config.last_step == "none" else config.last_step_size
    t0, t1 = transport.sample_interval(
        sde=True, diffusion_form=config.diffusion_form, last_step_size=last_step_size
    )
    needs_t1 = config.sde_method == "heun" or config.last_step in ("Mean", "Tweedie")
    _check_conversions_finite(transport, (t0, t1) if needs_t1 else (t0,), sde=True)

    def velocity_and_score(x, t):
        return transport.velocity_and_score(network(x, t), x, t)

    return integrate_sde(
        velocity_and_score,
        x_init,
        key=key,
        path=transport.path,
        t0=t0,
        t1=t1,
        steps=config.steps,
        method=config.sde_method,
        diffusion_form=config.diffusion_form,
        diffusion_norm=config.diffusion_norm,
        last_step=config.last_step,
        last_step_size=last_step_size,
    )


__all__ = [
    "EDM_SIGMAS",
    "OdeStats",
    "cfg_velocity",
    "diffusion_coefficient",
    "edm_time_grid",
    "integrate_ode",
    "integrate_sde",
    "sample",
    "solve_ode",
]
