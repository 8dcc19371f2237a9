"""Tests of eqdisp.models._unet: the flow_matching CIFAR-10 U-Net (meanflow_unet_fid.md §2.2-2.3).

Forward and gradient tests use a tiny configuration (`_TINY`: 32 base channels, two levels, one
ResBlock per level, 16x16 inputs; 8 ResBlocks); the cifar10 configuration is only shape-evaluated.
Tiny layout (0-based ResBlock: stage, channels in -> out, resolution):
0 input 32->32 16x16 | 1 input 32->64 8x8 +attn | 2 middle 64 +attn | 3 middle 64 |
4 output 128->64 8x8 +attn | 5 output 96->64 8x8 +attn, upsample | 6 output 96->32 16x16 |
7 output 64->32 16x16.
"""

import math

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

_TINY = {
    "model_channels": 32,
    "channel_mult": (1, 2),
    "num_res_blocks": 1,
    "attention_resolutions": (2,),
}
_SIZE = 16


def _count_params(tree) -> int:
    return sum(
        math.prod(leaf.shape)
        for leaf in jax.tree.leaves(tree)
        if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.inexact)
    )


@jax.jit
def _add_noise(leaves, key):
    flat, unravel = jax.flatten_util.ravel_pytree(leaves)  # one draw
    return unravel(flat + 0.05 * jax.random.normal(key, flat.shape, flat.dtype))


def _perturb(model, key):
    """Add noise to every parameter so that the zero-initialised layers do something."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    leaves, treedef = jax.tree.flatten(params)
    # A list of leaves, not the module: one compile for every variant of the static fields.
    return eqx.combine(jax.tree.unflatten(treedef, _add_noise(leaves, key)), static)


def _tiny(getkey, **overrides):
    from eqdisp.models._unet import UNet

    return UNet(**{**_TINY, **overrides}, key=getkey())


# Built once per file: the first build compiles one random draw per parameter shape, the costliest
# step of this file on a 2-core CPU. RBG keys (any key works) compile about twice as fast as
# threefry's; later builds with the same shapes reuse the compiled draws.
def _build(**overrides):
    from eqdisp.models._unet import UNet

    model = UNet(**{**_TINY, **overrides}, key=jax.random.key(1, impl="rbg"))
    return model, _perturb(model, jax.random.key(2, impl="rbg"))


@pytest.fixture(scope="module")
def _models():
    return _build()


@pytest.fixture
def tiny(_models):
    return _models[0]


@pytest.fixture
def perturbed(_models):
    return _models[1]


def _example(key, channels=3, size=_SIZE):
    x = jax.random.normal(key, (channels, size, size), jnp.float32)
    return x, jnp.array(0.7, jnp.float32), jnp.array(0, jnp.int32)


def _forward(model, x, t, y, key, tap_blocks):
    # Eager on purpose: op-by-op dispatch compiles each op once for all the tap sets and keys of
    # this file, where a jitted forward compiles again for every `tap_blocks`.
    return model.forward_with_taps(x, t, y, key=key, tap_blocks=tap_blocks)


# ---------------------------------------------------------------------------------------------
# Parameter count against a formula written from the architecture (§2.2)


def _gn(c):
    return 2 * c


def _conv(cin, cout, k):
    return cin * cout * k * k + cout


def _resblock(cin, cout, emb, scale_shift=True):
    film = 2 * cout if scale_shift else cout
    skip = 0 if cin == cout else _conv(cin, cout, 1)
    in_layers = _gn(cin) + _conv(cin, cout, 3)
    out_layers = _gn(cout) + _conv(cout, cout, 3)
    return in_layers + (emb * film + film) + out_layers + skip


def _attention(c):
    return _gn(c) + (c * 3 * c + 3 * c) + (c * c + c)


def _formula(in_ch, out_ch, mc, mult, n, attn, scale_shift=True):
    """guided-diffusion's channel bookkeeping, layer by layer."""
    emb = 4 * mc
    total = (mc * emb + emb) + (emb * emb + emb)  # time MLP
    ch = mc * mult[0]
    total += _conv(in_ch, ch, 3)
    chans, ds = [ch], 1
    for level, m in enumerate(mult):
        for _ in range(n):
            total += _resblock(ch, mc * m, emb, scale_shift)
            ch = mc * m
            total += _attention(ch) if ds in attn else 0
            chans.append(ch)
        if level != len(mult) - 1:
            chans.append(ch)
            ds *= 2
    total += 2 * _resblock(ch, ch, emb, scale_shift) + _attention(ch)
    for level, m in reversed(list(enumerate(mult))):
        for i in range(n + 1):
            total += _resblock(ch + chans.pop(), mc * m, emb, scale_shift)
            ch = mc * m
            total += _attention(ch) if ds in attn else 0
            if level and i == n:
                ds //= 2
    return total + _gn(ch) + _conv(ch, out_ch, 3)


