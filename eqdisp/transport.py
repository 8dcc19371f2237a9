"""SiT's stochastic interpolants, prediction types and training loss.

**Convention (the one place it is written down; everything else in eqdisp refers here).**
eqdisp follows SiT (Ma et al. 2024, `transport/`): ``x1`` is data, ``x0`` is Gaussian noise,
``t = 0`` is noise and ``t = 1`` is data, and

    x_t = alpha_t * x1 + sigma_t * x0,        u_t = d_alpha_t * x1 + d_sigma_t * x0,

where ``alpha_t`` is the data coefficient, ``sigma_t`` the noise coefficient, ``d_`` is d/dt and
``u_t`` is the conditional velocity (the regression target of a velocity model). Samplers run
forward in t, from noise at ``t0`` to data at ``t1``. REPA uses the opposite time,
``t_REPA = 1 - t`` and ``v_REPA = -v``; convert at the boundary (REPA's guidance-high 0.7 is the
interval (0.3, 1.0) here).

Three objects make up a transport:

- a path (:class:`LinearPath`, :class:`GVPPath`, :class:`VPPath`): the coefficients, the SDE drift
  ``-(d_alpha/alpha) x`` and "SBDM" diffusion ``w_sb``, and the velocity/score/noise conversions;
- a prediction type (``velocity``, ``noise``, ``score``) with a loss weight (noise/score only);
- time intervals that keep away from the singular ends (:func:`train_interval`,
  :func:`sample_interval`).

Pure functions do the maths; :class:`Transport` bundles them for a
:class:`~eqdisp.config.TransportConfig`. Everything works on one example (any shape) with a
scalar ``t``; batch with ``jax.vmap``.
"""

import abc
import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray, Real

from .config import LossWeight, PathType, Prediction, SamplerConfig, TransportConfig
from .objective import AbstractNoisingObjective

TimeLike = Real[ArrayLike, ""]
"""A scalar time: a Python number or a 0-d array (see the module docstring for the convention)."""


def _time(t) -> Array:
    """``t`` as an array, float32 unless it already has a floating dtype."""
    t = jnp.asarray(t)
    return t if jnp.issubdtype(t.dtype, jnp.floating) else t.astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# Paths


