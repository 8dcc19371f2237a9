"""MeanFlow (Geng et al. 2025): the training target, loss and 1-/2-step sampler, as pure functions.

Facts and constants are read from the official JAX code ``Gsunshine/meanflow`` (``meanflow.py``,
class ``MeanFlow``; defaults from ``configs/default.py``). Formulas cite its methods.

**Time convention (MeanFlow's, the opposite of the rest of eqdisp).** Here ``t = 0`` is data and
``t = 1`` is noise: ``z_t = (1 - t) x + t e`` with ``e ~ N(0, I)``, the conditional velocity is
``v = e - x``, and sampling runs backwards from ``t = 1`` to ``t = 0``. SiT and
:mod:`eqdisp.transport` use ``t = 1`` data, ``t = 0`` noise. MeanFlow nets are fed this ``t``
as is, in [0, 1] (no x1000), so do not convert: these functions never call a SiT-convention model.

The network learns the *average velocity* ``u(z_t, r, t) = 1/(t - r) int_r^t v(z_s, s) ds`` for
``r <= t``; one sampling step is ``z_r = z_t - (t - r) u(z_t, r, t)``. It is conditioned on the
pair ``(t, h = t - r)`` (two time embedders summed into adaLN's ``c``: ``t_embedder`` and
``h_embedder`` in Gsunshine/meanflow ``models/models_dit.py``).

**The network protocol.** Every function takes a per-example network

    net(x, t, h, y, *, tap_blocks) -> (u, taps)

with ``x`` one input ``(c, h, w)`` (channels first), ``t`` and ``h`` 0-d float arrays, ``y`` a 0-d
int label (``num_classes`` is the null label), ``tap_blocks`` a tuple of 0-based block indices,
``u`` the average velocity with the shape of ``x`` and ``taps`` a ``Taps``-like module whose
``blocks`` field is ``Float[Array, "taps tokens dim"]`` (:class:`eqdisp.models.Taps`). Batching is
``jax.vmap`` here, never in the network. To differentiate with respect to the parameters, make
``net`` an ``eqx.Module`` (then ``eqx.filter_grad`` over it works).

**Index coupling (reproduced on purpose).** The official code chooses both masks by position in
the (per-device) batch: the first ``floor(data_proportion * batch)`` examples get ``r = t``
(`sample_tr`), and the first ``num_drop ~ Binomial(batch, 0.1)`` examples get the null label
(`cond_drop`). So the dropped labels almost always fall on ``r = t`` examples, and the ``r < t``
examples (the last 25%) are nearly never unconditional. A random mask would be the unbiased
alternative; eqdisp keeps the official behaviour so that results are comparable.
"""

from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax import lax
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .config import ConfigError, DispConfig, MeanFlowConfig, SamplerConfig, _check
from .objective import AbstractObjective, block_regularizers

MeanFlowNet = Callable[..., tuple[Float[Array, "c h w"], Any]]
"""``net(x, t, h, y, *, tap_blocks) -> (u, taps)`` on one example (see the module docstring)."""

DispFn = Callable[[Float[Array, "batch feature"]], Float[Array, ""]]
"""A dispersive loss of a batch of flattened representations, e.g.
``lambda z: eqdisp.dispersive_loss(z, "infonce_l2", tau=0.5, group_size=16)``."""


# ----------------------------------------------------------------------------------------------
# Training inputs: times, guided velocity, label dropout (batch level)


def _per_example(a: Float[Array, " batch"]) -> Float[Array, "batch 1 1 1"]:
    return a[:, None, None, None]


def sample_tr(
    key: PRNGKeyArray,
    batch: int,
    *,
    p_mean: float = -0.4,
    p_std: float = 1.0,
    data_proportion: float = 0.75,
) -> tuple[Float[Array, " batch"], Float[Array, " batch"]]:
    """The training times ``(t, r)``, Gsunshine/meanflow meanflow.py `MeanFlow.sample_tr`.

    Two independent logit-normal draws ``sigmoid(p_std n + p_mean)``, ``n ~ N(0, 1)``; ``t`` is
    their maximum and ``r`` their minimum. The first ``floor(data_proportion * batch)`` examples
    then get ``r := t`` (deterministic by index, as the official code does).

    **Arguments:**

    - `key`: randomness for the two draws.
    - `batch`: the number of examples.
    - `p_mean`, `p_std`: the logit-normal parameters.
    - `data_proportion`: the fraction of ``r = t`` examples, taken from the start of the batch.

    **Returns:**

    ``(t, r)``, float32, ``0 < r <= t < 1`` (MeanFlow time: t = 1 is noise).
    """
    s = jax.nn.sigmoid(p_std * jr.normal(key, (2, batch), jnp.float32) + p_mean)
    t, r = jnp.max(s, axis=0), jnp.min(s, axis=0)
    flow_matching = jnp.arange(batch) < int(data_proportion * batch)
    return t, jnp.where(flow_matching, t, r)


