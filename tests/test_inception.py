"""Tests of eqdisp.eval._inception: the FID Inception-v3, its NumPy-checked blocks and its weight files.

Ground truth: `reference/state_dict_layouts.md` (key names, shapes) and `reference/meanflow_unet_fid.md`
§3 (FID patches, eps 1e-3, front ends, pool3 / sFID / IS taps). No weights are downloaded.
"""

import collections
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

# ----------------------------------------------------------------------------------------------
# The released file's layout (state_dict_layouts.md, "FID Inception-v3"): each BasicConv2d as
# "name O I kh kw", in file order; every conv has 4 BN vectors of length O; then fc.

_CONVS = """
Conv2d_1a_3x3 32 3 3 3
Conv2d_2a_3x3 32 32 3 3
Conv2d_2b_3x3 64 32 3 3
Conv2d_3b_1x1 80 64 1 1
Conv2d_4a_3x3 192 80 3 3
Mixed_5b.branch1x1 64 192 1 1
Mixed_5b.branch5x5_1 48 192 1 1
Mixed_5b.branch5x5_2 64 48 5 5
Mixed_5b.branch3x3dbl_1 64 192 1 1
Mixed_5b.branch3x3dbl_2 96 64 3 3
Mixed_5b.branch3x3dbl_3 96 96 3 3
Mixed_5b.branch_pool 32 192 1 1
Mixed_5c.branch1x1 64 256 1 1
Mixed_5c.branch5x5_1 48 256 1 1
Mixed_5c.branch5x5_2 64 48 5 5
Mixed_5c.branch3x3dbl_1 64 256 1 1
Mixed_5c.branch3x3dbl_2 96 64 3 3
Mixed_5c.branch3x3dbl_3 96 96 3 3
Mixed_5c.branch_pool 64 256 1 1
Mixed_5d.branch1x1 64 288 1 1
Mixed_5d.branch5x5_1 48 288 1 1
Mixed_5d.branch5x5_2 64 48 5 5
Mixed_5d.branch3x3dbl_1 64 288 1 1
Mixed_5d.branch3x3dbl_2 96 64 3 3
Mixed_5d.branch3x3dbl_3 96 96 3 3
Mixed_5d.branch_pool 64 288 1 1
Mixed_6a.branch3x3 384 288 3 3
Mixed_6a.branch3x3dbl_1 64 288 1 1
Mixed_6a.branch3x3dbl_2 96 64 3 3
Mixed_6a.branch3x3dbl_3 96 96 3 3
Mixed_6b.branch1x1 192 768 1 1
Mixed_6b.branch7x7_1 128 768 1 1
Mixed_6b.branch7x7_2 128 128 1 7
Mixed_6b.branch7x7_3 192 128 7 1
Mixed_6b.branch7x7dbl_1 128 768 1 1
Mixed_6b.branch7x7dbl_2 128 128 7 1
Mixed_6b.branch7x7dbl_3 128 128 1 7
Mixed_6b.branch7x7dbl_4 128 128 7 1
Mixed_6b.branch7x7dbl_5 192 128 1 7
Mixed_6b.branch_pool 192 768 1 1
Mixed_6c.branch1x1 192 768 1 1
Mixed_6c.branch7x7_1 160 768 1 1
Mixed_6c.branch7x7_2 160 160 1 7
Mixed_6c.branch7x7_3 192 160 7 1
Mixed_6c.branch7x7dbl_1 160 768 1 1
Mixed_6c.branch7x7dbl_2 160 160 7 1
Mixed_6c.branch7x7dbl_3 160 160 1 7
Mixed_6c.branch7x7dbl_4 160 160 7 1
Mixed_6c.branch7x7dbl_5 192 160 1 7
Mixed_6c.branch_pool 192 768 1 1
Mixed_6d.branch1x1 192 768 1 1
Mixed_6d.branch7x7_1 160 768 1 1
Mixed_6d.branch7x7_2 160 160 1 7
Mixed_6d.branch7x7_3 192 160 7 1
Mixed_6d.branch7x7dbl_1 160 768 1 1
Mixed_6d.branch7x7dbl_2 160 160 7 1
Mixed_6d.branch7x7dbl_3 160 160 1 7
Mixed_6d.branch7x7dbl_4 160 160 7 1
Mixed_6d.branch7x7dbl_5 192 160 1 7
Mixed_6d.branch_pool 192 768 1 1
Mixed_6e.branch1x1 192 768 1 1
Mixed_6e.branch7x7_1 192 768 1 1
Mixed_6e.branch7x7_2 192 192 1 7
Mixed_6e.branch7x7_3 192 192 7 1
Mixed_6e.branch7x7dbl_1 192 768 1 1
Mixed_6e.branch7x7dbl_2 192 192 7 1
Mixed_6e.branch7x7dbl_3 192 192 1 7
Mixed_6e.branch7x7dbl_4 192 192 7 1
Mixed_6e.branch7x7dbl_5 192 192 1 7
Mixed_6e.branch_pool 192 768 1 1
Mixed_7a.branch3x3_1 192 768 1 1
Mixed_7a.branch3x3_2 320 192 3 3
Mixed_7a.branch7x7x3_1 192 768 1 1
Mixed_7a.branch7x7x3_2 192 192 1 7
Mixed_7a.branch7x7x3_3 192 192 7 1
Mixed_7a.branch7x7x3_4 192 192 3 3
Mixed_7b.branch1x1 320 1280 1 1
Mixed_7b.branch3x3_1 384 1280 1 1
Mixed_7b.branch3x3_2a 384 384 1 3
Mixed_7b.branch3x3_2b 384 384 3 1
Mixed_7b.branch3x3dbl_1 448 1280 1 1
Mixed_7b.branch3x3dbl_2 384 448 3 3
Mixed_7b.branch3x3dbl_3a 384 384 1 3
Mixed_7b.branch3x3dbl_3b 384 384 3 1
Mixed_7b.branch_pool 192 1280 1 1
Mixed_7c.branch1x1 320 2048 1 1
Mixed_7c.branch3x3_1 384 2048 1 1
Mixed_7c.branch3x3_2a 384 384 1 3
Mixed_7c.branch3x3_2b 384 384 3 1
Mixed_7c.branch3x3dbl_1 448 2048 1 1
Mixed_7c.branch3x3dbl_2 384 448 3 3
Mixed_7c.branch3x3dbl_3a 384 384 1 3
Mixed_7c.branch3x3dbl_3b 384 384 3 1
Mixed_7c.branch_pool 192 2048 1 1
"""
_DOC = pathlib.Path("/work/shared/reference/state_dict_layouts.md")