class AbstractPath(eqx.Module):
    """An interpolant ``x_t = alpha_t x1 + sigma_t x0`` (SiT's "coupling plan").

    Coefficient methods take a time array of any shape and return an array of that shape.
    Conversions take one example (any shape) and a scalar time. Formulas: SiT ``transport/path.py``
    (``ICPlan``, ``GVPCPlan``, ``VPCPlan``).
    """

    @abc.abstractmethod
    def alpha(self, t: Real[ArrayLike, "*t"]) -> Float[Array, "*t"]:
        """The data coefficient ``alpha_t``."""

    @abc.abstractmethod
    def sigma(self, t: Real[ArrayLike, "*t"]) -> Float[Array, "*t"]:
        """The noise coefficient ``sigma_t``."""

    @abc.abstractmethod
    def d_alpha(self, t: Real[ArrayLike, "*t"]) -> Float[Array, "*t"]:
        """``d alpha_t / dt``."""

    @abc.abstractmethod
    def d_sigma(self, t: Real[ArrayLike, "*t"]) -> Float[Array, "*t"]:
        """``d sigma_t / dt``."""

    @abc.abstractmethod
    def d_log_alpha(self, t: Real[ArrayLike, "*t"]) -> Float[Array, "*t"]:
        """``d_alpha_t / alpha_t``, numerically stable (SiT's ``compute_d_alpha_alpha_ratio_t``)."""

    @abc.abstractmethod
    def w_sb(self, t: Real[ArrayLike, "*t"]) -> Float[Array, "*t"]:
        """The "SBDM" diffusion ``(d_alpha/alpha) sigma^2 - sigma d_sigma`` (SiT's drift variance).

        It is also the factor in ``v = w_sb * score + (d_alpha/alpha) x``. Infinite at ``t = 0`` for
        the Linear and GVP paths.
        """

    def drift(self, x: Float[Array, "*x"], t: TimeLike) -> Float[Array, "*x"]:
        """The linear part of the probability-flow drift, ``-(d_alpha_t/alpha_t) x``.

        For VP this equals SiT's ``-beta_t x / 2`` (``d_log_alpha`` is ``beta_t / 2`` there).
        """
        return -self.d_log_alpha(t) * x

    def velocity_to_score(
        self, v: Float[Array, "*x"], x: Float[Array, "*x"], t: TimeLike
    ) -> Float[Array, "*x"]:
        """Score of ``p_t`` from the velocity (SiT's ``get_score_from_velocity``).

        ``s = (r v - x) / (sigma^2 - r d_sigma sigma)`` with ``r = alpha / d_alpha``. Singular at
        ``t = 1`` (``sigma = 0``).
        """
        t = _time(t)
        ratio = 1 / self.d_log_alpha(t)
        sigma = self.sigma(t)
        var = sigma**2 - ratio * self.d_sigma(t) * sigma
        return (ratio * v - x) / var

    def score_to_velocity(
        self, s: Float[Array, "*x"], x: Float[Array, "*x"], t: TimeLike
    ) -> Float[Array, "*x"]:
        """Velocity from the score, ``v = w_sb s + (d_alpha/alpha) x`` (inverts
        :meth:`velocity_to_score`)."""
        t = _time(t)
        return self.w_sb(t) * s - self.drift(x, t)

    def velocity_to_noise(
        self, v: Float[Array, "*x"], x: Float[Array, "*x"], t: TimeLike
    ) -> Float[Array, "*x"]:
        """The noise ``x0`` from the velocity, ``(r v - x) / (r d_sigma - sigma)`` with
        ``r = alpha / d_alpha`` (SiT's ``get_noise_from_velocity``)."""
        t = _time(t)
        ratio = 1 / self.d_log_alpha(t)
        return (ratio * v - x) / (ratio * self.d_sigma(t) - self.sigma(t))

    def noise_to_velocity(
        self, eps: Float[Array, "*x"], x: Float[Array, "*x"], t: TimeLike
    ) -> Float[Array, "*x"]:
        """Velocity from the noise (inverse of :meth:`velocity_to_noise`).

        ``v = (d_alpha/alpha) x + (d_sigma - (d_alpha/alpha) sigma) eps``, which is
        ``score_to_velocity`` of the score ``-eps / sigma``.
        """
        t = _time(t)
        k = self.d_log_alpha(t)
        return k * x + (self.d_sigma(t) - k * self.sigma(t)) * eps


class LinearPath(AbstractPath):
    """SiT's ``Linear`` (ICPlan): ``alpha_t = t``, ``sigma_t = 1 - t`` (rectified flow)."""

    def alpha(self, t: Real[ArrayLike, "*t"]) -> Float[Array, "*t"]:
        return _time(t)

    def sigma(self, t: Real[ArrayLike, "*t"]) -> Float[Array, "*t"]:
        return 1 - _time(t)

    def d_alpha(self, t: Real[ArrayLike, "*t"]) -> Float[Array, "*t"]:
        return jnp.ones_like(_time(t))

    def d_sigma(self, t: Real[ArrayLike, "*t"]) -> Float[Array, "*t"]:
        return -jnp.ones_like(_time(t))

    def d_log_alpha(self, t: Real[ArrayLike, "*t"]) -> Float[Array, "*t"]:
        return 1 / _time(t)

    def w_sb(self, t: Real[ArrayLike, "*t"]) -> Float[Array, "*t"]:
        t = _time(t)
        return (1 - t) / t


