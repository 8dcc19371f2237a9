"""The training objective: SiT's regression loss plus lambda times the Dispersive Loss (paper Eq. 1).

``L = mean_i L_diff(x_i) + lambda * mean_b L_disp({z_i^b})`` where ``z^b`` is the output of block b of
the model on the noised batch (``Taps.blocks``). With ``disp.variant == "none"`` or
``disp.weight == 0`` the model is asked for no taps, so the traced program is *the* baseline
program: same numbers, same speed.

The contrastive counterparts of paper Table 2 run a second noised view of every example through
the model and replace the dispersive term by ``contrastive_loss(z, z_pos)``; as in the paper, only
the first view receives the diffusion loss.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .config import DispConfig, ExperimentConfig, SamplerConfig
from .diffusion import GaussianDiffusion, ddpm_sample, make_diffusion
from .dispersive import contrastive_loss, dispersive_loss
from .models import parse_model_name
from .samplers import sample
from .transport import Transport, make_transport

Objective = Transport | GaussianDiffusion
"""What a model is trained with: SiT's interpolant (``Transport``) or DiT's ``GaussianDiffusion``.
Both offer ``sample_train_time``, ``interpolate``, ``loss`` and ``train_interval``."""


def make_objective(cfg: ExperimentConfig) -> Objective:
    """The objective of the references for this model: DiT's diffusion for DiT, SiT's transport else."""
    if parse_model_name(cfg.model.name).family == "DiT":
        return make_diffusion(learn_sigma=cfg.model.learn_sigma)
    return make_transport(cfg.transport)


def draw_samples(
    model: eqx.Module,
    x_init: Float[Array, "batch c h w"],
    y: Int[Array, " batch"],
    *,
    key: PRNGKeyArray,
    objective: Objective,
    config: SamplerConfig,
) -> Float[Array, "batch c h w"]:
    """Samples with the sampler that matches the objective: SiT's ODE/SDE or DiT's DDPM.

    For DiT, ``config.steps`` is the number of respaced DDPM steps (DiT's ``--num-sampling-steps``).
    """
    if isinstance(objective, GaussianDiffusion):
        return ddpm_sample(
            model,
            x_init,
            y,
            key=key,
            diffusion=objective,
            steps=config.steps,
            cfg_scale=config.cfg_scale,
            cfg_channels=config.cfg_channels,
        )
    return sample(model, x_init, y, key=key, transport=objective, config=config)


def sampler_evaluations(objective: Objective, sampler: SamplerConfig) -> int | None:
    """Network evaluations per sample of `draw_samples` (the counting of `sample` and
    `ddpm_sample`; guidance doubles the batch of each, not their number); None for ``dopri5``,
    whose steps are adaptive."""
    steps = sampler.steps
    if isinstance(objective, GaussianDiffusion):  # DiT runs: ancestral DDPM, one evaluation a step
        return steps
    if sampler.mode == "ode":
        return {"heun": 2 * (steps - 1), "euler": steps - 1}.get(sampler.ode_method)
    # steps - 1 stochastic steps, then one evaluation for the last step unless it is "none"
    last = 0 if sampler.last_step == "none" else 1
    return (2 if sampler.sde_method == "heun" else 1) * (steps - 1) + last


def describe_sampler(objective: Objective, sampler: SamplerConfig) -> str:
    """The sampler and its network evaluations per image, e.g. ``ODE heun, 250 grid points = 498
    evaluations each``, as `draw_samples` runs it."""
    nfe = sampler_evaluations(objective, sampler)
    if isinstance(objective, GaussianDiffusion):
        text = f"DDPM, {sampler.steps} steps = {nfe} evaluations each"
    elif nfe is None:
        text = f"ODE dopri5, adaptive evaluations (rtol {sampler.rtol:g}, atol {sampler.atol:g})"
    else:
        method = sampler.ode_method if sampler.mode == "ode" else sampler.sde_method
        text = f"{sampler.mode.upper()} {method}, {sampler.steps} grid points = {nfe} evaluations each"
    if sampler.cfg_scale != 1.0:
        text += f", guidance {sampler.cfg_scale:g} doubles the batch"
        low, high = sampler.cfg_interval
        if not isinstance(objective, GaussianDiffusion) and (low > 0.0 or high < 1.0):
            text += f" for t in [{low:g}, {high:g}]"
    return text


def regularizer(
    blocks: Float[Array, "batch taps tokens dim"],
    disp: DispConfig,
    blocks_pos: Float[Array, "batch taps tokens dim"] | None = None,
) -> Float[Array, ""]:
    """The dispersive (or, given ``blocks_pos``, contrastive) term, averaged over the tapped blocks.

    **Arguments:**

    - `blocks`: ``Taps.blocks`` of the whole batch, tapped at the regularised blocks:
        ``forward_with_taps(..., tap_blocks=disp.block_indices(model.depth))``.
    - `disp`: the dispersive-loss configuration.
    - `blocks_pos`: the same for the second (positive) view, for the contrastive variants.

    **Returns:**

    The unweighted regulariser, a float32 scalar.
    """
    return jnp.mean(_per_block(blocks, disp, blocks_pos))


def _per_block(
    blocks: Float[Array, "batch taps tokens dim"],
    disp: DispConfig,
    blocks_pos: Float[Array, "batch taps tokens dim"] | None,
) -> Float[Array, " taps"]:
    options = {"tau": disp.tau, "group_size": disp.group_size, "margin": disp.margin}
    losses = []
    for b in range(blocks.shape[1]):
        if blocks_pos is None:
            losses.append(dispersive_loss(blocks[:, b], disp.variant, **options))
        else:
            losses.append(
                contrastive_loss(
                    blocks[:, b],
                    blocks_pos[:, b],
                    disp.variant,
                    offdiag_weight=disp.offdiag_weight,
                    **options,
                )
            )
    return jnp.stack(losses)


def _second_view_time(
    key: PRNGKeyArray, t: Float[Array, " batch"], disp: DispConfig, objective: Objective
) -> Float[Array, " batch"]:
    t0, t1 = objective.train_interval
    if disp.contrastive == "independent":
        t_pos = jr.uniform(key, t.shape, minval=t0, maxval=t1)
    else:
        # "restricted": the noise levels differ by at most contrastive_max_dt (Sec. 4.2), as a
        # fraction of the time range (0.005 of SiT's [0, 1]; 5 of DiT's 1000 steps).
        width = disp.contrastive_max_dt * (t1 - t0)
        t_pos = jnp.clip(t + jr.uniform(key, t.shape, minval=-width, maxval=width), t0, t1)
    if isinstance(objective, GaussianDiffusion):  # DiT's steps are integers
        t_pos = jnp.round(t_pos)
    return t_pos


def diffusion_loss(
    model: eqx.Module,
    x1: Float[Array, "batch c h w"],
    y: Int[Array, " batch"],
    *,
    key: PRNGKeyArray,
    transport: Objective,
    disp: DispConfig,
) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
    """SiT training loss with the Dispersive Loss on the configured blocks.

    **Arguments:**

    - `model`: an eqdisp model (``AbstractDiffusionModel``: ``depth`` and
        ``forward_with_taps(x, t, y, *, key, tap_blocks)`` on one example).
    - `x1`: a batch of data (images or latents); eqdisp's time convention is in ``eqdisp.transport``.
    - `y`: class labels.
    - `key`: randomness for the noise, the times and label dropout.
    - `transport`: the objective: SiT's interpolant (``Transport``) or DiT's ``GaussianDiffusion``.
    - `disp`: the dispersive-loss configuration.

    **Returns:**

    ``(loss, metrics)`` with ``metrics = {"loss_diff": ..., "loss_disp": ...}``; ``loss_disp`` is the
    unweighted regulariser (0 for the baseline).
    """
    # Tap only the regularised blocks (none for the baseline): under scan, slicing some taps out of
    # all of them keeps the whole (depth, tokens, dim) stack and its cotangent alive.
    tap_blocks = disp.block_indices(model.depth) if disp.active else ()
    loss_diff, per_block = _terms(model, x1, y, key, transport, disp, tap_blocks)
    if not disp.active:
        return loss_diff, {"loss_diff": loss_diff, "loss_disp": jnp.zeros((), jnp.float32)}
    loss_disp = jnp.mean(per_block)
    loss = loss_diff + disp.weight * loss_disp
    return loss, {"loss_diff": loss_diff, "loss_disp": loss_disp}


def loss_terms(
    model: eqx.Module,
    x1: Float[Array, "batch c h w"],
    y: Int[Array, " batch"],
    *,
    key: PRNGKeyArray,
    transport: Objective,
    disp: DispConfig,
) -> tuple[Float[Array, ""], Float[Array, " taps"]]:
    """The two terms of `diffusion_loss` apart: the diffusion loss and the unweighted regulariser
    of each configured block, computed from the same key as `diffusion_loss` draws from.

    Unlike `diffusion_loss` this ignores ``disp.weight``: with a weight of 0 it still taps
    ``disp.blocks`` and computes their regulariser (training diagnostics use it so). When the
    term is active, ``diffusion_loss == loss_diff + disp.weight * mean(per_block)``.

    **Arguments:** as `diffusion_loss`.

    **Returns:**

    ``(loss_diff, per_block)``: float32; ``per_block[k]`` is the dispersive (or contrastive) loss
    of the k-th block of ``disp.block_indices(model.depth)``, empty for ``variant="none"``.
    """
    tap_blocks = disp.block_indices(model.depth) if disp.variant != "none" else ()
    return _terms(model, x1, y, key, transport, disp, tap_blocks)


def _terms(
    model: eqx.Module,
    x1: Float[Array, "batch c h w"],
    y: Int[Array, " batch"],
    key: PRNGKeyArray,
    transport: Objective,
    disp: DispConfig,
    tap_blocks: tuple[int, ...],
) -> tuple[Float[Array, ""], Float[Array, " taps"]]:
    batch = x1.shape[0]
    key_noise, key_time, key_drop, key_view = jr.split(key, 4)
    x0 = jr.normal(key_noise, x1.shape, x1.dtype)
    t = transport.sample_train_time(key_time, (batch,))
    drop_keys = jr.split(key_drop, batch)

    def forward(x0_i, x1_i, t_i, y_i, key_i):
        x_t, _ = transport.interpolate(x0_i, x1_i, t_i)
        out, taps = model.forward_with_taps(x_t, t_i, y_i, key=key_i, tap_blocks=tap_blocks)
        return transport.loss(out, x0_i, x1_i, t_i), taps

    per_example, taps = jax.vmap(forward)(x0, x1, t, y, drop_keys)
    loss_diff = jnp.mean(per_example)
    if not tap_blocks:
        return loss_diff, jnp.zeros((0,), jnp.float32)
    if disp.contrastive == "off":
        return loss_diff, _per_block(taps.blocks, disp, None)
    key_noise2, key_time2 = jr.split(key_view)
    x0_pos = jr.normal(key_noise2, x1.shape, x1.dtype)
    t_pos = _second_view_time(key_time2, t, disp, transport)
    _, taps_pos = jax.vmap(forward)(x0_pos, x1, t_pos, y, drop_keys)
    return loss_diff, _per_block(taps.blocks, disp, taps_pos.blocks)