def _layout(with_num_batches_tracked: bool) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for line in _CONVS.strip().splitlines():
        name, *dims = line.split()
        out = int(dims[0])
        shapes[f"{name}.conv.weight"] = tuple(int(d) for d in dims)
        for stat in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.bn.{stat}"] = (out,)
        if with_num_batches_tracked:
            shapes[f"{name}.bn.num_batches_tracked"] = ()
    shapes["fc.weight"] = (1008, 2048)
    shapes["fc.bias"] = (1008,)
    return shapes


def _synthetic_state(seed: int = 0) -> dict[str, np.ndarray]:
    """A random state dict with the real 566 keys (num_batches_tracked included), real shapes."""
    rng = np.random.default_rng(seed)
    state = {}
    for key, shape in _layout(with_num_batches_tracked=True).items():
        if key.endswith("num_batches_tracked"):
            state[key] = np.array(rng.integers(0, 1000), np.int64)
        else:
            state[key] = rng.standard_normal(shape).astype(np.float32)
    return state


def _float_part(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


# ----------------------------------------------------------------------------------------------
# A NumPy/SciPy-free float64 reimplementation (im2col) of the layers, following pytorch-fid.


def _np_conv(x, w_hwio, stride, padding):
    """Cross-correlation of one `h w c` image, zero padding `(ph, pw)`, float64."""
    ph, pw = padding
    x = np.pad(np.asarray(x, np.float64), ((ph, ph), (pw, pw), (0, 0)))
    kh, kw = w_hwio.shape[:2]
    patches = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(0, 1))
    patches = patches[::stride, ::stride]  # (ho, wo, c, kh, kw)
    return np.einsum("yxcij,ijco->yxo", patches, np.asarray(w_hwio, np.float64))