def guided_velocity(
    net: MeanFlowNet,
    z: Float[Array, "batch c h w"],
    t: Float[Array, " batch"],
    v: Float[Array, "batch c h w"],
    y: Int[Array, " batch"],
    *,
    num_classes: int,
    omega: float = 1.0,
    kappa: float = 0.5,
    interval: tuple[float, float] = (0.0, 1.0),
) -> Float[Array, "batch c h w"]:
    """The guided training velocity ``v_g``: classifier-free guidance folded into the target,
    Gsunshine/meanflow meanflow.py `MeanFlow.guidance_fn`.

    With ``u_cfg(y) = net(z_t, t, h=0, y)`` (``r = t``, no taps) and ``null = num_classes``:

    - ``kappa == 0``: ``v_g = u_cfg(null) + omega (v - u_cfg(null))``, one extra forward;
    - ``kappa > 0``: ``v_g = omega v + kappa u_cfg(y) + (1 - omega - kappa) u_cfg(null)``, two;
    - ``(omega, kappa) == (1, 0)``: ``v_g = v`` exactly, no forward.

    Examples whose ``t`` is outside ``interval`` use ``(omega, kappa) = (1, 0)``, so ``v_g = v``.

    **Arguments:**

    - `net`: the MeanFlow network on one example (module docstring).
    - `z`, `t`: the noisy batch ``z_t`` and its times (MeanFlow time, t = 1 noise).
    - `v`: the conditional velocity ``e - x``.
    - `y`: the labels.
    - `num_classes`: the null label.
    - `omega`, `kappa`, `interval`: as in :class:`MeanFlowConfig`.

    **Returns:**

    ``v_g``, under ``stop_gradient``: it only enters the stop-gradient target (the official code
    does not stop it explicitly; the gradients are the same).
    """
    if omega == 1.0 and kappa == 0.0:
        return v

    def forward(labels: Int[Array, " batch"]) -> Float[Array, "batch c h w"]:
        def one(z_i, t_i, y_i):
            return net(z_i, t_i, jnp.zeros_like(t_i), y_i, tap_blocks=())[0]

        return jax.vmap(one)(z, t, labels)

    low, high = interval
    inside = (t >= low) & (t <= high)
    w = _per_example(jnp.where(inside, omega, 1.0).astype(v.dtype))
    u_null = forward(jnp.full_like(y, num_classes))
    if kappa == 0.0:
        v_g = u_null + w * (v - u_null)
    else:
        k = _per_example(jnp.where(inside, kappa, 0.0).astype(v.dtype))
        u_cond = forward(y)
        v_g = w * v + k * u_cond + (1 - w - k) * u_null
    return lax.stop_gradient(v_g)


def cond_drop(
    key: PRNGKeyArray,
    y: Int[Array, " batch"],
    v: Float[Array, "batch c h w"],
    v_g: Float[Array, "batch c h w"],
    *,
    num_classes: int,
    prob: float = 0.1,
) -> tuple[Int[Array, " batch"], Float[Array, "batch c h w"]]:
    """Label dropout for classifier-free guidance, Gsunshine/meanflow meanflow.py
    `MeanFlow.cond_drop`.

    ``num_drop = sum_i [U_i < prob]`` with ``U ~ Uniform(0, 1)^batch`` (a Binomial count); the
    **first** ``num_drop`` examples get the null label and the plain velocity ``v`` as their
    target (an unconditional network is trained without guidance). See the module docstring for
    how this couples with the ``r = t`` prefix of `sample_tr`.

    **Arguments:**

    - `key`: randomness for the count.
    - `y`: the labels.
    - `v`: the conditional velocity ``e - x``.
    - `v_g`: the guided velocity from `guided_velocity`.
    - `num_classes`: the null label.
    - `prob`: the class-dropout probability.

    **Returns:**

    ``(y_inp, v_g)``: the labels fed to the network and the velocity of the target.
    """
    batch = y.shape[0]
    num_drop = jnp.sum(jr.uniform(key, (batch,)) < prob)
    drop = jnp.arange(batch) < num_drop
    y_inp = jnp.where(drop, num_classes, y).astype(y.dtype)
    return y_inp, jnp.where(drop[:, None, None, None], v, v_g)