class GVPPath(AbstractPath):
    """SiT's ``GVP``: ``alpha_t = sin(pi t / 2)``, ``sigma_t = cos(pi t / 2)``."""

    def alpha(self, t: Real[ArrayLike, "*t"]) -> Float[Array, "*t"]:
        return jnp.sin(_time(t) * (math.pi / 2))

    def sigma(self, t: Real[ArrayLike, "*t"]) -> Float[Array, "*t"]:
        return jnp.cos(_time(t) * (math.pi / 2))

    def d_alpha(self, t: Real[ArrayLike, "*t"]) -> Float[Array, "*t"]:
        return (math.pi / 2) * jnp.cos(_time(t) * (math.pi / 2))

    def d_sigma(self, t: Real[ArrayLike, "*t"]) -> Float[Array, "*t"]:
        return -(math.pi / 2) * jnp.sin(_time(t) * (math.pi / 2))

    def d_log_alpha(self, t: Real[ArrayLike, "*t"]) -> Float[Array, "*t"]:
        return math.pi / (2 * jnp.tan(_time(t) * (math.pi / 2)))

    def w_sb(self, t: Real[ArrayLike, "*t"]) -> Float[Array, "*t"]:
        t = _time(t)
        sigma = self.sigma(t)
        return self.d_log_alpha(t) * sigma**2 - sigma * self.d_sigma(t)


class VPPath(AbstractPath):
    """SiT's ``VP`` path: ``alpha_t = exp(m(t))``, ``sigma_t = sqrt(1 - exp(2 m(t)))`` with

    ``m(t) = -(1-t)^2 (sigma_max - sigma_min) / 4 - (1-t) sigma_min / 2`` (the VP-SDE of Song et
    al. with ``beta(s) = sigma_min + s (sigma_max - sigma_min)``, ``s = 1 - t``).
    ``d_log_alpha = m'(t) = beta_t / 2`` and ``w_sb = beta_t / 2``, SiT's override.
    """

    sigma_min: float = 0.1
    sigma_max: float = 20.0

    def _m(self, t: Array) -> Array:
        s = 1 - t
        return -0.25 * s**2 * (self.sigma_max - self.sigma_min) - 0.5 * s * self.sigma_min

    def _dm(self, t: Array) -> Array:
        return 0.5 * (1 - t) * (self.sigma_max - self.sigma_min) + 0.5 * self.sigma_min

    def alpha(self, t: Real[ArrayLike, "*t"]) -> Float[Array, "*t"]:
        return jnp.exp(self._m(_time(t)))

    def sigma(self, t: Real[ArrayLike, "*t"]) -> Float[Array, "*t"]:
        return jnp.sqrt(1 - jnp.exp(2 * self._m(_time(t))))

    def d_alpha(self, t: Real[ArrayLike, "*t"]) -> Float[Array, "*t"]:
        t = _time(t)
        return self.alpha(t) * self._dm(t)

    def d_sigma(self, t: Real[ArrayLike, "*t"]) -> Float[Array, "*t"]:
        t = _time(t)
        return -jnp.exp(2 * self._m(t)) * self._dm(t) / self.sigma(t)

    def d_log_alpha(self, t: Real[ArrayLike, "*t"]) -> Float[Array, "*t"]:
        return self._dm(_time(t))

    def w_sb(self, t: Real[ArrayLike, "*t"]) -> Float[Array, "*t"]:
        t = _time(t)
        return 0.5 * (self.sigma_min + (1 - t) * (self.sigma_max - self.sigma_min))


def make_path(name: PathType) -> AbstractPath:
    """The path called ``name``: ``"Linear"``, ``"GVP"`` or ``"VP"`` (``TransportConfig.path``)."""
    paths = {"Linear": LinearPath, "GVP": GVPPath, "VP": VPPath}
    if name not in paths:
        raise ValueError(f"path={name!r} is not allowed: expected one of 'Linear', 'GVP', 'VP'")
    return paths[name]()


# ----------------------------------------------------------------------------------------------
# Time intervals (SiT's create_transport + check_interval)


