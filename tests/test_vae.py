"""Tests of eqdisp.vae: the SD-VAE (diffusers AutoencoderKL) against a NumPy reimplementation, its
state-dict layout, weight files and batch helpers.

Ground truth: `reference/state_dict_layouts.md` (SD-VAE section: key names and shapes) and
diffusers' AutoencoderKL as described in eqdisp/vae.py's docstring. No torch, no real weights:
every state dict here is random, with the real diffusers key names.
"""

import json
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

_DOC = pathlib.Path("/work/shared/reference/state_dict_layouts.md")

# The SD-VAE's diffusers config.json (sd-vae-ft-ema / -ft-mse; the reference doc's header).
_SD_VAE_CONFIG = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.4.2",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 256,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# Small architectures that keep every code path: shortcuts in encoder and decoder, two halvings.
_SMALL = dict(block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=8)
_TINY = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16)


# ----------------------------------------------------------------------------------------------
# An independent description of diffusers' key layout (written from diffusers' module tree).


def _layout(
    channels=(128, 256, 512, 512), layers=2, latent=4, in_ch=3, out_ch=3
) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name, cout, cin, k):
        shapes[f"{name}.weight"] = (cout, cin, k, k)
        shapes[f"{name}.bias"] = (cout,)

    def norm(name, c):
        shapes[f"{name}.weight"] = (c,)
        shapes[f"{name}.bias"] = (c,)

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cout, cin, 3)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.conv_shortcut", cout, cin, 1)

    def mid(name, c):
        norm(f"{name}.attentions.0.group_norm", c)
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            shapes[f"{name}.attentions.0.{proj}.weight"] = (c, c)
            shapes[f"{name}.attentions.0.{proj}.bias"] = (c,)
        resnet(f"{name}.resnets.0", c, c)
        resnet(f"{name}.resnets.1", c, c)

    conv("encoder.conv_in", channels[0], in_ch, 3)
    previous = channels[0]
    for i, c in enumerate(channels):
        for j in range(layers):
            resnet(f"encoder.down_blocks.{i}.resnets.{j}", previous if j == 0 else c, c)
        previous = c
        if i < len(channels) - 1:
            conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", c, c, 3)
    mid("encoder.mid_block", channels[-1])
    norm("encoder.conv_norm_out", channels[-1])
    conv("encoder.conv_out", 2 * latent, channels[-1], 3)

    conv("decoder.conv_in", channels[-1], latent, 3)
    reversed_channels = list(reversed(channels))
    previous = reversed_channels[0]
    for i, c in enumerate(reversed_channels):
        for j in range(layers + 1):
            resnet(f"decoder.up_blocks.{i}.resnets.{j}", previous if j == 0 else c, c)
        previous = c
        if i < len(channels) - 1:
            conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", c, c, 3)
    mid("decoder.mid_block", channels[-1])
    norm("decoder.conv_norm_out", channels[0])
    conv("decoder.conv_out", out_ch, channels[0], 3)
    conv("quant_conv", 2 * latent, 2 * latent, 1)
    conv("post_quant_conv", latent, latent, 1)
    return shapes


def _random_state(layout: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 tensors with the given keys: weights ~ N(0, 1/fan_in), norms near identity."""
    rng = np.random.default_rng(seed)
    state = {}
    for key, shape in layout.items():
        if key.endswith(".bias"):
            value = 0.1 * rng.standard_normal(shape)
        elif len(shape) == 1:  # a GroupNorm scale
            value = 1.0 + 0.2 * rng.standard_normal(shape)
        else:
            value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
        state[key] = value.astype(np.float32)
    return state


def _legacy(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same tensors under diffusers' pre-0.14 attention names."""
    names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    out = {}
    for key, value in state.items():
        for new, old in names.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        out[key] = value
    return out


def _small_config(**overrides):
    from eqdisp.vae import VAEConfig

    return VAEConfig(**{**_SMALL, **overrides})


def _small_state(config, seed=0):
    return _random_state(
        _layout(
            config.block_out_channels,
            config.layers_per_block,
            config.latent_channels,
            config.in_channels,
            config.out_channels,
        ),
        seed,
    )


# ----------------------------------------------------------------------------------------------
# NumPy float64 reference, NCHW, PyTorch weight layouts, read straight from the state dict.


def _np_conv(x, weight, bias, stride=1, pad=((1, 1), (1, 1))):
    """PyTorch Conv2d on one `c h w` image; `pad` = ((top, bottom), (left, right)) zeros."""
    x = np.pad(np.asarray(x, np.float64), ((0, 0), *pad))
    weight = np.asarray(weight, np.float64)
    kh, kw = weight.shape[2:]
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))
    windows = windows[:, ::stride, ::stride]  # (c, ho, wo, kh, kw)
    out = np.einsum("cyxij,ocij->oyx", windows, weight)
    return out + np.asarray(bias, np.float64)[:, None, None]


