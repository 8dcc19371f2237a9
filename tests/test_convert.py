"""eqdisp.convert: official SiT/DiT/REPA state dicts <-> eqdisp models and runs, without torch.

The synthetic state dicts are built here from the official key names and shapes
(`reference/state_dict_layouts.md`) and checked against a NumPy forward written from the reference
spec (`reference/sit_dit_repa.md` §1), independently of eqdisp's mapping and model code.
"""

import math
import os
import pathlib
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

# SiT-T/2 on 8x8 latents: depth 6, width 192, 3 heads, 16 tokens (eqdisp's CPU size).
_T = {"depth": 6, "dim": 192, "heads": 3, "patch": 2, "input_size": 8, "channels": 4, "classes": 10}


def _one_line(excinfo, *needles):
    message = str(excinfo.value)
    assert "\n" not in message, message
    for needle in needles:
        assert str(needle) in message, message
    return message


def _official_shapes(depth, dim, patch, input_size, channels, classes, out_channels, **_):
    """Key -> shape of the official `models.py` state dict, written out from the reference table."""
    tokens = (input_size // patch) ** 2
    shapes = {
        "pos_embed": (1, tokens, dim),
        "x_embedder.proj.weight": (dim, channels, patch, patch),
        "x_embedder.proj.bias": (dim,),
        "t_embedder.mlp.0.weight": (dim, 256),
        "t_embedder.mlp.0.bias": (dim,),
        "t_embedder.mlp.2.weight": (dim, dim),
        "t_embedder.mlp.2.bias": (dim,),
        "y_embedder.embedding_table.weight": (classes + 1, dim),
    }
    for i in range(depth):
        shapes |= {
            f"blocks.{i}.attn.qkv.weight": (3 * dim, dim),
            f"blocks.{i}.attn.qkv.bias": (3 * dim,),
            f"blocks.{i}.attn.proj.weight": (dim, dim),
            f"blocks.{i}.attn.proj.bias": (dim,),
            f"blocks.{i}.mlp.fc1.weight": (4 * dim, dim),
            f"blocks.{i}.mlp.fc1.bias": (4 * dim,),
            f"blocks.{i}.mlp.fc2.weight": (dim, 4 * dim),
            f"blocks.{i}.mlp.fc2.bias": (dim,),
            f"blocks.{i}.adaLN_modulation.1.weight": (6 * dim, dim),
            f"blocks.{i}.adaLN_modulation.1.bias": (6 * dim,),
        }
    shapes |= {
        "final_layer.linear.weight": (patch * patch * out_channels, dim),
        "final_layer.linear.bias": (patch * patch * out_channels,),
        "final_layer.adaLN_modulation.1.weight": (2 * dim, dim),
        "final_layer.adaLN_modulation.1.bias": (2 * dim,),
    }
    return shapes


def _sincos_table(dim, grid):
    """The reference's fixed position embedding (§1.3), float64 then float32, `(1, T, D)`."""

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    w, h = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
    return np.concatenate([one_d(dim // 2, w), one_d(dim // 2, h)], axis=1)[None].astype(np.float32)


def _synthetic_state(seed=0, learn_sigma=True, **overrides):
    """A random state dict in the official layout (every weight non-zero, adaLN included)."""
    arch = {**_T, **overrides}
    out_channels = 2 * arch["channels"] if learn_sigma else arch["channels"]
    rng = np.random.default_rng(seed)
    state = {}
    for key, shape in _official_shapes(**arch, out_channels=out_channels).items():
        fan_in = shape[1] if len(shape) == 2 else 16
        state[key] = (rng.standard_normal(shape) / math.sqrt(fan_in)).astype(np.float32)
    state["pos_embed"] = _sincos_table(arch["dim"], arch["input_size"] // arch["patch"])
    return state


def _numpy_forward(state, x, t, y, *, heads, family="SiT"):
    """The official SiT/DiT forward on one example, float64 NumPy, straight from the spec (§1)."""
    sd = {k: np.asarray(v, np.float64) for k, v in state.items()}
    kernel = sd["x_embedder.proj.weight"]
    dim, channels, p, _ = kernel.shape
    grid = x.shape[-1] // p
    x = np.asarray(x, np.float64)

    tokens = np.empty((grid * grid, dim))
    for i in range(grid):  # Conv2d(kernel = stride = p): a cross-correlation per patch, row-major
        for j in range(grid):
            patch = x[:, i * p : (i + 1) * p, j * p : (j + 1) * p]
            tokens[i * grid + j] = np.tensordot(kernel, patch, axes=3) + sd["x_embedder.proj.bias"]
    h = tokens + sd["pos_embed"][0]

    def linear(name, v):
        return v @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]

    silu = lambda v: v / (1 + np.exp(-v))
    gelu = lambda v: 0.5 * v * (1 + np.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3)))

    def norm(v):
        mean = v.mean(-1, keepdims=True)
        return (v - mean) / np.sqrt(((v - mean) ** 2).mean(-1, keepdims=True) + 1e-6)

    freqs = np.exp(-math.log(10000) * np.arange(128, dtype=np.float32) / 128).astype(np.float64)
    t_freq = np.concatenate([np.cos(t * freqs), np.sin(t * freqs)])  # cos first
    c = linear("t_embedder.mlp.2", silu(linear("t_embedder.mlp.0", t_freq)))
    c = c + sd["y_embedder.embedding_table.weight"][y]

    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    hd = dim // heads
    for b in range(depth):
        pre = f"blocks.{b}"
        mod = linear(f"{pre}.adaLN_modulation.1", silu(c))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = np.split(mod, 6)
        a = norm(h) * (1 + scale_msa) + shift_msa
        qkv = linear(f"{pre}.attn.qkv", a).reshape(len(a), 3, heads, hd)
        q, k, v = (qkv[:, s].transpose(1, 0, 2) for s in range(3))  # (heads, tokens, hd)
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(hd)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        attn = (weights @ v).transpose(1, 0, 2).reshape(len(a), dim)
        h = h + gate_msa * linear(f"{pre}.attn.proj", attn)
        m = norm(h) * (1 + scale_mlp) + shift_mlp
        h = h + gate_mlp * linear(f"{pre}.mlp.fc2", gelu(linear(f"{pre}.mlp.fc1", m)))
    shift, scale = np.split(linear("final_layer.adaLN_modulation.1", silu(c)), 2)
    out = linear("final_layer.linear", norm(h) * (1 + scale) + shift)
    c_out = out.shape[-1] // (p * p)
    img = np.einsum("hwpqc->chpwq", out.reshape(grid, grid, p, p, c_out))
    img = img.reshape(c_out, grid * p, grid * p)
    learn_sigma = c_out == 2 * channels
    return img[:channels] if family == "SiT" and learn_sigma else img


def _fake(shapes):
    """Tensors that are only shapes: error paths never read values, and XL stays unallocated."""
    return {key: jax.ShapeDtypeStruct(shape, np.float32) for key, shape in shapes.items()}


def _perturbed(model, key, scale=0.05):
    params, static = eqx.partition(model, eqx.is_inexact_array)
    leaves, treedef = jax.tree.flatten(params)
    keys = jr.split(key, len(leaves))
    leaves = [leaf + scale * jr.normal(k, leaf.shape) for leaf, k in zip(leaves, keys)]
    return eqx.combine(jax.tree.unflatten(treedef, leaves), static)


def _assert_same_weights(a, b, same_static=True):
    la, ta = jax.tree.flatten(eqx.filter(a, eqx.is_array))
    lb, tb = jax.tree.flatten(eqx.filter(b, eqx.is_array))
    assert ta == tb or not same_static
    assert len(la) == len(lb)
    for u, v in zip(la, lb):
        assert u.dtype == v.dtype and u.shape == v.shape
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def _example(key, model):
    x = jr.normal(key, (model.in_channels, model.input_size, model.input_size))
    return x, jnp.array(0.3, jnp.float32), jnp.array(3, jnp.int32)


# ---------------------------------------------------------------------------------------------
# The layout


def test_xl2_layout_matches_the_reference_table_without_allocating(getkey):
    from eqdisp.convert import torch_state_dict_shapes
    from eqdisp.models import make_model

    for name in ("SiT-XL/2", "DiT-XL/2"):
        model = eqx.filter_eval_shape(make_model, name, key=getkey())  # nothing allocated
        shapes = torch_state_dict_shapes(model)
        expected = _official_shapes(
            depth=28, dim=1152, patch=2, input_size=32, channels=4, classes=1000, out_channels=8
        )
        assert list(shapes) == list(expected)  # same keys, in the file's order
        assert shapes == expected
        assert len(shapes) == 292
        assert sum(math.prod(s) for s in shapes.values()) == 675_129_632
    small = eqx.filter_eval_shape(make_model, "SiT-S/2", key=getkey())
    shapes = torch_state_dict_shapes(small)
    assert (len(shapes), sum(math.prod(s) for s in shapes.values())) == (132, 32_963_360)


def test_round_trip_is_bit_exact_and_computes_the_same(getkey):
    from eqdisp.convert import model_to_torch_state_dict, torch_state_dict_to_model
    from eqdisp.models import make_model

    model = make_model("SiT-S/2", key=getkey(), input_size=8, num_classes=10)
    model = _perturbed(model, getkey())  # the zero-initialised layers too
    state = model_to_torch_state_dict(model)
    assert all(v.dtype == np.float32 for v in state.values())
    assert state["x_embedder.proj.weight"].shape == (384, 4, 2, 2)
    back = torch_state_dict_to_model(state, "SiT-S/2")
    found = (back.input_size, back.in_channels, back.num_classes, back.learn_sigma)
    assert found == (8, 4, 10, True)
    _assert_same_weights(model, back)
    again = model_to_torch_state_dict(back)
    assert list(again) == list(state)
    for key in state:
        np.testing.assert_array_equal(again[key], state[key])
    x, t, y = _example(getkey(), model)
    np.testing.assert_array_equal(np.asarray(model(x, t, y)), np.asarray(back(x, t, y)))


@pytest.mark.parametrize("family, learn_sigma", [("SiT", True), ("DiT", True), ("SiT", False)])
def test_converted_model_computes_the_official_forward(getkey, family, learn_sigma):
    from eqdisp.convert import torch_state_dict_to_model

    state = _synthetic_state(learn_sigma=learn_sigma)
    model = torch_state_dict_to_model(state, f"{family}-T/2")
    assert model.learn_sigma == learn_sigma and model.num_classes == 10
    x = np.random.default_rng(1).standard_normal((4, 8, 8)).astype(np.float32)
    t = 0.3 if family == "SiT" else 417.0
    want = _numpy_forward(state, x, t, 7, heads=3, family=family)
    got = np.asarray(model(jnp.asarray(x), jnp.array(t, jnp.float32), jnp.array(7, jnp.int32)))
    assert got.shape == want.shape == ((8 if family == "DiT" and learn_sigma else 4), 8, 8)
    scale = np.abs(want).max()
    assert scale > 0.1  # a forward that actually computes something
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * scale)


def test_patch_kernel_is_the_torch_conv(getkey):
    """The patch embedding of a known input equals a direct conv with the (D, C, p, p) kernel."""
    from eqdisp.convert import torch_state_dict_to_model

    state = _synthetic_state()
    model = torch_state_dict_to_model(state, "SiT-T/2")
    kernel, bias = state["x_embedder.proj.weight"], state["x_embedder.proj.bias"]
    x = np.zeros((4, 8, 8), np.float32)
    x[2, 5, 3] = 1.0  # channel 2, row 5, column 3: patch (2, 1), offset (kh, kw) = (1, 1)
    tokens = np.asarray(model.x_embedder(jnp.asarray(x)))
    expected = np.tile(bias, (16, 1))
    expected[2 * 4 + 1] += kernel[:, 2, 1, 1]
    np.testing.assert_allclose(tokens, expected, rtol=0, atol=1e-6)


def test_adaln_chunks_keep_the_reference_order(getkey):
    """Only gate_msa (chunk 2 of 6) set: the block adds the attention branch unmodulated."""
    from eqdisp.convert import torch_state_dict_to_model

    state = _synthetic_state()
    dim = _T["dim"]
    for i in range(_T["depth"]):
        state[f"blocks.{i}.adaLN_modulation.1.weight"][:] = 0
        bias = np.zeros(6 * dim, np.float32)
        bias[2 * dim : 3 * dim] = 1.0  # (shift, scale, GATE) x msa
        state[f"blocks.{i}.adaLN_modulation.1.bias"] = bias
    model = torch_state_dict_to_model(state, "SiT-T/2")
    block = model.block(0)
    h = jr.normal(getkey(), (16, dim))
    c = jr.normal(getkey(), (dim,))
    mean = h.mean(-1, keepdims=True)
    normed = (h - mean) / jnp.sqrt(((h - mean) ** 2).mean(-1, keepdims=True) + 1e-6)
    expected = h + block.attention(normed)
    np.testing.assert_allclose(np.asarray(block(h, c)), np.asarray(expected), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Errors: one line naming the key and both shapes


def _shapes_of(name, **overrides):
    from eqdisp.convert import torch_state_dict_shapes
    from eqdisp.models import make_model

    return torch_state_dict_shapes(
        eqx.filter_eval_shape(make_model, name, key=jr.key(0), **overrides)
    )


def test_wrong_model_names_are_one_line_errors():
    from eqdisp.config import ConfigError
    from eqdisp.convert import ConvertError, torch_state_dict_to_model

    b2 = _fake(_shapes_of("SiT-B/2"))
    with pytest.raises(ConvertError) as excinfo:
        torch_state_dict_to_model(b2, "SiT-XL/2")
    _one_line(excinfo, "x_embedder.proj.weight", (768, 4, 2, 2), (1152, 4, 2, 2), "SiT-XL/2")

    s4 = _fake(_shapes_of("SiT-S/4"))
    with pytest.raises(ConvertError) as excinfo:
        torch_state_dict_to_model(s4, "SiT-S/2")
    _one_line(excinfo, "x_embedder.proj.weight", (384, 4, 4, 4), (384, 4, 2, 2))

    no_null_row = _fake(_shapes_of("SiT-S/2") | {"y_embedder.embedding_table.weight": (1000, 384)})
    with pytest.raises(ConvertError) as excinfo:
        torch_state_dict_to_model(no_null_row, "SiT-S/2", num_classes=1000)
    _one_line(excinfo, "y_embedder.embedding_table.weight", (1000, 384), (1001, 384))

    with pytest.raises(ConfigError) as excinfo:
        torch_state_dict_to_model(b2, "SiT-M/2")
    _one_line(excinfo, "SiT-M/2")


def test_inferred_values_are_checked_against_given_ones():
    from eqdisp.convert import ConvertError, torch_state_dict_to_model

    s2 = _fake(_shapes_of("SiT-S/2"))  # 32x32 input, learn_sigma, 1000 classes
    cases = [
        ({"input_size": 64}, "pos_embed", (1, 256, 384), (1, 1024, 384)),
        ({"learn_sigma": False}, "final_layer.linear.weight", (32, 384), (16, 384)),
        ({"in_channels": 3}, "x_embedder.proj.weight", (384, 4, 2, 2), (384, 3, 2, 2)),
        ({"num_classes": 10}, "y_embedder.embedding_table.weight", (1001, 384), (11, 384)),
    ]
    for given, key, got, want in cases:
        with pytest.raises(ConvertError) as excinfo:
            torch_state_dict_to_model(s2, "SiT-S/2", **given)
        _one_line(excinfo, key, got, want)


def test_missing_unknown_and_misshapen_tensors():
    from eqdisp.convert import ConvertError, torch_state_dict_to_model

    shapes = _shapes_of("SiT-S/2")
    missing = _fake({k: s for k, s in shapes.items() if k != "blocks.3.mlp.fc2.bias"})
    with pytest.raises(ConvertError) as excinfo:
        torch_state_dict_to_model(missing, "SiT-S/2")
    _one_line(excinfo, "missing key blocks.3.mlp.fc2.bias", (384,))

    deeper = _fake(shapes | {"blocks.12.attn.qkv.weight": (1152, 384)})
    with pytest.raises(ConvertError) as excinfo:
        torch_state_dict_to_model(deeper, "SiT-S/2")
    _one_line(excinfo, "unknown key blocks.12.attn.qkv.weight", (1152, 384))

    odd_rows = _fake(shapes | {"final_layer.linear.weight": (24, 384)})
    with pytest.raises(ConvertError) as excinfo:
        torch_state_dict_to_model(odd_rows, "SiT-S/2")
    _one_line(excinfo, "final_layer.linear.weight", (24, 384), (32, 384))

    qk_norm = _fake(shapes | {"blocks.0.attn.q_norm.weight": (64,)})
    with pytest.raises(ConvertError) as excinfo:
        torch_state_dict_to_model(qk_norm, "SiT-S/2")
    _one_line(excinfo, "blocks.0.attn.q_norm.weight", "qk_norm")


def test_values_are_checked():
    from eqdisp.convert import POS_EMBED_ATOL, ConvertError, torch_state_dict_to_model

    state = _synthetic_state()
    drifted = dict(state, pos_embed=state["pos_embed"] + 0.5 * POS_EMBED_ATOL)
    model = torch_state_dict_to_model(drifted, "SiT-T/2")  # EMA drift of the frozen buffer: fine
    assert model.input_size == 8

    wrong = dict(state, pos_embed=_sincos_table(192, 4)[:, ::-1].copy())  # tokens reversed
    with pytest.raises(ConvertError) as excinfo:
        torch_state_dict_to_model(wrong, "SiT-T/2")
    message = _one_line(excinfo, "pos_embed", "4x4 grid of width 192", "by up to")
    assert float(message.split("by up to ")[1].split()[0]) > 0.5  # the max difference, reported

    nan = dict(state)
    nan["blocks.2.mlp.fc1.bias"] = np.full_like(state["blocks.2.mlp.fc1.bias"], np.nan)
    with pytest.raises(ConvertError) as excinfo:
        torch_state_dict_to_model(nan, "SiT-T/2")
    _one_line(excinfo, "blocks.2.mlp.fc1.bias", "non-finite")

    ints = dict(state, **{"x_embedder.proj.bias": np.zeros(192, np.int64)})
    with pytest.raises(ConvertError) as excinfo:
        torch_state_dict_to_model(ints, "SiT-T/2")
    _one_line(excinfo, "x_embedder.proj.bias", "int64")


def test_ddp_prefix_is_stripped_and_half_precision_widened():
    from eqdisp.convert import torch_state_dict_to_model

    state = _synthetic_state()
    plain = torch_state_dict_to_model(state, "SiT-T/2")
    ddp = torch_state_dict_to_model({f"module.{k}": v for k, v in state.items()}, "SiT-T/2")
    _assert_same_weights(plain, ddp)
    half = {k: v.astype(np.float16) for k, v in state.items()}
    model = torch_state_dict_to_model(half, "SiT-T/2")
    np.testing.assert_array_equal(
        np.asarray(model.blocks.qkv.weight[1]),
        half["blocks.1.attn.qkv.weight"].astype(np.float32),
    )


# ---------------------------------------------------------------------------------------------
# REPA


def _repa_state(seed=0):
    """REPA's SiT: no learn_sigma (4 output channels) plus one projector MLP (z_dim 768)."""
    state = _synthetic_state(seed, learn_sigma=False)
    rng = np.random.default_rng(seed + 1)
    dim, hidden = _T["dim"], 2048
    for index, (rows, cols) in zip((0, 2, 4), ((hidden, dim), (hidden, hidden), (768, hidden))):
        state[f"projectors.0.{index}.weight"] = rng.standard_normal((rows, cols)).astype(np.float32)
        state[f"projectors.0.{index}.bias"] = np.zeros(rows, np.float32)
    return state


def test_repa_model_answers_in_sit_convention(getkey):
    from eqdisp.convert import torch_state_dict_to_model

    state = _repa_state()
    repa = torch_state_dict_to_model(state, "SiT-T/2")  # projectors: detected and skipped
    assert repa.time_convention == "repa" and not repa.learn_sigma
    plain = torch_state_dict_to_model(state, "SiT-T/2", time_convention="sit")
    _assert_same_weights(repa, plain, same_static=False)
    x = jr.normal(getkey(), (4, 8, 8))
    y = jnp.array(4, jnp.int32)
    for t in (0.0, 0.25, 0.7, 1.0):
        t = jnp.array(t, jnp.float32)
        np.testing.assert_array_equal(
            np.asarray(repa(x, t, y)), -np.asarray(plain(x, 1 - t, y))
        )
    # And against REPA's own forward: v_REPA(x, t_REPA = 0.2) is minus eqdisp's v at t = 0.8.
    repa_forward = _numpy_forward(state, np.asarray(x), 0.2, 4, heads=3)
    got = np.asarray(repa(x, jnp.array(0.8, jnp.float32), y))
    np.testing.assert_allclose(got, -repa_forward, rtol=0, atol=2e-5 * np.abs(repa_forward).max())


def test_repa_legacy_blocks_are_renamed():
    from eqdisp.convert import torch_state_dict_to_model

    state = _repa_state()
    legacy = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "blocks" and int(parts[1]) >= 2:  # encoder_depth 2: blocks 2.. are decoder's
            key = ".".join(["decoder_blocks", str(int(parts[1]) - 2), *parts[2:]])
        legacy[key] = value
    _assert_same_weights(
        torch_state_dict_to_model(legacy, "SiT-T/2"), torch_state_dict_to_model(state, "SiT-T/2")
    )


def test_repa_convention_is_refused_for_dit():
    from eqdisp.config import ConfigError, ModelConfig

    with pytest.raises(ConfigError) as excinfo:
        ModelConfig(name="DiT-B/2", time_convention="repa")
    _one_line(excinfo, "model.time_convention", "DiT-B/2")


# ---------------------------------------------------------------------------------------------
# PyTorch itself (not a dependency: run where torch is installed)


def test_matches_a_pytorch_model_with_the_official_module_names(getkey):
    torch = pytest.importorskip("torch")
    from torch import nn

    from eqdisp.convert import model_to_torch_state_dict
    from eqdisp.models import make_model

    class Attention(nn.Module):  # timm's Attention(dim, heads, qkv_bias=True)
        def __init__(self, dim, heads):
            super().__init__()
            self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

        def forward(self, x):
            n, tokens, dim = x.shape
            qkv = self.qkv(x).reshape(n, tokens, 3, self.heads, dim // self.heads)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            return self.proj(out.transpose(1, 2).reshape(n, tokens, dim))

    class Mlp(nn.Module):  # timm's Mlp with tanh GELU
        def __init__(self, dim):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

        def forward(self, x):
            return self.fc2(nn.functional.gelu(self.fc1(x), approximate="tanh"))

    def modulate(x, shift, scale):
        return x * (1 + scale[:, None]) + shift[:, None]

    class Block(nn.Module):
        def __init__(self, dim, heads):
            super().__init__()
            self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.attn = Attention(dim, heads)
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(dim)
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

        def forward(self, x, c):
            s1, g1, a1, s2, g2, a2 = self.adaLN_modulation(c).chunk(6, dim=1)
            x = x + a1[:, None] * self.attn(modulate(self.norm1(x), s1, g1))
            return x + a2[:, None] * self.mlp(modulate(self.norm2(x), s2, g2))

    class SiT(nn.Module):
        def __init__(self, depth, dim, heads, p, tokens, classes, channels):
            super().__init__()
            self.p, self.channels = p, channels
            self.x_embedder = nn.Module()
            self.x_embedder.proj = nn.Conv2d(channels, dim, p, p)
            self.t_embedder = nn.Module()
            self.t_embedder.mlp = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))
            self.y_embedder = nn.Module()
            self.y_embedder.embedding_table = nn.Embedding(classes + 1, dim)
            self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim), requires_grad=False)
            self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
            self.final_layer = nn.Module()
            self.final_layer.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.final_layer.linear = nn.Linear(dim, p * p * 2 * channels)
            self.final_layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

        def forward(self, x, t, y):
            h = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
            freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
            args = t[:, None].float() * freqs[None]
            c = self.t_embedder.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))
            c = c + self.y_embedder.embedding_table(y)
            for block in self.blocks:
                h = block(h, c)
            shift, scale = self.final_layer.adaLN_modulation(c).chunk(2, dim=1)
            h = self.final_layer.linear(modulate(self.final_layer.norm_final(h), shift, scale))
            n, grid = len(h), math.isqrt(h.shape[1])
            h = h.reshape(n, grid, grid, self.p, self.p, 2 * self.channels)
            h = torch.einsum("nhwpqc->nchpwq", h).reshape(n, -1, grid * self.p, grid * self.p)
            return h[:, : self.channels]  # SiT drops the learned-sigma half

    model = _perturbed(make_model("SiT-S/2", key=getkey(), input_size=8, num_classes=10), getkey())
    reference = SiT(12, 384, 6, 2, 16, 10, 4)
    state = {k: torch.from_numpy(v) for k, v in model_to_torch_state_dict(model).items()}
    reference.load_state_dict(state, strict=True)  # every key and shape of the official names
    x, t, y = _example(getkey(), model)
    with torch.no_grad():
        want = reference(
            torch.from_numpy(np.asarray(x))[None], torch.tensor([0.3]), torch.tensor([3])
        )[0].numpy()
    got = np.asarray(model(x, t, y))
    scale = np.abs(want).max()
    assert scale > 0.1
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale)


