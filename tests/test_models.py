"""Tests of eqdisp.models: the DiT/SiT transformer against the reference constants (sit_dit_repa.md §1)."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

_TINY = {"input_size": 8, "in_channels": 4, "num_classes": 10}  # SiT-T/2 on 8x8: 16 tokens


def _count_params(tree) -> int:
    leaves = jax.tree.leaves(tree)
    return sum(
        math.prod(leaf.shape)
        for leaf in leaves
        if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.inexact)
    )


def _perturb(model, key, scale=0.05):
    """Add noise to every parameter so that zero-initialised layers do something."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    leaves = [
        leaf + scale * jax.random.normal(k, leaf.shape, leaf.dtype) for leaf, k in zip(leaves, keys)
    ]
    return eqx.combine(jax.tree.unflatten(treedef, leaves), static)


def _example(key, model):
    x = jax.random.normal(key, (model.in_channels, model.input_size, model.input_size), jnp.float32)
    return x, jnp.array(0.3, jnp.float32), jnp.array(3, jnp.int32)


def _tiny(getkey, **overrides):
    from eqdisp.models import make_model

    return make_model("SiT-T/2", key=getkey(), **{**_TINY, **overrides})


# ---------------------------------------------------------------------------------------------
# Names, sizes and parameter counts


def test_parse_model_name():
    from eqdisp.models import parse_model_name

    assert parse_model_name("SiT-B/2") == ("SiT", 12, 768, 12, 2)
    assert parse_model_name("DiT-XL/8") == ("DiT", 28, 1152, 16, 8)
    assert parse_model_name("L/4") == ("SiT", 24, 1024, 16, 4)
    assert parse_model_name("SiT-T/2").depth == 6


@pytest.mark.parametrize(
    "name, expected, tol",
    [
        # Exact: an independent probe (cpu_perf_probe.md) and the XL state dict minus its pos_embed
        # (state_dict_layouts.md: 675,129,632 - 256 * 1152).
        ("SiT-S/2", 32_865_056, 0),
        ("SiT-XL/2", 675_129_632 - 256 * 1152, 0),
        ("DiT-XL/2", 675_129_632 - 256 * 1152, 0),
        ("SiT-B/2", 130.3e6, 0.05e6),
        ("SiT-L/2", 457.8e6, 0.05e6),
        ("SiT-XL/2", 674.8e6, 0.05e6),
    ],
)
def test_parameter_counts(getkey, name, expected, tol):
    from eqdisp.models import make_model

    shapes = eqx.filter_eval_shape(make_model, name, key=getkey())  # nothing allocated
    assert abs(_count_params(shapes) - expected) <= tol


def test_trainable_leaves_are_exactly_the_parameters(getkey):
    # The fixed position embedding must not be a leaf (it would be trained and counted).
    model = _tiny(getkey)
    params = eqx.filter(model, eqx.is_inexact_array)
    assert _count_params(params) == _count_params(model)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    shapes = {leaf.shape for leaf in jax.tree.leaves(params)}
    assert (model.num_tokens, model.dim) not in shapes


def test_properties(getkey):
    model = _tiny(getkey)
    assert (model.depth, model.dim, model.num_heads, model.patch_size) == (6, 192, 3, 2)
    assert (model.grid_size, model.num_tokens, model.num_classes) == (4, 16, 10)
    assert model.out_channels == 4
    assert _tiny(getkey, learn_sigma=False).out_channels == 4
    from eqdisp.models import make_model

    assert make_model("DiT-T/2", key=getkey(), **_TINY).out_channels == 8


@pytest.mark.parametrize(
    "name, overrides, fragment",
    [
        ("SiT-Q/2", {}, "'SiT-Q/2'"),
        ("SiT-B/3", {}, "'SiT-B/3'"),
        ("ViT-B/2", {}, "'ViT-B/2'"),
        ("SiT-T/4", {"input_size": 30}, "input_size=30"),
        ("SiT-T/2", {"block_impl": "loop"}, "'loop'"),
        ("SiT-T/2", {"dtype": "float16"}, "'float16'"),
        ("SiT-T/2", {"class_dropout_prob": 1.0}, "1.0"),
        ("SiT-T/2", {"depth": 3}, "depth"),
        ("SiT-T/2", {"attention": "cudnn"}, "needs bfloat16"),
        ("SiT-T/2", {"remat": "some"}, "'some'"),
    ],
)
def test_bad_names_and_configs(getkey, name, overrides, fragment):
    from eqdisp.config import ConfigError
    from eqdisp.models import make_model

    # A Literal field given a bad string is caught by the test-time type checker first
    # (jaxtyping's TypeCheckError, a TypeError); without it ModelConfig raises ConfigError.
    literal_field = set(overrides) & {"block_impl", "dtype", "remat"}
    with pytest.raises((ConfigError, ValueError, TypeError)) as info:
        make_model(name, key=getkey(), **overrides)
    message = str(info.value)
    assert fragment in message
    if not literal_field:
        assert "\n" not in message  # one line for the user