def test_cifar10_parameter_count(getkey):
    from eqdisp.models._unet import UNet

    shapes = eqx.filter_eval_shape(UNet, key=getkey())  # nothing allocated
    # cifar10 by hand: 256 channels everywhere, emb 512; 12 encoder + 2 middle ResBlocks 256->256,
    # 15 decoder ResBlocks 512->256 (1x1 skip), attention after 4 + 1 + 5 of them.
    by_hand = (
        (128 * 512 + 512 + 512 * 512 + 512)
        + (3 * 256 * 9 + 256)
        + 14 * _resblock(256, 256, 512)
        + 15 * _resblock(512, 256, 512)
        + 10 * _attention(256)
        + (2 * 256 + 256 * 3 * 9 + 3)
    )
    assert _formula(3, 3, 128, (2, 2, 2), 4, (2,)) == by_hand == 55_676_419
    assert _count_params(shapes) == by_hand
    assert shapes.depth == 29 and shapes.dropout == 0.3 and shapes.emb_channels == 512
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes))


@pytest.mark.parametrize("scale_shift", [True, False])
def test_tiny_parameter_count(getkey, scale_shift):
    from eqdisp.models._unet import UNet

    shapes = eqx.filter_eval_shape(
        UNet, **_TINY, use_scale_shift_norm=scale_shift, in_channels=4, out_channels=2, key=getkey()
    )
    assert _count_params(shapes) == _formula(4, 2, 32, (1, 2), 1, (2,), scale_shift)


# ---------------------------------------------------------------------------------------------
# Block enumeration and tap shapes of the cifar10 configuration (§2.3)


def test_cifar10_block_table_and_tap_shapes(getkey):
    from eqdisp.models._unet import DEFAULT_DISP_BLOCK, UNet

    shapes = eqx.filter_eval_shape(UNet, key=getkey())
    names = shapes.resblock_names
    assert names[:4] == tuple(f"input_blocks.{i}.0" for i in range(1, 5))
    assert names[4:8] == tuple(f"input_blocks.{i}.0" for i in range(6, 10))
    assert names[8:12] == tuple(f"input_blocks.{i}.0" for i in range(11, 15))
    assert names[12:14] == ("middle_block.0", "middle_block.2")
    assert names[14:] == tuple(f"output_blocks.{i}.0" for i in range(15))
    assert DEFAULT_DISP_BLOCK == 15 and names[DEFAULT_DISP_BLOCK] == "output_blocks.1.0"
    # Attention after the 16x16 ResBlocks and the first middle block, nowhere else.
    with_attn = [k for k, a in enumerate(shapes.attn_blocks) if a is not None]
    assert with_attn == [4, 5, 6, 7, 12, 19, 20, 21, 22, 23]

    groups = {
        (1024, 256): (0, 1, 2, 3, 24, 25, 26, 27, 28),
        (256, 256): (4, 5, 6, 7, 19, 20, 21, 22, 23),
        (64, 256): tuple(range(8, 19)),
    }
    params, static = eqx.partition(shapes, lambda a: isinstance(a, jax.ShapeDtypeStruct))

    def taps_of_every_group(params, x):
        model = eqx.combine(params, static)
        t, y = jnp.array(0.5, jnp.float32), jnp.array(0, jnp.int32)
        outs = [model.forward_with_taps(x, t, y, tap_blocks=b) for b in groups.values()]
        return outs[0][0], [taps.blocks for _, taps in outs], outs[0][1].c

    x = jax.ShapeDtypeStruct((3, 32, 32), jnp.float32)
    out, blocks, c = jax.eval_shape(taps_of_every_group, params, x)
    assert out.shape == (3, 32, 32) and c.shape == (512,)
    for (shape, indices), tapped in zip(groups.items(), blocks):
        assert tapped.shape == (len(indices), *shape)


