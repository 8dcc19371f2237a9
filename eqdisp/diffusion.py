"""DiT's Gaussian diffusion: the linear-beta DDPM, its hybrid training loss and the DDPM/DDIM samplers.

A transcription of DiT's ``diffusion/`` (``create_diffusion`` defaults: eps prediction, LEARNED_RANGE
variance, hybrid loss ``MSE + VB``; ``facebookresearch/DiT`` ``diffusion/__init__.py``,
``diffusion/gaussian_diffusion.py`` and ``diffusion/respace.py``).

**Time convention: DiT's, not eqdisp's.** :mod:`eqdisp.transport` (SiT) runs ``t`` in ``[0, 1]``
with ``t = 1`` data. Here ``t`` is the integer step index ``0..T-1`` (``T = 1000``), carried as an
integer-valued float32: ``t = 0`` is the data side (least noise) and ``t = T - 1`` pure noise, and
the network receives that index as is (DiT's timestep embedder takes it unscaled). The names of the
arrays stay the library's: ``x1`` is data and ``x0`` the Gaussian noise, so

    x_t = sqrt(abar_t) * x1 + sqrt(1 - abar_t) * x0,        target = x0 (the noise, "eps").

**Precision.** Every schedule table (betas, cumulative products, posterior coefficients) is built in
float64 NumPy when first needed and kept as host constants: they are never module leaves, jit
arguments or trainable. DiT indexes a float64 table and then casts to float32; eqdisp casts each
table to float32 and then indexes it, which gives the same numbers (the cast is elementwise).

:class:`GaussianDiffusion` is an :class:`eqdisp.objective.AbstractNoisingObjective`, like SiT's
:class:`eqdisp.transport.Transport`. Sampling: :func:`ddpm_sample` (DiT's ``p_sample_loop`` on the
respaced schedule, what ``sample.py`` runs) and :func:`ddim_sample`.
"""

import dataclasses
import functools
import math
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray, Real

from .config import ConfigError, SamplerConfig
from .objective import AbstractNoisingObjective

TimeLike = Real[ArrayLike, ""]
"""A scalar step index ``0..T-1`` (an integer or an integer-valued float)."""


# ----------------------------------------------------------------------------------------------
# Schedules (float64 NumPy)


def beta_schedule(name: str, num_timesteps: int) -> Float[np.ndarray, " T"]:
    """DiT's ``get_named_beta_schedule``, float64: ``name`` is ``linear`` (DiT's default) or
    ``cosine`` (improved DDPM's ``squaredcos_cap_v2``).

    ``linear``: ``linspace(1e-4 k, 0.02 k, T)`` with ``k = 1000 / T``. ``cosine``:
    ``beta_i = min(1 - abar((i+1)/T) / abar(i/T), 0.999)`` with
    ``abar(s) = cos((s + 0.008) / 1.008 * pi / 2)^2``.
    """
    if num_timesteps < 1:
        raise ConfigError(f"num_timesteps={num_timesteps!r} is not allowed: expected an int >= 1")
    if name == "linear":
        scale = 1000 / num_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)
    if name == "cosine":

        def abar(s):
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [
            min(1 - abar((i + 1) / num_timesteps) / abar(i / num_timesteps), 0.999)
            for i in range(num_timesteps)
        ]
        return np.asarray(betas, np.float64)
    raise ConfigError(f"schedule={name!r} is not allowed: expected 'linear' or 'cosine'")


