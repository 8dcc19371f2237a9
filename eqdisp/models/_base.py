"""What every eqdisp diffusion network is: one example in, one prediction and its taps out."""

import abc

import equinox as eqx
from jaxtyping import Array, Float, Int, PRNGKeyArray


class Taps(eqx.Module):
    """Intermediate activations of a transformer, returned as data (never collected by side effect).

    Nothing is paid for a tap that the loss does not read: under `jax.jit` the unused parts are
    removed by dead-code elimination (measured; see `DiffusionTransformer`).

    **Fields:**

    - `blocks`: the residual stream after each block, `blocks[k]` after the (k+1)-th block (so the
        paper's 1-based "block 3" is `blocks[2]`). In the compute dtype of the model.
    - `c`: the conditioning vector `t_emb + y_emb` fed to every adaLN layer (after label dropout).
    """

    blocks: Float[Array, "depth tokens dim"]
    c: Float[Array, " dim"]


class AbstractDiffusionModel(eqx.Module):
    """A network `(x_t, t, y) -> prediction` on one example, with typed taps.

    Subclasses implement `forward_with_taps`; `__call__` is fixed to return its first output, so
    the two can never disagree. Batching is `jax.vmap` by the caller.
    """

    @abc.abstractmethod
    def forward_with_taps(
        self,
        x: Float[Array, "c h w"],
        t: Float[Array, ""],
        y: Int[Array, ""],
        *,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, "c_out h w"], eqx.Module]:
        """Run the network on one example and return `(prediction, taps)`."""

    def __call__(
        self,
        x: Float[Array, "c h w"],
        t: Float[Array, ""],
        y: Int[Array, ""],
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "c_out h w"]:
        """**Arguments:** as `forward_with_taps`.

        **Returns:** the prediction only.
        """
        return self.forward_with_taps(x, t, y, key=key)[0]