# ---------------------------------------------------------------------------------------------
# Forward: shapes, dtypes, zero init


def test_output_shape_and_dtype(getkey, perturbed):
    model = perturbed
    x, t, y = _example(getkey())
    out, taps = _forward(model, x, t, y, None, (0, 6, 7))
    assert out.shape == (3, _SIZE, _SIZE) and out.dtype == jnp.float32
    assert taps.blocks.shape == (3, _SIZE * _SIZE, 32) and taps.blocks.dtype == jnp.float32
    assert taps.c.shape == (128,) and taps.c.dtype == jnp.float32
    out_none, taps_none = _forward(model, x, t, y, None, ())
    assert taps_none.blocks.shape[0] == 0
    assert jnp.array_equal(out, out_none)  # tapping changes nothing
    assert model.depth == 8


def test_zero_init_output_and_residual_branches(getkey, tiny):
    model = tiny
    x, t, y = _example(getkey())
    out, taps = _forward(model, x, t, y, None, (0,))
    assert jnp.all(out == 0)
    # A fresh ResBlock is its skip path (zero out_conv): the identity when channels match ...
    emb = model.embed_time(t)
    h = model.input_conv(x)
    assert jnp.array_equal(model.res_blocks[0](h, emb), h)
    assert jnp.array_equal(taps.blocks[0], h.reshape(32, -1).T)
    # ... and the 1x1 skip conv when they do not (block 1: 32 -> 64).
    block = model.res_blocks[1]
    assert block.skip is not None
    h8 = jax.random.normal(getkey(), (32, 8, 8), jnp.float32)
    assert jnp.array_equal(block(h8, emb), block.skip(h8))
    # A fresh attention block is the identity (zero proj).
    attn = model.attn_blocks[1]
    h64 = jax.random.normal(getkey(), (64, 8, 8), jnp.float32)
    assert jnp.array_equal(attn(h64), h64)


def test_init_statistics(tiny):
    # PyTorch defaults: uniform(+-1/sqrt(fan_in)) for weights and biases; GroupNorm 1 and 0.
    model = tiny
    block = model.res_blocks[6]
    w = block.in_conv.weight  # (32, 96, 3, 3): fan_in 864
    assert w.shape == (32, 96, 3, 3)
    bound = 1 / math.sqrt(96 * 9)
    assert float(jnp.max(jnp.abs(w))) <= bound
    assert float(jnp.std(w)) == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert float(jnp.max(jnp.abs(block.in_conv.bias))) <= bound
    emb_bound = 1 / math.sqrt(model.emb_channels)
    emb_std = float(jnp.std(block.emb_linear.weight))
    assert emb_std == pytest.approx(emb_bound / math.sqrt(3), rel=0.05)
    assert jnp.all(block.in_norm.weight == 1) and jnp.all(block.in_norm.bias == 0)
    for zero in (block.out_conv, model.out_conv, model.attn_blocks[1].proj):
        assert jnp.all(zero.weight == 0) and jnp.all(zero.bias == 0)


# ---------------------------------------------------------------------------------------------
# Taps


def _tokens(h):
    return h.reshape(h.shape[0], -1).T