def test_bad_architecture(getkey):
    from eqdisp.models import DiffusionTransformer

    kwargs = {"input_size": 8, "in_channels": 4, "patch_size": 2, "depth": 1, "num_classes": 3}
    kwargs["key"] = getkey()
    with pytest.raises(ValueError, match="dim=100 is not divisible by num_heads=3"):
        DiffusionTransformer(dim=100, num_heads=3, **kwargs)
    with pytest.raises(ValueError, match="dim=18"):
        DiffusionTransformer(dim=18, num_heads=3, **kwargs)


def test_make_model_from_config(getkey):
    from eqdisp.config import ModelConfig
    from eqdisp.models import make_model

    config = ModelConfig(name="DiT-T/4", input_size=16, num_classes=7)
    model = make_model(config, key=getkey(), block_impl="scan")
    assert (model.family, model.patch_size, model.input_size, model.block_impl) == (
        "DiT",
        4,
        16,
        "scan",
    )
    assert model.y_embedder.embedding_table.shape == (8, 192)


# ---------------------------------------------------------------------------------------------
# Embedders: layouts and known values


def test_pos_embed_known_values():
    from eqdisp.models import sincos_pos_embed_2d

    dim, grid = 16, 4
    pe = sincos_pos_embed_2d(dim, grid)
    assert pe.shape == (grid * grid, dim) and pe.dtype == np.float32
    omega = 10000.0 ** (-np.arange(dim // 4) / (dim / 4))
    for i, j in [(0, 0), (1, 2), (3, 1), (2, 3)]:
        k = i * grid + j  # row-major tokens
        expected = np.concatenate(
            [np.sin(j * omega), np.cos(j * omega), np.sin(i * omega), np.cos(i * omega)]
        )
        np.testing.assert_allclose(pe[k], expected, rtol=0, atol=1e-7)


def test_timestep_embedding_cos_first():
    from eqdisp.models import timestep_embedding

    emb0 = timestep_embedding(jnp.array(0.0, jnp.float32))
    assert emb0.shape == (256,) and emb0.dtype == jnp.float32
    np.testing.assert_array_equal(emb0, np.concatenate([np.ones(128), np.zeros(128)]))
    t = 1.5
    emb = np.asarray(timestep_embedding(jnp.array(t, jnp.float32)))
    freqs = np.exp(-math.log(10000.0) * np.arange(128) / 128)
    np.testing.assert_allclose(emb[:128], np.cos(t * freqs), atol=1e-6)
    np.testing.assert_allclose(emb[128:], np.sin(t * freqs), atol=1e-6)
    # DiT's integer steps are used as given (no rescaling).
    emb999 = np.asarray(timestep_embedding(jnp.array(999.0, jnp.float32)))
    np.testing.assert_allclose(emb999[0], math.cos(999.0), atol=1e-4)


def test_patchify_order():
    from eqdisp.models import patchify

    c, size, p = 3, 8, 2
    grid = size // p
    x = jnp.arange(c * size * size, dtype=jnp.float32).reshape(c, size, size)
    tokens = np.asarray(patchify(x, p))
    assert tokens.shape == (grid * grid, c * p * p)
    for i, j, ch, a, b in [(0, 0, 0, 0, 0), (1, 2, 2, 1, 0), (3, 1, 1, 0, 1)]:
        # token i*G + j, feature (c, kh, kw)
        assert tokens[i * grid + j, ch * p * p + a * p + b] == x[ch, i * p + a, j * p + b]


def test_unpatchify_order_and_round_trip():
    from eqdisp.models import patchify, unpatchify

    c, size, p = 3, 8, 2
    grid = size // p
    tokens = jnp.arange(grid * grid * p * p * c, dtype=jnp.float32).reshape(grid * grid, p * p * c)
    out = np.asarray(unpatchify(tokens, p, c))
    assert out.shape == (c, size, size)
    for i, j, ch, a, b in [(0, 0, 0, 0, 0), (1, 2, 2, 1, 0), (3, 1, 1, 0, 1)]:
        # output token vectors are ordered (kh, kw, c), c fastest
        assert out[ch, i * p + a, j * p + b] == tokens[i * grid + j, (a * p + b) * c + ch]
    # Round trip once the (c, kh, kw) input order is permuted to (kh, kw, c).
    x = jax.random.normal(jax.random.key(0), (c, size, size), jnp.float32)
    patches = patchify(x, p).reshape(grid * grid, c, p, p).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(unpatchify(patches.reshape(grid * grid, -1), p, c), x)


def test_patch_embed_is_a_strided_conv(getkey):
    from eqdisp.models import PatchEmbed

    c, dim, p = 4, 8, 2
    embed = PatchEmbed(c, dim, p, key=getkey())
    embed = eqx.tree_at(
        lambda e: e.proj.bias, embed, jax.random.normal(getkey(), (dim,), jnp.float32)
    )
    x = jax.random.normal(getkey(), (c, 8, 8), jnp.float32)
    kernel = embed.proj.weight.reshape(dim, c, p, p)  # the PyTorch Conv2d weight layout
    conv = (
        jax.lax.conv_general_dilated(
            x[None], kernel, (p, p), "VALID", precision=jax.lax.Precision.HIGHEST
        )[0]
        + embed.proj.bias[:, None, None]
    )
    expected = conv.reshape(dim, -1).T  # tokens row-major over the grid
    np.testing.assert_allclose(embed(x), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Initialisation


def _xavier_bound(weight):
    out_features, in_features = weight.shape
    return math.sqrt(6.0 / (in_features + out_features))


def test_init_statistics(getkey):
    from eqdisp.models import make_model

    model = make_model("SiT-T/2", key=getkey(), input_size=8)  # T: D=192, big enough for statistics
    block0 = model.block(0)
    for weight in [
        block0.qkv.weight,
        block0.proj.weight,
        block0.fc1.weight,
        block0.fc2.weight,
        model.x_embedder.proj.weight,
    ]:
        bound = _xavier_bound(weight)
        assert float(jnp.max(jnp.abs(weight))) <= bound
        assert float(jnp.max(jnp.abs(weight))) > 0.99 * bound
        np.testing.assert_allclose(float(jnp.std(weight)), bound / math.sqrt(3.0), rtol=0.03)
    # qkv is xavier on the fused (3D, D) matrix, fan_out = 3D.
    assert block0.qkv.weight.shape == (3 * 192, 192)
    assert model.x_embedder.proj.weight.shape == (192, 4 * 2 * 2)
    for weight in [
        model.t_embedder.mlp_in.weight,
        model.t_embedder.mlp_out.weight,
        model.y_embedder.embedding_table,
    ]:
        np.testing.assert_allclose(float(jnp.std(weight)), 0.02, rtol=0.03)
        assert abs(float(jnp.mean(weight))) < 1e-3
    assert model.y_embedder.embedding_table.shape == (1001, 192)
    zero = [
        model.blocks.adaln_modulation.weight,
        model.blocks.adaln_modulation.bias,
        model.final_layer.adaln_modulation.weight,
        model.final_layer.adaln_modulation.bias,
        model.final_layer.linear.weight,
        model.final_layer.linear.bias,
    ]
    biases = [
        model.x_embedder.proj.bias,
        model.t_embedder.mlp_in.bias,
        model.t_embedder.mlp_out.bias,
        model.blocks.qkv.bias,
        model.blocks.proj.bias,
        model.blocks.fc1.bias,
        model.blocks.fc2.bias,
    ]
    for array in zero + biases:
        assert not jnp.any(array)
    # Blocks are independently initialised along the stacked axis.
    assert not jnp.allclose(model.blocks.qkv.weight[0], model.blocks.qkv.weight[1])


@pytest.mark.parametrize("name, channels", [("SiT-T/2", 4), ("DiT-T/2", 8)])
def test_output_is_zero_at_init(getkey, name, channels):
    from eqdisp.models import make_model

    model = make_model(name, key=getkey(), **_TINY)
    x, t, y = _example(getkey(), model)
    out = model(x, t, y)
    assert out.shape == (channels, 8, 8) and out.dtype == jnp.float32
    assert not jnp.any(out)


# ---------------------------------------------------------------------------------------------
# Forward: taps, scan vs unroll, batching, label dropout, precision


def test_taps_are_the_residual_stream(getkey):
    model = _perturb(_tiny(getkey), getkey())
    x, t, y = _example(getkey(), model)
    out, taps = eqx.filter_jit(model.forward_with_taps)(x, t, y)
    assert taps.blocks.shape == (model.depth, model.num_tokens, model.dim)
    assert taps.c.shape == (model.dim,)
    h = model.embed(x)
    c = model.condition(t, y)
    np.testing.assert_allclose(taps.c, c, rtol=1e-5, atol=1e-6)  # jit vs eager rounding
    for k in range(model.depth):
        h = model.block(k)(h, c)
        np.testing.assert_allclose(taps.blocks[k], h, rtol=1e-5, atol=1e-5)
    # The final layer consumes the last tap.
    head = model.unpatchify(model.final_layer(taps.blocks[-1], taps.c))
    np.testing.assert_allclose(out, head[: model.in_channels], rtol=1e-5, atol=1e-6)
    assert float(jnp.std(out)) > 1e-3  # the perturbed model does something


def test_scan_equals_unroll(getkey):
    init_key, noise_key = getkey(), getkey()
    unrolled, scanned = (
        _perturb(_tiny(lambda: init_key, block_impl=impl), noise_key) for impl in ("unroll", "scan")
    )
    assert (unrolled.block_impl, scanned.block_impl) == ("unroll", "scan")
    x, t, y = _example(getkey(), unrolled)

    def loss(model):
        out, taps = model.forward_with_taps(x, t, y)
        return jnp.mean(jnp.square(out)) + jnp.mean(jnp.square(taps.blocks[2]))

    (out_u, taps_u), (out_s, taps_s) = (
        eqx.filter_jit(m.forward_with_taps)(x, t, y) for m in (unrolled, scanned)
    )
    np.testing.assert_allclose(out_u, out_s, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(taps_u.blocks, taps_s.blocks, rtol=1e-5, atol=1e-5)
    grad_u = eqx.filter_jit(eqx.filter_grad(loss))(unrolled)
    grad_s = eqx.filter_jit(eqx.filter_grad(loss))(scanned)
    for gu, gs in zip(jax.tree.leaves(grad_u), jax.tree.leaves(grad_s)):
        np.testing.assert_allclose(gu, gs, rtol=1e-4, atol=1e-6)


def test_attention_implementations_agree(getkey):
    """`jax.nn.dot_product_attention` (XLA) computes what the einsum attention computes."""
    init_key, noise_key = getkey(), getkey()
    einsum, xla = (
        _perturb(_tiny(lambda: init_key, attention=impl), noise_key) for impl in ("einsum", "xla")
    )
    xs = jax.random.normal(getkey(), (3, 4, 8, 8), jnp.float32)
    ts = jnp.array([0.1, 0.5, 0.9], jnp.float32)
    ys = jnp.array([0, 5, 10], jnp.int32)

    def loss(model):
        out, taps = jax.vmap(model.forward_with_taps)(xs, ts, ys)
        return jnp.mean(jnp.square(out)) + jnp.mean(jnp.square(taps.blocks))

    values = [eqx.filter_jit(eqx.filter_value_and_grad(loss))(m) for m in (einsum, xla)]
    (value_e, grad_e), (value_x, grad_x) = values
    assert float(value_e) > 1e-3
    np.testing.assert_allclose(value_e, value_x, rtol=1e-5)
    for ge, gx in zip(jax.tree.leaves(grad_e), jax.tree.leaves(grad_x)):
        np.testing.assert_allclose(ge, gx, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "backend, version, dtype, explicit, expected",
    [
        ("cpu", "cpu", "float32", {}, ("scan", "einsum", "dots", "dots")),
        ("cpu", "cpu", "bfloat16", {}, ("scan", "einsum", "dots", "dots")),
        ("gpu", "cuda 13000", "bfloat16", {}, ("unroll", "cudnn", "none", "cast")),
        ("gpu", "cuda 13000", "float32", {}, ("unroll", "einsum", "none", "cast")),
        ("gpu", "rocm 6.3", "bfloat16", {}, ("unroll", "einsum", "none", "cast")),
        ("tpu", "PJRT C API", "bfloat16", {}, ("unroll", "einsum", "none", "cast")),
        # Explicit choices are kept, each on its own.
        (
            "gpu",
            "cuda 13000",
            "bfloat16",
            {"block_impl": "scan", "attention": "xla"},
            ("scan", "xla", "none", "cast"),
        ),
        ("cpu", "cpu", "float32", {"remat": "full"}, ("scan", "einsum", "full", "dots")),
        ("cpu", "cpu", "bfloat16", {"bf16_mode": "cast"}, ("scan", "einsum", "dots", "cast")),
        ("tpu", "PJRT C API", "bfloat16", {"bf16_mode": "dots"}, ("unroll", "einsum", "none", "dots")),
    ],
)
def test_auto_implementation(backend, version, dtype, explicit, expected):
    from eqdisp.config import ModelConfig
    from eqdisp.models import resolve_implementation

    config = ModelConfig(name="SiT-T/2", dtype=dtype, **explicit)
    assert (
        tuple(resolve_implementation(config, backend=backend, platform_version=version)) == expected
    )


@pytest.mark.parametrize(
    "dtype, backend, isa, expected",
    [
        ("auto", "cpu", ["AMX", "AVX-512-BF16", "AVX-512", "AVX2"], "bfloat16"),
        ("auto", "cpu", ["AVX-512-BF16", "AVX-512", "AVX2"], "bfloat16"),
        ("auto", "cpu", ["AVX-512", "AVX2"], "float32"),  # bf16 dots would be upcast there
        ("auto", "gpu", ["AMX"], "float32"),
        ("float32", "cpu", ["AMX"], "float32"),
        ("bfloat16", "cpu", [], "bfloat16"),
    ],
)
def test_auto_dtype_is_bfloat16_only_on_cpus_with_bfloat16_units(dtype, backend, isa, expected):
    from eqdisp.config import ModelConfig
    from eqdisp.models import resolve_dtype

    assert resolve_dtype(ModelConfig(name="SiT-T/2", dtype=dtype), backend=backend, isa=isa) == expected


def test_auto_is_scan_einsum_and_remat_on_this_cpu(getkey):
    model = _tiny(getkey)
    assert (model.block_impl, model.blocks.attention_impl, model.remat, model.bf16_mode) == (
        "scan",
        "einsum",
        "dots",
        "dots",
    )


@pytest.mark.parametrize("block_impl", ["scan", "unroll"])
def test_remat_changes_nothing_but_speed(getkey, block_impl):
    """Recomputing in the backward pass gives the same loss and gradients as storing."""
    init_key, noise_key = getkey(), getkey()
    models = [
        _perturb(_tiny(lambda: init_key, block_impl=block_impl, remat=r), noise_key)
        for r in ("none", "dots", "full")
    ]
    xs = jax.random.normal(getkey(), (3, 4, 8, 8), jnp.float32)
    ts = jnp.array([0.1, 0.5, 0.9], jnp.float32)
    ys = jnp.array([0, 5, 10], jnp.int32)

    def loss(model):
        out, taps = jax.vmap(model.forward_with_taps)(xs, ts, ys)
        return jnp.mean(jnp.square(out)) + jnp.mean(jnp.square(taps.blocks[:, 2]))

    (value, grad), *others = [eqx.filter_jit(eqx.filter_value_and_grad(loss))(m) for m in models]
    assert float(value) > 1e-3
    for other_value, other_grad in others:
        np.testing.assert_allclose(other_value, value, rtol=1e-6)
        for g, h in zip(jax.tree.leaves(grad), jax.tree.leaves(other_grad)):
            np.testing.assert_allclose(h, g, rtol=1e-4, atol=1e-7)


def test_vmap_matches_per_example(getkey):
    model = _perturb(_tiny(getkey), getkey())
    batch = 3
    xs = jax.random.normal(getkey(), (batch, 4, 8, 8), jnp.float32)
    ts = jnp.linspace(0.1, 0.9, batch, dtype=jnp.float32)
    ys = jnp.array([0, 5, 10], jnp.int32)  # 10 is the null label
    out, taps = eqx.filter_jit(lambda m, *a: jax.vmap(m.forward_with_taps)(*a))(model, xs, ts, ys)
    assert out.shape == (batch, 4, 8, 8) and taps.blocks.shape == (batch, 6, 16, 192)
    for i in range(batch):
        np.testing.assert_allclose(out[i], model(xs[i], ts[i], ys[i]), rtol=1e-5, atol=1e-6)


def test_label_dropout_only_with_key(getkey):
    model = _tiny(getkey, class_dropout_prob=0.5)
    table = model.y_embedder.embedding_table
    assert table.shape == (model.num_classes + 1, model.dim)  # the null row exists
    x, t, y = _example(getkey(), model)
    c_label = model.condition(t, y)
    c_null = model.condition(t, jnp.array(model.num_classes, jnp.int32))
    np.testing.assert_allclose(c_null - model.t_embedder(t), table[model.num_classes], atol=1e-7)
    # No key: deterministic, never dropped.
    np.testing.assert_array_equal(model.forward_with_taps(x, t, y)[1].c, c_label)
    # With keys: each label is independently kept or replaced by the null label.
    keys = jax.random.split(getkey(), 64)
    cs = eqx.filter_jit(jax.vmap(lambda k: model.forward_with_taps(x, t, y, key=k)[1].c))(keys)
    is_null = jnp.all(jnp.isclose(cs, c_null, atol=1e-6), axis=1)
    is_label = jnp.all(jnp.isclose(cs, c_label, atol=1e-6), axis=1)
    assert bool(jnp.all(is_null ^ is_label))
    assert 16 <= int(jnp.sum(is_null)) <= 48  # Binomial(64, 0.5): 8 standard deviations
    # Probability 0: a key changes nothing.
    no_drop = _tiny(getkey, class_dropout_prob=0.0)
    np.testing.assert_array_equal(no_drop.condition(t, y, key=getkey()), no_drop.condition(t, y))


@pytest.mark.parametrize("bf16_mode, activations", [("cast", jnp.bfloat16), ("dots", jnp.float32)])
def test_bfloat16_compute(getkey, bf16_mode, activations):
    init_key, noise_key = getkey(), getkey()
    model32, model16 = (
        _perturb(_tiny(lambda: init_key, dtype=dtype, bf16_mode=bf16_mode), noise_key)
        for dtype in ("float32", "bfloat16")
    )
    x, t, y = _example(getkey(), model32)
    out32, _ = eqx.filter_jit(model32.forward_with_taps)(x, t, y)
    out16, taps16 = eqx.filter_jit(model16.forward_with_taps)(x, t, y)
    assert out16.dtype == jnp.float32
    # "cast" runs the network in bfloat16; "dots" rounds only the operands of the dots.
    assert taps16.blocks.dtype == activations and taps16.c.dtype == activations
    # bf16 has an 8-bit mantissa (relative step 2^-8 = 0.4%); after 6 blocks the error stays a few %.
    scale = float(jnp.max(jnp.abs(out32)))
    assert float(jnp.max(jnp.abs(out16 - out32))) < 0.05 * scale
    # Master weights stay float32 and gradients arrive in float32.
    assert all(
        leaf.dtype == jnp.float32
        for leaf in jax.tree.leaves(eqx.filter(model16, eqx.is_inexact_array))
    )
    loss = lambda m: jnp.mean(jnp.square(m(x, t, y)))
    grads = eqx.filter_jit(eqx.filter_grad(loss))(model16)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(grads))
    assert float(jnp.abs(grads.blocks.qkv.weight).max()) > 0
    # The gradients are those of the float32 network to bfloat16 accuracy (each leaf within 5%
    # of its float32 norm: bf16 rounds to 0.4% per operand, compounded over 6 blocks).
    grads32 = eqx.filter_jit(eqx.filter_grad(loss))(model32)
    for g16, g32 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads32)):
        norm = float(jnp.linalg.norm(g32))
        assert float(jnp.linalg.norm(g16 - g32)) <= 0.05 * norm + 1e-6


@pytest.mark.parametrize("block_impl", ["unroll", "scan"])
@pytest.mark.parametrize("tap_blocks", [(2,), (0, 5), (1, 2, 4), ()])
def test_tap_blocks_select_values_and_gradients(getkey, block_impl, tap_blocks):
    # Asking for some blocks returns exactly those rows of the full taps, and a loss on them has
    # the gradients of the same loss on the full taps (scan keeps them in its carry instead).
    model = _perturb(_tiny(getkey, block_impl=block_impl), getkey())
    x, t, y = _example(getkey(), model)
    weights = jnp.arange(1.0, len(tap_blocks) + 1)[:, None, None]

    def loss(model, selected):
        out, taps = model.forward_with_taps(x, t, y, tap_blocks=tap_blocks if selected else None)
        picked = taps.blocks if selected else taps.blocks[np.asarray(tap_blocks, int)]
        return jnp.mean(jnp.square(out)) + jnp.sum(weights * jnp.square(picked)), (out, picked)

    grad = eqx.filter_jit(eqx.filter_grad(loss, has_aux=True))
    (grads_sel, (out_sel, sel)), (grads_all, (out_all, all_)) = (
        grad(model, True),
        grad(model, False),
    )
    assert sel.shape == (len(tap_blocks), model.num_tokens, model.dim)
    np.testing.assert_allclose(out_sel, out_all, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sel, all_, rtol=1e-5, atol=1e-5)
    for gs, ga in zip(jax.tree.leaves(grads_sel), jax.tree.leaves(grads_all)):
        np.testing.assert_allclose(gs, ga, rtol=1e-4, atol=1e-4)  # sums ~ 50


def test_tap_blocks_in_bfloat16_under_scan(getkey):
    # The carried tap buffer takes the compute dtype and holds what the full taps hold.
    model = _tiny(getkey, block_impl="scan", dtype="bfloat16", bf16_mode="cast")
    model = _perturb(model, getkey())
    x, t, y = _example(getkey(), model)
    forward = eqx.filter_jit(model.forward_with_taps)
    _, every = forward(x, t, y)
    _, some = forward(x, t, y, tap_blocks=(1, 4))
    assert some.blocks.dtype == jnp.bfloat16 and some.blocks.shape[0] == 2
    np.testing.assert_allclose(
        np.asarray(some.blocks, np.float32),
        np.asarray(every.blocks[1::3], np.float32),
        rtol=2e-2,
        atol=2e-2,
    )


@pytest.mark.parametrize("tap_blocks", [(3, 2), (2, 2), (6,), (-1,)])
def test_bad_tap_blocks_are_one_line_errors(getkey, tap_blocks):
    model = _tiny(getkey)
    x, t, y = _example(getkey(), model)
    with pytest.raises(
        ValueError, match=r"^tap_blocks=.* increasing 0-based block indices below the depth 6"
    ):
        model.forward_with_taps(x, t, y, tap_blocks=tap_blocks)


@pytest.mark.parametrize("block_impl", ["unroll", "scan"])
def test_reading_one_tap_costs_nothing_extra(getkey, block_impl):
    # A loss that reads the tap it asked for must not pay for the others: compare the compiled
    # gradient programs of an output-only loss and the same plus a term on one tap. The programs
    # differ by that tap, its cotangent and the term, not by anything that scales with the depth
    # (under scan a stacked `ys` of every block would: XLA does not shrink it to a slice).
    model = _perturb(_tiny(getkey, block_impl=block_impl), getkey())
    params, static = eqx.partition(model, eqx.is_inexact_array)
    x, t, y = _example(getkey(), model)

    def loss(params, read_tap):
        model = eqx.combine(params, static)
        if not read_tap:
            return jnp.mean(jnp.square(model(x, t, y)))
        out, taps = model.forward_with_taps(x, t, y, tap_blocks=(2,))
        return jnp.mean(jnp.square(out)) + jnp.mean(jnp.square(taps.blocks[0]))

    base = jax.jit(jax.grad(lambda p: loss(p, False))).lower(params).compile()
    tap = jax.jit(jax.grad(lambda p: loss(p, True))).lower(params).compile()
    base_mem = base.memory_analysis().temp_size_in_bytes
    tap_mem = tap.memory_analysis().temp_size_in_bytes
    one_tap = model.num_tokens * model.dim * 4
    assert model.remat == "dots"  # the CPU default
    assert tap_mem <= base_mem + 4 * one_tap