@dataclasses.dataclass(frozen=True, eq=False)
class DiffusionTables:
    """Every per-step table of a beta schedule, float64 NumPy, read-only (DiT's ``GaussianDiffusion.__init__``).

    Index ``i`` is the step of *this* schedule (for a respaced schedule, the respaced index).
    """

    betas: Float[np.ndarray, " T"]
    alphas_cumprod: Float[np.ndarray, " T"]
    """``abar_i = prod_{j <= i} (1 - beta_j)``."""
    alphas_cumprod_prev: Float[np.ndarray, " T"]
    """``abar_{i-1}``, with ``abar_{-1} = 1``."""
    sqrt_alphas_cumprod: Float[np.ndarray, " T"]
    sqrt_one_minus_alphas_cumprod: Float[np.ndarray, " T"]
    sqrt_recip_alphas_cumprod: Float[np.ndarray, " T"]
    sqrt_recipm1_alphas_cumprod: Float[np.ndarray, " T"]
    posterior_variance: Float[np.ndarray, " T"]
    """``beta_i (1 - abar_{i-1}) / (1 - abar_i)``, the variance of ``q(x_{i-1} | x_i, x_data)``."""
    posterior_log_variance_clipped: Float[np.ndarray, " T"]
    """Its log, with element 0 (where the variance is 0) replaced by element 1."""
    posterior_mean_coef1: Float[np.ndarray, " T"]
    """The coefficient of the data in the posterior mean, ``beta_i sqrt(abar_{i-1}) / (1 - abar_i)``."""
    posterior_mean_coef2: Float[np.ndarray, " T"]
    """The coefficient of ``x_i``, ``(1 - abar_{i-1}) sqrt(1 - beta_i) / (1 - abar_i)``."""
    log_betas: Float[np.ndarray, " T"]
    """``log beta_i``: the upper end of LEARNED_RANGE."""
    fixed_large_log_variance: Float[np.ndarray, " T"]
    """``log([posterior_variance_1, beta_1, ..., beta_{T-1}])``: FIXED_LARGE (``learn_sigma=False``)."""

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    @classmethod
    def from_betas(cls, betas: Float[np.ndarray, " T"]) -> "DiffusionTables":
        """All tables of a float64 beta schedule (DiT's ``GaussianDiffusion.__init__``)."""
        betas = np.array(betas, np.float64)  # a copy: the tables are made read-only below
        if betas.ndim != 1 or not np.all((betas > 0) & (betas <= 1)):
            raise ConfigError("betas are not allowed: expected a 1-d schedule with 0 < beta <= 1")
        alphas = 1.0 - betas
        abar = np.cumprod(alphas, axis=0)
        abar_prev = np.append(1.0, abar[:-1])
        post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
        # A one-step schedule has no element 1 (DiT raises there); its posterior variance is 0, so
        # fall back to beta_0 (FIXED_LARGE's choice) to keep the log finite.
        post_var_1 = post_var[1] if len(post_var) > 1 else betas[0]
        tables = {
            "betas": betas,
            "alphas_cumprod": abar,
            "alphas_cumprod_prev": abar_prev,
            "sqrt_alphas_cumprod": np.sqrt(abar),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - abar),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / abar),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / abar - 1),
            "posterior_variance": post_var,
            "posterior_log_variance_clipped": np.log(np.append(post_var_1, post_var[1:])),
            "posterior_mean_coef1": betas * np.sqrt(abar_prev) / (1.0 - abar),
            "posterior_mean_coef2": (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
            "log_betas": np.log(betas),
            "fixed_large_log_variance": np.log(np.append(post_var_1, betas[1:])),
        }
        for value in tables.values():
            value.setflags(write=False)
        return cls(**tables)

    def float32(self, name: str) -> Float[np.ndarray, " T"]:
        """The table ``name`` cast to float32 (equal to DiT's index-then-cast)."""
        return _float32_table(self, name)


@functools.cache
def _float32_table(tables: DiffusionTables, name: str) -> np.ndarray:
    # DiffusionTables hashes by identity (eq=False), and the tables themselves are cached.
    out = np.asarray(getattr(tables, name), np.float32)
    out.setflags(write=False)
    return out


