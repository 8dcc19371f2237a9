"""What a model is trained with, as one abstraction: `AbstractObjective`, and the training loss.

The train loop, the samplers and the analysis see an objective only through `AbstractObjective`:
its batch loss terms (`training_terms`), how a model trained with it samples (`draw_samples`,
`sampler_evaluations`, `describe_sampler`) and how its time reads in SiT's convention
(`model_time`, for the analysis). As in diffrax (``AbstractSolver`` and the final ``Euler``,
``Heun``), the abstract classes live here and the concrete objectives are final classes beside
their math: SiT's :class:`eqdisp.transport.Transport` and DiT's
:class:`eqdisp.diffusion.GaussianDiffusion`, both `AbstractNoisingObjective`s (noise the data at a
sampled time, regress the network's output), and :class:`eqdisp.meanflow.MeanFlow` (a JVP
target); :func:`eqdisp.families.make_objective` picks one for a configuration.

`training_loss` is the paper's Eq. 1:
``L = mean_i L_diff(x_i) + lambda * mean_b L_disp({z_i^b})`` where ``z^b`` is the output of block
b of the model on the noised batch (``Taps.blocks``). With ``disp.variant == "none"`` or
``disp.weight == 0`` the model is asked for no taps, so the traced program is *the* baseline
program: same numbers, same speed.

The contrastive counterparts of paper Table 2 run a second noised view of every example through
the model and replace the dispersive term by ``contrastive_loss(z, z_pos)``; as in the paper, only
the first view receives the diffusion loss.
"""

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .config import DispConfig, SamplerConfig
from .dispersive import contrastive_loss, dispersive_loss


class AbstractObjective(eqx.Module):
    """A training objective and the sampler that goes with it (subclass it as a final class)."""

    @abc.abstractmethod
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
        """``(loss, per_block, logs)``: the objective's own loss on a batch of data `x1`, the
        unweighted regulariser (``disp``'s variant) of each block of `tap_blocks` (0-based),
        computed on the same forward pass (empty when `tap_blocks` is), and any other scalars
        worth logging (e.g. MeanFlow's unweighted loss; SiT and DiT log none)."""

    @abc.abstractmethod
    def draw_samples(
        self,
        model: eqx.Module,
        x_init: Float[Array, "batch c h w"],
        y: Int[Array, " batch"],
        *,
        key: PRNGKeyArray,
        config: SamplerConfig,
    ) -> Float[Array, "batch c h w"]:
        """Samples from the starting noise `x_init` with the sampler `config` describes."""

    @abc.abstractmethod
    def sampler_evaluations(self, config: SamplerConfig) -> int | None:
        """Network evaluations per sample of `draw_samples` (guidance doubles the batch of each,
        not their number); None where the count is adaptive."""

    @abc.abstractmethod
    def describe_sampler(self, config: SamplerConfig) -> str:
        """One line naming the sampler and its evaluations per image, e.g. ``ODE heun, 250 grid
        points = 498 evaluations each``."""

    @abc.abstractmethod
    def model_time(self, t: float) -> float:
        """The time the model is fed for the time `t` of SiT's convention (0 noise, 1 data)."""

    @abc.abstractmethod
    def interpolate(
        self, x0: Float[Array, "*x"], x1: Float[Array, "*x"], t: Float[Array, ""] | float
    ) -> tuple[Float[Array, "*x"], Float[Array, "*x"]]:
        """``(x_t, target)``: the data `x1` noised with `x0` at the model's time `t`."""


class AbstractNoisingObjective(AbstractObjective):
    """An objective that noises each example at a sampled time and regresses the network's output
    on it (SiT's interpolants, DiT's diffusion). Its `training_terms` are shared: subclasses give
    the time distribution, the noising and the per-example loss."""

    @property
    @abc.abstractmethod
    def train_interval(self) -> tuple[float, float]:
        """The range ``(t0, t1)`` of training times."""

    @abc.abstractmethod
    def sample_train_time(
        self, key: PRNGKeyArray, shape: tuple[int, ...]
    ) -> Float[Array, "*shape"]:
        """Training times."""

    @abc.abstractmethod
    def loss(
        self,
        model_out: Float[Array, "c_out h w"],
        x0: Float[Array, "c h w"],
        x1: Float[Array, "c h w"],
        t: Float[Array, ""],
    ) -> Float[Array, ""]:
        """The per-example loss of one output; the batch loss is the mean over examples."""

    def snap_time(self, t: Float[Array, " batch"]) -> Float[Array, " batch"]:
        """A time of the second (contrastive) view moved onto the times the model trains on."""
        return t

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
        batch = x1.shape[0]
        key_noise, key_time, key_drop, key_view = jr.split(key, 4)
        x0 = jr.normal(key_noise, x1.shape, x1.dtype)
        t = self.sample_train_time(key_time, (batch,))
        drop_keys = jr.split(key_drop, batch)

        def forward(x0_i, x1_i, t_i, y_i, key_i):
            x_t, _ = self.interpolate(x0_i, x1_i, t_i)
            out, taps = model.forward_with_taps(x_t, t_i, y_i, key=key_i, tap_blocks=tap_blocks)
            return self.loss(out, x0_i, x1_i, t_i), taps

        per_example, taps = jax.vmap(forward)(x0, x1, t, y, drop_keys)
        loss_diff = jnp.mean(per_example)
        if not tap_blocks:
            return loss_diff, jnp.zeros((0,), jnp.float32), {}
        if disp.contrastive == "off":
            return loss_diff, block_regularizers(taps.blocks, disp, None), {}
        key_noise2, key_time2 = jr.split(key_view)
        x0_pos = jr.normal(key_noise2, x1.shape, x1.dtype)
        t_pos = _second_view_time(key_time2, t, disp, self)
        _, taps_pos = jax.vmap(forward)(x0_pos, x1, t_pos, y, drop_keys)
        return loss_diff, block_regularizers(taps.blocks, disp, taps_pos.blocks), {}


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
    return jnp.mean(block_regularizers(blocks, disp, blocks_pos))


