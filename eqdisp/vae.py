"""The Stable Diffusion VAE (diffusers `AutoencoderKL`) in Equinox, and its weight loader.

DiT, SiT, REPA and Dispersive Loss train on the latents of `stabilityai/sd-vae-ft-ema` (or
`-ft-mse`): diffusers' `AutoencoderKL` with block_out_channels (128, 256, 512, 512), 2 layers per
block, 4 latent channels, GroupNorm(32 groups, eps 1e-6) and SiLU. Facts of the architecture, each
checked against diffusers (`autoencoders/vae.py`, `autoencoder_kl.py`, `resnet.py`,
`downsampling.py`, `upsampling.py`, `attention_processor.py`, `unets/unet_2d_blocks.py`):

- ResnetBlock2D: GroupNorm, SiLU, 3x3 conv, GroupNorm, SiLU, (dropout 0), 3x3 conv, plus the input,
  through a 1x1 `conv_shortcut` where the channel count changes. No time embedding, output scale 1.
- Encoder: 3x3 `conv_in`; per level a DownEncoderBlock2D (`layers_per_block` resnets, then, except
  at the last level, a Downsample2D: zero pad (0, 1, 0, 1) = one row at the bottom and one column
  at the right, then a 3x3 stride-2 conv without padding); the mid block; GroupNorm, SiLU and a 3x3
  `conv_out` to `2 * latent_channels` (mean and log-variance); then the 1x1 `quant_conv`.
- Decoder: 1x1 `post_quant_conv`; 3x3 `conv_in`; the mid block; per level (channels reversed) an
  UpDecoderBlock2D (`layers_per_block + 1` resnets, then, except at the last level, nearest-2x
  upsampling and a 3x3 conv); GroupNorm, SiLU and a 3x3 `conv_out`.
- Mid block (UNetMidBlock2D): resnet, attention, resnet. The attention has one head of width
  `C = block_out_channels[-1]`: GroupNorm (same groups, eps 1e-6) over the input, `to_q`, `to_k`,
  `to_v` linears over the h*w tokens, softmax(q k^T / sqrt(C)) v, `to_out.0`, plus the input.
- Posterior: `mean, logvar = split(moments)`, `std = exp(0.5 * clip(logvar, -30, 20))`.

Latents here are **unscaled**: the diffusion models see `z * 0.18215` (`eqdisp.data.LATENT_SCALE`),
and that factor is applied by the data pipeline and the sampler's decoder, never in this module.

Computation is channels-last (NHWC, HWIO kernels): on a 2-core Intel Xeon (AVX-512, AMX) it measured 6-11% faster than NCHW
for the VAE's conv + GroupNorm blocks (128 ch at 256^2, 256 ch at 128^2, 512 ch at 64^2). The public
API is channels first (`encode(x: (3, H, W))`), one example per call; batch with `jax.vmap` or use
`encode_images` / `decode_latents`. Modules store kernels as HWIO and linears as (in, out); the
state-dict functions convert to and from the PyTorch layouts, bit for bit.

Weights are never downloaded: `load_vae` reads a diffusers directory or a weight file the user has.
"""

import dataclasses
import functools
import json
import os
import pathlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float, PRNGKeyArray, UInt8

from .config import ConfigError
from .io import WeightsError, read_state_dict

_EPS = 1e-6  # every GroupNorm of the VAE (resnet_eps = 1e-6 in diffusers' Encoder/Decoder)
_LOGVAR_MIN, _LOGVAR_MAX = -30.0, 20.0  # DiagonalGaussianDistribution's clamp


class VAEWeightsError(WeightsError):
    """A VAE weight file or directory is missing, unreadable or does not fit the config.

    A `eqdisp.io.WeightsError`; the message is one line meant for the user."""


# ----------------------------------------------------------------------------------------------
# Config