# ----------------------------------------------------------------------------------------------
# Target via the JVP, and the loss


def meanflow_jvp(
    net: MeanFlowNet,
    z: Float[Array, "batch c h w"],
    t: Float[Array, " batch"],
    r: Float[Array, " batch"],
    y: Int[Array, " batch"],
    v_g: Float[Array, "batch c h w"],
    *,
    tap_blocks: Sequence[int] = (),
) -> tuple[Float[Array, "batch c h w"], Float[Array, "batch c h w"], Any]:
    """The prediction ``u`` and its total time derivative ``du/dt`` in one forward-mode pass,
    Gsunshine/meanflow meanflow.py `MeanFlow.forward`.

    Per example, ``jax.jvp`` of ``f(z, t, r) = net(z, t, t - r, y)`` at ``(z_t, t, r)`` along the
    tangent ``(v_g, 1, 0)``: the total derivative ``du/dt = (d_z u) v_g + d_t u + d_h u`` along
    ``dz/dt = v_g``, ``dr/dt = 0`` (the input ``h = t - r`` moves with ``t``). The taps come out as ``jax.jvp``'s ``aux``: the activations of the primal pass, which
    stay differentiable for an outer ``jax.grad``; the tangent pass contributes none.

    **Arguments:**

    - `net`: the MeanFlow network on one example (module docstring).
    - `z`, `t`, `r`: the noisy batch ``z_t`` and its times, ``r <= t``.
    - `y`: the labels fed to the network (after `cond_drop`).
    - `v_g`: the velocity along which ``z`` moves (the guided velocity).
    - `tap_blocks`: 0-based blocks whose outputs the network returns in its taps.

    **Returns:**

    ``(u, dudt, taps)``, batched over the first axis. ``u`` carries gradients; ``dudt`` is meant
    for the stop-gradient target (`meanflow_target`).
    """
    tap_blocks = tuple(tap_blocks)

    def one(z_i, t_i, r_i, y_i, v_i):
        def f(z_, t_, r_):
            return net(z_, t_, t_ - r_, y_i, tap_blocks=tap_blocks)

        tangents = (v_i, jnp.ones_like(t_i), jnp.zeros_like(r_i))
        return jax.jvp(f, (z_i, t_i, r_i), tangents, has_aux=True)

    return jax.vmap(one)(z, t, r, y, v_g)


def meanflow_target(
    v_g: Float[Array, "batch c h w"],
    dudt: Float[Array, "batch c h w"],
    t: Float[Array, " batch"],
    r: Float[Array, " batch"],
) -> Float[Array, "batch c h w"]:
    """The MeanFlow identity as a regression target (MeanFlow Eq. 10; `MeanFlow.forward`):
    ``u_tgt = stop_gradient(v_g - clip(t - r, 0, 1) du/dt)``; ``v_g`` where ``r = t``.

    **Arguments:** the guided velocity, ``du/dt`` from `meanflow_jvp`, and the times.

    **Returns:** the target, with no gradient.
    """
    h = _per_example(jnp.clip(t - r, 0.0, 1.0)).astype(dudt.dtype)
    return lax.stop_gradient(v_g - h * dudt)


