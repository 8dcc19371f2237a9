"""Equinox networks of eqdisp: the DiT/SiT/MF transformer (one backbone for all three) and its
pieces, and flow_matching's CIFAR-10 U-Net.

Every model maps one example `(x, t, y)` to `(out, Taps)` with `forward_with_taps`; `__call__`
returns `out` only. Batch with `jax.vmap`.
"""

from ..config import MODEL_SIZES, PATCH_SIZES, UNET_SIZES, ModelSpec, parse_model_name
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
from ._unet import DEFAULT_DISP_BLOCK as UNET_DISP_BLOCK
from ._unet import UNet, UNetTaps

__all__ = [
    "MODEL_SIZES",
    "PATCH_SIZES",
    "UNET_DISP_BLOCK",
    "UNET_SIZES",
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
    "UNet",
    "UNetTaps",
    "make_model",
    "parse_model_name",
    "patchify",
    "resolve_dtype",
    "resolve_implementation",
    "sincos_pos_embed_2d",
    "timestep_embedding",
    "unpatchify",
]