def _np_basic_conv(x, conv):
    y = _np_conv(x, conv.weight, conv.stride, conv.padding)
    mean, var = np.asarray(conv.bn_mean, np.float64), np.asarray(conv.bn_var, np.float64)
    gamma, beta = np.asarray(conv.bn_weight, np.float64), np.asarray(conv.bn_bias, np.float64)
    y = (y - mean) / np.sqrt(var + 1e-3) * gamma + beta  # TF Inception BN eps
    return np.maximum(y, 0.0)


def _np_pool(x, op, stride, padding, count_include_pad=True):
    fill = -np.inf if op == "max" else 0.0
    xp = np.pad(x, ((padding, padding), (padding, padding), (0, 0)), constant_values=fill)
    windows = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(0, 1))[::stride, ::stride]
    if op == "max":
        return windows.max(axis=(-2, -1))
    ones = np.pad(np.ones(x.shape[:2] + (1,)), ((padding, padding), (padding, padding), (0, 0)))
    counts = np.lib.stride_tricks.sliding_window_view(ones, (3, 3), axis=(0, 1))[::stride, ::stride]
    denominator = 9.0 if count_include_pad else counts.sum(axis=(-2, -1))
    return windows.sum(axis=(-2, -1)) / denominator


def _np_inception_a(x, b):
    pool = _np_pool(x, "avg", 1, 1, count_include_pad=False)  # FIDInceptionA
    return np.concatenate(
        [
            _np_basic_conv(x, b.branch1x1),
            _np_basic_conv(_np_basic_conv(x, b.branch5x5_1), b.branch5x5_2),
            _np_basic_conv(
                _np_basic_conv(_np_basic_conv(x, b.branch3x3dbl_1), b.branch3x3dbl_2),
                b.branch3x3dbl_3,
            ),
            _np_basic_conv(pool, b.branch_pool),
        ],
        axis=-1,
    )


def _np_inception_b(x, b):
    dbl = _np_basic_conv(_np_basic_conv(x, b.branch3x3dbl_1), b.branch3x3dbl_2)
    return np.concatenate(
        [
            _np_basic_conv(x, b.branch3x3),
            _np_basic_conv(dbl, b.branch3x3dbl_3),
            _np_pool(x, "max", 2, 0),
        ],
        axis=-1,
    )


def _np_inception_e_max(x, b):
    """FIDInceptionE_2 (Mixed_7c): the pool branch is a 3x3/1/pad-1 max pool."""
    b3 = _np_basic_conv(x, b.branch3x3_1)
    dbl = _np_basic_conv(_np_basic_conv(x, b.branch3x3dbl_1), b.branch3x3dbl_2)
    return np.concatenate(
        [
            _np_basic_conv(x, b.branch1x1),
            _np_basic_conv(b3, b.branch3x3_2a),
            _np_basic_conv(b3, b.branch3x3_2b),
            _np_basic_conv(dbl, b.branch3x3dbl_3a),
            _np_basic_conv(dbl, b.branch3x3dbl_3b),
            _np_basic_conv(_np_pool(x, "max", 1, 1), b.branch_pool),
        ],
        axis=-1,
    )


def _assert_close(actual, expected):
    expected = np.asarray(expected, np.float64)
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(
        np.asarray(actual, np.float64), expected, rtol=1e-5, atol=2e-6 * scale
    )