def meanflow_loss(
    net: MeanFlowNet,
    x: Float[Array, "batch c h w"],
    y: Int[Array, " batch"],
    *,
    key: PRNGKeyArray,
    num_classes: int,
    config: MeanFlowConfig = MeanFlowConfig(),
    disp_fn: DispFn | None = None,
    disp_weight: float | None = None,
    tap_blocks: Sequence[int] = (),
) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
    """MeanFlow's training loss plus, optionally, lambda times the Dispersive Loss,
    Gsunshine/meanflow meanflow.py `MeanFlow.forward`; the Dispersive term on one block as in
    Wang & He 2025, Appendix A.

    Batch level (the network runs per example under ``jax.vmap``):

    1. ``key_time, key_noise, key_drop = jr.split(key, 3)``; ``(t, r)`` from `sample_tr`;
        ``e ~ N(0, I)``; ``z_t = (1 - t) x + t e`` and ``v = e - x`` (MeanFlow time: t = 1 noise).
    2. ``v_g`` from `guided_velocity`, then ``(y_inp, v_g)`` from `cond_drop`.
    3. ``u, du/dt, taps`` from `meanflow_jvp`; ``u_tgt`` from `meanflow_target`.
    4. Per example ``err = sum_{c,h,w} (u - u_tgt)^2``; adaptive weight
        ``w = stop_gradient(1 / (err + norm_eps)^norm_p)``; ``loss_mf = mean(w err)``.
    5. With `disp_fn`: the primal taps of each tapped block, flattened to ``(batch, tokens * dim)``,
        go through `disp_fn`; ``loss_disp`` is the mean over blocks and
        ``loss = loss_mf + disp_weight * loss_disp``.

    **Arguments:**

    - `net`: the MeanFlow network on one example (module docstring); an ``eqx.Module`` to take
        gradients with respect to its parameters.
    - `x`: a batch of data (latents), channels first.
    - `y`: class labels in ``[0, num_classes)``.
    - `key`: randomness for the times, the noise and the label dropout.
    - `num_classes`: the number of classes; ``num_classes`` is the null label.
    - `config`: the MeanFlow constants.
    - `disp_fn`: the dispersive loss of a ``(batch, feature)`` array, or ``None`` for MeanFlow
        alone (then no block is tapped unless `tap_blocks` asks).
    - `disp_weight`: lambda, required with `disp_fn`.
    - `tap_blocks`: 0-based blocks to regularise (MF-B: ``(2,)``, MF-XL/2: ``(6,)``: block
      ``depth // 4``, "the same single block as in our SiT experiments", Wang & He 2025, App. A;
      ``depth=num_layers//4`` in the ``raywang4/DispLoss`` README, "Differences from JAX").

    **Returns:**

    ``(loss, metrics)``, float32 scalars: ``loss_mf`` (the weighted MeanFlow loss),
    ``loss_mf_unweighted`` (``mean(err)``), ``v_loss`` (``mean sum (u - v)^2``, monitoring
    only) and ``loss_disp`` (unweighted; 0 without `disp_fn`).
    """
    if disp_fn is not None and (disp_weight is None or not tuple(tap_blocks)):
        raise ValueError(
            f"disp_fn needs disp_weight (got {disp_weight!r}) and at least one of tap_blocks "
            f"(got {tuple(tap_blocks)!r})"
        )
    loss_mf, metrics, taps = meanflow_terms(
        net, x, y, key=key, num_classes=num_classes, config=config, tap_blocks=tap_blocks
    )
    if disp_fn is None:
        return loss_mf, metrics
    batch = x.shape[0]
    blocks = taps.blocks  # (batch, taps, tokens, dim): the primal pass only
    per_block = [disp_fn(blocks[:, b].reshape(batch, -1)) for b in range(blocks.shape[1])]
    loss_disp = jnp.mean(jnp.stack(per_block).astype(jnp.float32))
    metrics["loss_disp"] = loss_disp
    return loss_mf + disp_weight * loss_disp, metrics


def meanflow_terms(
    net: MeanFlowNet,
    x: Float[Array, "batch c h w"],
    y: Int[Array, " batch"],
    *,
    key: PRNGKeyArray,
    num_classes: int,
    config: MeanFlowConfig = MeanFlowConfig(),
    tap_blocks: Sequence[int] = (),
) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]], Any]:
    """Steps 1-4 of `meanflow_loss`: ``(loss_mf, metrics, taps)`` with the taps of the primal
    pass (batched: ``taps.blocks`` is ``(batch, taps, tokens, dim)``), for a caller that computes
    its own regulariser from them (`MeanFlow.training_terms`)."""
    batch = x.shape[0]
    key_time, key_noise, key_drop = jr.split(key, 3)
    t, r = sample_tr(
        key_time,
        batch,
        p_mean=config.p_mean,
        p_std=config.p_std,
        data_proportion=config.data_proportion,
    )
    e = jr.normal(key_noise, x.shape, x.dtype)
    t_x = _per_example(t).astype(x.dtype)
    z = (1 - t_x) * x + t_x * e
    v = e - x
    v_g = guided_velocity(
        net,
        z,
        t,
        v,
        y,
        num_classes=num_classes,
        omega=config.omega,
        kappa=config.kappa,
        interval=config.guidance_interval,
    )
    y_inp, v_g = cond_drop(
        key_drop, y, v, v_g, num_classes=num_classes, prob=config.class_dropout_prob
    )
    u, dudt, taps = meanflow_jvp(net, z, t, r, y_inp, v_g, tap_blocks=tap_blocks)
    u_tgt = meanflow_target(v_g, dudt, t, r)

    err = _sum_squares(u - u_tgt)
    weight = lax.stop_gradient(1.0 / (err + config.norm_eps) ** config.norm_p)
    loss_mf = jnp.mean(weight * err)
    metrics = {
        "loss_mf": loss_mf,
        "loss_mf_unweighted": jnp.mean(err),
        "v_loss": lax.stop_gradient(jnp.mean(_sum_squares(u - v))),
        "loss_disp": jnp.zeros((), jnp.float32),
    }
    return loss_mf, metrics, taps


