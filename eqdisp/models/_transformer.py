"""The DiT/SiT transformer: adaLN-Zero blocks, the final layer and the backbone (one file).

Every constant follows the official `models.py` of DiT (`facebookresearch/DiT`) and SiT
(`willisma/SiT`); classes and functions are cited inline. Field names mirror the PyTorch state
dict (`x_embedder.proj`, `blocks.qkv`, `final_layer.linear`, ...), with `adaLN_modulation.1`
spelled `adaln_modulation`, so a weight loader is a renaming plus reshapes.
"""

from collections.abc import Sequence
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

from ._base import AbstractDiffusionModel, Taps, check_tap_blocks
from ._embed import (
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    dense,
    make_linear,
    sincos_pos_embed_2d,
    unpatchify,
)
from ._mixed import attention_bf16, linear_bf16

_LN_EPS = 1e-6  # all three LayerNorms (DiT `DiTBlock.norm1/norm2`, `FinalLayer.norm_final`)

# What a block's backward pass may read from its forward pass (`remat`); everything else is
# recomputed. Under vmap the linear layers are dots without batch dimensions, attention's two
# einsums are batched dots, so "dots" stores the linear layers' outputs and recomputes attention.
_REMAT_POLICIES = {
    "none": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


def _layer_norm(x: Float[Array, "tokens dim"]) -> Float[Array, "tokens dim"]:
    """LayerNorm without affine, biased variance, eps 1e-6; statistics in float32 even under bf16."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + _LN_EPS)).astype(x.dtype)


def _modulate(
    x: Float[Array, "tokens dim"], shift: Float[Array, " dim"], scale: Float[Array, " dim"]
) -> Float[Array, "tokens dim"]:
    return x * (1 + scale) + shift


def _cast_floating(tree: PyTree, dtype: jnp.dtype) -> PyTree:
    # Casting inside the forward keeps float32 master weights: the gradient of `astype` casts the
    # cotangent back, so gradients arrive in float32 at the float32 leaves.
    return jax.tree.map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, tree)


def _unstack(tree: PyTree, n: int) -> list[PyTree]:
    """Split every leaf's leading axis into `n` trees with one `lax.split` per leaf.

    `lax.split` transposes to one concatenate (each layer's parameter gradient written once) where
    per-layer `a[i]` transposes to `n` full-size pads summed; XLA simplifies both to the same
    speed on SiT-S/2 (measured), so this is the form that does not rely on the simplifier.
    """
    leaves, treedef = jax.tree.flatten(tree)
    parts = [
        [p.reshape(p.shape[1:]) for p in jax.lax.split(leaf, (1,) * n, axis=0)] for leaf in leaves
    ]
    return [jax.tree.unflatten(treedef, [part[i] for part in parts]) for i in range(n)]


class TransformerBlock(eqx.Module):
    """A DiT block with adaLN-Zero conditioning (DiT `models.py`, `DiTBlock`).

    `x + gate_msa * Attn(modulate(LN(x), shift_msa, scale_msa))`, then the same with the MLP;
    the six modulation chunks come from `Linear(SiLU(c))`, zero-initialised so the block starts as
    the identity.
    """

    qkv: eqx.nn.Linear
    proj: eqx.nn.Linear
    fc1: eqx.nn.Linear
    fc2: eqx.nn.Linear
    adaln_modulation: eqx.nn.Linear
    num_heads: int = eqx.field(static=True)
    attention_impl: Literal["einsum", "xla", "cudnn"] = eqx.field(static=True)
    matmul: Literal["float32", "bfloat16"] = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        attention: Literal["einsum", "xla", "cudnn"] = "einsum",
        matmul: Literal["float32", "bfloat16"] = "float32",
        *,
        key: PRNGKeyArray,
    ):
        """`matmul="bfloat16"`: the token-wise linear layers and einsum attention take float32
        activations and run their dots, forward and backward, on bfloat16 operands with float32
        accumulation (`linear_bf16`, `attention_bf16`); everything else stays float32."""
        qkv_key, proj_key, fc1_key, fc2_key, ada_key = jax.random.split(key, 5)
        hidden = int(dim * mlp_ratio)
        # xavier on the fused qkv matrix (fan_out = 3D), zero biases (DiT `initialize_weights`).
        self.qkv = make_linear(dim, 3 * dim, "xavier", key=qkv_key)
        self.proj = make_linear(dim, dim, "xavier", key=proj_key)
        self.fc1 = make_linear(dim, hidden, "xavier", key=fc1_key)
        self.fc2 = make_linear(hidden, dim, "xavier", key=fc2_key)
        self.adaln_modulation = make_linear(dim, 6 * dim, "zero", key=ada_key)
        self.num_heads = num_heads
        self.attention_impl = attention
        self.matmul = matmul

    def __check_init__(self):
        dim = self.proj.weight.shape[-1]
        if dim % self.num_heads != 0:
            raise ValueError(f"dim={dim} is not divisible by num_heads={self.num_heads}")
        if self.attention_impl not in ("einsum", "xla", "cudnn"):
            raise ValueError(
                f"attention={self.attention_impl!r} is not allowed: expected 'einsum', 'xla' or 'cudnn'"
            )
        if self.matmul not in ("float32", "bfloat16"):
            raise ValueError(
                f"matmul={self.matmul!r} is not allowed: expected 'float32' or 'bfloat16'"
            )

    def attention(self, x: Float[Array, "tokens dim"]) -> Float[Array, "tokens dim"]:
        """Multi-head self-attention (timm `Attention`, qkv bias, scale `head_dim^-0.5`).

        `attention="einsum"` computes it per example in `(heads, tokens, head_dim)` layout, which
        becomes `(batch, heads, tokens, head_dim)` under the caller's vmap: the fastest layout
        measured on a 2-core CPU (SiT-S/2, batch 32); scores and softmax in float32. `"xla"` and
        `"cudnn"` call `jax.nn.dot_product_attention` with that implementation (cuDNN: flash
        attention, the scores never stored). With
        `matmul="bfloat16"`, einsum attention is `attention_bf16` (bf16 dot operands, float32
        scores, softmax and accumulation).
        """
        tokens, dim = x.shape
        heads = self.num_heads
        head_dim = dim // heads
        # qkv feature index is s*D + h*hd + d with s in (q, k, v).
        qkv = self._dense(self.qkv, x).reshape(tokens, 3, heads, head_dim)
        if self.attention_impl == "einsum":
            q, k, v = qkv.transpose(1, 2, 0, 3)
            q = q * head_dim**-0.5
            if self.matmul == "bfloat16":
                out = attention_bf16(q, k, v)
            else:
                scores = jnp.einsum("hnd,hmd->hnm", q, k, preferred_element_type=jnp.float32)
                weights = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
                out = jnp.einsum("hnm,hmd->hnd", weights, v)
            out = out.transpose(1, 0, 2)
        else:
            q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
            out = jax.nn.dot_product_attention(q, k, v, implementation=self.attention_impl)
        return self._dense(self.proj, out.reshape(tokens, dim))

    def mlp(self, x: Float[Array, "tokens dim"]) -> Float[Array, "tokens dim"]:
        """fc1 (4D) -> tanh-approximated GELU -> fc2 (timm `Mlp`)."""
        return self._dense(self.fc2, jax.nn.gelu(self._dense(self.fc1, x), approximate=True))

    def _dense(
        self, linear: eqx.nn.Linear, x: Float[Array, "tokens d_in"]
    ) -> Float[Array, "tokens d_out"]:
        if self.matmul == "bfloat16":
            return linear_bf16(x, linear.weight, linear.bias)
        return dense(linear, x)

    def __call__(
        self, x: Float[Array, "tokens dim"], c: Float[Array, " dim"]
    ) -> Float[Array, "tokens dim"]:
        """**Arguments:** `x` the residual stream, `c` the conditioning vector.

        **Returns:** the residual stream after this block.
        """
        mod = dense(self.adaln_modulation, jax.nn.silu(c))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6)
        x = x + gate_msa * self.attention(_modulate(_layer_norm(x), shift_msa, scale_msa))
        x = x + gate_mlp * self.mlp(_modulate(_layer_norm(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(eqx.Module):
    """LayerNorm, adaLN (shift then scale) and a zero-initialised projection to patch outputs (DiT
    `FinalLayer`)."""

    linear: eqx.nn.Linear
    adaln_modulation: eqx.nn.Linear

    def __init__(self, dim: int, patch_size: int, out_channels: int, *, key: PRNGKeyArray):
        linear_key, ada_key = jax.random.split(key)
        self.linear = make_linear(dim, patch_size**2 * out_channels, "zero", key=linear_key)
        self.adaln_modulation = make_linear(dim, 2 * dim, "zero", key=ada_key)

    def __call__(
        self, x: Float[Array, "tokens dim"], c: Float[Array, " dim"]
    ) -> Float[Array, "tokens patch_features"]:
        shift, scale = jnp.split(dense(self.adaln_modulation, jax.nn.silu(c)), 2)
        return dense(self.linear, _modulate(_layer_norm(x), shift, scale))


def _check_architecture(
    *, input_size: int, patch_size: int, dim: int, num_heads: int, depth: int
) -> None:
    if depth < 1:
        raise ValueError(f"depth={depth} is not allowed: expected a positive int")
    if patch_size < 1 or input_size % patch_size != 0:
        raise ValueError(f"input_size={input_size} is not divisible by patch_size={patch_size}")
    if num_heads < 1 or dim % num_heads != 0:
        raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
    if dim % 4 != 0:
        raise ValueError(
            f"dim={dim} is not allowed: expected a multiple of 4 (2-D sin-cos position embedding)"
        )


class DiffusionTransformer(AbstractDiffusionModel):
    """The DiT/SiT transformer (Peebles & Xie 2023; Ma et al. 2024), one network for both.

    Patch embedding + fixed 2-D sin-cos positions, `c = t_emb + y_emb`, `depth` adaLN-Zero blocks,
    adaLN final layer, unpatchify. SiT and DiT differ only in what `__call__` returns when
    `learn_sigma`: SiT keeps the first `in_channels` output channels, DiT all `2 * in_channels`.
    A network with REPA's weights (`time_convention="repa"`) is fed `1 - t` and its output is
    negated, so it answers in SiT's convention like every eqdisp model.

    The blocks are one stacked `TransformerBlock` (leading `depth` axis on every array), run
    unrolled or under `lax.scan` (`block_impl`); both compute the same function. Which is faster
    depends on the backend and the batch (`make_model`'s `"auto"` picks; the measurements are in
    the README, Speed); scan compiles in seconds at any depth. Taps cost what is asked for:
    `forward_with_taps(..., tap_blocks=(2,))` returns block 3 alone, which under scan rides in the
    carry rather than in a stacked `(depth, tokens, dim)` output.

    The position embedding is not a leaf: it is a NumPy constant added at trace time, so
    `eqx.filter(model, eqx.is_inexact_array)` is exactly the trainable parameters.
    """

    x_embedder: PatchEmbed
    t_embedder: TimestepEmbedder
    y_embedder: LabelEmbedder
    blocks: TransformerBlock
    final_layer: FinalLayer
    h_embedder: TimestepEmbedder | None
    family: Literal["SiT", "DiT", "MF"] = eqx.field(static=True)
    input_size: int = eqx.field(static=True)
    in_channels: int = eqx.field(static=True)
    patch_size: int = eqx.field(static=True)
    num_heads: int = eqx.field(static=True)
    learn_sigma: bool = eqx.field(static=True)
    block_impl: Literal["unroll", "scan"] = eqx.field(static=True)
    dtype: Literal["float32", "bfloat16"] = eqx.field(static=True)
    bf16_mode: Literal["cast", "dots"] = eqx.field(static=True)
    remat: Literal["none", "dots", "full"] = eqx.field(static=True)
    time_convention: Literal["sit", "repa"] = eqx.field(static=True)

    def __init__(
        self,
        *,
        input_size: int,
        in_channels: int,
        patch_size: int,
        dim: int,
        depth: int,
        num_heads: int,
        num_classes: int,
        mlp_ratio: float = 4.0,
        learn_sigma: bool = True,
        class_dropout_prob: float = 0.1,
        family: Literal["SiT", "DiT", "MF"] = "SiT",
        block_impl: Literal["unroll", "scan"] = "scan",
        dtype: Literal["float32", "bfloat16"] = "float32",
        bf16_mode: Literal["cast", "dots"] = "cast",
        attention: Literal["einsum", "xla", "cudnn"] = "einsum",
        remat: Literal["none", "dots", "full"] = "none",
        time_convention: Literal["sit", "repa"] = "sit",
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `input_size`: height = width of the input; must be divisible by `patch_size`.
        - `in_channels`: input channels (4 for SD-VAE latents).
        - `patch_size`, `dim`, `depth`, `num_heads`, `mlp_ratio`: the architecture.
        - `num_classes`: labels `0..num_classes-1`; `num_classes` is the null label.
        - `learn_sigma`: produce `2 * in_channels` output channels (the reference default).
        - `class_dropout_prob`: label dropout in training (when a `key` is passed to the forward).
        - `family`: `"SiT"` or `"DiT"` (which output channels `__call__` returns), or `"MF"`:
            MeanFlow's DiT with a second timestep embedder for `h = t - r` (Gsunshine/meanflow
            `models/models_dit.py`), `c = t_emb(t) + h_emb(h) + y_emb(y)`.
        - `block_impl`: `"unroll"` or `"scan"`.
        - `dtype`: compute dtype, `"float32"` or `"bfloat16"`; parameters are float32 either way.
        - `bf16_mode`: how `dtype="bfloat16"` is applied: `"cast"` runs the network in bfloat16
            (LayerNorm statistics and softmax in float32); `"dots"` keeps activations float32
            and gives the blocks' token-wise matmuls and attention bfloat16 operands with float32
            accumulation, forward and backward (`eqdisp.models._mixed`: the form that reaches a
            CPU's AMX/AVX-512-BF16 units through XLA). Ignored for float32.
        - `attention`: `"einsum"`, `"xla"` or `"cudnn"` (see `TransformerBlock.attention`).
        - `remat`: what the backward pass recomputes in each block instead of storing:
            `"none"`; `"dots"` keeps the outputs of the linear layers and recomputes attention
            and the elementwise ops; `"full"` keeps only the block's input.
        - `time_convention`: the convention the weights were trained in: `"sit"` (t = 1 data,
            the library's) or `"repa"` (REPA: t = 1 noise, velocity noise - data); SiT only.
        - `key`: a PRNG key for the initialisation.
        """
        # Fail before allocating anything (an XL model is 2.7 GB).
        _check_architecture(
            input_size=input_size, patch_size=patch_size, dim=dim, num_heads=num_heads, depth=depth
        )
        patch_key, t_key, y_key, blocks_key, final_key = jax.random.split(key, 5)
        out_channels = 2 * in_channels if learn_sigma else in_channels
        self.x_embedder = PatchEmbed(in_channels, dim, patch_size, key=patch_key)
        self.t_embedder = TimestepEmbedder(dim, key=t_key)
        self.y_embedder = LabelEmbedder(num_classes, dim, class_dropout_prob, key=y_key)
        matmul = "bfloat16" if dtype == "bfloat16" and bf16_mode == "dots" else "float32"
        make_block = lambda k: TransformerBlock(
            dim, num_heads, mlp_ratio, attention, matmul, key=k
        )
        self.blocks = eqx.filter_vmap(make_block)(jax.random.split(blocks_key, depth))
        self.final_layer = FinalLayer(dim, patch_size, out_channels, key=final_key)
        # A key of its own, so SiT and DiT initialise exactly as before the MF family existed.
        h_key = jax.random.fold_in(key, 1)
        self.h_embedder = TimestepEmbedder(dim, key=h_key) if family == "MF" else None
        self.family = family
        self.input_size = input_size
        self.in_channels = in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.learn_sigma = learn_sigma
        self.block_impl = block_impl
        self.dtype = dtype
        self.bf16_mode = bf16_mode
        self.remat = remat
        self.time_convention = time_convention

    def __check_init__(self):
        _check_architecture(
            input_size=self.input_size,
            patch_size=self.patch_size,
            dim=self.dim,
            num_heads=self.num_heads,
            depth=self.depth,
        )
        if self.family not in ("SiT", "DiT", "MF"):
            raise ValueError(
                f"family={self.family!r} is not allowed: expected 'SiT', 'DiT' or 'MF'"
            )
        if (self.family == "MF") != (self.h_embedder is not None):
            raise ValueError("an 'MF' model has an h_embedder and only an 'MF' model has one")
        if self.family == "MF" and self.learn_sigma:
            raise ValueError(
                "learn_sigma=True is not allowed for family='MF': expected False (MeanFlow "
                "predicts an average velocity, no variance)"
            )
        if self.block_impl not in ("unroll", "scan"):
            raise ValueError(
                f"block_impl={self.block_impl!r} is not allowed: expected 'unroll' or 'scan'"
            )
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(
                f"dtype={self.dtype!r} is not allowed: expected 'float32' or 'bfloat16'"
            )
        if self.bf16_mode not in ("cast", "dots"):
            raise ValueError(
                f"bf16_mode={self.bf16_mode!r} is not allowed: expected 'cast' or 'dots'"
            )
        if self.family == "MF" and self.blocks.matmul == "bfloat16":
            raise ValueError(
                "bf16_mode='dots' is not allowed for family='MF': expected 'cast' (MeanFlow "
                "differentiates the network forward-mode, which the 'dots' kernels do not support)"
            )
        if self.bf16_mode == "dots" and self.blocks.attention_impl == "cudnn":
            raise ValueError(
                "attention='cudnn' is not allowed with bf16_mode='dots': expected bf16_mode='cast' "
                "(cuDNN flash attention takes bfloat16 activations)"
            )
        if self.remat not in _REMAT_POLICIES:
            raise ValueError(
                f"remat={self.remat!r} is not allowed: expected 'none', 'dots' or 'full'"
            )
        if self.time_convention not in ("sit", "repa"):
            raise ValueError(
                f"time_convention={self.time_convention!r} is not allowed: expected 'sit' or 'repa'"
            )
        if self.time_convention == "repa" and self.family != "SiT":
            raise ValueError(
                f"time_convention='repa' is not allowed for family={self.family!r}: expected 'SiT' "
                "(DiT is fed integer steps, REPA a time in [0, 1])"
            )

    # -- sizes -------------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Number of transformer blocks."""
        return self.blocks.qkv.weight.shape[0]

    @property
    def dim(self) -> int:
        """Hidden width D."""
        return self.x_embedder.proj.weight.shape[0]

    def upstream_mask(self, block: int) -> PyTree:
        """1 on the embedders and blocks ``0..block`` (a slice of the stacked blocks), 0 on the
        later blocks and the final layer."""
        params = eqx.filter(self, eqx.is_inexact_array)

        def first_blocks(a):
            keep = (jnp.arange(a.shape[0]) <= block).astype(a.dtype)
            return keep.reshape(-1, *(1,) * (a.ndim - 1))

        mask = jax.tree.map(lambda a: jnp.ones((), a.dtype), params)
        mask = eqx.tree_at(lambda m: m.blocks, mask, jax.tree.map(first_blocks, params.blocks))
        zeros = jax.tree.map(lambda a: jnp.zeros((), a.dtype), params.final_layer)
        return eqx.tree_at(lambda m: m.final_layer, mask, zeros)

    @property
    def grid_size(self) -> int:
        """Patches per side, `input_size // patch_size`."""
        return self.input_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Tokens per example, `grid_size**2`."""
        return self.grid_size**2

    @property
    def num_classes(self) -> int:
        """Number of real classes; also the index of the null label."""
        return self.y_embedder.num_classes

    @property
    def class_dropout_prob(self) -> float:
        """Label-dropout probability used when a `key` is passed."""
        return self.y_embedder.dropout_prob

    @property
    def out_channels(self) -> int:
        """Channels returned by `__call__` (SiT drops the learned-sigma half; DiT keeps it)."""
        if self.learn_sigma and self.family == "DiT":
            return 2 * self.in_channels
        return self.in_channels

    # -- pieces of the forward (public for analysis and tests) ---------------------------------

    def embed(self, x: Float[Array, "c h w"]) -> Float[Array, "tokens dim"]:
        """Patch embedding plus the fixed position embedding: the input of block 1."""
        weight_dtype = self.x_embedder.proj.weight.dtype
        pos = sincos_pos_embed_2d(self.dim, self.grid_size)  # trace-time constant, not a leaf
        return self.x_embedder(x.astype(weight_dtype)) + jnp.asarray(pos, weight_dtype)

    def condition(
        self,
        t: Float[Array, ""],
        y: Int[Array, ""],
        *,
        h: Float[Array, ""] | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, " dim"]:
        """`c = t_emb(t) + y_emb(y)`, plus `h_emb(h)` for an MF model (`h = t - r`; None is 0,
        the instantaneous velocity); with a `key`, `y` is dropped to the null label with
        probability `class_dropout_prob` (training)."""
        if self.h_embedder is None:
            if h is not None:
                raise ValueError(f"h is only for family='MF' models, not {self.family!r}")
            return self.t_embedder(t) + self.y_embedder(y, key=key)
        h = jnp.zeros_like(t) if h is None else h
        return self.t_embedder(t) + self.h_embedder(h) + self.y_embedder(y, key=key)

    def block(self, index: int) -> TransformerBlock:
        """The `index`-th (0-based) block as an unstacked module."""
        return jax.tree.map(lambda a: a[index] if eqx.is_array(a) else a, self.blocks)

    def unpatchify(
        self, tokens: Float[Array, "tokens patch_features"]
    ) -> Float[Array, "c_out h w"]:
        """Final-layer token outputs to an image with all `2 * in_channels` (or `in_channels`) channels."""
        channels = self.final_layer.linear.weight.shape[0] // self.patch_size**2
        return unpatchify(tokens, self.patch_size, channels)

    def _run_blocks(
        self, h: Float[Array, "tokens dim"], c: Float[Array, " dim"], tap_blocks: tuple[int, ...]
    ) -> tuple[Float[Array, "tokens dim"], Float[Array, "taps tokens dim"]]:
        dynamic, static = eqx.partition(self.blocks, eqx.is_array)

        def block(params, h):
            return eqx.combine(params, static)(h, c)

        if self.remat != "none":
            block = jax.checkpoint(block, policy=_REMAT_POLICIES[self.remat])
        if self.block_impl == "unroll":
            outs = []
            for params in _unstack(dynamic, self.depth):
                h = block(params, h)
                outs.append(h)
            taps = [outs[i] for i in tap_blocks]
            return h, jnp.stack(taps) if taps else jnp.zeros((0, *h.shape), h.dtype)
        if tap_blocks == tuple(range(self.depth)):

            def step(carry, params):
                out = block(params, carry)
                return out, out  # ys are exactly the taps

            return jax.lax.scan(step, h, dynamic)
        # Some blocks only: the taps ride in the carry and are written at their blocks alone. XLA
        # cannot shrink a scan's stacked `ys` to the slices a loss reads; in the SiT-S/2 batch-32
        # train step that (depth, tokens, dim) buffer, its transposes and its padded cotangent
        # added 1.04 GB to XLA's bytes accessed over the baseline (0.26 GB this way, the loss
        # included).
        slot = np.full(self.depth, -1, np.int32)
        slot[list(tap_blocks)] = np.arange(len(tap_blocks))

        def step_tapped(carry, xs):
            h, taps = carry
            params, k = xs
            h = block(params, h)
            if tap_blocks:
                taps = jax.lax.cond(
                    k >= 0, lambda: jax.lax.dynamic_update_index_in_dim(taps, h, k, 0), lambda: taps
                )
            return (h, taps), None

        taps = jnp.zeros((len(tap_blocks), *h.shape), h.dtype)
        (h, taps), _ = jax.lax.scan(step_tapped, (h, taps), (dynamic, jnp.asarray(slot)))
        return h, taps

    def forward_with_taps(
        self,
        x: Float[Array, "c h w"],
        t: Float[Array, ""],
        y: Int[Array, ""],
        *,
        key: PRNGKeyArray | None = None,
        tap_blocks: Sequence[int] | None = None,
        h: Float[Array, ""] | None = None,
    ) -> tuple[Float[Array, "c_out h w"], Taps]:
        """Run the network on one example.

        **Arguments:**

        - `x`: the noisy input `(in_channels, input_size, input_size)`.
        - `t`: the time (SiT: `t` in [0, 1], t = 1 data; DiT: step 0..999). A `"repa"` network
            is fed `1 - t` and its output negated, so it returns SiT's velocity at SiT's `t`.
        - `y`: the label; `num_classes` is the null label (unconditional).
        - `key`: pass a key in training to apply label dropout; `None` in evaluation.
        - `tap_blocks`: the 0-based blocks whose outputs to return, increasing; `None` for every
            block. Ask for only the blocks you read: under `lax.scan`, reading one tap out of all
            of them keeps the whole `(depth, tokens, dim)` stack alive.
        - `h`: MF models only: the interval `t - r` of the average velocity (MeanFlow's time,
            t = 1 noise); None is 0.

        **Returns:** `(out, taps)`: `out` float32 with `out_channels` channels, and `Taps` with the
        residual stream after the `tap_blocks` blocks and the conditioning vector, in the dtype
        of the activations (bfloat16 with `bf16_mode="cast"`, else float32).
        """
        tap_blocks = check_tap_blocks(tap_blocks, self.depth)
        model = self
        if self.dtype != "float32" and self.bf16_mode == "cast":
            model = _cast_floating(self, jnp.dtype(self.dtype))
        # REPA trained with t = 1 noise and target noise - data (REPA `loss.py`, `SILoss`): under
        # t_REPA = 1 - t_SiT its velocity is minus SiT's, so it sees 1 - t and its output flips.
        repa = self.time_convention == "repa"
        c = model.condition(1 - t if repa else t, y, h=h, key=key)  # before `h` names the tokens
        h = model.embed(x)
        h, blocks = model._run_blocks(h, c, tap_blocks)
        # Output in float32 whatever the compute dtype (the loss is accumulated in float32).
        out = model.unpatchify(model.final_layer(h, c).astype(jnp.float32))
        out = -out if repa else out
        return out[: self.out_channels], Taps(blocks=blocks, c=c)