_DOWN_BLOCK = "DownEncoderBlock2D"
_UP_BLOCK = "UpDecoderBlock2D"
_IGNORED_KEYS = frozenset(
    {
        "sample_size",  # tiling threshold only
        "scaling_factor",  # 0.18215 lives in eqdisp.data.LATENT_SCALE
        "shift_factor",
        "latents_mean",
        "latents_std",
        "force_upcast",  # eqdisp's VAE is float32
    }
)
_MUST_BE_TRUE = ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The architecture of an `AutoencoderKL` (diffusers' names). The defaults are the SD-VAE's
    (`stabilityai/sd-vae-ft-ema`, `-ft-mse`), the VAE of DiT, SiT, REPA and Dispersive Loss."""

    in_channels: int = 3
    """Image channels the encoder reads."""
    out_channels: int = 3
    """Image channels the decoder writes."""
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    """Channels per resolution level; `len - 1` halvings, so 8x for four levels."""
    layers_per_block: int = 2
    """Resnets per encoder level (the decoder has one more per level)."""
    latent_channels: int = 4
    """Channels of the latent (the posterior has twice as many moments)."""
    norm_num_groups: int = 32
    """GroupNorm groups; must divide every entry of `block_out_channels`."""

    def __post_init__(self):
        channels = self.block_out_channels
        if not (
            isinstance(channels, tuple) and channels and all(_is_int(c) and c > 0 for c in channels)
        ):
            raise ConfigError(
                f"block_out_channels={channels!r} is not allowed: expected a non-empty tuple of "
                "positive ints"
            )
        for name in ("in_channels", "out_channels", "layers_per_block", "latent_channels",
                     "norm_num_groups"):
            value = getattr(self, name)
            if not (_is_int(value) and value > 0):
                raise ConfigError(f"{name}={value!r} is not allowed: expected a positive int")
        bad = [c for c in channels if c % self.norm_num_groups]
        if bad:
            raise ConfigError(
                f"norm_num_groups={self.norm_num_groups} is not allowed with "
                f"block_out_channels={channels}: expected a divisor of every entry "
                f"(not of {bad[0]})"
            )

    @property
    def downsampling_factor(self) -> int:
        """Image side / latent side: `2 ** (len(block_out_channels) - 1)` (8 for the SD-VAE)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> "VAEConfig":
        """The config of a diffusers `AutoencoderKL` `config.json` (already parsed).

        Keys that do not change the network (`_class_name`, `_diffusers_version`, any other
        `_*` key, `sample_size`, `scaling_factor`, `shift_factor`, `latents_mean`, `latents_std`,
        `force_upcast`) are ignored; absent keys take diffusers' `AutoencoderKL` defaults, as
        diffusers would (note: those are *not* the SD-VAE's: one level of 64 channels, 1 layer).

        **Raises:** `ConfigError` (one line) for a key or value eqdisp does not implement: a class
        other than `AutoencoderKL`, block types other than `DownEncoderBlock2D` /
        `UpDecoderBlock2D`, an activation other than SiLU, `use_quant_conv`,
        `use_post_quant_conv` or `mid_block_add_attention` false, or an unknown key.
        """
        if not isinstance(config, Mapping):
            kind = type(config).__name__
            raise ConfigError(f"a diffusers VAE config must be a JSON object, not a {kind}")
        name = config.get("_class_name", "AutoencoderKL")
        if name != "AutoencoderKL":
            raise ConfigError(
                f"_class_name={name!r} is not supported: expected 'AutoencoderKL' (the SD-VAE)"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        known |= {"down_block_types", "up_block_types", "act_fn", *_IGNORED_KEYS, *_MUST_BE_TRUE}
        unknown = sorted(k for k in config if not str(k).startswith("_") and k not in known)
        if unknown:
            raise ConfigError(
                f"unknown AutoencoderKL config key {unknown[0]!r}: eqdisp implements "
                f"{', '.join(sorted(known))}"
            )
        act = config.get("act_fn", "silu")
        if act not in ("silu", "swish"):
            raise ConfigError(f"act_fn={act!r} is not supported: expected 'silu'")
        for flag in _MUST_BE_TRUE:
            if config.get(flag, True) is not True:
                raise ConfigError(f"{flag}={config[flag]!r} is not supported: expected true")
        channels = config.get("block_out_channels", (64,))
        if not isinstance(channels, (list, tuple)):
            raise ConfigError(
                f"block_out_channels={channels!r} is not allowed: expected a list of positive ints"
            )
        channels = tuple(channels)
        for key, allowed in (("down_block_types", _DOWN_BLOCK), ("up_block_types", _UP_BLOCK)):
            types = config.get(key, (allowed,))
            if not isinstance(types, (list, tuple)) or any(t != allowed for t in types):
                raise ConfigError(
                    f"{key}={types!r} is not supported: expected only {allowed!r} blocks"
                )
            if len(types) != len(channels):
                raise ConfigError(
                    f"{key} has {len(types)} entries but block_out_channels has {len(channels)}: "
                    "expected one block per level"
                )
        return cls(
            in_channels=config.get("in_channels", 3),
            out_channels=config.get("out_channels", 3),
            block_out_channels=channels,
            layers_per_block=config.get("layers_per_block", 1),
            latent_channels=config.get("latent_channels", 4),
            norm_num_groups=config.get("norm_num_groups", 32),
        )


# ----------------------------------------------------------------------------------------------
# Layers (one example, channels last)


def _uniform(key: PRNGKeyArray, shape: tuple[int, ...], bound: float) -> Float[Array, "..."]:
    """U(-bound, bound) float32, PyTorch's default init for convs and linears."""
    # With a concrete key the numbers come from NumPy seeded by the key's bits: eager jax.random
    # compiles one kernel per shape, which costs far more than drawing 84M numbers. Under tracing
    # (`eqx.filter_eval_shape`) the key has no bits, so jax.random is used.
    try:
        seed = np.asarray(jax.random.key_data(key)).ravel().tolist()
    except jax.errors.TracerArrayConversionError:
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound)
    draws = np.random.default_rng(seed).uniform(-bound, bound, shape)
    return jnp.asarray(draws.astype(np.float32))


class Conv2d(eqx.Module):
    """A 2-D convolution with bias on one `h w c` image; zero padding
    `((top, bottom), (left, right))`."""

    weight: Float[Array, "kh kw cin cout"]
    bias: Float[Array, " cout"]
    stride: int = eqx.field(static=True)
    padding: tuple[tuple[int, int], tuple[int, int]] = eqx.field(static=True)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        *,
        stride: int = 1,
        padding: tuple[tuple[int, int], tuple[int, int]] | None = None,
        key: PRNGKeyArray,
    ):
        """PyTorch's default init. `padding` defaults to `kernel // 2` on every side ("same")."""
        w_key, b_key = jax.random.split(key)
        bound = (in_channels * kernel * kernel) ** -0.5
        self.weight = _uniform(w_key, (kernel, kernel, in_channels, out_channels), bound)
        self.bias = _uniform(b_key, (out_channels,), bound)
        self.stride = stride
        if padding is None:
            padding = ((kernel // 2, kernel // 2), (kernel // 2, kernel // 2))
        self.padding = padding

    def __call__(self, x: Float[Array, "h w cin"]) -> Float[Array, "h2 w2 cout"]:
        y = lax.conv_general_dilated(
            x[None],
            self.weight,
            window_strides=(self.stride, self.stride),
            padding=self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )[0]
        return y + self.bias


class Linear(eqx.Module):
    """`x @ weight + bias` over the last axis."""

    weight: Float[Array, "cin cout"]
    bias: Float[Array, " cout"]

    def __init__(self, in_features: int, out_features: int, *, key: PRNGKeyArray):
        w_key, b_key = jax.random.split(key)
        bound = in_features**-0.5
        self.weight = _uniform(w_key, (in_features, out_features), bound)
        self.bias = _uniform(b_key, (out_features,), bound)

    def __call__(self, x: Float[Array, "*batch cin"]) -> Float[Array, "*batch cout"]:
        return x @ self.weight + self.bias


class GroupNorm(eqx.Module):
    """PyTorch `GroupNorm(groups, c, eps=1e-6)` with affine scale and shift, on one `h w c`
    image."""

    weight: Float[Array, " c"]
    bias: Float[Array, " c"]
    groups: int = eqx.field(static=True)

    def __init__(self, groups: int, channels: int):
        self.weight = jnp.ones((channels,), jnp.float32)
        self.bias = jnp.zeros((channels,), jnp.float32)
        self.groups = groups

    def __check_init__(self):
        if self.weight.shape[0] % self.groups:
            raise ValueError(
                f"groups={self.groups} is not allowed: expected a divisor of {self.weight.shape[0]}"
            )

    def __call__(self, x: Float[Array, "h w c"]) -> Float[Array, "h w c"]:
        height, width, channels = x.shape
        y = x.reshape(height, width, self.groups, channels // self.groups)
        mean = jnp.mean(y, axis=(0, 1, 3), keepdims=True)
        # Two-pass variance (biased, as PyTorch normalises): no cancellation for large means.
        var = jnp.mean(jnp.square(y - mean), axis=(0, 1, 3), keepdims=True)
        y = (y - mean) * lax.rsqrt(var + _EPS)
        return y.reshape(height, width, channels) * self.weight + self.bias


class ResnetBlock2D(eqx.Module):
    """diffusers `ResnetBlock2D` without time embedding: two GroupNorm-SiLU-conv3x3 stages plus the
    input, which passes a 1x1 `conv_shortcut` when the channel count changes."""

    norm1: GroupNorm
    conv1: Conv2d
    norm2: GroupNorm
    conv2: Conv2d
    conv_shortcut: Conv2d | None

    def __init__(self, in_channels: int, out_channels: int, groups: int, *, key: PRNGKeyArray):
        conv1_key, conv2_key, shortcut_key = jax.random.split(key, 3)
        self.norm1 = GroupNorm(groups, in_channels)
        self.conv1 = Conv2d(in_channels, out_channels, 3, key=conv1_key)
        self.norm2 = GroupNorm(groups, out_channels)
        self.conv2 = Conv2d(out_channels, out_channels, 3, key=conv2_key)
        self.conv_shortcut = (
            Conv2d(in_channels, out_channels, 1, key=shortcut_key)
            if in_channels != out_channels
            else None
        )

    def __call__(self, x: Float[Array, "h w cin"]) -> Float[Array, "h w cout"]:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut + h


class Downsample2D(eqx.Module):
    """diffusers `Downsample2D(use_conv=True, padding=0)`: pad one zero row at the bottom and one
    zero column at the right, then a 3x3 stride-2 conv. `h` becomes `h // 2`."""

    conv: Conv2d

    def __init__(self, channels: int, *, key: PRNGKeyArray):
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=((0, 1), (0, 1)), key=key)

    def __call__(self, x: Float[Array, "h w c"]) -> Float[Array, "h2 w2 c"]:
        return self.conv(x)


class Upsample2D(eqx.Module):
    """diffusers `Upsample2D(use_conv=True)`: nearest-neighbour 2x, then a 3x3 conv."""

    conv: Conv2d

    def __init__(self, channels: int, *, key: PRNGKeyArray):
        self.conv = Conv2d(channels, channels, 3, key=key)

    def __call__(self, x: Float[Array, "h w c"]) -> Float[Array, "h2 w2 c"]:
        height, width, channels = x.shape
        x = jnp.broadcast_to(x[:, None, :, None, :], (height, 2, width, 2, channels))
        return self.conv(x.reshape(2 * height, 2 * width, channels))


class Attention(eqx.Module):
    """The mid block's single-head self-attention over the `h * w` positions, with residual.

    Field names follow diffusers' current `Attention`; `to_out` is a 1-tuple so that its state-dict
    key is `to_out.0` (diffusers' `to_out` is `[Linear, Dropout]`).
    """

    group_norm: GroupNorm
    to_q: Linear
    to_k: Linear
    to_v: Linear
    to_out: tuple[Linear]

    def __init__(self, channels: int, groups: int, *, key: PRNGKeyArray):
        q_key, k_key, v_key, out_key = jax.random.split(key, 4)
        self.group_norm = GroupNorm(groups, channels)
        self.to_q = Linear(channels, channels, key=q_key)
        self.to_k = Linear(channels, channels, key=k_key)
        self.to_v = Linear(channels, channels, key=v_key)
        self.to_out = (Linear(channels, channels, key=out_key),)

    def __call__(self, x: Float[Array, "h w c"]) -> Float[Array, "h w c"]:
        height, width, channels = x.shape
        tokens = self.group_norm(x).reshape(height * width, channels)
        q, k, v = self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)
        # One head of width C (diffusers: heads = C // attention_head_dim, attention_head_dim = C).
        scores = jnp.einsum("qc,kc->qk", q, k) * (channels**-0.5)
        out = jax.nn.softmax(scores, axis=-1) @ v
        return x + self.to_out[0](out).reshape(height, width, channels)


class MidBlock2D(eqx.Module):
    """diffusers `UNetMidBlock2D` with one attention layer: resnet, attention, resnet.

    `attentions` comes before `resnets`, as in diffusers (it is the state-dict order)."""

    attentions: tuple[Attention]
    resnets: tuple[ResnetBlock2D, ResnetBlock2D]

    def __init__(self, channels: int, groups: int, *, key: PRNGKeyArray):
        attn_key, first_key, second_key = jax.random.split(key, 3)
        self.attentions = (Attention(channels, groups, key=attn_key),)
        self.resnets = (
            ResnetBlock2D(channels, channels, groups, key=first_key),
            ResnetBlock2D(channels, channels, groups, key=second_key),
        )

    def __call__(self, x: Float[Array, "h w c"]) -> Float[Array, "h w c"]:
        x = self.resnets[0](x)
        x = self.attentions[0](x)
        return self.resnets[1](x)


class DownEncoderBlock2D(eqx.Module):
    """`num_layers` resnets (the first changes `in_channels` to `out_channels`), then, unless it is
    the last level, a `Downsample2D`."""

    resnets: tuple[ResnetBlock2D, ...]
    downsamplers: tuple[Downsample2D] | None

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_layers: int,
        groups: int,
        *,
        add_downsample: bool,
        key: PRNGKeyArray,
    ):
        keys = jax.random.split(key, num_layers + 1)
        self.resnets = tuple(
            ResnetBlock2D(
                in_channels if i == 0 else out_channels, out_channels, groups, key=keys[i]
            )
            for i in range(num_layers)
        )
        self.downsamplers = (Downsample2D(out_channels, key=keys[-1]),) if add_downsample else None

    def __call__(self, x: Float[Array, "h w cin"]) -> Float[Array, "h2 w2 cout"]:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(eqx.Module):
    """`num_layers` resnets (the first changes `in_channels` to `out_channels`), then, unless it is
    the last level, an `Upsample2D`."""

    resnets: tuple[ResnetBlock2D, ...]
    upsamplers: tuple[Upsample2D] | None

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_layers: int,
        groups: int,
        *,
        add_upsample: bool,
        key: PRNGKeyArray,
    ):
        keys = jax.random.split(key, num_layers + 1)
        self.resnets = tuple(
            ResnetBlock2D(
                in_channels if i == 0 else out_channels, out_channels, groups, key=keys[i]
            )
            for i in range(num_layers)
        )
        self.upsamplers = (Upsample2D(out_channels, key=keys[-1]),) if add_upsample else None

    def __call__(self, x: Float[Array, "h w cin"]) -> Float[Array, "h2 w2 cout"]:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder(eqx.Module):
    """Image (`h w in_channels`) to the `2 * latent_channels` posterior moments (before
    `quant_conv`)."""

    conv_in: Conv2d
    down_blocks: tuple[DownEncoderBlock2D, ...]
    mid_block: MidBlock2D
    conv_norm_out: GroupNorm
    conv_out: Conv2d

    def __init__(self, config: VAEConfig, *, key: PRNGKeyArray):
        channels, groups = config.block_out_channels, config.norm_num_groups
        in_key, mid_key, out_key, *block_keys = jax.random.split(key, 3 + len(channels))
        self.conv_in = Conv2d(config.in_channels, channels[0], 3, key=in_key)
        self.down_blocks = tuple(
            DownEncoderBlock2D(
                channels[max(i - 1, 0)],
                channels[i],
                config.layers_per_block,
                groups,
                add_downsample=i < len(channels) - 1,
                key=block_keys[i],
            )
            for i in range(len(channels))
        )
        self.mid_block = MidBlock2D(channels[-1], groups, key=mid_key)
        self.conv_norm_out = GroupNorm(groups, channels[-1])
        self.conv_out = Conv2d(channels[-1], 2 * config.latent_channels, 3, key=out_key)

    def __call__(self, x: Float[Array, "h w cin"]) -> Float[Array, "h2 w2 moments"]:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(eqx.Module):
    """Latent (`h w latent_channels`, after `post_quant_conv`) to an image (`h2 w2 out_channels`).

    `up_blocks` comes before `mid_block`, as in diffusers' state-dict order; the call runs the mid
    block first."""

    conv_in: Conv2d
    up_blocks: tuple[UpDecoderBlock2D, ...]
    mid_block: MidBlock2D
    conv_norm_out: GroupNorm
    conv_out: Conv2d

    def __init__(self, config: VAEConfig, *, key: PRNGKeyArray):
        channels = tuple(reversed(config.block_out_channels))
        groups = config.norm_num_groups
        in_key, mid_key, out_key, *block_keys = jax.random.split(key, 3 + len(channels))
        self.conv_in = Conv2d(config.latent_channels, channels[0], 3, key=in_key)
        self.up_blocks = tuple(
            UpDecoderBlock2D(
                channels[max(i - 1, 0)],
                channels[i],
                config.layers_per_block + 1,
                groups,
                add_upsample=i < len(channels) - 1,
                key=block_keys[i],
            )
            for i in range(len(channels))
        )
        self.mid_block = MidBlock2D(channels[0], groups, key=mid_key)
        self.conv_norm_out = GroupNorm(groups, channels[-1])
        self.conv_out = Conv2d(channels[-1], config.out_channels, 3, key=out_key)

    def __call__(self, z: Float[Array, "h w latent"]) -> Float[Array, "h2 w2 cout"]:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(eqx.Module):
    """The SD-VAE (diffusers `AutoencoderKL`), one example per call, float32.

    Attribute names equal diffusers' module names, so `vae.decoder.up_blocks[2].resnets[0]` holds
    `decoder.up_blocks.2.resnets.0.*` of the weight file (`vae_to_state_dict`).
    """

    encoder: Encoder
    decoder: Decoder
    quant_conv: Conv2d
    post_quant_conv: Conv2d
    config: VAEConfig = eqx.field(static=True)

    def __init__(self, config: VAEConfig = VAEConfig(), *, key: PRNGKeyArray):
        """Random weights (PyTorch's default init; for tests and benchmarks; use `load_vae`).

        **Arguments:**

        - `config`: the architecture; the default is the SD-VAE's.
        - `key`: a PRNG key.
        """
        enc_key, dec_key, quant_key, post_key = jax.random.split(key, 4)
        latent = config.latent_channels
        self.encoder = Encoder(config, key=enc_key)
        self.decoder = Decoder(config, key=dec_key)
        self.quant_conv = Conv2d(2 * latent, 2 * latent, 1, key=quant_key)
        self.post_quant_conv = Conv2d(latent, latent, 1, key=post_key)
        self.config = config

    def encode(
        self, x: Float[Array, "cin h w"]
    ) -> tuple[Float[Array, "latent lh lw"], Float[Array, "latent lh lw"]]:
        """The posterior of one image.

        **Arguments:**

        - `x`: one image, channels first, values in [-1, 1]; `h` and `w` multiples of
            `config.downsampling_factor` (8). (Other sizes run as in diffusers: each halving
            floors.)

        **Returns:** `(mean, std)`, each `(latent_channels, h / 8, w / 8)`, **unscaled** (multiply a
        sample `mean + std * eps` by `eqdisp.data.LATENT_SCALE` = 0.18215 for the diffusion model);
        `std = exp(0.5 * clip(logvar, -30, 20))`.
        """
        moments = self.quant_conv(self.encoder(jnp.transpose(x, (1, 2, 0))))
        mean, logvar = jnp.split(moments, 2, axis=-1)
        std = jnp.exp(0.5 * jnp.clip(logvar, _LOGVAR_MIN, _LOGVAR_MAX))
        return jnp.transpose(mean, (2, 0, 1)), jnp.transpose(std, (2, 0, 1))

    def decode(self, z: Float[Array, "latent h w"]) -> Float[Array, "cout h2 w2"]:
        """The image of one latent.

        **Arguments:**

        - `z`: one **unscaled** latent (a diffusion model's output divided by
            `eqdisp.data.LATENT_SCALE` = 0.18215), channels first.

        **Returns:** the image, channels first, `(out_channels, 8h, 8w)`, about [-1, 1] and not
        clipped (`eqdisp.images.to_uint8` clips and quantises).
        """
        image = self.decoder(self.post_quant_conv(jnp.transpose(z, (1, 2, 0))))
        return jnp.transpose(image, (2, 0, 1))


