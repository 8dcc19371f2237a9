"""What every eqdisp diffusion network is: one example in, one prediction and its taps out."""

import abc
from collections.abc import Sequence

import equinox as eqx
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree


def check_tap_blocks(
    tap_blocks: Sequence[int] | None, depth: int, *, unit: str = "block"
) -> tuple[int, ...]:
    """`tap_blocks` as a tuple of ints: increasing 0-based indices below `depth` (`None`: all).

    **Raises:** `ValueError` naming the bad value; `unit` names what is counted (``"ResBlock"``).
    """
    if tap_blocks is None:
        return tuple(range(depth))
    blocks = tuple(tap_blocks)
    in_range = all(isinstance(b, (int, np.integer)) and 0 <= b < depth for b in blocks)
    if not in_range or list(blocks) != sorted(set(blocks)):
        raise ValueError(
            f"tap_blocks={tap_blocks!r} is not allowed: expected increasing 0-based {unit} "
            f"indices below the depth {depth}, or None for every {unit}"
        )
    return tuple(int(b) for b in blocks)


class Taps(eqx.Module):
    """Intermediate activations of a transformer, returned as data (never collected by side effect).

    A model returns the blocks its caller asks for (`tap_blocks`): taps nobody reads are removed
    by XLA, but XLA does not shrink a scan's stacked outputs to the slices a loss reads, so
    reading one tap out of all of them keeps the whole stack alive (see `_run_blocks`).

    **Fields:**

    - `blocks`: the residual stream after each tapped block, in the order of `tap_blocks`; by
        default every block, `blocks[k]` after the (k+1)-th block (so the paper's 1-based
        "block 3" is `blocks[2]`). In the dtype of the model's activations (bfloat16 only when
        the network runs in bfloat16, `bf16_mode="cast"`).
    - `c`: the conditioning vector `t_emb + y_emb` fed to every adaLN layer (after label dropout).
    """

    blocks: Float[Array, "taps tokens dim"]
    c: Float[Array, " dim"]


class AbstractDiffusionModel(eqx.Module):
    """A network `(x_t, t, y) -> prediction` on one example, with typed taps.

    Subclasses implement `depth` and `forward_with_taps`; `__call__` is fixed to return its first
    output, so the two can never disagree. Batching is `jax.vmap` by the caller.
    """

    @property
    @abc.abstractmethod
    def depth(self) -> int:
        """Number of blocks that can be tapped."""

    @abc.abstractmethod
    def forward_with_taps(
        self,
        x: Float[Array, "c h w"],
        t: Float[Array, ""],
        y: Int[Array, ""],
        *,
        key: PRNGKeyArray | None = None,
        tap_blocks: Sequence[int] | None = None,
    ) -> tuple[Float[Array, "c_out h w"], eqx.Module]:
        """Run the network on one example and return `(prediction, taps)`, tapped after the
        0-based blocks `tap_blocks` (increasing; `None` for every block)."""

    @abc.abstractmethod
    def upstream_mask(self, block: int) -> PyTree:
        """Which parameters the output of the 0-based `block` depends on: a PyTree shaped like
        `eqx.filter(self, eqx.is_inexact_array)` with 1 on those parameters and 0 on the
        others (scalars broadcast over whole leaves, or arrays where a leaf is shared)."""

    def tap_groups(self, tap_blocks: Sequence[int]) -> tuple[tuple[int, ...], ...]:
        """`tap_blocks` split into groups whose taps have one shape and can be stacked, in order
        of first appearance. Every block of a transformer has one shape: one group."""
        return (tuple(tap_blocks),)

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
        return self.forward_with_taps(x, t, y, key=key, tap_blocks=())[0]