# ---------------------------------------------------------------------------------------------
# Files (written without torch by tests/torchfiles.py)


def _sit_args(**overrides):
    import argparse

    args = dict(model="SiT-T/2", image_size=64, num_classes=10, path_type="Linear",
                prediction="velocity", loss_weight=None, train_eps=None, sample_eps=None)
    return argparse.Namespace(**(args | overrides))


def _training_checkpoint(path, ema, model=None, args=None, **extra):
    from torchfiles import write_torch_file

    model = model if model is not None else {k: v + 1 for k, v in ema.items() if k != "pos_embed"}
    if "pos_embed" in ema:
        model = model | {"pos_embed": ema["pos_embed"]}
    opt = {"state": {0: {"step": np.zeros((), np.float32), "exp_avg": np.zeros(3, np.float32)}},
           "param_groups": [{"lr": 1e-4, "params": [0]}]}
    write_torch_file(path, {"model": model, "ema": ema, "opt": opt, "args": args, **extra})
    return path


def test_from_torch_reads_every_file_format(tmp_path):
    from safetensors.numpy import save_file
    from torchfiles import write_torch_file

    from eqdisp.convert import from_torch, read_torch_checkpoint, torch_state_dict_to_model

    state = _synthetic_state()
    want = torch_state_dict_to_model(state, "SiT-T/2")
    write_torch_file(tmp_path / "release.pt", state)
    write_torch_file(tmp_path / "legacy.pth", state, legacy=True)
    save_file(state, str(tmp_path / "release.safetensors"))
    np.savez(tmp_path / "release.npz", **state)
    for name in ("release.pt", "legacy.pth", "release.safetensors", "release.npz"):
        _assert_same_weights(from_torch(tmp_path / name, "SiT-T/2"), want)
    bare = read_torch_checkpoint(tmp_path / "release.pt", "SiT-T/2")
    assert (bare.kind, bare.entry, bare.skipped, bare.args) == ("state dict", None, (), None)
    assert bare.pos_embed_max_abs_diff == 0.0 and bare.model_name == "SiT-T/2"

    ckpt = _training_checkpoint(tmp_path / "0400000.pt", state, args=_sit_args())
    ema = read_torch_checkpoint(ckpt)  # the model name comes from args.model
    assert (ema.kind, ema.entry, ema.model_name) == ("training checkpoint", "ema", "SiT-T/2")
    assert ema.args["image_size"] == 64 and ema.transport.path == "Linear"
    _assert_same_weights(ema.model, want)
    raw = from_torch(ckpt, "T/2", weights="model")  # a bare size means SiT, as everywhere
    np.testing.assert_array_equal(
        np.asarray(raw.blocks.fc1.bias[2]), state["blocks.2.mlp.fc1.bias"] + 1
    )