def _np_group_norm(x, weight, bias, groups, eps=1e-6):
    c, h, w = x.shape
    y = np.asarray(x, np.float64).reshape(groups, c // groups, h, w)
    mean, var = y.mean(axis=(1, 2, 3), keepdims=True), y.var(axis=(1, 2, 3), keepdims=True)
    y = ((y - mean) / np.sqrt(var + eps)).reshape(c, h, w)
    weight, bias = np.asarray(weight, np.float64), np.asarray(bias, np.float64)
    return y * weight[:, None, None] + bias[:, None, None]


def _np_silu(x):
    return x / (1.0 + np.exp(-x))


class _Ref:
    """diffusers' AutoencoderKL forward, written from its modules, over a state dict."""

    def __init__(self, state, groups):
        self.s = {k: np.asarray(v, np.float64) for k, v in state.items()}
        self.groups = groups

    def conv(self, name, x, stride=1, pad=None):
        k = self.s[f"{name}.weight"].shape[-1]
        pad = ((k // 2, k // 2), (k // 2, k // 2)) if pad is None else pad
        return _np_conv(x, self.s[f"{name}.weight"], self.s[f"{name}.bias"], stride, pad)

    def norm(self, name, x):
        return _np_group_norm(x, self.s[f"{name}.weight"], self.s[f"{name}.bias"], self.groups)

    def linear(self, name, x):
        return x @ self.s[f"{name}.weight"].T + self.s[f"{name}.bias"]

    def resnet(self, name, x):
        h = self.conv(f"{name}.conv1", _np_silu(self.norm(f"{name}.norm1", x)))
        h = self.conv(f"{name}.conv2", _np_silu(self.norm(f"{name}.norm2", h)))
        if f"{name}.conv_shortcut.weight" in self.s:
            x = self.conv(f"{name}.conv_shortcut", x)
        return x + h

    def downsample(self, name, x):
        # F.pad(x, (0, 1, 0, 1)): one column on the right, one row at the bottom; no conv padding.
        return self.conv(f"{name}.conv", x, stride=2, pad=((0, 1), (0, 1)))

    def upsample(self, name, x):
        return self.conv(f"{name}.conv", x.repeat(2, axis=1).repeat(2, axis=2))

    def attention(self, name, x):
        c, h, w = x.shape
        tokens = self.norm(f"{name}.group_norm", x).reshape(c, h * w).T
        q, k, v = (self.linear(f"{name}.{p}", tokens) for p in ("to_q", "to_k", "to_v"))
        scores = q @ k.T / np.sqrt(c)
        p = np.exp(scores - scores.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        out = self.linear(f"{name}.to_out.0", p @ v)
        return x + out.T.reshape(c, h, w)

    def mid(self, name, x):
        x = self.resnet(f"{name}.resnets.0", x)
        x = self.attention(f"{name}.attentions.0", x)
        return self.resnet(f"{name}.resnets.1", x)

    def blocks(self, prefix, kind):
        return sorted({int(k.split(".")[2]) for k in self.s if k.startswith(f"{prefix}.{kind}.")})

    def layers(self, prefix):
        return sorted({int(k.split(".")[4]) for k in self.s if k.startswith(f"{prefix}.resnets.")})

    def encode(self, x):
        x = self.conv("encoder.conv_in", x)
        for i in self.blocks("encoder", "down_blocks"):
            prefix = f"encoder.down_blocks.{i}"
            for j in self.layers(prefix):
                x = self.resnet(f"{prefix}.resnets.{j}", x)
            if f"{prefix}.downsamplers.0.conv.weight" in self.s:
                x = self.downsample(f"{prefix}.downsamplers.0", x)
        x = self.mid("encoder.mid_block", x)
        x = self.conv("encoder.conv_out", _np_silu(self.norm("encoder.conv_norm_out", x)))
        moments = self.conv("quant_conv", x)
        mean, logvar = np.split(moments, 2, axis=0)
        return mean, np.exp(0.5 * np.clip(logvar, -30.0, 20.0))

    def decode(self, z):
        x = self.conv("decoder.conv_in", self.conv("post_quant_conv", z))
        x = self.mid("decoder.mid_block", x)
        for i in self.blocks("decoder", "up_blocks"):
            prefix = f"decoder.up_blocks.{i}"
            for j in self.layers(prefix):
                x = self.resnet(f"{prefix}.resnets.{j}", x)
            if f"{prefix}.upsamplers.0.conv.weight" in self.s:
                x = self.upsample(f"{prefix}.upsamplers.0", x)
        return self.conv("decoder.conv_out", _np_silu(self.norm("decoder.conv_norm_out", x)))


def _assert_close(actual, expected, rtol):
    """Close to within `rtol` of the reference's largest magnitude (float32 vs float64)."""
    expected = np.asarray(expected, np.float64)
    scale = max(1.0, float(np.abs(expected).max()))
    actual = np.asarray(actual, np.float64)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def _chw_to_hwc(x):
    return jnp.asarray(np.asarray(x, np.float32).transpose(1, 2, 0))


def _hwc_to_chw(x):
    return np.asarray(x).transpose(2, 0, 1)


@pytest.fixture(scope="module")
def small():
    """A small random VAE, its state dict (real key names) and the NumPy reference."""
    from eqdisp.vae import state_dict_to_vae

    config = _small_config()
    state = _small_state(config)
    return config, state, state_dict_to_vae(state, config), _Ref(state, config.norm_num_groups)


# ----------------------------------------------------------------------------------------------
# Blocks against NumPy


def test_group_norm_matches_numpy(small):
    _, _, vae, ref = small
    norm = vae.decoder.conv_norm_out  # 16 channels, 8 groups, random affine
    x = 3.0 + 2.0 * np.random.default_rng(1).standard_normal((16, 5, 7))  # a large mean
    _assert_close(_hwc_to_chw(norm(_chw_to_hwc(x))), ref.norm("decoder.conv_norm_out", x), 1e-5)


@pytest.mark.parametrize(
    "name, cin, shortcut",
    [
        ("encoder.down_blocks.1.resnets.0", 16, True),  # 16 -> 32 channels: 1x1 conv_shortcut
        ("encoder.down_blocks.1.resnets.1", 32, False),
        ("decoder.up_blocks.2.resnets.0", 32, True),  # 32 -> 16
    ],
)
def test_resnet_block_matches_numpy(small, name, cin, shortcut):
    _, _, vae, ref = small
    parts = name.split(".")
    block = getattr(vae, parts[0])
    block = getattr(block, parts[1])[int(parts[2])].resnets[int(parts[4])]
    assert (block.conv_shortcut is not None) == shortcut
    x = np.random.default_rng(2).standard_normal((cin, 6, 5))
    _assert_close(_hwc_to_chw(eqx.filter_jit(block)(_chw_to_hwc(x))), ref.resnet(name, x), 1e-5)


@pytest.mark.parametrize("size", [(8, 8), (7, 10)])
def test_downsample_pads_bottom_right_then_strides(small, size):
    _, _, vae, ref = small
    down = vae.encoder.down_blocks[0].downsamplers[0]
    x = np.random.default_rng(3).standard_normal((16, *size))
    out = _hwc_to_chw(down(_chw_to_hwc(x)))
    assert out.shape == (16, size[0] // 2, size[1] // 2)
    expected = ref.downsample("encoder.down_blocks.0.downsamplers.0", x)
    _assert_close(out, expected, 1e-5)
    # Symmetric padding (top/left too) would give other numbers: the asymmetry is checked.
    symmetric = ref.conv("encoder.down_blocks.0.downsamplers.0.conv", x, stride=2)
    assert not np.allclose(symmetric[:, : out.shape[1], : out.shape[2]], expected, atol=1e-3)


def test_upsample_is_nearest_then_conv(small):
    _, _, vae, ref = small
    up = vae.decoder.up_blocks[0].upsamplers[0]
    x = np.random.default_rng(4).standard_normal((32, 3, 5))
    out = _hwc_to_chw(up(_chw_to_hwc(x)))
    assert out.shape == (32, 6, 10)
    _assert_close(out, ref.upsample("decoder.up_blocks.0.upsamplers.0", x), 1e-5)


def test_mid_attention_and_mid_block_match_numpy(small):
    _, _, vae, ref = small
    x = np.random.default_rng(5).standard_normal((32, 4, 6))
    attention = vae.encoder.mid_block.attentions[0]
    out = _hwc_to_chw(attention(_chw_to_hwc(x)))
    _assert_close(out, ref.attention("encoder.mid_block.attentions.0", x), 1e-5)
    out = _hwc_to_chw(eqx.filter_jit(vae.decoder.mid_block)(_chw_to_hwc(x)))
    _assert_close(out, ref.mid("decoder.mid_block", x), 1e-5)


def test_encode_and_decode_match_numpy(small):
    config, _, vae, ref = small
    rng = np.random.default_rng(6)
    image = rng.uniform(-1.0, 1.0, (3, 16, 12)).astype(np.float32)
    mean, std = eqx.filter_jit(vae.encode)(jnp.asarray(image))
    assert mean.shape == std.shape == (4, 4, 3)
    ref_mean, ref_std = ref.encode(image)
    _assert_close(mean, ref_mean, 1e-4)
    _assert_close(std, ref_std, 1e-4)
    z = rng.standard_normal((4, 3, 5)).astype(np.float32)
    out = eqx.filter_jit(vae.decode)(jnp.asarray(z))
    assert out.shape == (3, 12, 20) and out.dtype == jnp.float32
    _assert_close(out, ref.decode(z), 1e-4)


def test_posterior_std_clips_logvar(small):
    """std = exp(0.5 * clip(logvar, -30, 20)): the log-variance half of quant_conv saturates."""
    config, _, vae, _ = small
    latent = config.latent_channels
    bias = vae.quant_conv.bias
    huge = bias.at[latent:].set(jnp.array([1e4, -1e4, 1e4, -1e4], jnp.float32))
    clipped = eqx.tree_at(lambda v: v.quant_conv.bias, vae, huge)
    mean, std = eqx.filter_jit(clipped.encode)(jnp.zeros((3, 8, 8), jnp.float32))
    assert np.allclose(np.asarray(std[0]), np.exp(10.0))
    assert np.allclose(np.asarray(std[1]), np.exp(-15.0))
    assert np.all(np.isfinite(np.asarray(mean)))


# ----------------------------------------------------------------------------------------------
# Key layout


def test_default_layout_is_the_sd_vae():
    from eqdisp.vae import VAEConfig, vae_state_shapes

    shapes = vae_state_shapes()  # jax.eval_shape inside: nothing is allocated
    assert shapes == _layout() and list(shapes) == list(_layout())
    assert len(shapes) == 248 and sum(int(np.prod(s)) for s in shapes.values()) == 83_653_863
    assert VAEConfig.from_diffusers(_SD_VAE_CONFIG) == VAEConfig()
    assert VAEConfig().downsampling_factor == 8


@pytest.mark.skipif(not _DOC.is_file(), reason="the shared reference docs are not present")
def test_layout_matches_reference_doc():
    from eqdisp.vae import vae_state_shapes

    text = _DOC.read_text().split("## SD-VAE AutoencoderKL")[1].split("~~~")[1]
    rows = [line.split("\t") for line in text.strip().splitlines()[1:]]
    doc = {
        key: tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
        for key, shape in rows
    }
    assert list(doc.items()) == list(vae_state_shapes().items())


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        dict(block_out_channels=(8,), layers_per_block=1, norm_num_groups=4),
        dict(block_out_channels=(8, 16, 16, 24), layers_per_block=3, norm_num_groups=8),
        dict(in_channels=1, out_channels=2, latent_channels=8),
    ],
)
def test_layout_of_other_configs(overrides):
    from eqdisp.vae import vae_state_shapes

    config = _small_config(**overrides)
    assert list(vae_state_shapes(config).items()) == list(
        _layout(
            config.block_out_channels,
            config.layers_per_block,
            config.latent_channels,
            config.in_channels,
            config.out_channels,
        ).items()
    )


# ----------------------------------------------------------------------------------------------
# State dicts


def test_both_attention_namings_load_the_same_model(small):
    from eqdisp.vae import state_dict_to_vae, vae_to_state_dict

    config, state, vae, _ = small
    legacy = _legacy(state)
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in legacy
    from_legacy = state_dict_to_vae(legacy, config)
    assert all(
        np.array_equal(a, b) for a, b in zip(jax.tree.leaves(vae), jax.tree.leaves(from_legacy))
    )
    # Written back under the current names, exactly.
    back = vae_to_state_dict(from_legacy)
    assert list(back) == list(state)
    assert all(back[k].dtype == np.float32 and np.array_equal(back[k], state[k]) for k in state)
    images = jnp.zeros((2, 3, 16, 16), jnp.float32)
    mean, std = eqx.filter_jit(lambda v, x: jax.vmap(v.encode)(x))(from_legacy, images)
    assert mean.shape == std.shape == (2, 4, 4, 4)
    out = eqx.filter_jit(lambda v, z: jax.vmap(v.decode)(z))(from_legacy, mean)
    assert out.shape == (2, 3, 16, 16)


def test_state_dict_round_trip_is_bit_exact(getkey):
    from eqdisp.vae import AutoencoderKL, state_dict_to_vae, vae_to_state_dict

    config = _small_config(**_TINY)
    vae = AutoencoderKL(config, key=getkey())
    state = vae_to_state_dict(vae)
    assert {k: v.shape for k, v in state.items()} == _layout((32, 64), 1)
    again = state_dict_to_vae(state, config)
    leaves, again_leaves = jax.tree.leaves(vae), jax.tree.leaves(again)
    assert len(leaves) == len(again_leaves) == len(state)
    assert all(np.array_equal(a, b) for a, b in zip(leaves, again_leaves))
    # Half precision files load too (cast to float32).
    half = {k: v.astype(np.float16) for k, v in state.items()}
    loaded = state_dict_to_vae(half, config)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(loaded))


def test_state_dict_errors_are_one_line(small):
    from eqdisp.vae import VAEWeightsError, state_dict_to_vae

    config, state, _, _ = small

    def error(bad, match):
        with pytest.raises(VAEWeightsError, match=match) as info:
            state_dict_to_vae(bad, config)
        assert "\n" not in str(info.value)
        return str(info.value)

    missing = dict(state)
    del missing["decoder.mid_block.attentions.0.to_k.bias"]
    error(missing, r"1 missing \(first: decoder\.mid_block\.attentions\.0\.to_k\.bias \(32,\)\)")
    extra = dict(state, **{"encoder.extra.weight": np.zeros((2, 3), np.float32)})
    error(extra, r"1 unexpected \(first: encoder\.extra\.weight \(2, 3\)\)")
    key = "encoder.down_blocks.1.resnets.0.conv_shortcut.weight"
    bad_shape = dict(state, **{key: np.zeros((32, 16, 3, 3), np.float32)})
    error(bad_shape, rf"^{key} has shape \(32, 16, 3, 3\), expected \(32, 16, 1, 1\)")
    both = dict(state, **{"encoder.mid_block.attentions.0.query.weight": state[
        "encoder.mid_block.attentions.0.to_q.weight"
    ]})
    error(both, r"encoder\.mid_block\.attentions\.0\.to_q\.weight twice")
    ints = dict(state, **{"quant_conv.bias": np.zeros(8, np.int64)})
    error(ints, r"quant_conv\.bias has dtype int64, expected a float")
    # The default SD-VAE config does not fit the small weights: the config is named.
    with pytest.raises(VAEWeightsError, match=r"for VAEConfig\(.*\): 48 missing \(first: ") as info:
        state_dict_to_vae(state)
    assert "\n" not in str(info.value)
    compvis = {"encoder.down.0.block.0.norm1.weight": np.ones(128, np.float32)}
    assert "CompVis/LDM" in error(compvis, "not a diffusers AutoencoderKL state dict")


# ----------------------------------------------------------------------------------------------
# Config


def test_config_errors_are_one_line():
    from eqdisp.config import ConfigError
    from eqdisp.vae import VAEConfig

    cases = [
        ({"_class_name": "AutoencoderTiny"}, r"^_class_name='AutoencoderTiny' is not supported"),
        ({"act_fn": "gelu"}, r"^act_fn='gelu' is not supported: expected 'silu'"),
        (
            {"down_block_types": ["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"]},
            r"^down_block_types=.*AttnDownEncoderBlock2D.* is not supported",
        ),
        ({"up_block_types": ["UpDecoderBlock2D"] * 3}, r"^up_block_types has 3 entries but"),
        ({"mid_block_add_attention": False}, r"^mid_block_add_attention=False is not supported"),
        ({"use_quant_conv": False}, r"^use_quant_conv=False"),
        ({"norm_type": "spatial"}, r"^unknown AutoencoderKL config key 'norm_type'"),
        ({"norm_num_groups": 24}, r"^norm_num_groups=24 is not allowed .*\(not of 128\)$"),
        ({"layers_per_block": 0}, r"^layers_per_block=0 is not allowed"),
        ({"block_out_channels": 128}, r"^block_out_channels=128 is not allowed"),
    ]
    for change, match in cases:
        with pytest.raises(ConfigError, match=match) as info:
            VAEConfig.from_diffusers({**_SD_VAE_CONFIG, **change})
        assert "\n" not in str(info.value)
    # Unrelated keys of newer diffusers versions are ignored; absent keys are diffusers' defaults.
    newer = {**_SD_VAE_CONFIG, "scaling_factor": 0.18215, "force_upcast": True,
             "latents_mean": None, "shift_factor": None, "use_quant_conv": True,
             "_name_or_path": "x"}  # fmt: skip
    assert VAEConfig.from_diffusers(newer) == VAEConfig()
    assert VAEConfig.from_diffusers({}) == VAEConfig(block_out_channels=(64,), layers_per_block=1)


# ----------------------------------------------------------------------------------------------
# Batches


def test_batch_helpers_are_deterministic_and_chunked(getkey):
    from eqdisp.images import to_uint8
    from eqdisp.vae import AutoencoderKL, decode_latents, encode_images

    vae = AutoencoderKL(_small_config(**_TINY), key=getkey())
    images = np.random.default_rng(7).uniform(-1, 1, (5, 3, 16, 16)).astype(np.float32)
    mean, std = encode_images(vae, images, batch_size=2)  # chunks 2, 2, 1 (+1 zero pad)
    assert mean.shape == std.shape == (5, 4, 8, 8) and mean.dtype == np.float32
    again_mean, again_std = encode_images(vae, images, batch_size=2)
    assert np.array_equal(mean, again_mean) and np.array_equal(std, again_std)
    encode = eqx.filter_jit(lambda v, x: jax.vmap(v.encode)(x))
    direct_mean, direct_std = encode(vae, jnp.asarray(images))
    np.testing.assert_allclose(mean, direct_mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(std, direct_std, rtol=1e-5, atol=1e-5)

    calls = []
    pixels = decode_latents(vae, mean, batch_size=2, progress=lambda d, t: calls.append((d, t)))
    assert pixels.shape == (5, 16, 16, 3) and pixels.dtype == np.uint8
    assert calls == [(2, 5), (4, 5), (5, 5)]
    assert np.array_equal(pixels, decode_latents(vae, mean, batch_size=2))
    floats = np.asarray(eqx.filter_jit(lambda v, z: jax.vmap(v.decode)(z))(vae, jnp.asarray(mean)))
    # to_uint8 truncates; float32 differences between batch shapes may move a pixel by one level.
    assert np.abs(pixels.astype(int) - to_uint8(floats).astype(int)).max() <= 1
    assert encode_images(vae, images[:0])[0].shape == (0, 4, 8, 8)
    assert decode_latents(vae, mean[:0]).shape == (0, 16, 16, 3)
    with pytest.raises(ValueError, match="batch_size=0 is not allowed"):
        encode_images(vae, images, batch_size=0)


# ----------------------------------------------------------------------------------------------
# Files


def _tiny_files(tmp_path, seed=0):
    from eqdisp.vae import VAEConfig

    config = VAEConfig(**_TINY)
    state = _small_state(config, seed)
    raw = {**_SD_VAE_CONFIG, "block_out_channels": [32, 64], "layers_per_block": 1,
           "norm_num_groups": 16, "down_block_types": ["DownEncoderBlock2D"] * 2,
           "up_block_types": ["UpDecoderBlock2D"] * 2, "scaling_factor": 0.18215}
    return config, state, raw


def _same(vae, state):
    from eqdisp.vae import vae_to_state_dict

    back = vae_to_state_dict(vae)
    return list(back) == list(state) and all(np.array_equal(back[k], state[k]) for k in state)


def test_load_vae_from_diffusers_directories_and_safetensors(tmp_path):
    from safetensors.numpy import save_file

    from eqdisp.vae import load_vae

    config, state, raw = _tiny_files(tmp_path)
    model_dir = tmp_path / "pipeline" / "vae"
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text(json.dumps(raw))
    save_file(_legacy(state), str(model_dir / "diffusion_pytorch_model.safetensors"))
    for path in (model_dir, tmp_path / "pipeline"):  # the model directory or the pipeline root
        vae = load_vae(path)
        assert vae.config == config and _same(vae, state)
    single = tmp_path / "vae.safetensors"
    save_file(state, str(single))
    assert _same(load_vae(single, config=config), state)
    mean, _ = eqx.filter_jit(load_vae(single, config=config).encode)(jnp.zeros((3, 8, 8)))
    assert mean.shape == (4, 4, 4)


@pytest.mark.parametrize("legacy", [False, True])
def test_load_vae_from_bin(tmp_path, legacy):
    from torchfiles import write_torch_file

    from eqdisp.vae import load_vae

    config, state, raw = _tiny_files(tmp_path, seed=1)
    model_dir = tmp_path / "vae"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(raw))
    write_torch_file(model_dir / "diffusion_pytorch_model.bin", state, legacy=legacy)
    assert _same(load_vae(model_dir), state)
    write_torch_file(tmp_path / "vae.pt", _legacy(state), legacy=legacy)
    assert _same(load_vae(tmp_path / "vae.pt", config=config), state)


def test_load_vae_errors_are_one_line(tmp_path):
    from safetensors.numpy import save_file

    from eqdisp.config import ConfigError
    from eqdisp.vae import VAEConfig, VAEWeightsError, load_vae

    def error(path, kind, match, **kwargs):
        with pytest.raises(kind, match=match) as info:
            load_vae(path, **kwargs)
        assert "\n" not in str(info.value)

    error(tmp_path / "nowhere", VAEWeightsError, r"not found at .*nowhere.*never downloads")
    error(tmp_path, VAEWeightsError, r"^no diffusers VAE in the directory .*: expected a diffusers")
    (tmp_path / "notes.txt").write_text("hello")
    error(tmp_path / "notes.txt", VAEWeightsError, r"notes\.txt: expected a diffusers model")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    error(garbage, VAEWeightsError, r"garbage\.safetensors")

    config, state, raw = _tiny_files(tmp_path)
    folder = tmp_path / "model"
    folder.mkdir()
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text("{not json")
    error(folder, VAEWeightsError, r"cannot read .*config\.json")
    (folder / "config.json").write_text(json.dumps({**raw, "act_fn": "relu"}))
    error(folder, ConfigError, r"config\.json: act_fn='relu' is not supported")
    (folder / "config.json").write_text(json.dumps(raw))
    error(folder, ConfigError, r"does not match", config=VAEConfig())
    # A weight file for another config: the file and the first bad key are named.
    single = tmp_path / "small.safetensors"
    save_file(state, str(single))
    error(single, VAEWeightsError, r"small\.safetensors: not a diffusers AutoencoderKL state dict")
    shapes = dict(state, **{"quant_conv.weight": np.zeros((8, 8, 3, 3), np.float32)})
    save_file(shapes, str(single))
    match = r"quant_conv\.weight has shape \(8, 8, 3, 3\), expected \(8, 8, 1, 1\)"
    error(single, VAEWeightsError, match, config=config)


# ----------------------------------------------------------------------------------------------
# Benchmark target


def test_bench_vae_reports_figures(capsys):
    from cli.bench import main
    from eqdisp.bench import cpu_info

    figures = main(
        ["vae", "--batch", "2", "--resolution", "16", "--steps", "1",
         "--config.block-out-channels", "16", "32", "--config.norm-num-groups", "8"]
    )
    assert figures["encode_images_per_s"] > 0 and figures["decode_images_per_s"] > 0
    assert figures["latent_shape"] == [4, 8, 8] and figures["cpu"] == cpu_info()
    lines = [line.strip() for line in capsys.readouterr().out.splitlines()]
    assert lines[0].startswith("cpu: ")
    assert any(line.startswith("decode_images_per_s: ") for line in lines)
    assert any(line.endswith(" img/s") for line in lines if line.startswith("decode_images"))
    assert any(line.startswith("memory_gib.decode_temporaries: ") for line in lines)


def test_bench_vae_rejects_a_resolution_the_vae_cannot_halve():
    from eqdisp.bench import bench_vae
    from eqdisp.config import ConfigError

    match = r"^--resolution 20 is not allowed: expected a positive multiple of 8$"
    with pytest.raises(ConfigError, match=match):
        bench_vae(1, 20)