def test_taps_and_output_equal_a_hand_recomputation(getkey, perturbed):
    model = perturbed
    x, t, y = _example(getkey())
    out, taps = _forward(model, x, t, y, None, (3, 4))
    _, tap3 = _forward(model, x, t, y, None, (3,))
    _, tap4 = _forward(model, x, t, y, None, (4,))
    _, taps_16 = _forward(model, x, t, y, None, (0, 6, 7))
    np.testing.assert_array_equal(taps.blocks, jnp.concatenate([tap3.blocks, tap4.blocks]))

    # The whole network by hand (tiny layout in the module docstring); skips pop last-in first.
    def pool(h):  # 2x2 average
        return (h[:, 0::2, 0::2] + h[:, 1::2, 0::2] + h[:, 0::2, 1::2] + h[:, 1::2, 1::2]) / 4

    def nearest(h):  # x2: output pixel i reads input pixel i // 2
        idx = np.arange(2 * h.shape[1]) // 2
        return h[:, idx][:, :, idx]

    blocks, attn = model.res_blocks, model.attn_blocks
    emb = model.embed_time(t)
    h_in = model.input_conv(x)
    h0 = blocks[0](h_in, emb)  # 16x16, no attention; then the Downsample container
    h_down = pool(h0)
    h1 = attn[1](blocks[1](h_down, emb))  # 8x8, 64 channels
    h2 = attn[2](blocks[2](h1, emb))
    h3 = blocks[3](h2, emb)
    h4 = blocks[4](jnp.concatenate([h3, h1]), emb)
    h5 = blocks[5](jnp.concatenate([attn[4](h4), h_down]), emb)
    h6 = blocks[6](jnp.concatenate([nearest(attn[5](h5)), h0]), emb)
    h7 = blocks[7](jnp.concatenate([h6, h_in]), emb)
    expected_out = model.out_conv(jax.nn.silu(model.out_norm(h7)))
    tol = {"rtol": 1e-5, "atol": 1e-5}
    np.testing.assert_allclose(taps.blocks, jnp.stack([_tokens(h3), _tokens(h4)]), **tol)
    expected_16 = jnp.stack([_tokens(h0), _tokens(h6), _tokens(h7)])
    np.testing.assert_allclose(taps_16.blocks, expected_16, **tol)
    np.testing.assert_allclose(out, expected_out, **tol)
    np.testing.assert_allclose(taps.c, emb, rtol=1e-6, atol=1e-6)
    # Pixel (i, j) is token i * w + j.
    np.testing.assert_allclose(taps.blocks[0][2 * 8 + 5], h3[:, 2, 5], **tol)


# Independent NumPy (float64) versions of one ResBlock and one attention block (§2.2).


def _np(a):
    return np.asarray(a, np.float64)


def _np_group_norm(norm, x, groups=32, eps=1e-5):
    g = x.reshape(groups, -1)
    g = (g - g.mean(1, keepdims=True)) / np.sqrt(g.var(1, keepdims=True) + eps)
    return g.reshape(x.shape) * _np(norm.weight)[:, None, None] + _np(norm.bias)[:, None, None]


def _np_conv(conv, x):
    w, b = _np(conv.weight), _np(conv.bias).reshape(-1)
    k = w.shape[-1]
    pad = k // 2
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    h, wd = x.shape[1:]
    out = np.zeros((w.shape[0], h, wd))
    for di in range(k):
        for dj in range(k):
            out += np.einsum("oc,chw->ohw", w[:, :, di, dj], xp[:, di : di + h, dj : dj + wd])
    return out + b[:, None, None]


def _np_silu(x):
    return x / (1 + np.exp(-x))


def test_resblock_matches_numpy(getkey, perturbed):
    block = perturbed.res_blocks[6]  # 96 -> 32, 1x1 skip
    x = jax.random.normal(getkey(), (96, 8, 8), jnp.float32)
    emb = jax.random.normal(getkey(), (128,), jnp.float32)
    xn, en = _np(x), _np(emb)
    h = _np_conv(block.in_conv, _np_silu(_np_group_norm(block.in_norm, xn)))
    film = _np(block.emb_linear.weight) @ _np_silu(en) + _np(block.emb_linear.bias)
    scale, shift = film[:32, None, None], film[32:, None, None]  # scale first
    h = _np_group_norm(block.out_norm, h) * (1 + scale) + shift
    h = _np_conv(block.out_conv, _np_silu(h))
    expected = _np_conv(block.skip, xn) + h
    np.testing.assert_allclose(block(x, emb), expected, rtol=1e-4, atol=1e-4)