# ----------------------------------------------------------------------------------------------
# State dict <-> model


def _state_key(path: tuple) -> str:
    parts = []
    for entry in path:
        if isinstance(entry, jax.tree_util.GetAttrKey):
            parts.append(entry.name)
        elif isinstance(entry, jax.tree_util.SequenceKey):
            parts.append(str(entry.idx))
        else:  # pragma: no cover - the modules hold only attributes and tuples
            raise TypeError(f"unexpected pytree path entry {entry!r}")
    return ".".join(parts)


def _leaves_with_keys(vae: Any) -> Iterator[tuple[str, Any]]:
    for path, leaf in jax.tree_util.tree_flatten_with_path(vae)[0]:
        yield _state_key(path), leaf


# PyTorch layouts: conv kernels OIHW (ours HWIO), linear weights (out, in) (ours (in, out)).
def _to_torch_axes(ndim: int) -> tuple[int, ...]:
    return {4: (3, 2, 0, 1), 2: (1, 0)}.get(ndim, tuple(range(ndim)))


def _from_torch_axes(ndim: int) -> tuple[int, ...]:
    return {4: (2, 3, 1, 0), 2: (1, 0)}.get(ndim, tuple(range(ndim)))


@functools.lru_cache(maxsize=8)
def _template(config: VAEConfig) -> AutoencoderKL:
    """The model's structure for `config`, leaves as `jax.ShapeDtypeStruct` (immutable: cached)."""
    return eqx.filter_eval_shape(AutoencoderKL, config, key=jax.random.key(0))