def resolve_eps(cfg: TransportConfig) -> tuple[float, float]:
    """``(train_eps, sample_eps)`` with SiT's defaults filled in (``create_transport``).

    - VP: ``1e-5`` and ``1e-3``;
    - Linear/GVP with noise or score prediction: ``1e-3`` and ``1e-3``;
    - Linear/GVP with velocity prediction: ``0`` and ``0``. SiT forces these and ignores given
      values; eqdisp uses an explicitly given value. It only matters for the SDE's ``SBDM`` start
      and an SDE without last step (training and ODE intervals are ``[0, 1]`` whatever it is),
      and it is the way to use ``SBDM`` with a velocity model.

    Each value is resolved on its own. SiT's
    ``sample_eps = 1e-3 if train_eps is None else sample_eps`` turns ``sample_eps`` into ``None``
    when only ``train_eps`` is given; that bug is not reproduced.
    """
    if cfg.path == "VP":
        defaults = (1e-5, 1e-3)
    elif cfg.prediction != "velocity":
        defaults = (1e-3, 1e-3)
    else:
        defaults = (0.0, 0.0)
    train_eps = defaults[0] if cfg.train_eps is None else float(cfg.train_eps)
    sample_eps = defaults[1] if cfg.sample_eps is None else float(cfg.sample_eps)
    return train_eps, sample_eps


def _check_interval(
    cfg: TransportConfig,
    eps: float,
    *,
    sde: bool,
    diffusion_form: str,
    last_step_size: float,
) -> tuple[float, float]:
    # Transcribes SiT's Transport.check_interval (reverse=False).
    t0, t1 = 0.0, 1.0
    t1_sde = 1.0 - eps if (not sde or last_step_size == 0) else 1.0 - last_step_size
    if cfg.path == "VP":
        t1 = t1_sde
    elif cfg.prediction != "velocity" or sde:
        t0 = eps if (diffusion_form == "SBDM" and sde) or cfg.prediction != "velocity" else 0.0
        t1 = t1_sde
    return t0, t1


def train_interval(cfg: TransportConfig) -> tuple[float, float]:
    """The training time interval ``[t0, t1]`` (SiT's ``check_interval(train_eps, sde=False)``).

    Linear/GVP velocity: ``[0, 1]``; Linear/GVP noise/score: ``[eps, 1 - eps]``; VP:
    ``[0, 1 - eps]``, with ``eps`` from :func:`resolve_eps`. Time convention: module docstring.
    """
    return _check_interval(
        cfg, resolve_eps(cfg)[0], sde=False, diffusion_form="SBDM", last_step_size=0.0
    )


def sample_interval(
    cfg: TransportConfig,
    *,
    sde: bool = False,
    diffusion_form: str = "sigma",
    last_step_size: float = 0.0,
) -> tuple[float, float]:
    """The sampling time interval (SiT's ``check_interval(sample_eps, eval=True)``).

    **Arguments:**

    - `cfg`: the transport configuration.
    - `sde`: the interval of the SDE sampler rather than the ODE's.
    - `diffusion_form`: the SDE diffusion form (only ``"SBDM"`` changes the start).
    - `last_step_size`: the SDE's last-step size; 0 means no last step.

    **Returns:**

    ``(t0, t1)``. ODE: as :func:`train_interval` with ``sample_eps``. SDE: ``t0 = sample_eps``
    for ``SBDM`` or a non-velocity model on Linear/GVP, else 0 (VP: always 0);
    ``t1 = 1 - last_step_size``, or ``1 - sample_eps`` without a last step.
    """
    return _check_interval(
        cfg,
        resolve_eps(cfg)[1],
        sde=sde,
        diffusion_form=diffusion_form,
        last_step_size=float(last_step_size),
    )