def test_attention_matches_numpy(getkey, perturbed):
    block = perturbed.attn_blocks[1]  # 64 channels, one head
    x = jax.random.normal(getkey(), (64, 8, 8), jnp.float32)
    xn = _np(x)
    tokens = _np_group_norm(block.norm, xn).reshape(64, -1)  # (c, t)
    qkv = _np(block.qkv.weight) @ tokens + _np(block.qkv.bias)[:, None]
    q, k, v = qkv[:64], qkv[64:128], qkv[128:]  # channel chunks ("new order")
    scores = q.T @ k / np.sqrt(64)  # (t, s); 1/sqrt(sqrt(c)) on q and on k
    weights = np.exp(scores - scores.max(1, keepdims=True))
    weights /= weights.sum(1, keepdims=True)
    attended = v @ weights.T  # (c, t)
    out = _np(block.proj.weight) @ attended + _np(block.proj.bias)[:, None]
    np.testing.assert_allclose(block(x), xn + out.reshape(64, 8, 8), rtol=1e-4, atol=1e-4)


def test_mismatched_tap_shapes_are_one_line_errors(getkey, tiny):
    model = tiny
    x, t, y = _example(getkey())
    with pytest.raises(ValueError, match=r"block 0: \(256, 32\), block 1: \(64, 64\)") as info:
        model.forward_with_taps(x, t, y, tap_blocks=(0, 1))
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="cannot be stacked"):
        model.forward_with_taps(x, t, y, tap_blocks=None)


@pytest.mark.parametrize("tap_blocks", [(8,), (-1,), (4, 3), (2, 2)])
def test_bad_tap_blocks(getkey, tiny, tap_blocks):
    model = tiny
    x, t, y = _example(getkey())
    with pytest.raises(ValueError, match="tap_blocks") as info:
        model.forward_with_taps(x, t, y, tap_blocks=tap_blocks)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# Dropout, time embedding, precision


def test_dropout_only_with_a_key(getkey, perturbed):
    model = perturbed
    x, t, y = _example(getkey())
    k1, k2 = getkey(), getkey()
    eval_a, _ = _forward(model, x, t, y, None, ())
    eval_b = model(x, t, y)
    train_1, _ = _forward(model, x, t, y, k1, ())
    train_1b, _ = _forward(model, x, t, y, k1, ())
    train_2, _ = _forward(model, x, t, y, k2, ())
    assert jnp.array_equal(eval_a, eval_b) and jnp.array_equal(eval_a, model(x, t, y))
    assert jnp.array_equal(train_1, train_1b)
    assert not jnp.allclose(train_1, train_2, atol=1e-3)
    assert not jnp.allclose(train_1, eval_a, atol=1e-3)


def test_dropout_rate_and_scale(getkey):
    from eqdisp.models._unet import _dropout

    x = jnp.ones((8, 64, 64), jnp.float32)
    out = _dropout(x, 0.3, getkey())
    kept = out != 0
    assert float(jnp.mean(kept)) == pytest.approx(0.7, abs=0.01)
    np.testing.assert_allclose(out[kept], 1 / 0.7, rtol=1e-6)


