"""The ADM U-Net of flow_matching's CIFAR-10 example, with typed taps of every residual block.

The network of `facebookresearch/flow_matching` `examples/image/models/unet.py` (itself
guided-diffusion's `UNetModel`) as configured by `MODEL_CONFIGS["cifar10"]`
(`examples/image/models/model_configs.py`); every constant follows those two files and
`examples/image/models/nn.py` (classes cited inline).
The defaults of `UNet` are the cifar10 configuration: 29 residual blocks, 55,676,419 parameters.

Layout. PyTorch nests the blocks in `input_blocks`, `middle_block` and `output_blocks` containers;
here the 29 `ResBlock`s are one flat tuple `UNet.res_blocks` in forward order, so that
`res_blocks[k]` is the block whose output is tap `k`, and `attn_blocks[k]` is the attention block
that follows it in the same container (`None` if there is none). `UNet.resblock_names` gives the
PyTorch module path of each (`"input_blocks.1.0"`, ..., `"middle_block.0"`, ...,
`"output_blocks.14.0"`), which is all a weight loader needs besides renaming the layers:
`in_norm`/`in_conv` = `in_layers.0/2`, `emb_linear` = `emb_layers.1`, `out_norm`/`out_conv` =
`out_layers.0/3`, `skip` = `skip_connection`; attention `norm`, `qkv`, `proj` = `norm`, `qkv`,
`proj_out` (Conv1d weights `(o, i, 1)` squeezed to Linear `(o, i)`); `input_conv` =
`input_blocks.0.0`, `out_norm`/`out_conv` = `out.0/2`, `time_embed_in/out` = `time_embed.0/2`.
"""

from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

from ._base import AbstractDiffusionModel, check_tap_blocks
from ._embed import dense, timestep_embedding

DEFAULT_DISP_BLOCK: int = 15
"""The 0-based ResBlock the paper regularises on the CIFAR-10 U-Net ("residual block 15").

The paper does not say how it counts. This is the 0-based count of ResBlocks in forward order
(`[m for m in unet.modules() if isinstance(m, ResBlock)][15]` on flow_matching's `UNetModel`):
`output_blocks[1]`, the second decoder block at 8x8 with 256 channels (64 tokens x 256,
d = 16384). The other readings
sit at the same 8x8 bottleneck with the same shape: 1-based ResBlock 15 = 0-based 14
(`output_blocks[0]`), or 0-based container 15 (counting `input_blocks` 0-14 first) = the middle
block, whose output is that of 0-based ResBlock 13. It is an index for `tap_blocks` (0-based);
`DispConfig.blocks`, which counts from 1, spells it `"16"`. Meaningful for the cifar10
configuration only.
"""


# ----------------------------------------------------------------------------------------------
# Layers


class GroupNorm32(eqx.Module):
    """GroupNorm with a per-channel affine, computed in float32 whatever the input dtype.

    guided-diffusion's `GroupNorm32`: `GroupNorm(32, c, eps=1e-5)` on `x.float()`, cast back to
    `x.dtype` (flow_matching `examples/image/models/nn.py`, `normalization`). Weight 1, bias 0
    (PyTorch's init). The parameters stay float32 under a bfloat16 compute dtype (`UNet` does not
    cast them).
    """

    weight: Float[Array, " channels"]
    bias: Float[Array, " channels"]
    groups: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)

    def __init__(self, channels: int, groups: int = 32, eps: float = 1e-5):
        if groups < 1 or channels % groups != 0:
            raise ValueError(
                f"channels={channels} is not divisible by num_groups={groups} (GroupNorm)"
            )
        self.weight = jnp.ones((channels,), jnp.float32)
        self.bias = jnp.zeros((channels,), jnp.float32)
        self.groups = groups
        self.eps = eps

    def __call__(self, x: Float[Array, "channels *spatial"]) -> Float[Array, "channels *spatial"]:
        x32 = x.astype(jnp.float32)
        grouped = x32.reshape(self.groups, -1)
        mean = jnp.mean(grouped, axis=1, keepdims=True)
        var = jnp.mean(jnp.square(grouped - mean), axis=1, keepdims=True)  # biased, as PyTorch
        normed = ((grouped - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        affine_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        out = normed * self.weight.astype(jnp.float32).reshape(affine_shape)
        return (out + self.bias.astype(jnp.float32).reshape(affine_shape)).astype(x.dtype)


def _zeros_like_layer(make: Callable[[], eqx.Module]) -> eqx.Module:
    # guided-diffusion's `zero_module`; the layer's shapes without drawing its random init.
    shapes = eqx.filter_eval_shape(make)
    is_struct = lambda a: isinstance(a, jax.ShapeDtypeStruct)
    return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype) if is_struct(a) else a, shapes)