def _sum_squares(a: Float[Array, "batch c h w"]) -> Float[Array, " batch"]:
    return jnp.sum(jnp.square(a.astype(jnp.float32)), axis=(1, 2, 3))


# ----------------------------------------------------------------------------------------------
# Sampling


def time_grid(steps: int | Sequence[float | int]) -> tuple[float, ...]:
    """The sampling times from noise to data: ``linspace(1, 0, steps + 1)`` for an int (1 step:
    ``(1, 0)``; 2 steps: ``(1, 0.5, 0)``, as the third-party ports do), else the given times,
    which must decrease strictly within [0, 1] (the official config's
    ``sampling.sampling_timesteps``, read by ``generate`` in Gsunshine/meanflow ``meanflow.py``)."""
    if isinstance(steps, int) and not isinstance(steps, bool):
        _check(steps >= 1, "meanflow steps", steps, "an int >= 1 or a decreasing list of times")
        return tuple(float(s) for s in np.linspace(1.0, 0.0, steps + 1))
    grid = tuple(float(s) for s in steps)
    ok = len(grid) >= 2 and all(1.0 >= a > b >= 0.0 for a, b in zip(grid, grid[1:]))
    _check(ok, "meanflow steps", steps, "at least two times decreasing strictly within [0, 1]")
    return grid


def meanflow_sample(
    net: MeanFlowNet,
    z1: Float[Array, "batch c h w"],
    y: Int[Array, " batch"],
    *,
    steps: int | Sequence[float | int] = 1,
) -> Float[Array, "batch c h w"]:
    """Few-step MeanFlow sampling, Gsunshine/meanflow meanflow.py `MeanFlow.sample_one_step` under
    `generate`'s loop: ``z <- z - (t - r) u(z, t, h = t - r, y)`` over consecutive times
    ``t > r`` of `time_grid(steps)`.

    One network evaluation per step; no guidance at inference (it is part of the training
    target). The steps run under one ``lax.scan``.

    **Arguments:**

    - `net`: the MeanFlow network on one example (module docstring).
    - `z1`: Gaussian noise, the state at ``t = 1``.
    - `y`: labels (``num_classes`` for unconditional samples).
    - `steps`: the number of steps (1 or 2 in the paper) or a decreasing time grid from 1 to 0.

    **Returns:**

    The samples at the grid's last time (``t = 0``: data).
    """
    grid = time_grid(steps)
    times = jnp.asarray(grid[:-1], jnp.float32), jnp.asarray(grid[1:], jnp.float32)

    def step(z, tr):
        t, r = tr
        h = t - r

        def one(z_i, y_i):
            return net(z_i, t, h, y_i, tap_blocks=())[0]

        u = jax.vmap(one)(z, y)
        return z - h.astype(z.dtype) * u.astype(z.dtype), None

    z0, _ = lax.scan(step, z1, times)
    return z0


# ----------------------------------------------------------------------------------------------
# The objective