def test_time_embedding_matches_numpy(tiny):
    model = tiny
    w1, b1 = _np(model.time_embed_in.weight), _np(model.time_embed_in.bias)
    w2, b2 = _np(model.time_embed_out.weight), _np(model.time_embed_out.bias)
    half = 16  # model_channels / 2
    freqs = np.exp(-np.log(10000.0) * np.arange(half) / half)
    for t in (0.0, 0.25, 1.0):
        args = t * freqs
        features = np.concatenate([np.cos(args), np.sin(args)])  # cos first, raw t (no x1000)
        hidden = w1 @ features + b1
        expected = w2 @ (hidden / (1 + np.exp(-hidden))) + b2
        got = model.embed_time(jnp.array(t, jnp.float32))
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_bfloat16_compute(getkey, perturbed):
    from eqdisp.models._unet import GroupNorm32, _cast_compute

    f32 = perturbed
    _, bf16 = _build(dtype="bfloat16")  # the same parameters
    params = jax.tree.leaves(eqx.filter(bf16, eqx.is_array))
    assert all(leaf.dtype == jnp.float32 for leaf in params)
    cast = _cast_compute(bf16, jnp.dtype(jnp.bfloat16))
    assert cast.res_blocks[0].in_conv.weight.dtype == jnp.bfloat16
    norms = [n for n in jax.tree.leaves(cast, is_leaf=lambda n: isinstance(n, GroupNorm32))
             if isinstance(n, GroupNorm32)]
    assert norms and all(n.weight.dtype == jnp.float32 for n in norms)

    x, t, y = _example(getkey())
    out32, taps32 = _forward(f32, x, t, y, None, (3, 4))
    out16, taps16 = eqx.filter_jit(_forward)(bf16, x, t, y, None, (3, 4))
    assert out16.dtype == jnp.float32
    assert taps16.blocks.dtype == jnp.bfloat16 and taps16.c.dtype == jnp.bfloat16
    # bf16 has 8 mantissa bits (relative step 2^-8 = 0.4%); a few percent over 8 blocks.
    scale = float(jnp.max(jnp.abs(out32)))
    assert scale > 0
    assert float(jnp.max(jnp.abs(out16 - out32))) < 0.05 * scale
    tap_scale = float(jnp.max(jnp.abs(taps32.blocks)))
    tap_error = jnp.max(jnp.abs(taps16.blocks.astype(jnp.float32) - taps32.blocks))
    assert float(tap_error) < 0.05 * tap_scale


# ---------------------------------------------------------------------------------------------
# Gradients


def _loss(model, xs, ts, target):
    ys = jnp.zeros(xs.shape[:1], jnp.int32)
    out = jax.vmap(model)(xs, ts, ys)
    return jnp.mean(jnp.square(out - target))


@eqx.filter_jit
def _sgd_step(model, xs, ts, target):
    loss, grads = eqx.filter_value_and_grad(_loss)(model, xs, ts, target)
    return loss, grads, eqx.apply_updates(model, jax.tree.map(lambda g: -0.1 * g, grads))


def test_gradient_descent_decreases_the_loss(getkey, tiny, perturbed):
    model = tiny
    xs = jax.random.normal(getkey(), (2, 3, _SIZE, _SIZE), jnp.float32)
    ts = jnp.array([0.2, 0.8], jnp.float32)
    target = jax.random.normal(getkey(), xs.shape, jnp.float32)
    losses = []
    for _ in range(3):
        loss, _, model = _sgd_step(model, xs, ts, target)
        losses.append(float(loss))
    assert losses[2] < losses[1] < losses[0]

    # Once the zero layers are not zero, every parameter gets a finite, nonzero gradient.
    _, grads, _ = _sgd_step(perturbed, xs, ts, target)
    leaves = jax.tree.leaves_with_path(eqx.filter(grads, eqx.is_inexact_array))
    assert len(leaves) == len(jax.tree.leaves(eqx.filter(perturbed, eqx.is_inexact_array)))
    for path, g in leaves:
        assert g.dtype == jnp.float32, jax.tree_util.keystr(path)
        assert bool(jnp.all(jnp.isfinite(g))), jax.tree_util.keystr(path)
        assert float(jnp.max(jnp.abs(g))) > 0, jax.tree_util.keystr(path)


# ---------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"model_channels": 24}, "num_groups=32"),
        ({"channel_mult": ()}, "channel_mult"),
        ({"num_res_blocks": 0}, "num_res_blocks=0"),
        ({"dropout": 1.0}, "dropout=1.0"),
        ({"num_heads": 3}, "num_heads=3"),
        ({"num_head_channels": 48}, "num_head_channels=48"),
    ],
)
def test_bad_configs(getkey, overrides, fragment):
    with pytest.raises(ValueError, match=fragment) as info:
        _tiny(getkey, **overrides)
    assert "\n" not in str(info.value)


def test_bad_input_shape(tiny):
    model = tiny
    t, y = jnp.array(0.5, jnp.float32), jnp.array(0, jnp.int32)
    with pytest.raises(ValueError, match="multiples of 2"):
        model.forward_with_taps(jnp.zeros((3, 9, 9), jnp.float32), t, y, tap_blocks=())
    with pytest.raises(ValueError, match=r"expected \(3, h, w\)"):
        model(jnp.zeros((4, _SIZE, _SIZE), jnp.float32), t, y)