def test_file_errors_are_one_line(tmp_path):
    from torchfiles import write_torch_file

    from eqdisp.convert import ConvertError, from_torch
    from eqdisp.io import WeightsError

    state = _synthetic_state()
    write_torch_file(tmp_path / "release.pt", state)
    with pytest.raises(ConvertError) as excinfo:
        from_torch(tmp_path / "release.pt", "SiT-T/2", weights="model")
    _one_line(excinfo, "release.pt", "bare state dict", "weights='model'")
    with pytest.raises(ConvertError) as excinfo:
        from_torch(tmp_path / "release.pt")
    _one_line(excinfo, "release.pt", "does not name its model")
    with pytest.raises(ConvertError) as excinfo:
        from_torch(tmp_path / "release.pt", "SiT-S/2")
    _one_line(excinfo, "release.pt", "x_embedder.proj.weight", (192, 4, 2, 2), (384, 4, 2, 2))

    ckpt = _training_checkpoint(tmp_path / "ckpt.pt", state, args=_sit_args())
    with pytest.raises(ConvertError) as excinfo:
        from_torch(ckpt, "SiT-B/2")
    _one_line(excinfo, "'SiT-B/2'", "args.model='SiT-T/2'")
    with pytest.raises(ConvertError) as excinfo:  # args say 1000 classes, the table has 11 rows
        from_torch(
            _training_checkpoint(tmp_path / "c2.pt", state, args=_sit_args(num_classes=1000))
        )
    _one_line(excinfo, "y_embedder.embedding_table.weight", (11, 192), (1001, 192))
    with pytest.raises(ConvertError) as excinfo:
        from_torch(_training_checkpoint(tmp_path / "c3.pt", state, args=_sit_args(image_size=256)))
    _one_line(excinfo, "pos_embed", (1, 16, 192), (1, 256, 192))

    write_torch_file(tmp_path / "model_only.pt", {"model": state, "args": _sit_args()})
    with pytest.raises(ConvertError) as excinfo:
        from_torch(tmp_path / "model_only.pt")
    _one_line(excinfo, "no 'ema' entry", "weights='model'")
    with pytest.raises(WeightsError) as excinfo:
        from_torch(tmp_path / "nothing.pt", "SiT-T/2")
    _one_line(excinfo, "nothing.pt")