class MeanFlow(AbstractObjective):
    """MeanFlow as an eqdisp objective: `meanflow_loss`'s target with the Dispersive Loss on the
    primal pass, and `meanflow_sample`'s few-step sampler (``SamplerConfig.steps`` grid points).

    The model is an ``MF-*`` :class:`eqdisp.models.DiffusionTransformer` (a DiT with a second
    timestep embedder); `MeanFlow` feeds it ``h = t - r`` through ``forward_with_taps(..., h=)``.
    Times are MeanFlow's (t = 1 noise); `model_time` maps eqdisp's analysis time to them.
    The contrastive counterparts (two noised views) are not defined for MeanFlow.
    """

    config: MeanFlowConfig = eqx.field(static=True)
    num_classes: int = eqx.field(static=True)

    def training_terms(
        self,
        model: eqx.Module,
        x1: Float[Array, "batch c h w"],
        y: Int[Array, " batch"],
        *,
        key: PRNGKeyArray,
        disp: DispConfig,
        tap_blocks: tuple[int, ...],
    ) -> tuple[Float[Array, ""], Float[Array, " taps"], dict[str, Float[Array, ""]]]:
        """MeanFlow's adaptively weighted loss (close to 1 by construction: ``err / (err +
        0.01)``), the primal taps' regularisers, and for the log the unweighted loss
        ``loss_mf_unweighted`` and ``v_loss`` (`meanflow_loss`)."""
        if tap_blocks and disp.contrastive != "off":
            raise ConfigError(
                f"disp.contrastive={disp.contrastive!r} is not allowed with MeanFlow: expected "
                "'off' (the contrastive counterparts are defined for one-time objectives)"
            )
        net = _ModelNet(model)
        loss_mf, metrics, taps = meanflow_terms(
            net, x1, y, key=key, num_classes=self.num_classes, config=self.config,
            tap_blocks=tap_blocks,
        )
        logs = {k: metrics[k] for k in ("loss_mf_unweighted", "v_loss")}
        if not tap_blocks:
            return loss_mf, jnp.zeros((0,), jnp.float32), logs
        return loss_mf, block_regularizers(taps.blocks, disp), logs

    def draw_samples(
        self,
        model: eqx.Module,
        x_init: Float[Array, "batch c h w"],
        y: Int[Array, " batch"],
        *,
        key: PRNGKeyArray,
        config: SamplerConfig,
    ) -> Float[Array, "batch c h w"]:
        """`meanflow_sample` from the noise `x_init` over ``config.steps`` equally spaced grid
        points, counted as SiT counts them: 2 points are MeanFlow's 1-step sampling, 3 its 2-step.
        Deterministic (`key` is unused); guidance is in the weights, so ``config.cfg_scale`` must
        be 1."""
        if config.cfg_scale != 1.0:
            raise ConfigError(
                f"sampler.cfg_scale={config.cfg_scale!r} is not allowed with MeanFlow: expected 1 "
                "(guidance is trained into the model: meanflow.omega, meanflow.kappa)"
            )
        return meanflow_sample(_ModelNet(model), x_init, y, steps=config.steps - 1)

    def sampler_evaluations(self, config: SamplerConfig) -> int:
        """One evaluation a step: ``config.steps - 1``."""
        return config.steps - 1

    def describe_sampler(self, config: SamplerConfig) -> str:
        n = config.steps - 1
        return f"MeanFlow, {config.steps} grid points = {n} step{'s' if n > 1 else ''} = {n} evaluations each"

    def model_time(self, t: float) -> float:
        """MeanFlow's t = 1 is noise: eqdisp's `t` is ``1 - t``."""
        return 1.0 - t

    def interpolate(
        self, x0: Float[Array, "*x"], x1: Float[Array, "*x"], t: Float[Array, ""] | float
    ) -> tuple[Float[Array, "*x"], Float[Array, "*x"]]:
        """``z_t = (1 - t) x1 + t x0`` and the conditional velocity ``x0 - x1`` (data `x1`, noise
        `x0`; MeanFlow's time)."""
        t = jnp.asarray(t, x1.dtype)
        return (1 - t) * x1 + t * x0, x0 - x1


class _ModelNet(eqx.Module):
    """An eqdisp MF model in the network protocol of this module."""

    model: eqx.Module

    def __call__(self, x, t, h, y, *, tap_blocks):
        return self.model.forward_with_taps(x, t, y, h=h, tap_blocks=tap_blocks)



__all__ = [
    "MeanFlow",
    "MeanFlowConfig",
    "cond_drop",
    "guided_velocity",
    "meanflow_jvp",
    "meanflow_loss",
    "meanflow_terms",
    "meanflow_sample",
    "meanflow_target",
    "sample_tr",
    "time_grid",
]
