"""The train state, the one compiled train step, and the training diagnostics beside it."""

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
from jax.sharding import Mesh
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

from ..config import DispConfig, OptimConfig
from ..dispersive import dispersive_floor
from ..objective import AbstractObjective, loss_terms, training_loss
from ..sharding import constrain_batch, constrain_state


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


def ema_decay_at(update: Int[Array, ""], ema_decay: float) -> Float[Array, ""]:
    """The EMA decay of update number `update` (1 for the first) with flow_matching's warm-up,
    ``min(ema_decay, (1 + n) / (10 + n))``: 0.18 at the first update, 0.5 at the eighth."""
    n = update.astype(jnp.float32)
    return jnp.minimum(jnp.float32(ema_decay), (1.0 + n) / (10.0 + n))


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
    objective: AbstractObjective,
    disp: DispConfig,
    *,
    ema_decay: float,
    ema_warmup: bool = False,
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

    The EMA decays by `ema_decay` each step, or with `ema_warmup` by
    :func:`ema_decay_at` (flow_matching's warm-up).
    """

    @eqx.filter_jit(donate="all")
    def train_step(
        state: TrainState, x: Float[Array, "batch c h w"], y: Int[Array, " batch"]
    ) -> tuple[TrainState, dict[str, Float[Array, ""]]]:
        if mesh is not None:
            state = constrain_state(state, mesh)
            x, y = constrain_batch((x, y), mesh)
        key = jr.fold_in(state.key, state.step)
        loss_fn = eqx.filter_value_and_grad(training_loss, has_aux=True)
        (loss, metrics), grads = loss_fn(state.model, x, y, key=key, objective=objective, disp=disp)
        params = eqx.filter(state.model, eqx.is_inexact_array)
        # optax computes b ** count (float ** int32); allow that promotion whatever the global mode.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, state.opt_state, params)
        model = eqx.apply_updates(state.model, updates)
        new_params = eqx.filter(model, eqx.is_inexact_array)
        decay = ema_decay_at(state.step + 1, ema_decay) if ema_warmup else ema_decay
        ema = optax.incremental_update(new_params, state.ema, step_size=1.0 - decay)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
        new_state = TrainState(model, ema, opt_state, state.step + 1, state.key)
        if mesh is not None:
            new_state = constrain_state(new_state, mesh)
        return new_state, metrics

    return train_step


def diagnostic_disp(disp: DispConfig) -> DispConfig:
    """The dispersive term `make_diagnostics` measures for a run configured with `disp`.

    The configured term when ``disp.variant`` is not ``"none"``, with the paper's lambda
    (``DispConfig().weight``, 0.5) in place of a weight of 0; for ``variant="none"``, InfoNCE-L2
    with the paper's lambda and the other configured fields (``tau``, ``blocks``, ``group_size``:
    the paper's 0.5, block depth//4 and groups of 16 unless changed). So a baseline reports what
    the paper's regulariser would be, and send, where its regularised twin applies it.
    """
    paper = DispConfig()
    variant = paper.variant if disp.variant == "none" else disp.variant
    weight = disp.weight if disp.weight > 0 else paper.weight
    return dataclasses.replace(disp, variant=variant, weight=weight)


def _tap_features(
    model: eqx.Module, x: Float[Array, "batch c h w"], y: Int[Array, " batch"], block: int
) -> int:
    """D, the size of one example's tap of the 0-based `block` (tokens x channels)."""

    def tap():
        t = jnp.zeros((), jnp.float32)
        return model.forward_with_taps(x[0], t, y[0], tap_blocks=(block,))[1].blocks

    return math.prod(jax.eval_shape(tap).shape[1:])


def _masked_dot(a: PyTree, b: PyTree, mask: PyTree) -> Float[Array, ""]:
    products = jax.tree.map(lambda x, y, m: jnp.sum(m * x * y, dtype=jnp.float32), a, b, mask)
    return sum(jax.tree.leaves(products), jnp.zeros((), jnp.float32))


def make_diagnostics(objective: AbstractObjective, disp: DispConfig, *, mesh: Mesh | None = None):
    """Build ``diagnostics(state, x, y) -> metrics``: what the dispersive term does, measured on
    the batch and with the step key of ``train_step(state, x, y)``, the state left untouched.

    Answers "the loss sits at -log(group) from the first steps: is it doing anything?". Near its
    floor the InfoNCE-L2 term's gradient is a sum of the off-diagonal ``exp(-d_ij / tau)``, as its
    gap is, so both fade together: a loss at the floor means the examples' block outputs are far
    apart (``d_ij >> tau``) and the term has stopped pushing. Computed for the term
    `diagnostic_disp(disp)` (for a baseline, the paper's InfoNCE-L2, so baseline and regularised
    runs compare), with one forward pass and one backward pass per term; nothing is donated, so a
    run's weights do not depend on whether it computes these. For each regularised block ``b`` (1-based, as in ``disp.blocks``):

    - ``disp_gap/b{b}``: the block's dispersive loss minus its floor
      (`eqdisp.dispersive.dispersive_floor` for the group size used; InfoNCE-L2: `-log(group)`,
      and the gap is ``log(1 + (group - 1) k)`` with ``k`` the mean off-diagonal
      ``exp(-d_ij / tau)``). Not reported for the contrastive variants (their infimum, 0, is
      not a level the loss settles at).
    - ``grad_norm_disp/b{b}``: the norm of the gradient the block's term sends into the weights as
      trained, ``lambda / n_blocks`` times the gradient of its unweighted loss (with the lambda of
      `diagnostic_disp`: the paper's 0.5 for a baseline); ``grad_norm_disp_unweighted/b{b}``: the
      norm of the gradient of the unweighted loss.
    - ``grad_norm_diff/b{b}``: the norm of the diffusion loss' gradient on the same parameters.
    - ``grad_cos/b{b}``: the cosine of those two gradients, in [-1, 1] (0 where either vanishes,
      as for the backbone at the adaLN-Zero initialisation, where the diffusion gradient reaches
      the final layer alone).

    and ``grad_norm_diff``: the norm of the diffusion loss' gradient on all parameters.

    "The parameters shared with block b" are those both terms depend on,
    ``model.upstream_mask``: for a transformer, the patch, time and label embedders and blocks
    1..b (slices of the stacked blocks), not blocks b+1..depth and not the final layer, which
    only the diffusion loss reaches; for a U-Net, everything that runs before ResBlock b's
    output. The dispersive gradient is zero outside them, so its norm and the cosine are the
    same over all parameters.

    The group size is the configured one, or the whole batch when it does not divide the batch
    (possible for a baseline, whose `group_size` is not checked against the batch).

    Cost: one forward pass and ``1 + n_blocks`` backward passes, under two train steps for one
    block (README, Speed); compiling it takes about as long as the step's.

    **Arguments:**

    - `objective`: the run's objective, as given to `make_train_step`.
    - `disp`: the run's dispersive configuration.
    - `mesh`: as for `make_train_step`.

    **Returns:**

    The compiled function; its float32 scalars are keyed as above.
    """
    probe = diagnostic_disp(disp)

    @eqx.filter_jit
    def diagnostics(
        state: TrainState, x: Float[Array, "batch c h w"], y: Int[Array, " batch"]
    ) -> dict[str, Float[Array, ""]]:
        if mesh is not None:
            state = constrain_state(state, mesh)
            x, y = constrain_batch((x, y), mesh)
        key = jr.fold_in(state.key, state.step)  # the train step's key
        batch = x.shape[0]
        term = probe
        if probe.group_size is not None and batch % probe.group_size:
            term = dataclasses.replace(probe, group_size=None)
        model = state.model
        blocks = term.block_indices(model.depth)
        params, static = eqx.partition(model, eqx.is_inexact_array)

        def terms(p):
            return loss_terms(
                eqx.combine(p, static), x, y, key=key, objective=objective, disp=term
            )

        (_, per_block), pullback = jax.vjp(terms, params)
        one, zero = jnp.ones((), jnp.float32), jnp.zeros((), jnp.float32)
        (g_diff,) = pullback((one, jnp.zeros_like(per_block)))
        metrics = {"grad_norm_diff": optax.tree.norm(g_diff)}
        for k, b in enumerate(blocks):
            floor = dispersive_floor(
                term.variant,
                term.group_size or batch,
                tau=term.tau,
                margin=term.margin,
                features=_tap_features(model, x, y, b),
            )
            (g_disp,) = pullback((zero, jax.nn.one_hot(k, len(blocks), dtype=jnp.float32)))
            mask = model.upstream_mask(b)
            diff_sq = _masked_dot(g_diff, g_diff, mask)
            disp_sq = _masked_dot(g_disp, g_disp, mask)
            norms = jnp.sqrt(diff_sq) * jnp.sqrt(disp_sq)
            tiny = jnp.finfo(jnp.float32).tiny  # 0 / tiny = 0 where a gradient vanishes
            cos = _masked_dot(g_diff, g_disp, mask) / jnp.maximum(norms, tiny)
            name = f"b{b + 1}"
            if term.contrastive == "off":
                metrics[f"disp_gap/{name}"] = per_block[k] - floor
            metrics[f"grad_norm_disp/{name}"] = term.weight / len(blocks) * jnp.sqrt(disp_sq)
            metrics[f"grad_norm_disp_unweighted/{name}"] = jnp.sqrt(disp_sq)
            metrics[f"grad_norm_diff/{name}"] = jnp.sqrt(diff_sq)
            metrics[f"grad_cos/{name}"] = jnp.clip(cos, -1.0, 1.0)
        return metrics

    return diagnostics