# ----------------------------------------------------------------------------------------------
# Forward pass


def test_shapes_from_any_input_size(getkey):
    from eqdisp.eval._inception import InceptionFeatures, InceptionV3FID

    model = eqx.filter_eval_shape(InceptionV3FID, key=getkey())
    for height, width in [(299, 299), (32, 48), (512, 400)]:
        image = jax.ShapeDtypeStruct((3, height, width), jnp.float32)
        features = eqx.filter_eval_shape(lambda m, x: m(x), model, image)
        assert isinstance(features, InceptionFeatures)
        assert features.pool3.shape == (2048,)
        assert features.spatial.shape == (7 * 17 * 17,) == (2023,)
        assert features.logits.shape == (1008,)
    batch = jax.ShapeDtypeStruct((5, 3, 64, 64), jnp.float32)
    batched = eqx.filter_eval_shape(lambda m, x: jax.vmap(m)(x), model, batch)
    assert (batched.pool3.shape, batched.spatial.shape, batched.logits.shape) == (
        (5, 2048),
        (5, 2023),
        (5, 1008),
    )


def test_inception_features_full_net(getkey):
    """One compile of the full net at 299 (inputs resized from 24 x 40); batching and padding."""
    from eqdisp.eval._inception import InceptionV3FID, inception_features

    model = InceptionV3FID(key=getkey())
    images = np.random.default_rng(0).integers(0, 256, (3, 24, 40, 3), dtype=np.uint8)
    out = inception_features(model, images, batch_size=2)  # second batch padded 1 -> 2
    assert {k: v.shape for k, v in out.items()} == {
        "pool3": (3, 2048),
        "spatial": (3, 2023),
        "logits": (3, 1008),
    }
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in out.values())
    assert out["pool3"].min() >= 0.0 and out["spatial"].min() >= 0.0  # after ReLU
    assert out["pool3"].std() > 0.0 and not np.allclose(out["pool3"][0], out["pool3"][1])
    # IS logits are fc.weight @ pool3 without the bias (ADM, torch-fidelity).
    expected = out["pool3"].astype(np.float64) @ np.asarray(model.fc_weight, np.float64).T
    _assert_close(out["logits"], expected)
    # Same compiled function, different batch composition: per-image results do not change.
    again = inception_features(model, images[1:], batch_size=2)
    for name in out:
        np.testing.assert_allclose(again[name], out[name][1:], rtol=1e-5, atol=1e-5)
    empty = inception_features(model, images[:0], batch_size=2)
    assert empty["pool3"].shape == (0, 2048)


@pytest.mark.parametrize(
    "kernel, stride, padding",
    [((3, 3), 2, 0), ((1, 7), 1, (0, 3)), ((7, 1), 1, (3, 0)), ((5, 5), 1, 2)],
)
def test_basic_conv_matches_numpy(getkey, kernel, stride, padding):
    from eqdisp.eval._inception import BasicConv2d

    conv = BasicConv2d(5, 6, kernel, stride=stride, padding=padding, key=getkey())
    x = jax.random.normal(getkey(), (11, 13, 5), jnp.float32)
    _assert_close(conv(x), _np_basic_conv(np.asarray(x), conv))


def test_mixed_5b_matches_numpy(getkey):
    """Inception-A (FID variant: the avg pool divides by the real pixel count) vs NumPy."""
    from eqdisp.eval._inception import InceptionA

    block = InceptionA(192, 32, key=getkey())
    x = jax.nn.relu(jax.random.normal(getkey(), (6, 7, 192), jnp.float32))
    out = eqx.filter_jit(block)(x)
    assert out.shape == (6, 7, 256)
    _assert_close(out, _np_inception_a(np.asarray(x), block))
    # The FID patch matters: including the padding in the average gives different border values.
    included = _np_pool(np.asarray(x, np.float64), "avg", 1, 1, count_include_pad=True)
    excluded = _np_pool(np.asarray(x, np.float64), "avg", 1, 1, count_include_pad=False)
    assert not np.allclose(included[0], excluded[0]) and np.allclose(included[3, 3], excluded[3, 3])