def space_timesteps(num_timesteps: int, section_counts: int | str) -> tuple[int, ...]:
    """The kept steps of a respaced schedule, sorted (DiT's ``space_timesteps``).

    ``section_counts``: an int or ``"250"`` (one section, the case DiT's scripts use), a
    comma-separated list of counts per equal section (``"10,15,20"``), or ``"ddimN"`` (a fixed
    integer stride giving exactly ``N`` steps). For one section of ``N`` steps the kept steps are
    Python's ``round`` of the float stride ``(T - 1) / (N - 1)`` accumulated ``i`` times, as in
    DiT. For ``T = 1000, N = 250`` that equals ``round(linspace(0, T - 1, N))``,
    ``{0, 4, 8, ..., 995, 999}``; for some other counts an exact ``.5`` tie rounds the other way
    (``N = 999`` keeps 499 where ``round(linspace)`` has 500), and DiT's accumulation is kept.
    """
    accepted = "a step count such as 250, counts per section such as '10,15,20', or 'ddimN'"
    if isinstance(section_counts, str):
        spec = section_counts.removeprefix("ddim")
        if not all(part.strip().isdecimal() for part in spec.split(",")) or (
            spec != section_counts and "," in spec
        ):
            raise ConfigError(f"steps={section_counts!r} is not allowed: expected {accepted}")
        if section_counts.startswith("ddim"):
            desired = int(spec)
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return tuple(range(0, num_timesteps, stride))
            raise ConfigError(
                f"steps={section_counts!r} is not allowed: no integer stride gives exactly "
                f"{desired} of {num_timesteps} steps"
            )
        counts = [int(x) for x in section_counts.split(",")]
    else:
        counts = [int(section_counts)]
    size_per, extra = divmod(num_timesteps, len(counts))
    start, steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ConfigError(
                f"steps={section_counts!r} is not allowed: a section of {size} steps cannot keep "
                f"{count}; expected 1 <= steps <= {size}"
            )
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            steps.append(start + round(position))  # Python's round, as DiT
            position += stride
        start += size
    return tuple(sorted(set(steps)))


def respaced_betas(
    alphas_cumprod: Float[np.ndarray, " T"], use_timesteps: tuple[int, ...]
) -> Float[np.ndarray, " steps"]:
    """DiT's ``SpacedDiffusion`` betas: ``beta'_i = 1 - abar_{tau_i} / abar_{tau_{i-1}}``, ``abar_{tau_{-1}} = 1``."""
    kept = np.asarray(use_timesteps, np.int64)
    abar = np.asarray(alphas_cumprod, np.float64)[kept]
    return 1.0 - abar / np.append(1.0, abar[:-1])


@functools.cache
def _base_tables(num_timesteps: int, schedule: str) -> DiffusionTables:
    return DiffusionTables.from_betas(beta_schedule(schedule, num_timesteps))


@functools.cache
def _respaced_tables(
    num_timesteps: int, schedule: str, steps: int | str
) -> tuple[tuple[int, ...], DiffusionTables]:
    timestep_map = space_timesteps(num_timesteps, steps)
    base = _base_tables(num_timesteps, schedule)
    betas = respaced_betas(base.alphas_cumprod, timestep_map)
    return timestep_map, DiffusionTables.from_betas(betas)


# ----------------------------------------------------------------------------------------------
# Pure maths (one example, float32)