def _conv2d(
    in_channels: int, out_channels: int, kernel_size: int, zero: bool, *, key: PRNGKeyArray
) -> eqx.nn.Conv2d:
    # Equinox's default init is PyTorch's (kaiming-uniform a = sqrt(5): weight and bias uniform in
    # +-1/sqrt(fan_in), as flow_matching's `conv_nd` leaves it); `zero` gives zero weight and bias
    # (`zero_module`).
    def make() -> eqx.nn.Conv2d:
        return eqx.nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            padding=kernel_size // 2,
            dtype=jnp.float32,
            key=key,
        )

    return _zeros_like_layer(make) if zero else make()


def _linear(
    in_features: int, out_features: int, zero: bool, *, key: PRNGKeyArray
) -> eqx.nn.Linear:
    # As `_conv2d`: Equinox's default Linear init is PyTorch's (bound 1/sqrt(in_features)).
    def make() -> eqx.nn.Linear:
        return eqx.nn.Linear(in_features, out_features, dtype=jnp.float32, key=key)

    return _zeros_like_layer(make) if zero else make()


def _dropout(x: Float[Array, "c h w"], rate: float, key: PRNGKeyArray) -> Float[Array, "c h w"]:
    """Inverted dropout (PyTorch `nn.Dropout` in training): zero with probability `rate`, scale
    the kept values by `1 / (1 - rate)`."""
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def _downsample(x: Float[Array, "c h w"]) -> Float[Array, "c h2 w2"]:
    """2x2 average pool, stride 2 (`Downsample` with `conv_resample=False`)."""
    c, h, w = x.shape
    return jnp.mean(x.reshape(c, h // 2, 2, w // 2, 2), axis=(2, 4))


def _upsample(x: Float[Array, "c h w"]) -> Float[Array, "c h2 w2"]:
    """Nearest-neighbour x2 (`Upsample` with `conv_resample=False`)."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class ResBlock(eqx.Module):
    """guided-diffusion's `ResBlock` without up/down-sampling (flow_matching
    `examples/image/models/unet.py`, `ResBlock._forward`), in this order:

    1. `h = in_conv(SiLU(in_norm(x)))` (GroupNorm, SiLU, conv3x3 `c_in -> c_out`);
    2. `scale, shift = split(emb_linear(SiLU(emb)))`, scale first;
    3. `h = out_norm(h) * (1 + scale) + shift` (or `out_norm(h + emb_out)` without scale-shift);
    4. `h = out_conv(Dropout(SiLU(h)))` with a zero-initialised conv3x3;
    5. `skip(x) + h`, `skip` the identity when `c_in == c_out`, a 1x1 conv otherwise.

    Because `out_conv` starts at zero, a fresh block is exactly its skip path.
    """

    in_norm: GroupNorm32
    in_conv: eqx.nn.Conv2d
    emb_linear: eqx.nn.Linear
    out_norm: GroupNorm32
    out_conv: eqx.nn.Conv2d
    skip: eqx.nn.Conv2d | None
    dropout: float = eqx.field(static=True)
    use_scale_shift_norm: bool = eqx.field(static=True)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        dropout: float = 0.0,
        use_scale_shift_norm: bool = True,
        num_groups: int = 32,
        norm_eps: float = 1e-5,
        *,
        key: PRNGKeyArray,
    ):
        in_key, emb_key, out_key, skip_key = jax.random.split(key, 4)
        self.in_norm = GroupNorm32(in_channels, num_groups, norm_eps)
        self.in_conv = _conv2d(in_channels, out_channels, 3, False, key=in_key)
        emb_out = 2 * out_channels if use_scale_shift_norm else out_channels
        self.emb_linear = _linear(emb_channels, emb_out, False, key=emb_key)
        self.out_norm = GroupNorm32(out_channels, num_groups, norm_eps)
        self.out_conv = _conv2d(out_channels, out_channels, 3, True, key=out_key)
        if in_channels == out_channels:
            self.skip = None
        else:
            self.skip = _conv2d(in_channels, out_channels, 1, False, key=skip_key)
        self.dropout = dropout
        self.use_scale_shift_norm = use_scale_shift_norm

    def __call__(
        self,
        x: Float[Array, "c_in h w"],
        emb: Float[Array, " emb"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "c_out h w"]:
        """**Arguments:** `x` the feature map, `emb` the time embedding; `key` given means
        training (dropout applied), `None` inference.

        **Returns:** the block output `skip(x) + h`.
        """
        h = self.in_conv(jax.nn.silu(self.in_norm(x)))
        emb_out = dense(self.emb_linear, jax.nn.silu(emb)).astype(h.dtype)[:, None, None]
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(emb_out, 2)
            h = self.out_norm(h) * (1 + scale) + shift
        else:
            h = self.out_norm(h + emb_out)
        h = jax.nn.silu(h)
        if key is not None and self.dropout > 0:
            h = _dropout(h, self.dropout, key)
        h = self.out_conv(h)
        return (x if self.skip is None else self.skip(x)) + h


class AttentionBlock(eqx.Module):
    """Self-attention over the pixels of a feature map (guided-diffusion `AttentionBlock` with
    `QKVAttention`, the "new" order; flow_matching `examples/image/models/unet.py`).

    `qkv = Conv1d(c -> 3c)(GroupNorm(x))`; q, k, v are the three channel chunks, each split into
    heads of `c / heads` consecutive channels; q and k are both scaled by `(c / heads)^(-1/4)`;
    scores and softmax in float32; `x + proj(attention)` with a zero-initialised `proj`, so a
    fresh block is the identity.
    """

    norm: GroupNorm32
    qkv: eqx.nn.Linear
    proj: eqx.nn.Linear
    num_heads: int = eqx.field(static=True)

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_groups: int = 32,
        norm_eps: float = 1e-5,
        *,
        key: PRNGKeyArray,
    ):
        if num_heads < 1 or channels % num_heads != 0:
            raise ValueError(f"channels={channels} is not divisible by num_heads={num_heads}")
        qkv_key, proj_key = jax.random.split(key)
        self.norm = GroupNorm32(channels, num_groups, norm_eps)
        # Conv1d(k=1) as a Linear: same init (fan_in = channels), weight (o, i, 1) squeezed.
        self.qkv = _linear(channels, 3 * channels, False, key=qkv_key)
        self.proj = _linear(channels, channels, True, key=proj_key)
        self.num_heads = num_heads

    def __call__(self, x: Float[Array, "c h w"]) -> Float[Array, "c h w"]:
        c, height, width = x.shape
        heads = self.num_heads
        head_dim = c // heads
        tokens = self.norm(x).reshape(c, height * width).T  # (tokens, c)
        # qkv channel index is s*c + head*head_dim + d with s in (q, k, v): the "new order".
        qkv = dense(self.qkv, tokens).reshape(height * width, 3, heads, head_dim)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        scale = head_dim**-0.25  # on q and k both, as guided-diffusion (stabler in fp16)
        scores = jnp.einsum(
            "thd,shd->hts", q * scale, k * scale, preferred_element_type=jnp.float32
        )
        weights = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
        out = jnp.einsum("hts,shd->thd", weights, v).reshape(height * width, c)
        return x + dense(self.proj, out).T.reshape(c, height, width)


# ----------------------------------------------------------------------------------------------
# The U-Net


class UNetTaps(eqx.Module):
    """The U-Net's taps: ResBlock outputs as tokens, and the time embedding.

    The shared `Taps` cannot hold them: its annotations give `blocks` and `c` one axis name `dim`,
    but here `c` has `4 * model_channels` entries and the feature maps `mult * model_channels`.
    Consumers that read `.blocks` (the objective, the analysis) take either.

    **Fields:**

    - `blocks`: the outputs of the tapped ResBlocks, in the order of `tap_blocks`, each
        `(h * w, channels)`: pixel `(i, j)` is token `i * w + j`. In the compute dtype.
    - `c`: the time embedding `emb` fed to every ResBlock, in the compute dtype.
    """

    blocks: Float[Array, "taps tokens dim"]
    c: Float[Array, " emb"]


class _Slot(NamedTuple):
    """Where one ResBlock sits (static; derived from the configuration)."""

    stage: Literal["input", "middle", "output"]
    in_channels: int
    out_channels: int
    attention: bool  # an AttentionBlock follows in the same container
    resample: Literal["down", "up", "none"]  # a Downsample container / an Upsample layer follows
    name: str  # the PyTorch module path of the ResBlock
    factor: int  # the downsample factor of its feature map


def _layout(
    model_channels: int,
    channel_mult: tuple[int, ...],
    num_res_blocks: int,
    attention_resolutions: tuple[int, ...],
) -> tuple[_Slot, ...]:
    """The ResBlocks of guided-diffusion's `UNetModel.__init__` in forward order."""
    ch = model_channels * channel_mult[0]
    skip_channels = [ch]  # what each input container pushes, input conv first
    ds = 1
    container = 1  # input_blocks[0] is the input conv
    slots: list[_Slot] = []
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            out = model_channels * mult
            name = f"input_blocks.{container}.0"
            slots.append(_Slot("input", ch, out, ds in attention_resolutions, "none", name, ds))
            ch = out
            skip_channels.append(ch)
            container += 1
        if level != len(channel_mult) - 1:
            slots[-1] = slots[-1]._replace(resample="down")
            skip_channels.append(ch)
            container += 1
            ds *= 2
    slots.append(_Slot("middle", ch, ch, True, "none", "middle_block.0", ds))
    slots.append(_Slot("middle", ch, ch, False, "none", "middle_block.2", ds))
    container = 0
    for level, mult in reversed(list(enumerate(channel_mult))):
        for i in range(num_res_blocks + 1):
            out = model_channels * mult
            resample = "up" if level and i == num_res_blocks else "none"
            cin = ch + skip_channels.pop()
            name = f"output_blocks.{container}.0"
            attention = ds in attention_resolutions
            slots.append(_Slot("output", cin, out, attention, resample, name, ds))
            ch = out
            container += 1
            if resample == "up":
                ds //= 2
    return tuple(slots)


def _check_config(
    *,
    in_channels: int,
    out_channels: int,
    model_channels: int,
    channel_mult: tuple[int, ...],
    num_res_blocks: int,
    dropout: float,
    num_heads: int,
    num_head_channels: int,
    num_groups: int,
    dtype: str,
) -> None:
    def positive(name: str, value: int) -> None:
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name}={value!r} is not allowed: expected a positive int")

    for name, value in [
        ("in_channels", in_channels),
        ("out_channels", out_channels),
        ("model_channels", model_channels),
        ("num_res_blocks", num_res_blocks),
        ("num_groups", num_groups),
    ]:
        positive(name, value)
    if not channel_mult or not all(isinstance(m, int) and m >= 1 for m in channel_mult):
        raise ValueError(
            f"channel_mult={channel_mult!r} is not allowed: expected a non-empty tuple of "
            "positive ints"
        )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout!r} is not allowed: expected 0 <= dropout < 1")
    for mult in sorted(set(channel_mult)):
        ch = model_channels * mult
        if ch % num_groups != 0:
            raise ValueError(
                f"model_channels * channel_mult = {ch} is not divisible by num_groups={num_groups}"
            )
        if num_head_channels == -1:
            if num_heads < 1 or ch % num_heads != 0:
                raise ValueError(f"channels {ch} are not divisible by num_heads={num_heads}")
        elif num_head_channels < 1 or ch % num_head_channels != 0:
            raise ValueError(
                f"channels {ch} are not divisible by num_head_channels={num_head_channels} "
                "(or use -1 for num_heads heads)"
            )
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype={dtype!r} is not allowed: expected 'float32' or 'bfloat16'")