def test_mixed_6a_matches_numpy(getkey):
    from eqdisp.eval._inception import InceptionB

    block = InceptionB(288, key=getkey())
    x = jax.nn.relu(jax.random.normal(getkey(), (9, 9, 288), jnp.float32))
    out = eqx.filter_jit(block)(x)
    assert out.shape == (4, 4, 768)
    _assert_close(out, _np_inception_b(np.asarray(x), block))


def test_mixed_7c_matches_numpy(getkey):
    """FIDInceptionE_2: max pool in the pool branch."""
    from eqdisp.eval._inception import InceptionE

    block = InceptionE(2048, "max", key=getkey())
    x = jax.nn.relu(jax.random.normal(getkey(), (4, 5, 2048), jnp.float32))
    out = eqx.filter_jit(block)(x)
    assert out.shape == (4, 5, 2048)
    _assert_close(out, _np_inception_e_max(np.asarray(x), block))


def test_resize_grids():
    """TF1 ResizeBilinear (src = dst * in/out) vs PyTorch align_corners=False (half-pixel)."""
    from eqdisp.eval._inception import resize_bilinear

    ramp = jnp.arange(4.0).reshape(4, 1, 1) * jnp.ones((1, 4, 1))

    def column(frontend, size):
        return np.asarray(resize_bilinear(ramp, frontend, size))[:, 0, 0]

    np.testing.assert_allclose(column("tf1", 8), [0, 0.5, 1, 1.5, 2, 2.5, 3, 3])
    np.testing.assert_allclose(column("pytorch_fid", 8), [0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3])
    np.testing.assert_allclose(column("tf1", 2), [0, 2])
    np.testing.assert_allclose(column("pytorch_fid", 2), [0.5, 2.5])
    image = jax.random.uniform(jax.random.key(1), (299, 299, 3), jnp.float32)
    assert resize_bilinear(image, "tf1") is image  # 299 in, 299 out: identity in both front ends


# ----------------------------------------------------------------------------------------------
# State dicts and weight files


def test_state_dict_round_trip_real_layout():
    from eqdisp.eval._inception import (
        expected_state_shapes,
        model_to_state_dict,
        state_dict_to_model,
    )

    assert expected_state_shapes() == _layout(with_num_batches_tracked=False)
    assert len(_layout(with_num_batches_tracked=True)) == 566
    state = _synthetic_state()
    model = state_dict_to_model(state)  # num_batches_tracked present: ignored
    back = model_to_state_dict(model)
    floats = _float_part(state)
    assert list(back) == list(floats) and len(back) == 472
    assert sum(v.size for v in back.values()) == 23_885_392
    for key, value in floats.items():
        assert back[key].dtype == np.float32 and np.array_equal(back[key], value), key
    # Conv kernels are stored HWIO for NHWC convolutions.
    kernel = model.Mixed_6b.branch7x7_2.weight
    assert kernel.shape == (1, 7, 128, 128)
    np.testing.assert_array_equal(
        kernel, state["Mixed_6b.branch7x7_2.conv.weight"].transpose(2, 3, 1, 0)
    )
    assert model.Mixed_7c.pool == "max" and model.Mixed_7b.pool == "avg"
    again = model_to_state_dict(state_dict_to_model(back))  # without num_batches_tracked
    assert all(np.array_equal(again[k], back[k]) for k in back)


@pytest.mark.skipif(not _DOC.is_file(), reason="the shared reference docs are not present")
def test_layout_table_matches_reference_doc():
    text = _DOC.read_text().split("## FID Inception-v3")[1].split("~~~")[1]
    rows = [line.split("\t") for line in text.strip().splitlines()[1:]]
    doc = {
        key: tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
        for key, shape, *_ in rows
    }
    assert doc == _layout(with_num_batches_tracked=True)
    assert list(doc) == list(_layout(with_num_batches_tracked=True))


