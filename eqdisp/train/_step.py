"""The train state and the one compiled train step."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
from jax.sharding import Mesh
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

from ..config import DispConfig, OptimConfig
from ..objective import diffusion_loss
from ..sharding import constrain_batch, constrain_state
from ..transport import Transport


class TrainState(eqx.Module):
    """Everything a run needs to continue: model, EMA weights, optimizer state, step and key.

    ``ema`` holds the floating-point leaves of the model (``eqx.filter(model, eqx.is_inexact_array)``);
    ``ema_model`` recombines them with the model's static parts for sampling and analysis.
    """

    model: eqx.Module
    ema: PyTree
    opt_state: optax.OptState
    step: Int[Array, ""]
    key: PRNGKeyArray

    @property
    def ema_model(self) -> eqx.Module:
        return eqx.combine(self.ema, self.model)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """AdamW with a constant (or warm-up + cosine) learning rate, optionally after global-norm
    gradient clipping."""
    lr = cfg.lr
    if cfg.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(
            0.0, cfg.lr, warmup_steps=cfg.warmup_steps, decay_steps=cfg.decay_steps
        )
    adamw = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.grad_clip is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)


def init_train_state(
    model: eqx.Module, optimizer: optax.GradientTransformation, *, key: PRNGKeyArray
) -> TrainState:
    """A fresh state; the EMA starts as an exact copy of the weights (DiT/SiT)."""
    params = eqx.filter(model, eqx.is_inexact_array)
    return TrainState(
        model=model,
        ema=jax.tree.map(jnp.copy, params),
        opt_state=optimizer.init(params),
        step=jnp.zeros((), jnp.int32),
        key=key,
    )


def make_train_step(
    optimizer: optax.GradientTransformation,
    transport: Transport,
    disp: DispConfig,
    *,
    ema_decay: float,
    mesh: Mesh | None = None,
):
    """Build ``train_step(state, x, y) -> (state, metrics)``, compiled once with donated buffers.

    The step key is ``fold_in(state.key, state.step)``, so a run's randomness depends only on its
    seed and step number (a resumed run draws exactly what an uninterrupted one would).

    With a `mesh` (``eqdisp.sharding.make_mesh``) the step is one SPMD program over the global
    batch: ``x`` and ``y`` are split over all devices (``batch_sharding``) and the state, in and
    out, is laid out by ``state_sharding`` (replicated, or FSDP-sharded when the mesh's ``fsdp``
    axis is > 1). Pass a state placed by ``shard_state`` and batches from ``global_batch`` so
    nothing moves between steps and the donated buffers are reused. Without a mesh the step is
    the plain single-device program.
    """

    @eqx.filter_jit(donate="all")
    def train_step(
        state: TrainState, x: Float[Array, "batch c h w"], y: Int[Array, " batch"]
    ) -> tuple[TrainState, dict[str, Float[Array, ""]]]:
        if mesh is not None:
            state = constrain_state(state, mesh)
            x, y = constrain_batch((x, y), mesh)
        key = jr.fold_in(state.key, state.step)
        loss_fn = eqx.filter_value_and_grad(diffusion_loss, has_aux=True)
        (loss, metrics), grads = loss_fn(state.model, x, y, key=key, transport=transport, disp=disp)
        params = eqx.filter(state.model, eqx.is_inexact_array)
        # optax computes b ** count (float ** int32); allow that promotion whatever the global mode.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, state.opt_state, params)
        model = eqx.apply_updates(state.model, updates)
        new_params = eqx.filter(model, eqx.is_inexact_array)
        ema = optax.incremental_update(new_params, state.ema, step_size=1.0 - ema_decay)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
        new_state = TrainState(model, ema, opt_state, state.step + 1, state.key)
        if mesh is not None:
            new_state = constrain_state(new_state, mesh)
        return new_state, metrics

    return train_step
