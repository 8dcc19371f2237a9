"""One vocabulary of array dimensions and aliases, shared by every eqdisp module.

Dimension names used in annotations throughout the library:

- ``batch``: examples in a batch; ``group``: examples in one dispersive-loss group.
- ``c h w``: channels, height and width of one image or latent (channels first, as in DiT/SiT).
- ``tokens dim``: transformer tokens and hidden width; ``depth``: number of blocks.
- ``feature``: flattened per-example features (``D`` in the paper, ``tokens * dim`` for SiT).
"""

from jaxtyping import Array, Float, Int, PRNGKeyArray, Shaped

Scalar = Float[Array, ""]
"""A 0-d float array (a loss, a time)."""

Image = Float[Array, "c h w"]
"""One image or latent, channels first."""

Label = Int[Array, ""]
"""One class label; ``num_classes`` is the null (unconditional) label."""

Time = Float[Array, ""]
"""One time ``t``; eqdisp follows SiT: ``t = 0`` is noise, ``t = 1`` is data."""

__all__ = ["Array", "Float", "Image", "Int", "Label", "PRNGKeyArray", "Scalar", "Shaped", "Time"]