def normal_kl(
    mean1: Float[Array, "*#x"],
    logvar1: Float[Array, "*#x"],
    mean2: Float[Array, "*#x"],
    logvar2: Float[Array, "*#x"],
) -> Float[Array, "*#x"]:
    """``KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2)))`` elementwise, in nats (DiT's ``normal_kl``)."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + jnp.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * jnp.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: Float[Array, "*#x"]) -> Float[Array, "*#x"]:
    """DiT's tanh approximation of the standard normal CDF,
    ``0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` (absolute error below about 2e-4)."""
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(
    x: Float[Array, "*#x"], *, means: Float[Array, "*#x"], log_scales: Float[Array, "*#x"]
) -> Float[Array, "*#x"]:
    """Log-likelihood (nats) of data in ``[-1, 1]`` quantised to 256 bins under ``N(means, exp(log_scales)^2)``.

    DiT's ``discretized_gaussian_log_likelihood``: the bin is ``x +- 1/255``; below ``-0.999`` the
    whole lower tail and above ``0.999`` the whole upper tail; probabilities clamped at ``1e-12``;
    the CDF is :func:`approx_standard_normal_cdf`.
    """
    centered = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(
        x < -0.999,
        log_cdf_plus,
        jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta),
    )


def _gather(tables: DiffusionTables, name: str, index: Int[Array, ""]) -> Float[Array, ""]:
    return jnp.asarray(tables.float32(name))[index]


def _index(t: TimeLike) -> Int[Array, ""]:
    t = jnp.asarray(t)
    if jnp.issubdtype(t.dtype, jnp.floating):
        t = jnp.round(t)
    return t.astype(jnp.int32)


# ----------------------------------------------------------------------------------------------
# The training objective


class GaussianDiffusion(AbstractNoisingObjective):
    """DiT's objective: ``GaussianDiffusion`` with eps prediction, LEARNED_RANGE variance, the
    hybrid loss, and ancestral DDPM sampling (:func:`ddpm_sample`).

    Holds no arrays: the float64 tables are host constants derived from the static fields (see
    the module docstring for the time convention). Build with :func:`make_diffusion`.
    """

    num_timesteps: int = eqx.field(static=True)
    schedule: str = eqx.field(static=True)
    learn_sigma: bool = eqx.field(static=True)

    def __check_init__(self):
        if not (isinstance(self.num_timesteps, int) and self.num_timesteps >= 2):
            raise ConfigError(
                f"num_timesteps={self.num_timesteps!r} is not allowed: expected an int >= 2"
            )
        if self.schedule not in ("linear", "cosine"):
            raise ConfigError(
                f"schedule={self.schedule!r} is not allowed: expected 'linear' or 'cosine'"
            )

    @property
    def tables(self) -> DiffusionTables:
        """The float64 tables of the full ``num_timesteps`` schedule."""
        return _base_tables(self.num_timesteps, self.schedule)

    def respaced(self, steps: int | str) -> tuple[tuple[int, ...], DiffusionTables]:
        """``(timestep_map, tables)`` of the schedule respaced to ``steps`` (see :func:`space_timesteps`).

        ``timestep_map[i]`` is the original step of respaced step ``i``; the tables are rebuilt
        from the respaced betas (:func:`respaced_betas`).
        """
        return _respaced_tables(self.num_timesteps, self.schedule, steps)

    @property
    def train_interval(self) -> tuple[float, float]:
        """``(0, T - 1)``: the range of training step indices (DiT time, module docstring)."""
        return 0.0, float(self.num_timesteps - 1)

    def sample_train_time(
        self, key: PRNGKeyArray, shape: tuple[int, ...]
    ) -> Float[Array, "*shape"]:
        """Step indices uniform on ``{0, ..., T - 1}``, as integer-valued float32."""
        return jr.randint(key, shape, 0, self.num_timesteps).astype(jnp.float32)

    def interpolate(
        self, x0: Float[Array, "*x"], x1: Float[Array, "*x"], t: TimeLike
    ) -> tuple[Float[Array, "*x"], Float[Array, "*x"]]:
        """``(x_t, target)`` with ``x_t = sqrt(abar_t) x1 + sqrt(1 - abar_t) x0`` and ``target = x0``.

        ``x0`` is the noise and ``x1`` the data (DiT's ``q_sample``); one example, scalar ``t``.
        """
        index = _index(t)
        a = _gather(self.tables, "sqrt_alphas_cumprod", index).astype(x1.dtype)
        s = _gather(self.tables, "sqrt_one_minus_alphas_cumprod", index).astype(x0.dtype)
        return a * x1 + s * x0, x0

    def snap_time(self, t: Float[Array, " batch"]) -> Float[Array, " batch"]:
        """DiT's steps are integers: a second view's time is rounded to one."""
        return jnp.round(t)

    def draw_samples(
        self,
        model: eqx.Module,
        x_init: Float[Array, "batch c h w"],
        y: Int[Array, " batch"],
        *,
        key: PRNGKeyArray,
        config: SamplerConfig,
    ) -> Float[Array, "batch c h w"]:
        """DiT's ancestral DDPM, :func:`ddpm_sample`; ``config.steps`` is the number of respaced
        steps (DiT's ``--num-sampling-steps``)."""
        return ddpm_sample(
            model,
            x_init,
            y,
            key=key,
            diffusion=self,
            steps=config.steps,
            cfg_scale=config.cfg_scale,
            cfg_channels=config.cfg_channels,
        )

    def sampler_evaluations(self, config: SamplerConfig) -> int:
        """One evaluation a respaced step."""
        return config.steps

    def describe_sampler(self, config: SamplerConfig) -> str:
        text = f"DDPM, {config.steps} steps = {config.steps} evaluations each"
        if config.cfg_scale != 1.0:
            text += f", guidance {config.cfg_scale:g} doubles the batch"
        return text

    def model_time(self, t: float) -> float:
        """The step ``round((1 - t) (T - 1))`` (step 0 is the least noisy)."""
        return float(round((1.0 - t) * (self.num_timesteps - 1)))

    def loss(
        self,
        model_out: Float[Array, "c_out h w"],
        x0: Float[Array, "c h w"],
        x1: Float[Array, "c h w"],
        t: TimeLike,
    ) -> Float[Array, ""]:
        """DiT's per-example hybrid loss (``training_losses`` with ``LossType.MSE``), float32.

        **Arguments:**

        - `model_out`: the network output at ``x_t = interpolate(x0, x1, t)[0]``: ``eps_hat`` and,
          when ``learn_sigma``, the variance values ``v`` as channels ``[C:2C]``.
        - `x0`, `x1`: the noise and the data of the example.
        - `t`: its step index.

        **Returns:**

        ``mean((x0 - eps_hat)^2) + vb`` with, from ``eps_hat`` with its gradient stopped (only
        ``v`` learns from it), and the log-variance
        ``frac log beta_t + (1 - frac) posterior_log_variance_clipped_t``, ``frac = (v + 1) / 2``:
        ``vb`` = the mean KL (bits) of the true posterior ``q(x_{t-1} | x_t, x1)`` to the model's for
        ``t > 0``, and the mean negative discretised-Gaussian log-likelihood (bits) of ``x1`` for
        ``t = 0``. Without ``learn_sigma`` only the MSE (DiT: FIXED_LARGE variance, no VB).
        Take the batch mean of this, as DiT.
        """
        channels = x0.shape[0]
        expected = 2 * channels if self.learn_sigma else channels
        if model_out.shape[0] != expected:
            raise ValueError(
                f"the model output has {model_out.shape[0]} channels, expected {expected} "
                f"(learn_sigma={self.learn_sigma}, {channels} data channels)"
            )
        out = model_out.astype(jnp.float32)
        x0 = x0.astype(jnp.float32)
        x1 = x1.astype(jnp.float32)
        eps_hat = out[:channels]
        mse = jnp.mean((x0 - eps_hat) ** 2)
        if not self.learn_sigma:
            return mse

        tables = self.tables
        index = _index(t)
        x_t, _ = self.interpolate(x0, x1, index)
        # VB term: eps_hat frozen, so only the variance channels receive its gradient.
        log_var = _learned_range_log_variance(tables, index, out[channels:])
        x_start_hat = _predict_xstart(tables, index, x_t, jax.lax.stop_gradient(eps_hat))
        mean = _posterior_mean(tables, index, x_start_hat, x_t)
        true_mean = _posterior_mean(tables, index, x1, x_t)
        true_log_var = _gather(tables, "posterior_log_variance_clipped", index)
        kl = jnp.mean(normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)
        nll = -jnp.mean(
            discretized_gaussian_log_likelihood(x1, means=mean, log_scales=0.5 * log_var)
        ) / math.log(2.0)
        vb = jnp.where(index == 0, nll, kl)
        return mse + vb


def make_diffusion(
    num_timesteps: int = 1000, schedule: str = "linear", learn_sigma: bool = True
) -> GaussianDiffusion:
    """DiT's ``create_diffusion`` for training (no respacing): ``T`` steps of the ``schedule``.

    ``learn_sigma=True`` (DiT's default) expects ``2 C`` output channels and trains with the hybrid
    loss; ``False`` expects ``C`` and trains the plain MSE (sampling then uses FIXED_LARGE).
    """
    return GaussianDiffusion(
        num_timesteps=int(num_timesteps), schedule=schedule, learn_sigma=bool(learn_sigma)
    )


def _predict_xstart(tables, index, x_t, eps):
    return (
        _gather(tables, "sqrt_recip_alphas_cumprod", index) * x_t
        - _gather(tables, "sqrt_recipm1_alphas_cumprod", index) * eps
    )


def _posterior_mean(tables, index, x_start, x_t):
    return (
        _gather(tables, "posterior_mean_coef1", index) * x_start
        + _gather(tables, "posterior_mean_coef2", index) * x_t
    )


def _learned_range_log_variance(tables, index, v):
    frac = (v + 1) / 2
    max_log = _gather(tables, "log_betas", index)
    min_log = _gather(tables, "posterior_log_variance_clipped", index)
    return frac * max_log + (1 - frac) * min_log


# ----------------------------------------------------------------------------------------------
# Sampling


def _guided_network(model, y, *, channels, scale, null_label, cfg_channels):
    """The batched network ``(x, t) -> out`` with DiT's ``forward_with_cfg`` applied.

    The same pattern as :func:`eqdisp.samplers.cfg_velocity` (doubled batch; scale 1 runs the
    conditional model only; unguided channels keep the conditional output), written out here
    because the output has ``2 C`` channels where ``cfg_velocity`` returns the input's ``C``.
    """
    if null_label is None:
        null_label = getattr(model, "num_classes", None)
        if null_label is None and scale != 1.0:
            raise ConfigError(
                "null_label=None is not allowed: the model has no num_classes; pass null_label"
            )
    if cfg_channels is not None and cfg_channels < 1:
        raise ConfigError(f"cfg_channels={cfg_channels!r} is not allowed: expected None or >= 1")
    # Like DiT's model_out[:, :3]: with fewer eps channels than that, all of them are guided.
    guided_channels = channels if cfg_channels is None else min(int(cfg_channels), channels)

    def forward(x, t, labels):
        return jax.vmap(lambda xi, yi: model(xi, t, yi))(x, labels).astype(jnp.float32)

    def network(x, t):
        if scale == 1.0:
            return forward(x, t, y)
        null = jnp.full_like(y, null_label)
        cond, uncond = jnp.split(forward(jnp.concatenate([x, x]), t, jnp.concatenate([y, null])), 2)
        # DiT's forward_with_cfg: eps channels [:cfg_channels] guided; the other eps channels and
        # all variance channels from the conditional half (the half DiT's sample.py keeps).
        g = uncond[:, :guided_channels] + scale * (
            cond[:, :guided_channels] - uncond[:, :guided_channels]
        )
        return jnp.concatenate([g, cond[:, guided_channels:]], axis=1)

    return network


def _split_output(out, channels, learn_sigma):
    expected = 2 * channels if learn_sigma else channels
    if out.shape[1] != expected:
        raise ValueError(
            f"the model output has {out.shape[1]} channels, expected {expected} "
            f"(learn_sigma={learn_sigma}, {channels} data channels)"
        )
    return out[:, :channels], (out[:, channels:] if learn_sigma else None)


def _scan_inputs(
    diffusion: GaussianDiffusion, steps: int | str, key: PRNGKeyArray, names: tuple[str, ...]
) -> dict[str, Array]:
    """Per-step inputs of a respaced sampler's ``lax.scan``: the named tables, the original
    timestep the model sees, whether noise is added (not at the last step), and a key."""
    timestep_map, tables = diffusion.respaced(steps)
    n = len(timestep_map)
    # Step i of the scan is respaced step n-1-i: the tables reversed, as float32 constants.
    return {
        **{name: jnp.asarray(tables.float32(name)[::-1].copy()) for name in names},
        "t_model": jnp.asarray(np.asarray(timestep_map[::-1], np.float32)),
        "noise_scale": jnp.asarray((np.arange(n)[::-1] != 0).astype(np.float32)),
        "key": jr.split(key, n),
    }


@eqx.filter_jit
def ddpm_sample(
    model: Callable[..., Float[Array, "c_out h w"]],
    x_init: Float[Array, "batch c h w"],
    y: Int[Array, " batch"],
    *,
    key: PRNGKeyArray,
    diffusion: GaussianDiffusion,
    steps: int | str = 250,
    cfg_scale: float = 1.0,
    cfg_channels: int | None = 3,
    null_label: int | None = None,
) -> Float[Array, "batch c h w"]:
    """DiT's ancestral sampler (``p_sample_loop`` of ``create_diffusion(str(steps))``).

    For respaced steps ``i = steps-1, ..., 0`` with original steps ``tau_i``
    (``round(linspace(0, T-1, steps))``) and tables rebuilt from the respaced betas:

    - ``eps, v = model(x, tau_i, y)`` (the network gets the *original* index, as a float);
    - ``x0_hat = sqrt(1/abar'_i) x - sqrt(1/abar'_i - 1) eps``, not clipped (``clip_denoised=False``);
    - ``mean = coef1'_i x0_hat + coef2'_i x``; LEARNED_RANGE
      ``log var = frac log beta'_i + (1 - frac) posterior_log_variance_clipped'_i``, ``frac = (v+1)/2``
      (FIXED_LARGE without ``learn_sigma``);
    - ``x <- mean + exp(log var / 2) z``, without noise at ``i = 0``.

    **Arguments:**

    - `model`: ``model(x, t, y, *, key=None)`` on one example; outputs ``2 C`` channels
      (``eps | v``) when ``diffusion.learn_sigma``, else ``C``.
    - `x_init`: the starting noise ``x_{T-1}`` (DiT's ``z``).
    - `y`: the labels.
    - `key`: the randomness of the ancestral steps.
    - `diffusion`: the (unrespaced) diffusion the model was trained with.
    - `steps`: the respacing, an int or a string for :func:`space_timesteps` (DiT: 250).
    - `cfg_scale`: classifier-free guidance scale; exactly 1 runs only the conditional model.
    - `cfg_channels`: guide only eps channels ``[:cfg_channels]`` (3 is DiT's GLIDE leftover);
      ``None`` (or a number >= C) guides all eps channels. The variance channels are never guided.
    - `null_label`: the unconditional label; defaults to ``model.num_classes``.

    **Returns:**

    The samples (``x`` at respaced step 0), float32. One compiled program: a ``lax.scan`` over
    the steps, the model vmapped over the batch (doubled under guidance).
    """
    channels = x_init.shape[1]
    network = _guided_network(
        model,
        y,
        channels=channels,
        scale=cfg_scale,
        null_label=null_label,
        cfg_channels=cfg_channels,
    )
    var_names = (
        ("log_betas", "posterior_log_variance_clipped")
        if diffusion.learn_sigma
        else ("fixed_large_log_variance",)
    )
    xs = _scan_inputs(
        diffusion,
        steps,
        key,
        (
            "sqrt_recip_alphas_cumprod",
            "sqrt_recipm1_alphas_cumprod",
            "posterior_mean_coef1",
            "posterior_mean_coef2",
            *var_names,
        ),
    )

    def step(x, c):
        eps, v = _split_output(network(x, c["t_model"]), channels, diffusion.learn_sigma)
        x_start = c["sqrt_recip_alphas_cumprod"] * x - c["sqrt_recipm1_alphas_cumprod"] * eps
        mean = c["posterior_mean_coef1"] * x_start + c["posterior_mean_coef2"] * x
        if diffusion.learn_sigma:
            frac = (v + 1) / 2
            log_var = frac * c["log_betas"] + (1 - frac) * c["posterior_log_variance_clipped"]
        else:
            log_var = c["fixed_large_log_variance"]
        z = jr.normal(c["key"], x.shape, jnp.float32)
        return mean + c["noise_scale"] * jnp.exp(0.5 * log_var) * z, None

    x, _ = jax.lax.scan(step, x_init.astype(jnp.float32), xs)
    return x


@eqx.filter_jit
def ddim_sample(
    model: Callable[..., Float[Array, "c_out h w"]],
    x_init: Float[Array, "batch c h w"],
    y: Int[Array, " batch"],
    *,
    key: PRNGKeyArray,
    diffusion: GaussianDiffusion,
    steps: int | str = 250,
    eta: float = 0.0,
    cfg_scale: float = 1.0,
    cfg_channels: int | None = 3,
    null_label: int | None = None,
) -> Float[Array, "batch c h w"]:
    """DiT's DDIM sampler (``ddim_sample_loop``) on the respaced schedule; DiT's scripts do not use it.

    At respaced step ``i`` (model called with ``tau_i``): ``x0_hat`` as in :func:`ddpm_sample`
    (unclipped), ``eps = (sqrt(1/abar'_i) x - x0_hat) / sqrt(1/abar'_i - 1)``,
    ``sigma = eta sqrt((1 - abar'_{i-1}) / (1 - abar'_i)) sqrt(1 - abar'_i / abar'_{i-1})`` and
    ``x <- sqrt(abar'_{i-1}) x0_hat + sqrt(1 - abar'_{i-1} - sigma^2) eps + sigma z``, without
    noise at ``i = 0``. ``eta = 0`` is deterministic (then `key` is unused). The variance channels
    are ignored. Other arguments: :func:`ddpm_sample`.
    """
    channels = x_init.shape[1]
    network = _guided_network(
        model,
        y,
        channels=channels,
        scale=cfg_scale,
        null_label=null_label,
        cfg_channels=cfg_channels,
    )
    xs = _scan_inputs(
        diffusion,
        steps,
        key,
        (
            "sqrt_recip_alphas_cumprod",
            "sqrt_recipm1_alphas_cumprod",
            "alphas_cumprod",
            "alphas_cumprod_prev",
        ),
    )
    eta = jnp.asarray(eta, jnp.float32)

    def step(x, c):
        eps, _ = _split_output(network(x, c["t_model"]), channels, diffusion.learn_sigma)
        x_start = c["sqrt_recip_alphas_cumprod"] * x - c["sqrt_recipm1_alphas_cumprod"] * eps
        eps = (c["sqrt_recip_alphas_cumprod"] * x - x_start) / c["sqrt_recipm1_alphas_cumprod"]
        abar, abar_prev = c["alphas_cumprod"], c["alphas_cumprod_prev"]
        sigma = eta * jnp.sqrt((1 - abar_prev) / (1 - abar)) * jnp.sqrt(1 - abar / abar_prev)
        mean = x_start * jnp.sqrt(abar_prev) + jnp.sqrt(1 - abar_prev - sigma**2) * eps
        z = jr.normal(c["key"], x.shape, jnp.float32)
        return mean + c["noise_scale"] * sigma * z, None

    x, _ = jax.lax.scan(step, x_init.astype(jnp.float32), xs)
    return x


__all__ = [
    "DiffusionTables",
    "GaussianDiffusion",
    "approx_standard_normal_cdf",
    "beta_schedule",
    "ddim_sample",
    "ddpm_sample",
    "discretized_gaussian_log_likelihood",
    "make_diffusion",
    "normal_kl",
    "respaced_betas",
    "space_timesteps",
]