def sample_time(
    key: PRNGKeyArray, shape: tuple[int, ...], interval: tuple[float, float]
) -> Float[Array, "*shape"]:
    """Times drawn uniformly from ``[t0, t1)`` (SiT: ``rand * (t1 - t0) + t0``), float32."""
    t0, t1 = interval
    return jax.random.uniform(key, shape, jnp.float32, minval=t0, maxval=t1)


LOGIT_NORMAL_CLIP: tuple[float, float] = (1e-4, 1.0)
"""Where logit-normal training times are clipped (flow_matching's ``skewed_timestep_sample``)."""


def sample_logit_normal_time(
    key: PRNGKeyArray,
    shape: tuple[int, ...],
    mean: float,
    std: float,
    interval: tuple[float, float] = (0.0, 1.0),
) -> Float[Array, "*shape"]:
    """Times ``sigmoid(mean + std n)``, ``n ~ N(0, 1)``, float32, clipped to
    :data:`LOGIT_NORMAL_CLIP` and to ``interval``.

    flow_matching's ``--skewed_timesteps`` is ``mean = std = 1.2`` on ``[0, 1]``: it writes
    ``1 / (1 + exp(1.2 n - 1.2))``, the same distribution (``n`` and ``-n`` are).
    """
    low = max(LOGIT_NORMAL_CLIP[0], interval[0])
    high = min(LOGIT_NORMAL_CLIP[1], interval[1])
    n = jax.random.normal(key, shape, jnp.float32)
    return jnp.clip(jax.nn.sigmoid(mean + std * n), low, high)


# ----------------------------------------------------------------------------------------------
# Interpolation and loss


def interpolate(
    path: AbstractPath, x0: Float[Array, "*x"], x1: Float[Array, "*x"], t: TimeLike
) -> tuple[Float[Array, "*x"], Float[Array, "*x"]]:
    """``(x_t, u_t)`` for noise ``x0``, data ``x1`` and a scalar time ``t`` (module docstring)."""
    t = _time(t)
    x_t = path.alpha(t) * x1 + path.sigma(t) * x0
    u_t = path.d_alpha(t) * x1 + path.d_sigma(t) * x0
    return x_t, u_t


def training_target(
    path: AbstractPath,
    prediction: Prediction,
    x0: Float[Array, "*x"],
    x1: Float[Array, "*x"],
    t: TimeLike,
) -> Float[Array, "*x"]:
    """What a ``prediction`` network should output at ``x_t``: ``u_t``, ``x0`` or ``-x0 / sigma_t``.

    (The score loss is written ``w (out sigma_t + x0)^2`` rather than ``(out - target)^2``; see
    :func:`training_loss`.)
    """
    if prediction == "velocity":
        return interpolate(path, x0, x1, t)[1]
    if prediction == "noise":
        return x0
    if prediction == "score":
        return -x0 / path.sigma(t)
    raise ValueError(
        f"prediction={prediction!r} is not allowed: expected 'velocity', 'noise' or 'score'"
    )


def _loss_weight(path: AbstractPath, loss_weight: LossWeight, t: Array) -> Array:
    if loss_weight == "none":
        return jnp.ones_like(t)
    sigma = path.sigma(t)
    if loss_weight == "velocity":
        return (path.w_sb(t) / sigma) ** 2
    if loss_weight == "likelihood":
        return path.w_sb(t) / sigma**2
    raise ValueError(
        f"loss_weight={loss_weight!r} is not allowed: expected 'none', 'velocity' or 'likelihood'"
    )