def test_state_dict_errors_are_one_line():
    from eqdisp.eval._inception import InceptionWeightsError, state_dict_to_model

    state = _float_part(_synthetic_state())
    missing = dict(state)
    del missing["Mixed_6d.branch1x1.bn.running_var"]
    with pytest.raises(InceptionWeightsError, match="1 missing") as info:
        state_dict_to_model(missing)
    assert "\n" not in str(info.value)
    bad = dict(state, **{"fc.weight": np.zeros((1000, 2048), np.float32)})
    with pytest.raises(InceptionWeightsError, match=r"fc.weight has shape \(1000, 2048\)"):
        state_dict_to_model(bad)
    with pytest.raises(InceptionWeightsError, match="unexpected"):
        state_dict_to_model(dict(state, **{"AuxLogits.fc.weight": np.zeros((1, 1), np.float32)}))


# Weight files in every format `load_inception` accepts, written without torch (`torchfiles`); the
# reader itself is tested in test_io.py.


@pytest.mark.parametrize("fmt", ["zip", "legacy", "safetensors", "npz"])
def test_load_inception_from_every_format(tmp_path, fmt):
    from safetensors.numpy import save_file
    from torchfiles import write_torch_file

    from eqdisp.eval._inception import load_inception, model_to_state_dict

    state = _synthetic_state(seed=1)
    path = tmp_path / ("inception.npz" if fmt == "npz" else "pt_inception-2015-12-05-6726825d.pth")
    if fmt in ("zip", "legacy"):
        write_torch_file(path, collections.OrderedDict(state), legacy=fmt == "legacy")
    elif fmt == "safetensors":
        save_file(state, path)  # any suffix: the format is told by content
    else:
        np.savez(path, **_float_part(state))
    back = model_to_state_dict(load_inception(path))
    assert all(np.array_equal(back[k], v) for k, v in _float_part(state).items())


def test_load_inception_runs_no_code_from_the_file(tmp_path):
    from torchfiles import Global, Reduce, write_torch_file

    from eqdisp.eval._inception import InceptionWeightsError, load_inception, model_to_state_dict

    marker = tmp_path / "pwned"
    mkdir = Reduce(Global("posix", "mkdir"), (str(marker),))
    state = _synthetic_state(seed=2)
    path = tmp_path / "evil.pth"
    # The call rides along in a real state dict: the weights load, the call stays a record.
    write_torch_file(path, collections.OrderedDict(state, x=mkdir))
    back = model_to_state_dict(load_inception(path))
    assert np.array_equal(back["fc.weight"], state["fc.weight"]) and not marker.exists()
    write_torch_file(path, {"x": mkdir})
    with pytest.raises(InceptionWeightsError, match="holds no tensors") as info:
        load_inception(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value) and not marker.exists()
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(InceptionWeightsError, match="not a weight file") as info:
        load_inception(garbage)
    assert "\n" not in str(info.value)


def test_missing_file_is_one_line_error(tmp_path, monkeypatch):
    from eqdisp.eval._inception import InceptionWeightsError, load_inception

    path = tmp_path / "nowhere" / "pt_inception-2015-12-05-6726825d.pth"
    with pytest.raises(InceptionWeightsError) as info:
        load_inception(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert "EQDISP_INCEPTION" in message and "github.com/mseitzer/pytorch-fid/releases" in message
    monkeypatch.setenv("EQDISP_INCEPTION", str(tmp_path / "from_env.pth"))
    with pytest.raises(InceptionWeightsError, match="from_env.pth"):
        load_inception()
    monkeypatch.delenv("EQDISP_INCEPTION")
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(InceptionWeightsError, match=r"\.cache/eqdisp/pt_inception-2015-12-05"):
        load_inception()