def _repa_args(**overrides):
    import argparse

    args = dict(model="SiT-T/2", num_classes=10, resolution=64, encoder_depth=2, qk_norm=False,
                fused_attn=True, enc_type="dinov2-vit-b", proj_coeff=0.5, path_type="linear",
                prediction="v", weighting="uniform")
    return argparse.Namespace(**(args | overrides))


def test_repa_checkpoint_reports_its_projectors(tmp_path):
    from eqdisp.convert import ConvertError, read_torch_checkpoint

    state = _repa_state()
    ckpt = _training_checkpoint(tmp_path / "repa.pt", state, args=_repa_args(), steps=4_000_000)
    repa = read_torch_checkpoint(ckpt)
    assert repa.model.time_convention == "repa" and repa.steps == 4_000_000
    parts = [f"projectors.0.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")]
    assert repa.skipped == tuple(parts)
    assert repa.transport.path == "Linear"
    cosine = _training_checkpoint(tmp_path / "cos.pt", state, args=_repa_args(path_type="cosine"))
    assert read_torch_checkpoint(cosine).transport.path == "GVP"  # REPA's cosine = SiT's GVP

    stripped = {k: v for k, v in state.items() if not k.startswith("projectors.")}
    by_args = _training_checkpoint(tmp_path / "noproj.pt", stripped, args=_repa_args())
    assert read_torch_checkpoint(by_args).model.time_convention == "repa"

    qk = _training_checkpoint(tmp_path / "qk.pt", state, args=_repa_args(qk_norm=True))
    with pytest.raises(ConvertError) as excinfo:
        read_torch_checkpoint(qk)
    _one_line(excinfo, "qk_norm")


