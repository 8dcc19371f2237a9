"""Equinox networks of eqdisp: the DiT/SiT transformer (one backbone for both) and its pieces.

Every model maps one example `(x, t, y)` to `(out, Taps)` with `forward_with_taps`; `__call__`
returns `out` only. Batch with `jax.vmap`.
"""

from ..config import MODEL_SIZES, PATCH_SIZES, ModelSpec, parse_model_name
from ._base import AbstractDiffusionModel, Taps
from ._embed import (
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    patchify,
    sincos_pos_embed_2d,
    timestep_embedding,
    unpatchify,
)
from ._registry import Implementation, make_model, resolve_dtype, resolve_implementation
from ._transformer import DiffusionTransformer, FinalLayer, TransformerBlock

__all__ = [
    "MODEL_SIZES",
    "PATCH_SIZES",
    "AbstractDiffusionModel",
    "DiffusionTransformer",
    "FinalLayer",
    "Implementation",
    "LabelEmbedder",
    "ModelSpec",
    "PatchEmbed",
    "Taps",
    "TimestepEmbedder",
    "TransformerBlock",
    "make_model",
    "parse_model_name",
    "patchify",
    "resolve_dtype",
    "resolve_implementation",
    "sincos_pos_embed_2d",
    "timestep_embedding",
    "unpatchify",
]