def vae_state_shapes(config: VAEConfig = VAEConfig()) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a diffusers `AutoencoderKL` state dict for `config`, in diffusers' order.

    The SD-VAE (the default config) has 248 tensors, 83,653,863 values. Nothing is allocated.
    """
    shapes = {}
    for key, leaf in _leaves_with_keys(_template(config)):
        shape = tuple(leaf.shape)
        shapes[key] = tuple(shape[axis] for axis in _to_torch_axes(len(shape)))
    return shapes


def vae_to_state_dict(vae: AutoencoderKL) -> dict[str, np.ndarray]:
    """The diffusers state dict of `vae` (float32 NumPy, PyTorch layouts, current key names).

    Inverse of `state_dict_to_vae`, bit for bit.
    """
    state = {}
    for key, leaf in _leaves_with_keys(vae):
        array = np.asarray(leaf, dtype=np.float32)
        state[key] = np.ascontiguousarray(array.transpose(_to_torch_axes(array.ndim)))
    return state


_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
"""diffusers' old attention names (`AttentionBlock`, files saved before ~0.14) -> current names."""


def _modern_key(key: str) -> str:
    head, dot, tail = key.rpartition(".")  # tail: weight / bias
    prefix, dot2, module = head.rpartition(".")
    if ".attentions." in head and module in _LEGACY_ATTENTION:
        return f"{prefix}{dot2}{_LEGACY_ATTENTION[module]}{dot}{tail}"
    return key