# ---------------------------------------------------------------------------------------------
# Run directories


def test_convert_checkpoint_writes_a_run_that_loads_back(tmp_path):
    import eqdisp
    from eqdisp.convert import ConvertError, convert_checkpoint, torch_state_dict_to_model
    from eqdisp.diffusion import GaussianDiffusion
    from eqdisp import make_objective

    state = _synthetic_state()
    ckpt = _training_checkpoint(tmp_path / "ckpt.pt", state, args=_sit_args(disp=True))
    vae = tmp_path / "sd-vae"
    vae.mkdir()
    run = convert_checkpoint(ckpt, tmp_path / "run", vae=vae)
    loaded = eqdisp.load_checkpoint(run)
    want = torch_state_dict_to_model(state, "SiT-T/2")
    _assert_same_weights(loaded.ema, want)
    _assert_same_weights(loaded.model, want)
    assert loaded.step == 0
    cfg = loaded.config
    assert (cfg.model.name, cfg.model.input_size, cfg.model.in_channels) == ("SiT-T/2", 8, 4)
    assert (cfg.model.num_classes, cfg.model.learn_sigma) == (10, True)
    assert (cfg.data.source, cfg.data.vae) == ("latents", str(vae))
    assert cfg.disp == eqdisp.DISP_PRESETS["reference-pytorch"]  # the DispLoss run's --disp
    assert (cfg.sampler.mode, cfg.sampler.ode_method, cfg.sampler.steps) == ("ode", "heun", 250)
    opt = jax.tree.leaves(loaded.state.opt_state)
    assert all(float(jnp.abs(leaf).max()) == 0 for leaf in opt)  # a fresh Adam state
    report = (run / "conversion.json").read_text()
    assert '"entry": "ema"' in report

    with pytest.raises(ConvertError) as excinfo:
        convert_checkpoint(ckpt, run)
    _one_line(excinfo, str(run), "not empty")

    dit = _training_checkpoint(
        tmp_path / "dit.pt", state, args=_sit_args(model="DiT-T/2", path_type=None)
    )
    dit_run = eqdisp.load_checkpoint(convert_checkpoint(dit, tmp_path / "dit-run"))
    assert isinstance(make_objective(dit_run.config), GaussianDiffusion)
    assert dit_run.ema.out_channels == 8  # DiT keeps the learned-variance channels