def training_loss(
    model_out: Float[Array, "*x"],
    x0: Float[Array, "*x"],
    x1: Float[Array, "*x"],
    t: TimeLike,
    *,
    path: AbstractPath,
    prediction: Prediction,
    loss_weight: LossWeight = "none",
) -> Float[Array, ""]:
    """SiT's per-example loss (``Transport.training_losses``), computed in float32.

    **Arguments:**

    - `model_out`: the network output at ``x_t`` (``interpolate(path, x0, x1, t)[0]``), one example.
    - `x0`, `x1`: the noise and the data of that example.
    - `t`: its time.
    - `path`, `prediction`: the interpolant and what the network predicts.
    - `loss_weight`: ``none``, ``velocity`` (``(w_sb/sigma)^2``) or ``likelihood``
      (``w_sb/sigma^2``); used only for noise/score prediction, ignored for velocity (as in SiT).

    **Returns:**

    The mean over all elements of: ``(out - u_t)^2`` (velocity), ``w (out - x0)^2`` (noise) or
    ``w (out sigma_t + x0)^2`` (score). SiT's batch loss is the mean of this over examples.
    """
    t = _time(t).astype(jnp.float32)
    out = model_out.astype(jnp.float32)
    x0 = x0.astype(jnp.float32)
    x1 = x1.astype(jnp.float32)
    if prediction == "velocity":
        _, u_t = interpolate(path, x0, x1, t)
        return jnp.mean((out - u_t) ** 2)
    weight = _loss_weight(path, loss_weight, t)
    if prediction == "noise":
        return jnp.mean(weight * (out - x0) ** 2)
    if prediction == "score":
        return jnp.mean(weight * (out * path.sigma(t) + x0) ** 2)
    raise ValueError(
        f"prediction={prediction!r} is not allowed: expected 'velocity', 'noise' or 'score'"
    )


# ----------------------------------------------------------------------------------------------
# The bundle