def _describe(keys: list[str], shapes: Mapping[str, tuple[int, ...]]) -> str:
    first = ", ".join(f"{k} {shapes[k]}" for k in keys[:3])
    more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
    return f"{first}{more}"


def state_dict_to_vae(state: Mapping[str, Any], config: VAEConfig = VAEConfig()) -> AutoencoderKL:
    """Build the VAE from a diffusers `AutoencoderKL` state dict (NumPy arrays or array-likes).

    **Arguments:**

    - `state`: key -> array, diffusers names and PyTorch layouts (`vae_state_shapes(config)`).
        Attention weights may use the current names (`to_q`, `to_k`, `to_v`, `to_out.0`) or the
        legacy ones (`query`, `key`, `value`, `proj_attn`). Any float dtype; cast to float32.
    - `config`: the architecture the weights are for (default: the SD-VAE).

    **Returns:** the model.

    **Raises:** `VAEWeightsError` (one line) naming the first missing, unexpected or misshapen keys
    with their shapes, or a non-float tensor. Every tensor must be used: nothing is dropped.
    """
    renamed: dict[str, Any] = {}
    for key, value in state.items():
        new = _modern_key(str(key))
        if new in renamed:
            raise VAEWeightsError(
                f"the state dict holds {new} twice (under current and legacy attention names)"
            )
        renamed[new] = value
    expected = vae_state_shapes(config)
    missing = [k for k in expected if k not in renamed]
    extra = [k for k in renamed if k not in expected]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {_describe(missing, expected)})")
        if extra:
            got = {k: tuple(np.shape(renamed[k])) for k in extra[:3]}
            parts.append(f"{len(extra)} unexpected (first: {_describe(extra, got)})")
        hint = ""
        if any(k.startswith(("encoder.down.", "first_stage_model.")) for k in renamed):
            hint = "; this looks like the original CompVis/LDM layout, eqdisp reads diffusers'"
        raise VAEWeightsError(
            f"not a diffusers AutoencoderKL state dict for {config}: {'; '.join(parts)}{hint}"
        )
    arrays = {}
    for key, shape in expected.items():
        value = renamed[key]
        got = tuple(np.shape(value))
        if got != shape:
            raise VAEWeightsError(f"{key} has shape {got}, expected {shape} (for {config})")
        array = np.asarray(value)
        if not np.issubdtype(array.dtype, np.floating) and array.dtype.name != "bfloat16":
            raise VAEWeightsError(f"{key} has dtype {array.dtype}, expected a float tensor")
        arrays[key] = array.astype(np.float32)  # a copy: the model never aliases `state`

    template = _template(config)
    leaves = []
    for key, _ in _leaves_with_keys(template):
        array = arrays[key]
        leaves.append(jnp.asarray(array.transpose(_from_torch_axes(array.ndim))))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), leaves)