def test_convert_checkpoint_keeps_repa_convention(tmp_path):
    import eqdisp
    from eqdisp.convert import convert_checkpoint

    ckpt = _training_checkpoint(tmp_path / "repa.pt", _repa_state(), args=_repa_args())
    loaded = eqdisp.load_checkpoint(convert_checkpoint(ckpt, tmp_path / "run"))
    assert loaded.ema.time_convention == "repa"
    sampler = loaded.config.sampler
    assert (sampler.mode, sampler.steps, sampler.cfg_scale, sampler.cfg_interval) == (
        "sde", 250, 1.8, (0.3, 1.0)
    )
    assert loaded.config.data.flip is False and loaded.config.optim.grad_clip == 1.0


def _tiny_vae(root):
    """A random SD-VAE-shaped autoencoder (3 halvings: 4x8x8 latents <-> 64px), diffusers layout."""
    import json

    from safetensors.numpy import save_file

    from eqdisp.vae import AutoencoderKL, VAEConfig, vae_to_state_dict

    config = VAEConfig(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4)
    root.mkdir()
    vae = AutoencoderKL(config, key=jr.key(0))
    save_file(vae_to_state_dict(vae), str(root / "diffusion_pytorch_model.safetensors"))
    (root / "config.json").write_text(json.dumps({
        "_class_name": "AutoencoderKL", "block_out_channels": [8, 16, 16, 16],
        "layers_per_block": 1, "norm_num_groups": 4, "latent_channels": 4,
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "scaling_factor": 0.18215,
    }))
    return root


def test_cli_convert_then_sample(tmp_path):
    state = _synthetic_state()
    ckpt = _training_checkpoint(tmp_path / "0050000.pt", state, args=_sit_args())
    vae = _tiny_vae(tmp_path / "vae")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    run = tmp_path / "run"
    convert = subprocess.run(
        [sys.executable, "-m", "cli.convert", str(ckpt), str(run), "--model", "SiT-T/2",
         "--vae", str(vae)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert convert.returncode == 0, convert.stderr
    assert "SiT-T/2" in convert.stdout and "'ema'" in convert.stdout, convert.stdout
    again = subprocess.run(
        [sys.executable, "-m", "cli.convert", str(ckpt), str(run), "--model", "SiT-B/2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert again.returncode != 0
    assert again.stderr.strip().count("\n") == 0 and again.stderr.startswith("error: ")
    out = tmp_path / "samples.npz"
    sample = subprocess.run(
        [sys.executable, "-m", "cli.sample", str(run), "--num", "2", "--steps", "2",
         "--batch-size", "2", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert sample.returncode == 0, sample.stderr
    with np.load(out) as samples:
        assert samples["arr_0"].shape == (2, 64, 64, 3) and samples["arr_0"].dtype == np.uint8