def _cast_compute(tree: PyTree, dtype: jnp.dtype) -> PyTree:
    # Cast every floating leaf but the GroupNorm affines (GroupNorm runs in float32, as
    # guided-diffusion's `GroupNorm32` does). Casting inside the forward keeps float32 master
    # weights: `astype`'s transpose casts the cotangent back, so gradients arrive in float32.
    def cast(node):  # a GroupNorm32 arrives whole (`is_leaf`) and passes through
        return node.astype(dtype) if eqx.is_inexact_array(node) else node

    return jax.tree.map(cast, tree, is_leaf=lambda node: isinstance(node, GroupNorm32))


class UNet(AbstractDiffusionModel):
    """The flow_matching CIFAR-10 U-Net (guided-diffusion's ADM `UNetModel`), on one example.

    Time embedding `MLP(sinusoid(t))`; input conv3x3; an encoder of `num_res_blocks` ResBlocks per
    level with 2x2 average pooling between levels; a middle ResBlock, attention, ResBlock; a
    decoder of `num_res_blocks + 1` ResBlocks per level, each fed the concatenation of the current
    map and the matching encoder output, with nearest x2 upsampling between levels; attention after
    every ResBlock at the downsample factors `attention_resolutions`; GroupNorm, SiLU and a
    zero-initialised conv3x3 out. The defaults are the cifar10 configuration (flow_matching
    `MODEL_CONFIGS["cifar10"]`): 32x32 inputs, 256 channels at 32, 16 and 8 pixels, attention at
    16x16, 29 ResBlocks, 55,676,419 parameters.

    Time follows eqdisp's (and flow_matching's) convention, `t = 0` noise and `t = 1` data, and is
    embedded raw (no x1000). The network is unconditional (`num_classes=None` in flow_matching):
    `y` is accepted for the common interface and ignored. Not configurable (fixed to cifar10's
    values): `resblock_updown=False`, `conv_resample=False` (pooling and nearest upsampling without
    convs), the "new" attention order, no class embedding.

    Taps: `depth` is the number of ResBlocks, 0-based in forward order (encoder
    `0 .. L*n-1`, middle `L*n`, `L*n+1`, decoder after; cifar10: 0-11, 12-13, 14-28); tap `k` is
    the output of `res_blocks[k]` itself, before the attention or resampling that follows it in
    its PyTorch container, as `(h * w, channels)` tokens. Taps of different shapes cannot be
    stacked (a `ValueError` names them), so with several resolutions `tap_blocks=None` is an
    error. The paper's block is `DEFAULT_DISP_BLOCK` (15, `output_blocks[1]`, 8x8x256).
    """

    time_embed_in: eqx.nn.Linear
    time_embed_out: eqx.nn.Linear
    input_conv: eqx.nn.Conv2d
    res_blocks: tuple[ResBlock, ...]
    attn_blocks: tuple[AttentionBlock | None, ...]
    out_norm: GroupNorm32
    out_conv: eqx.nn.Conv2d
    in_channels: int = eqx.field(static=True)
    out_channels: int = eqx.field(static=True)
    model_channels: int = eqx.field(static=True)
    channel_mult: tuple[int, ...] = eqx.field(static=True)
    num_res_blocks: int = eqx.field(static=True)
    attention_resolutions: tuple[int, ...] = eqx.field(static=True)
    max_period: float = eqx.field(static=True)
    dtype: Literal["float32", "bfloat16"] = eqx.field(static=True)

    def __init__(
        self,
        *,
        in_channels: int = 3,
        out_channels: int = 3,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (2, 2, 2),
        num_res_blocks: int = 4,
        attention_resolutions: Sequence[int] = (2,),
        dropout: float = 0.3,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_scale_shift_norm: bool = True,
        num_groups: int = 32,
        norm_eps: float = 1e-5,
        max_period: float = 10000.0,
        dtype: Literal["float32", "bfloat16"] = "float32",
        key: PRNGKeyArray,
    ):
        """**Arguments:** (defaults: flow_matching's `MODEL_CONFIGS["cifar10"]`)

        - `in_channels`, `out_channels`: image channels in and out (3, 3).
        - `model_channels`: base width (128); the time embedding has `4 * model_channels`.
        - `channel_mult`: width multiplier per level ((2, 2, 2): 256 channels everywhere).
        - `num_res_blocks`: ResBlocks per encoder level (4); the decoder has one more per level.
        - `attention_resolutions`: downsample factors with attention after every ResBlock ((2,):
            the 16x16 level of 32x32 inputs). The middle block always has attention.
        - `dropout`: dropout rate inside every ResBlock (0.3), applied when the forward gets a key.
        - `num_heads`, `num_head_channels`: attention heads; `num_head_channels=-1` means
            `num_heads` heads (1, -1: one head), otherwise `channels // num_head_channels` heads.
        - `use_scale_shift_norm`: FiLM-style `GN(h)(1 + scale) + shift` (True), else `GN(h + emb)`.
        - `num_groups`, `norm_eps`: GroupNorm groups and epsilon (32, 1e-5).
        - `max_period`: of the sinusoidal time features (10000).
        - `dtype`: compute dtype, `"float32"` or `"bfloat16"`; parameters are float32 either way,
            GroupNorm and the attention softmax run in float32, the output is float32.
        - `key`: a PRNG key for the initialisation (PyTorch's default init; zero layers zero).
        """
        channel_mult = tuple(int(m) for m in channel_mult)
        attention_resolutions = tuple(int(r) for r in attention_resolutions)
        _check_config(
            in_channels=in_channels,
            out_channels=out_channels,
            model_channels=model_channels,
            channel_mult=channel_mult,
            num_res_blocks=num_res_blocks,
            dropout=dropout,
            num_heads=num_heads,
            num_head_channels=num_head_channels,
            num_groups=num_groups,
            dtype=dtype,
        )
        slots = _layout(model_channels, channel_mult, num_res_blocks, attention_resolutions)
        emb_channels = 4 * model_channels
        t_in_key, t_out_key, in_key, blocks_key, attn_key, out_key = jax.random.split(key, 6)
        block_keys = jax.random.split(blocks_key, len(slots))
        attn_keys = jax.random.split(attn_key, len(slots))
        self.time_embed_in = _linear(model_channels, emb_channels, False, key=t_in_key)
        self.time_embed_out = _linear(emb_channels, emb_channels, False, key=t_out_key)
        first = model_channels * channel_mult[0]
        self.input_conv = _conv2d(in_channels, first, 3, False, key=in_key)
        self.res_blocks = tuple(
            ResBlock(
                slot.in_channels,
                slot.out_channels,
                emb_channels,
                dropout,
                use_scale_shift_norm,
                num_groups,
                norm_eps,
                key=k,
            )
            for slot, k in zip(slots, block_keys)
        )

        def attention(channels: int, k: PRNGKeyArray) -> AttentionBlock:
            heads = num_heads if num_head_channels == -1 else channels // num_head_channels
            return AttentionBlock(channels, heads, num_groups, norm_eps, key=k)

        self.attn_blocks = tuple(
            attention(slot.out_channels, k) if slot.attention else None
            for slot, k in zip(slots, attn_keys)
        )
        last = slots[-1].out_channels
        self.out_norm = GroupNorm32(last, num_groups, norm_eps)
        self.out_conv = _conv2d(last, out_channels, 3, True, key=out_key)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.model_channels = model_channels
        self.channel_mult = channel_mult
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.max_period = float(max_period)
        self.dtype = dtype

    def __check_init__(self):
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(
                f"dtype={self.dtype!r} is not allowed: expected 'float32' or 'bfloat16'"
            )
        if len(self.res_blocks) != len(self._slots) or len(self.attn_blocks) != len(self._slots):
            raise ValueError("res_blocks/attn_blocks do not match the configured layout")

    # -- sizes -------------------------------------------------------------------------------

    @property
    def _slots(self) -> tuple[_Slot, ...]:
        return _layout(
            self.model_channels, self.channel_mult, self.num_res_blocks, self.attention_resolutions
        )

    @property
    def depth(self) -> int:
        """Number of ResBlocks (29 for cifar10), the blocks that can be tapped."""
        return len(self.res_blocks)

    @property
    def dropout(self) -> float:
        """Dropout rate of every ResBlock, applied when the forward gets a `key`."""
        return self.res_blocks[0].dropout

    @property
    def emb_channels(self) -> int:
        """Width of the time embedding, `4 * model_channels`."""
        return 4 * self.model_channels

    @property
    def resblock_names(self) -> tuple[str, ...]:
        """The PyTorch module path of each ResBlock, index = tap index (cifar10: `[0]` is
        `"input_blocks.1.0"`, `[12]` `"middle_block.0"`, `[15]` `"output_blocks.1.0"`)."""
        return tuple(slot.name for slot in self._slots)

    @property
    def downsample_factor(self) -> int:
        """Height and width of the input must be multiples of this, `2 ** (levels - 1)`."""
        return 2 ** (len(self.channel_mult) - 1)

    def tap_groups(self, tap_blocks: Sequence[int]) -> tuple[tuple[int, ...], ...]:
        """`tap_blocks` grouped by the resolution and width of their feature maps (the taps of
        one group stack), in order of first appearance."""
        slots = self._slots
        groups: dict[tuple[int, int], list[int]] = {}
        for block in check_tap_blocks(tap_blocks, self.depth, unit="ResBlock"):
            slot = slots[block]
            groups.setdefault((slot.factor, slot.out_channels), []).append(block)
        return tuple(tuple(group) for group in groups.values())

    def upstream_mask(self, block: int) -> PyTree:
        """1 on what runs before the output of ResBlock `block` in the forward: the time
        embedding, the input conv, ResBlocks ``0..block`` and the attention after ResBlocks
        ``0..block - 1``; 0 on the later ResBlocks and attention and the output layers."""
        params = eqx.filter(self, eqx.is_inexact_array)

        def fill(value: float) -> Callable[[PyTree], PyTree]:
            return lambda tree: jax.tree.map(lambda a: jnp.full((), value, a.dtype), tree)

        def later(m: PyTree) -> list[PyTree]:
            attention = [a for a in m.attn_blocks[block:] if a is not None]
            return [*m.res_blocks[block + 1 :], *attention, m.out_norm, m.out_conv]

        return eqx.tree_at(later, fill(1.0)(params), replace_fn=fill(0.0))

    # -- pieces of the forward (public for analysis and tests) ---------------------------------

    def embed_time(self, t: Float[Array, ""]) -> Float[Array, " emb"]:
        """`Linear(SiLU(Linear(sinusoid(t))))`: sinusoidal features of the raw `t`
        (`model_channels` of them, `[cos | sin]`, `max_period`) in float32, then the MLP in the
        dtype of the weights."""
        weight_dtype = self.time_embed_in.weight.dtype
        freq = timestep_embedding(t, self.model_channels, self.max_period).astype(weight_dtype)
        return dense(self.time_embed_out, jax.nn.silu(dense(self.time_embed_in, freq)))

    def forward_with_taps(
        self,
        x: Float[Array, "c h w"],
        t: Float[Array, ""],
        y: Int[Array, ""],
        *,
        key: PRNGKeyArray | None = None,
        tap_blocks: Sequence[int] | None = None,
    ) -> tuple[Float[Array, "c_out h w"], UNetTaps]:
        """Run the network on one example.

        **Arguments:**

        - `x`: the noisy input `(in_channels, h, w)`, `h` and `w` multiples of
            `downsample_factor`.
        - `t`: the time in [0, 1], `t = 1` data.
        - `y`: ignored (the network is unconditional).
        - `key`: pass a key in training to apply dropout in every ResBlock; `None` in evaluation.
        - `tap_blocks`: the 0-based ResBlocks whose outputs to return, increasing; `None` for every
            ResBlock (an error when they differ in shape).

        **Returns:** `(out, taps)`: `out` float32 with `out_channels` channels, and `UNetTaps`
        with the tapped ResBlock outputs as `(h * w, channels)` tokens and the time embedding, in
        the compute dtype.

        **Raises:** `ValueError` for a bad `tap_blocks`, taps of different shapes, or an input of
        the wrong channels or size.
        """
        del y  # unconditional (flow_matching's cifar10 model has num_classes=None)
        tap_blocks = check_tap_blocks(tap_blocks, self.depth, unit="ResBlock")
        c, height, width = x.shape
        factor = self.downsample_factor
        if c != self.in_channels or height % factor or width % factor:
            raise ValueError(
                f"input of shape {x.shape} is not allowed: expected ({self.in_channels}, h, w) "
                f"with h and w multiples of {factor}"
            )
        model = self
        if self.dtype != "float32":
            model = _cast_compute(self, jnp.dtype(self.dtype))
        keys = [None] * self.depth if key is None else list(jax.random.split(key, self.depth))

        emb = model.embed_time(t)
        h = model.input_conv(x.astype(model.input_conv.weight.dtype))
        skips = [h]
        taps = {}
        for k, slot in enumerate(self._slots):
            if slot.stage == "output":
                h = jnp.concatenate([h, skips.pop()], axis=0)
            h = model.res_blocks[k](h, emb, key=keys[k])
            if k in tap_blocks:
                taps[k] = h.reshape(h.shape[0], -1).T  # (h*w, channels), pixel i*w + j
            attn = model.attn_blocks[k]
            if attn is not None:
                h = attn(h)
            if slot.stage == "input":
                skips.append(h)
                if slot.resample == "down":
                    h = _downsample(h)
                    skips.append(h)
            elif slot.resample == "up":
                h = _upsample(h)
        out = model.out_conv(jax.nn.silu(model.out_norm(h))).astype(jnp.float32)
        return out, UNetTaps(blocks=_stack_taps(taps, tap_blocks, h.dtype), c=emb)


def _stack_taps(
    taps: dict[int, Array], tap_blocks: tuple[int, ...], dtype: jnp.dtype
) -> Float[Array, "taps tokens dim"]:
    if not tap_blocks:
        return jnp.zeros((0, 0, 0), dtype)
    shapes = {k: tuple(taps[k].shape) for k in tap_blocks}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"block {k}: {shape}" for k, shape in shapes.items())
        raise ValueError(
            f"tap_blocks={tap_blocks} cannot be stacked: the taps differ in shape "
            f"(tokens, channels) ({listed}); tap blocks of one resolution and width, or call "
            "once per shape"
        )
    return jnp.stack([taps[k] for k in tap_blocks])


__all__ = ["DEFAULT_DISP_BLOCK", "AttentionBlock", "GroupNorm32", "ResBlock", "UNet", "UNetTaps"]