# ----------------------------------------------------------------------------------------------
# Files


_WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.fp16.bin",
)
_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_FORMATS = (
    "a diffusers model directory (config.json + diffusion_pytorch_model.safetensors or .bin), "
    "a pipeline directory with vae/, or a .safetensors / .bin / .pt / .pth state dict"
)


def _read_state(path: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        return read_state_dict(path)
    except WeightsError as error:
        raise VAEWeightsError(str(error).splitlines()[0] if str(error) else repr(error)) from None


def _model_directory(path: pathlib.Path) -> pathlib.Path | None:
    """`path` or `path/vae` when it holds a config.json and a weight file, else None."""
    for folder in (path, path / "vae"):
        weights = any((folder / name).is_file() for name in _WEIGHT_NAMES)
        if weights and (folder / "config.json").is_file():
            return folder
    return None


def load_vae(path: str | os.PathLike, *, config: VAEConfig | None = None) -> AutoencoderKL:
    """Load the SD-VAE from files the user already has (torch is not needed; never downloads).

    **Arguments:**

    - `path`: a diffusers `AutoencoderKL` directory (`config.json` and
        `diffusion_pytorch_model.safetensors`, else `.bin`, else their `.fp16` variants), a
        pipeline directory whose `vae/` subfolder is one, or a single weight file
        (`.safetensors`, `.bin`, `.pt`, `.pth`) holding a diffusers-layout state dict.
    - `config`: the architecture of a single weight file (default: the SD-VAE's). For a
        directory `config.json` decides, and passing a different `config` is an error.

    **Returns:** the model, float32.

    **Raises:** `VAEWeightsError` (one line) for a missing or unreadable file or a state dict that
    does not fit; `ConfigError` (one line) for a `config.json` eqdisp does not implement.
    """
    path = pathlib.Path(path).expanduser()
    if path.is_dir():
        folder = _model_directory(path)
        if folder is None:
            raise VAEWeightsError(f"no diffusers VAE in the directory {path}: expected {_FORMATS}")
        try:
            raw = json.loads((folder / "config.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            message = str(error).splitlines()[0]
            raise VAEWeightsError(f"cannot read {folder / 'config.json'}: {message}") from None
        try:
            found = VAEConfig.from_diffusers(raw)
        except ConfigError as error:
            raise ConfigError(f"{folder / 'config.json'}: {error}") from None
        if config is not None and config != found:
            raise ConfigError(f"config={config} does not match {folder / 'config.json'} ({found})")
        weights = next(folder / n for n in _WEIGHT_NAMES if (folder / n).is_file())
        state, config = _read_state(weights), found
    elif path.is_file():
        if path.suffix not in _FILE_SUFFIXES:
            raise VAEWeightsError(f"cannot load a VAE from {path}: expected {_FORMATS}")
        weights, state = path, _read_state(path)
        config = VAEConfig() if config is None else config
    else:
        raise VAEWeightsError(
            f"VAE weights not found at {path}: expected {_FORMATS} (eqdisp never downloads)"
        )
    try:
        return state_dict_to_vae(state, config)
    except VAEWeightsError as error:
        raise VAEWeightsError(f"{weights}: {error}") from None


# ----------------------------------------------------------------------------------------------
# Batches


@eqx.filter_jit
def _encode_batch(
    vae: AutoencoderKL, images: Float[Array, "batch cin h w"]
) -> tuple[Float[Array, "batch latent lh lw"], Float[Array, "batch latent lh lw"]]:
    return jax.vmap(vae.encode)(images)


@eqx.filter_jit
def _decode_batch(
    vae: AutoencoderKL, latents: Float[Array, "batch latent h w"]
) -> Float[Array, "batch cout h2 w2"]:
    return jax.vmap(vae.decode)(latents)


def _chunks(
    array: np.ndarray, batch_size: int
) -> Iterator[tuple[np.ndarray, int]]:
    """Batches of exactly `min(batch_size, len)` rows (the last one zero-padded: one compile for
    all), each with its number of real rows."""
    if not (_is_int(batch_size) and batch_size >= 1):
        raise ValueError(f"batch_size={batch_size!r} is not allowed: expected an int >= 1")
    size = max(1, min(batch_size, array.shape[0]))
    for start in range(0, array.shape[0], size):
        chunk = array[start : start + size]
        real = chunk.shape[0]
        if real < size:
            chunk = np.concatenate([chunk, np.zeros((size - real,) + chunk.shape[1:], chunk.dtype)])
        yield chunk, real


def encode_images(
    vae: AutoencoderKL, images: Float[np.ndarray, "n cin h w"], *, batch_size: int = 8
) -> tuple[Float[np.ndarray, "n latent lh lw"], Float[np.ndarray, "n latent lh lw"]]:
    """Posteriors of a batch of images, in jitted chunks (one compile per image shape).

    **Arguments:**

    - `vae`: the model (`load_vae`).
    - `images`: float images in [-1, 1], channels first (`eqdisp.data.to_unit_range` of uint8).
    - `batch_size`: images per compiled call. At 256x256 the SD-VAE encoder's activations take
        about 0.1 GiB per image (XLA:CPU), so the default 8 keeps the process near 1 GiB.

    **Returns:** `(mean, std)` float32 NumPy, each `(n, 4, h / 8, w / 8)`, **unscaled** (the
    diffusion model sees `(mean + std * eps) * eqdisp.data.LATENT_SCALE`).
    """
    images = np.asarray(images, np.float32)
    means, stds = [], []
    for chunk, real in _chunks(images, batch_size):
        mean, std = _encode_batch(vae, jnp.asarray(chunk))
        means.append(np.asarray(mean)[:real])
        stds.append(np.asarray(std)[:real])
    if not means:
        factor = vae.config.downsampling_factor
        shape = (0, vae.config.latent_channels) + tuple(s // factor for s in images.shape[2:])
        return np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    return np.concatenate(means), np.concatenate(stds)


def decode_latents(
    vae: AutoencoderKL,
    latents: Float[np.ndarray, "n latent h w"],
    *,
    batch_size: int = 8,
    progress: Callable[[int, int], object] | None = None,
) -> UInt8[np.ndarray, "n h2 w2 cout"]:
    """Images of a batch of **unscaled** latents, as uint8 NHWC (ADM's sample-batch layout).

    **Arguments:**

    - `vae`: the model (`load_vae`).
    - `latents`: unscaled latents, channels first: a diffusion model's samples divided by
        `eqdisp.data.LATENT_SCALE` (0.18215); this function does not rescale.
    - `batch_size`: latents per compiled call (one compile per latent shape). At 32x32 latents
        the SD-VAE decoder's activations take about 0.22 GiB per image (XLA:CPU), so the
        default 8 keeps the process near 2 GiB.
    - `progress`: called as `progress(done, total)` after each chunk.

    **Returns:** `(n, 8h, 8w, out_channels)` uint8, converted by `eqdisp.images.to_uint8`
    (`clip(127.5 x + 128)` truncated, DiT/SiT's convention), like every image eqdisp writes.
    """
    from .images import to_uint8

    latents = np.asarray(latents, np.float32)
    total = latents.shape[0]
    parts, done = [], 0
    for chunk, real in _chunks(latents, batch_size):
        images = np.asarray(_decode_batch(vae, jnp.asarray(chunk)))[:real]
        parts.append(to_uint8(images))
        done += real
        if progress is not None:
            progress(done, total)
    if not parts:
        factor = vae.config.downsampling_factor
        height, width = (s * factor for s in latents.shape[2:])
        return np.zeros((0, height, width, vae.config.out_channels), np.uint8)
    return np.concatenate(parts)


__all__ = [
    "AutoencoderKL",
    "VAEConfig",
    "VAEWeightsError",
    "decode_latents",
    "encode_images",
    "load_vae",
    "state_dict_to_vae",
    "vae_state_shapes",
    "vae_to_state_dict",
]