class Transport(AbstractNoisingObjective):
    """SiT's objective: a :class:`~eqdisp.config.TransportConfig` turned into its path,
    intervals, loss, conversions and sampler (:func:`eqdisp.samplers.sample`).

    Holds no arrays. Build it with :func:`make_transport`. Time convention: module docstring.
    """

    config: TransportConfig = eqx.field(static=True)
    path: AbstractPath

    def __init__(self, config: TransportConfig):
        self.config = config
        self.path = make_path(config.path)

    @property
    def prediction(self) -> Prediction:
        return self.config.prediction

    @property
    def train_interval(self) -> tuple[float, float]:
        """The training interval ``(t0, t1)``, see :func:`train_interval`."""
        return train_interval(self.config)

    def sample_interval(
        self, *, sde: bool = False, diffusion_form: str = "sigma", last_step_size: float = 0.0
    ) -> tuple[float, float]:
        """See :func:`sample_interval`."""
        return sample_interval(
            self.config, sde=sde, diffusion_form=diffusion_form, last_step_size=last_step_size
        )

    def sample_train_time(
        self, key: PRNGKeyArray, shape: tuple[int, ...]
    ) -> Float[Array, "*shape"]:
        """Training times: uniform on :attr:`train_interval` (SiT's ``Transport.sample``), or
        logit-normal (:func:`sample_logit_normal_time`), as ``config.time_distribution`` says."""
        config = self.config
        if config.time_distribution == "logit_normal":
            return sample_logit_normal_time(
                key, shape, config.time_mean, config.time_std, self.train_interval
            )
        return sample_time(key, shape, self.train_interval)

    def interpolate(
        self, x0: Float[Array, "*x"], x1: Float[Array, "*x"], t: TimeLike
    ) -> tuple[Float[Array, "*x"], Float[Array, "*x"]]:
        """See :func:`interpolate`."""
        return interpolate(self.path, x0, x1, t)

    def loss(
        self,
        model_out: Float[Array, "*x"],
        x0: Float[Array, "*x"],
        x1: Float[Array, "*x"],
        t: TimeLike,
    ) -> Float[Array, ""]:
        """See :func:`training_loss`; vmap over the batch and take the mean."""
        return training_loss(
            model_out,
            x0,
            x1,
            t,
            path=self.path,
            prediction=self.config.prediction,
            loss_weight=self.config.loss_weight,
        )

    def draw_samples(
        self,
        model: eqx.Module,
        x_init: Float[Array, "batch c h w"],
        y: Int[Array, " batch"],
        *,
        key: PRNGKeyArray,
        config: SamplerConfig,
    ) -> Float[Array, "batch c h w"]:
        """SiT's ODE or SDE sampler, :func:`eqdisp.samplers.sample`."""
        from .samplers import sample  # samplers imports this module for its paths

        return sample(model, x_init, y, key=key, transport=self, config=config)

    def sampler_evaluations(self, config: SamplerConfig) -> int | None:
        """SiT's counting: Heun ``2 (steps - 1)``, Euler ``steps - 1``; the SDE's ``steps - 1``
        stochastic steps, then one evaluation for the last step unless it is ``none``; None for
        ``dopri5``, whose steps are adaptive."""
        steps = config.steps
        if config.mode == "ode":
            return {"heun": 2 * (steps - 1), "euler": steps - 1}.get(config.ode_method)
        last = 0 if config.last_step == "none" else 1
        return (2 if config.sde_method == "heun" else 1) * (steps - 1) + last

    def describe_sampler(self, config: SamplerConfig) -> str:
        nfe = self.sampler_evaluations(config)
        if nfe is None:
            text = f"ODE dopri5, adaptive evaluations (rtol {config.rtol:g}, atol {config.atol:g})"
        else:
            method = config.ode_method if config.mode == "ode" else config.sde_method
            grid = " (EDM grid)" if config.time_grid == "edm" else ""
            text = (
                f"{config.mode.upper()} {method}, {config.steps} grid points{grid} = "
                f"{nfe} evaluations each"
            )
        if config.cfg_scale != 1.0:
            text += f", guidance {config.cfg_scale:g} doubles the batch"
            low, high = config.cfg_interval
            if low > 0.0 or high < 1.0:
                text += f" for t in [{low:g}, {high:g}]"
        return text

    def model_time(self, t: float) -> float:
        """SiT's time is eqdisp's: `t` as it is."""
        return t

    def model_score(
        self, out: Float[Array, "*x"], x: Float[Array, "*x"], t: TimeLike
    ) -> Float[Array, "*x"]:
        """The score from a network output of the configured prediction type (SiT's ``get_score``).

        Noise: ``out / (-sigma_t)``; score: as is; velocity: :meth:`AbstractPath.velocity_to_score`.
        """
        return self.velocity_and_score(out, x, t)[1]

    def model_velocity(
        self, out: Float[Array, "*x"], x: Float[Array, "*x"], t: TimeLike
    ) -> Float[Array, "*x"]:
        """The probability-flow velocity from a network output (SiT's ``get_drift``).

        Velocity: as is; otherwise ``(d_alpha/alpha) x + w_sb * score``.
        """
        if self.config.prediction == "velocity":
            return out
        return self.velocity_and_score(out, x, t)[0]

    def velocity_and_score(
        self, out: Float[Array, "*x"], x: Float[Array, "*x"], t: TimeLike
    ) -> tuple[Float[Array, "*x"], Float[Array, "*x"]]:
        """Both the velocity and the score from one network output (the SDE drift needs both;
        SiT evaluates the network twice for them, once is enough)."""
        t = _time(t)
        prediction = self.config.prediction
        if prediction == "velocity":
            return out, self.path.velocity_to_score(out, x, t)
        if prediction == "noise":
            score = out / -self.path.sigma(t)
        else:
            score = out
        return self.path.score_to_velocity(score, x, t), score


def make_transport(cfg: TransportConfig) -> Transport:
    """The :class:`Transport` of a configuration."""
    return Transport(cfg)


__all__ = [
    "AbstractPath",
    "GVPPath",
    "LinearPath",
    "Transport",
    "VPPath",
    "interpolate",
    "make_path",
    "make_transport",
    "LOGIT_NORMAL_CLIP",
    "resolve_eps",
    "sample_interval",
    "sample_logit_normal_time",
    "sample_time",
    "train_interval",
    "training_loss",
    "training_target",
]