def block_regularizers(
    blocks: Float[Array, "batch taps tokens dim"],
    disp: DispConfig,
    blocks_pos: Float[Array, "batch taps tokens dim"] | None = None,
) -> Float[Array, " taps"]:
    """The unweighted dispersive (given `blocks_pos`: contrastive) loss of each tapped block."""
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
    key: PRNGKeyArray,
    t: Float[Array, " batch"],
    disp: DispConfig,
    objective: AbstractNoisingObjective,
) -> Float[Array, " batch"]:
    t0, t1 = objective.train_interval
    if disp.contrastive == "independent":
        t_pos = jr.uniform(key, t.shape, minval=t0, maxval=t1)
    else:
        # "restricted": the noise levels differ by at most contrastive_max_dt (Sec. 4.2), as a
        # fraction of the time range (0.005 of SiT's [0, 1]; 5 of DiT's 1000 steps).
        width = disp.contrastive_max_dt * (t1 - t0)
        t_pos = jnp.clip(t + jr.uniform(key, t.shape, minval=-width, maxval=width), t0, t1)
    return objective.snap_time(t_pos)


def training_loss(
    model: eqx.Module,
    x1: Float[Array, "batch c h w"],
    y: Int[Array, " batch"],
    *,
    key: PRNGKeyArray,
    objective: AbstractObjective,
    disp: DispConfig,
) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
    """The objective's loss plus lambda times the Dispersive Loss on the configured blocks (Eq. 1).

    **Arguments:**

    - `model`: an eqdisp model (``AbstractDiffusionModel``: ``depth`` and
        ``forward_with_taps(x, t, y, *, key, tap_blocks)`` on one example).
    - `x1`: a batch of data (images or latents).
    - `y`: class labels.
    - `key`: randomness for the noise, the times and label dropout.
    - `objective`: e.g. SiT's ``Transport`` or DiT's ``GaussianDiffusion``.
    - `disp`: the dispersive-loss configuration.

    **Returns:**

    ``(loss, metrics)`` with ``metrics = {"loss_diff": ..., "loss_disp": ..., **logs}``;
    ``loss_disp`` is the unweighted regulariser (0 for the baseline), ``logs`` the objective's
    other scalars (`AbstractObjective.training_terms`).
    """
    # Tap only the regularised blocks (none for the baseline): under scan, slicing some taps out of
    # all of them keeps the whole (depth, tokens, dim) stack and its cotangent alive.
    tap_blocks = disp.block_indices(model.depth) if disp.active else ()
    loss_diff, per_block, logs = objective.training_terms(
        model, x1, y, key=key, disp=disp, tap_blocks=tap_blocks
    )
    if not disp.active:
        zero = jnp.zeros((), jnp.float32)
        return loss_diff, {"loss_diff": loss_diff, "loss_disp": zero, **logs}
    loss_disp = jnp.mean(per_block)
    loss = loss_diff + disp.weight * loss_disp
    return loss, {"loss_diff": loss_diff, "loss_disp": loss_disp, **logs}


def loss_terms(
    model: eqx.Module,
    x1: Float[Array, "batch c h w"],
    y: Int[Array, " batch"],
    *,
    key: PRNGKeyArray,
    objective: AbstractObjective,
    disp: DispConfig,
) -> tuple[Float[Array, ""], Float[Array, " taps"]]:
    """The two terms of `training_loss` apart: the objective's loss and the unweighted
    regulariser of each configured block, computed from the same key as `training_loss` draws
    from.

    Unlike `training_loss` this ignores ``disp.weight``: with a weight of 0 it still taps
    ``disp.blocks`` and computes their regulariser (training diagnostics use it so). When the
    term is active, ``training_loss == loss_diff + disp.weight * mean(per_block)``.

    **Arguments:** as `training_loss`.

    **Returns:**

    ``(loss_diff, per_block)``: float32; ``per_block[k]`` is the dispersive (or contrastive) loss
    of the k-th block of ``disp.block_indices(model.depth)``, empty for ``variant="none"``.
    """
    tap_blocks = disp.block_indices(model.depth) if disp.variant != "none" else ()
    loss_diff, per_block, _ = objective.training_terms(
        model, x1, y, key=key, disp=disp, tap_blocks=tap_blocks
    )
    return loss_diff, per_block


__all__ = [
    "AbstractNoisingObjective",
    "AbstractObjective",
    "block_regularizers",
    "loss_terms",
    "regularizer",
    "training_loss",
]
