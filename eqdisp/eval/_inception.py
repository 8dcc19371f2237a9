"""The FID Inception-v3 (TF graph 2015-12-05, pytorch-fid layout) in Equinox, and its weight loader.

Facts from pytorch-fid `src/pytorch_fid/inception.py`, torch-fidelity
`torch_fidelity/feature_extractor_inceptionv3.py` (`FeatureExtractorInceptionV3`) and
guided-diffusion `evaluations/evaluator.py`:

- Architecture = pytorch-fid's `fid_inception_v3`: torchvision Inception3 with 1008 classes, no aux
  head, and the FID patches (`FIDInceptionA`, `FIDInceptionC`, `FIDInceptionE_1`,
  `FIDInceptionE_2`): the 3x3/1 average pools of Mixed_5b-d, Mixed_6b-e and Mixed_7b exclude the
  padding (`count_include_pad=False`); Mixed_7c's pool branch is a 3x3/1 *max* pool.
  Every BasicConv2d is conv (no bias) + inference BatchNorm (eps = 1e-3) + ReLU.
- Input convention of this module: **float pixel values in [0, 255], channels first**
  (`uint8.astype(float32)`; from [-1, 1] model outputs use `eqdisp.images.to_uint8`, which also
  quantises, as every FID pipeline does). Two front ends, chosen by `frontend`:
  `"tf1"` (default; ADM / TF graph / torch-fidelity's `interpolate_bilinear_2d_like_tensorflow1x`):
  TF1 `ResizeBilinear` to 299 with `src = dst * in / out`, then `(x - 128) / 128`;
  `"pytorch_fid"`: `F.interpolate(bilinear, align_corners=False)` (half-pixel centres) on
  `x / 255`, then `2x - 1`.
- Features (ADM's `evaluator.py`): `pool3` = global average of Mixed_7c (2048); `spatial` = ReLU
  output of Mixed_6d.branch1x1 (TF `mixed_6/conv`), first 7 channels, flattened H, W, C
  (17*17*7 = 2023, sFID); `logits` = `fc.weight @ pool3` **without** the bias (1008 classes;
  ADM's `softmax/logits/MatMul` and torch-fidelity's `logits_unbiased`, both used for the
  Inception Score).
- Computation is NHWC with HWIO kernels (XLA:CPU's native layout). BatchNorm is folded into the
  conv at call time; the module stores the file's raw tensors so the state dict round-trips exactly.

Weight files are never downloaded: `load_inception` reads a `.pth` (without torch, through
`eqdisp.io.read_state_dict`, whose unpickler runs no code from the file), or a `.safetensors` or
`.npz` with the same keys.
"""

import math
import os
import pathlib
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float, PRNGKeyArray, UInt8

from ..io import WeightsError, read_state_dict

Frontend = Literal["tf1", "pytorch_fid"]

WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILENAME
)
WEIGHTS_ENV = "EQDISP_INCEPTION"
"""Environment variable naming the weight file (`load_inception` with no path reads it)."""

_BN_EPS = 1e-3  # TF Inception's BatchNorm epsilon (as in pytorch-fid), not PyTorch's 1e-5.
_SIZE = 299
_NUM_CLASSES = 1008
_SPATIAL_CHANNELS = 7  # ADM keeps the first 7 channels of mixed_6/conv (`evaluator.py`).


class InceptionWeightsError(WeightsError):
    """The Inception weight file is missing or unreadable, or not the FID Inception's weights.

    The message is one line for the user. A `WeightsError` (of `eqdisp.io`), so loaders that
    catch that catch this too.
    """


def default_weights_path() -> pathlib.Path:
    """Where `load_inception` looks without a path: `$EQDISP_INCEPTION`, else
    `~/.cache/eqdisp/pt_inception-2015-12-05-6726825d.pth`."""
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        return pathlib.Path(env).expanduser()
    return pathlib.Path("~/.cache/eqdisp").expanduser() / WEIGHTS_FILENAME


# ----------------------------------------------------------------------------------------------
# Layers


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _numpy_rng(key: PRNGKeyArray) -> np.random.Generator | None:
    """A NumPy generator seeded by the key's bits, or None when the key is traced."""
    try:
        bits = np.asarray(jax.random.key_data(key))
    except jax.errors.TracerArrayConversionError:
        return None
    return np.random.default_rng(bits.ravel().tolist())


# Random init draws with NumPy, seeded by the key's bits, when the key is concrete: eager
# jax.random compiles one kernel per shape (about 40 s for the whole net on this CPU), and these
# weights only stand in for the file. Under tracing (`eqx.filter_eval_shape`) jax.random is used.


def _normal(key: PRNGKeyArray, shape: tuple[int, ...]) -> Float[Array, "..."]:
    if (rng := _numpy_rng(key)) is None:
        return jax.random.normal(key, shape, jnp.float32)
    return jnp.asarray(rng.standard_normal(shape, np.float32))


def _uniform(
    key: PRNGKeyArray, shape: tuple[int, ...], low: float, high: float
) -> Float[Array, "..."]:
    if (rng := _numpy_rng(key)) is None:
        return jax.random.uniform(key, shape, jnp.float32, low, high)
    return jnp.asarray(rng.uniform(low, high, shape).astype(np.float32))


class BasicConv2d(eqx.Module):
    """Conv (no bias) + inference BatchNorm (eps 1e-3) + ReLU, on one `h w c` image."""

    weight: Float[Array, "kh kw cin cout"]
    bn_weight: Float[Array, " cout"]
    bn_bias: Float[Array, " cout"]
    bn_mean: Float[Array, " cout"]
    bn_var: Float[Array, " cout"]
    stride: int = eqx.field(static=True)
    padding: tuple[int, int] = eqx.field(static=True)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int | tuple[int, int],
        *,
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
        key: PRNGKeyArray,
    ):
        """Random weights (He-normal kernel, BatchNorm statistics near identity).

        **Arguments:**

        - `in_channels`, `out_channels`: channel counts.
        - `kernel`: `k` or `(kh, kw)`; `padding`: `p` or `(ph, pw)`, zeros on both sides.
        - `stride`: the same in both directions.
        - `key`: a PRNG key.
        """
        kh, kw = _pair(kernel)
        w_key, gamma_key, beta_key, mean_key, var_key = jax.random.split(key, 5)
        std = math.sqrt(2.0 / (in_channels * kh * kw))
        self.weight = std * _normal(w_key, (kh, kw, in_channels, out_channels))
        self.bn_weight = _uniform(gamma_key, (out_channels,), 0.5, 1.5)
        self.bn_bias = 0.1 * _normal(beta_key, (out_channels,))
        self.bn_mean = 0.1 * _normal(mean_key, (out_channels,))
        self.bn_var = _uniform(var_key, (out_channels,), 0.5, 1.5)
        self.stride = stride
        self.padding = _pair(padding)

    def __call__(self, x: Float[Array, "h w cin"]) -> Float[Array, "h2 w2 cout"]:
        scale = self.bn_weight * lax.rsqrt(self.bn_var + _BN_EPS)
        shift = self.bn_bias - self.bn_mean * scale
        (ph, pw) = self.padding
        y = lax.conv_general_dilated(
            x[None],
            self.weight * scale,
            window_strides=(self.stride, self.stride),
            padding=((ph, ph), (pw, pw)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=lax.Precision.HIGHEST,
        )[0]
        return jax.nn.relu(y + shift)


def _max_pool(x: Float[Array, "h w c"], stride: int, padding: int) -> Float[Array, "h2 w2 c"]:
    """3x3 max pool; padding counts as -inf (PyTorch `max_pool2d`)."""
    pads = ((padding, padding), (padding, padding), (0, 0))
    init = jnp.array(-jnp.inf, x.dtype)
    return lax.reduce_window(x, init, lax.max, (3, 3, 1), (stride, stride, 1), pads)


def _avg_pool_exclude_pad(x: Float[Array, "h w c"]) -> Float[Array, "h w c"]:
    """3x3/1/pad 1 average pool that divides by the number of real pixels (`count_include_pad=False`)."""
    height, width, _ = x.shape
    sums = lax.reduce_window(
        x, jnp.array(0.0, x.dtype), lax.add, (3, 3, 1), (1, 1, 1), ((1, 1), (1, 1), (0, 0))
    )

    def counts(n: int) -> np.ndarray:
        index = np.arange(n)
        return np.minimum(index + 1, n - 1) - np.maximum(index - 1, 0) + 1

    count = np.outer(counts(height), counts(width)).astype(np.float32)[:, :, None]
    return sums / count


# ----------------------------------------------------------------------------------------------
# Blocks (names = torchvision / pytorch-fid attribute names, so the state dict maps one to one)


class InceptionA(eqx.Module):
    """pytorch-fid `FIDInceptionA` (Mixed_5b/5c/5d): the pool branch excludes padding."""

    branch1x1: BasicConv2d
    branch5x5_1: BasicConv2d
    branch5x5_2: BasicConv2d
    branch3x3dbl_1: BasicConv2d
    branch3x3dbl_2: BasicConv2d
    branch3x3dbl_3: BasicConv2d
    branch_pool: BasicConv2d

    def __init__(self, in_channels: int, pool_features: int, *, key: PRNGKeyArray):
        keys = jax.random.split(key, 7)
        self.branch1x1 = BasicConv2d(in_channels, 64, 1, key=keys[0])
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1, key=keys[1])
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, key=keys[2])
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1, key=keys[3])
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, key=keys[4])
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, key=keys[5])
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1, key=keys[6])

    def __call__(self, x: Float[Array, "h w cin"]) -> Float[Array, "h w cout"]:
        branch1x1 = self.branch1x1(x)
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(_avg_pool_exclude_pad(x))
        return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(eqx.Module):
    """torchvision `InceptionB` (Mixed_6a): grid reduction 35 -> 17."""

    branch3x3: BasicConv2d
    branch3x3dbl_1: BasicConv2d
    branch3x3dbl_2: BasicConv2d
    branch3x3dbl_3: BasicConv2d

    def __init__(self, in_channels: int, *, key: PRNGKeyArray):
        keys = jax.random.split(key, 4)
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2, key=keys[0])
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1, key=keys[1])
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, key=keys[2])
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, key=keys[3])

    def __call__(self, x: Float[Array, "h w cin"]) -> Float[Array, "h2 w2 cout"]:
        branch3x3 = self.branch3x3(x)
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = _max_pool(x, stride=2, padding=0)
        return jnp.concatenate([branch3x3, branch3x3dbl, branch_pool], axis=-1)


class InceptionC(eqx.Module):
    """pytorch-fid `FIDInceptionC` (Mixed_6b-e): factorised 7x7, pool branch excludes padding."""

    branch1x1: BasicConv2d
    branch7x7_1: BasicConv2d
    branch7x7_2: BasicConv2d
    branch7x7_3: BasicConv2d
    branch7x7dbl_1: BasicConv2d
    branch7x7dbl_2: BasicConv2d
    branch7x7dbl_3: BasicConv2d
    branch7x7dbl_4: BasicConv2d
    branch7x7dbl_5: BasicConv2d
    branch_pool: BasicConv2d

    def __init__(self, in_channels: int, channels_7x7: int, *, key: PRNGKeyArray):
        c7 = channels_7x7
        keys = jax.random.split(key, 10)
        self.branch1x1 = BasicConv2d(in_channels, 192, 1, key=keys[0])
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1, key=keys[1])
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), key=keys[2])
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), key=keys[3])
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1, key=keys[4])
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), key=keys[5])
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), key=keys[6])
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), key=keys[7])
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), key=keys[8])
        self.branch_pool = BasicConv2d(in_channels, 192, 1, key=keys[9])

    def forward_with_branch1x1(
        self, x: Float[Array, "h w cin"]
    ) -> tuple[Float[Array, "h w 768"], Float[Array, "h w 192"]]:
        """The block output and its 1x1 branch (Mixed_6d's is TF `mixed_6/conv`, the sFID tap)."""
        branch1x1 = self.branch1x1(x)
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        branch7x7dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(branch7x7dbl))
        branch7x7dbl = self.branch7x7dbl_5(self.branch7x7dbl_4(branch7x7dbl))
        branch_pool = self.branch_pool(_avg_pool_exclude_pad(x))
        out = jnp.concatenate([branch1x1, branch7x7, branch7x7dbl, branch_pool], axis=-1)
        return out, branch1x1

    def __call__(self, x: Float[Array, "h w cin"]) -> Float[Array, "h w 768"]:
        return self.forward_with_branch1x1(x)[0]


class InceptionD(eqx.Module):
    """torchvision `InceptionD` (Mixed_7a): grid reduction 17 -> 8."""

    branch3x3_1: BasicConv2d
    branch3x3_2: BasicConv2d
    branch7x7x3_1: BasicConv2d
    branch7x7x3_2: BasicConv2d
    branch7x7x3_3: BasicConv2d
    branch7x7x3_4: BasicConv2d

    def __init__(self, in_channels: int, *, key: PRNGKeyArray):
        keys = jax.random.split(key, 6)
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1, key=keys[0])
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, key=keys[1])
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1, key=keys[2])
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), key=keys[3])
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), key=keys[4])
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, key=keys[5])

    def __call__(self, x: Float[Array, "h w cin"]) -> Float[Array, "h2 w2 cout"]:
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_2(self.branch7x7x3_1(x))
        branch7x7x3 = self.branch7x7x3_4(self.branch7x7x3_3(branch7x7x3))
        branch_pool = _max_pool(x, stride=2, padding=0)
        return jnp.concatenate([branch3x3, branch7x7x3, branch_pool], axis=-1)


class InceptionE(eqx.Module):
    """pytorch-fid `FIDInceptionE_1` (Mixed_7b, `pool="avg"`, padding excluded) and
    `FIDInceptionE_2` (Mixed_7c, `pool="max"`: the TF graph's quirk)."""

    branch1x1: BasicConv2d
    branch3x3_1: BasicConv2d
    branch3x3_2a: BasicConv2d
    branch3x3_2b: BasicConv2d
    branch3x3dbl_1: BasicConv2d
    branch3x3dbl_2: BasicConv2d
    branch3x3dbl_3a: BasicConv2d
    branch3x3dbl_3b: BasicConv2d
    branch_pool: BasicConv2d
    pool: Literal["avg", "max"] = eqx.field(static=True)

    def __init__(self, in_channels: int, pool: Literal["avg", "max"], *, key: PRNGKeyArray):
        keys = jax.random.split(key, 9)
        self.branch1x1 = BasicConv2d(in_channels, 320, 1, key=keys[0])
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1, key=keys[1])
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), key=keys[2])
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), key=keys[3])
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1, key=keys[4])
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, key=keys[5])
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), key=keys[6])
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), key=keys[7])
        self.branch_pool = BasicConv2d(in_channels, 192, 1, key=keys[8])
        self.pool = pool

    def __check_init__(self):
        if self.pool not in ("avg", "max"):
            raise ValueError(f"pool={self.pool!r} is not allowed: expected 'avg' or 'max'")

    def __call__(self, x: Float[Array, "h w cin"]) -> Float[Array, "h w 2048"]:
        branch1x1 = self.branch1x1(x)
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = jnp.concatenate(
            [self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], axis=-1
        )
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = jnp.concatenate(
            [self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], axis=-1
        )
        if self.pool == "avg":
            pooled = _avg_pool_exclude_pad(x)
        else:
            pooled = _max_pool(x, stride=1, padding=1)
        branch_pool = self.branch_pool(pooled)
        return jnp.concatenate([branch1x1, branch3x3, branch3x3dbl, branch_pool], axis=-1)


# ----------------------------------------------------------------------------------------------
# Front end: resize to 299 and scale to [-1, 1]


def _resize_matrix(size_in: int, size_out: int, frontend: str) -> np.ndarray:
    """`(size_out, size_in)` bilinear interpolation weights for one axis.

    Source coordinates and weights are computed in float32, as both reference kernels do (TF1
    `ResizeBilinear`, PyTorch's CPU `upsample_bilinear2d`), so the grids match them bit for bit.
    """
    scale = np.float32(size_in) / np.float32(size_out)
    dst = np.arange(size_out, dtype=np.float32)
    if frontend == "tf1":  # TF1 ResizeBilinear, align_corners=False, no half-pixel centres
        src = dst * scale
    else:  # PyTorch align_corners=False: half-pixel centres, negative sources clamp to 0
        src = np.maximum(scale * (dst + np.float32(0.5)) - np.float32(0.5), np.float32(0.0))
    low = np.minimum(np.floor(src).astype(np.int64), size_in - 1)
    high = np.minimum(low + 1, size_in - 1)
    frac = np.clip(src - low.astype(np.float32), np.float32(0.0), np.float32(1.0))
    matrix = np.zeros((size_out, size_in), np.float32)
    np.add.at(matrix, (np.arange(size_out), low), np.float32(1.0) - frac)
    np.add.at(matrix, (np.arange(size_out), high), frac)
    return matrix


def resize_bilinear(
    x: Float[Array, "h w c"], frontend: Frontend = "tf1", size: int = _SIZE
) -> Float[Array, "size_out size_out c"]:
    """Bilinear resize of one `h w c` image to `size x size` with the front end's sampling grid.

    **Arguments:**

    - `x`: the image (any value range; the resize is linear).
    - `frontend`: `"tf1"` (TF1 `ResizeBilinear`, `src = dst * in / out`) or `"pytorch_fid"`
        (`F.interpolate(mode="bilinear", align_corners=False)`, half-pixel centres).
    - `size`: output height and width.

    **Returns:** the resized image; the identity when `x` is already `size x size`.
    """
    height, width, _ = x.shape
    if (height, width) == (size, size):
        return x
    rows = jnp.asarray(_resize_matrix(height, size, frontend))
    cols = jnp.asarray(_resize_matrix(width, size, frontend))
    hi = lax.Precision.HIGHEST
    x = jnp.einsum("oh,hwc->owc", rows, x, precision=hi)
    return jnp.einsum("pw,owc->opc", cols, x, precision=hi)


# ----------------------------------------------------------------------------------------------
# The network


class InceptionFeatures(eqx.Module):
    """The three FID/sFID/IS feature sets of one image (a leading batch axis under `jax.vmap`)."""

    pool3: Float[Array, " 2048"]
    """Global average pool of Mixed_7c (TF `pool_3`): FID, precision/recall."""
    spatial: Float[Array, " 2023"]
    """Mixed_6d.branch1x1 (TF `mixed_6/conv`), channels 0-6, flattened H, W, C: sFID."""
    logits: Float[Array, " 1008"]
    """`fc.weight @ pool3`, without the bias (ADM and torch-fidelity): Inception Score."""


class InceptionV3FID(eqx.Module):
    """The FID Inception-v3 (pytorch-fid `fid_inception_v3`, TF graph 2015-12-05), one image per call.

    Attribute names equal the PyTorch module names, so `model.Mixed_6d.branch1x1` holds
    `Mixed_6d.branch1x1.{conv,bn}.*` of the weight file.
    """

    Conv2d_1a_3x3: BasicConv2d
    Conv2d_2a_3x3: BasicConv2d
    Conv2d_2b_3x3: BasicConv2d
    Conv2d_3b_1x1: BasicConv2d
    Conv2d_4a_3x3: BasicConv2d
    Mixed_5b: InceptionA
    Mixed_5c: InceptionA
    Mixed_5d: InceptionA
    Mixed_6a: InceptionB
    Mixed_6b: InceptionC
    Mixed_6c: InceptionC
    Mixed_6d: InceptionC
    Mixed_6e: InceptionC
    Mixed_7a: InceptionD
    Mixed_7b: InceptionE
    Mixed_7c: InceptionE
    fc_weight: Float[Array, "1008 2048"]
    fc_bias: Float[Array, " 1008"]
    frontend: Frontend = eqx.field(static=True)

    def __init__(self, *, key: PRNGKeyArray, frontend: Frontend = "tf1"):
        """Random weights with the shapes of the released file (for tests; use `load_inception`).

        **Arguments:**

        - `key`: a PRNG key.
        - `frontend`: `"tf1"` (ADM / torch-fidelity resize and `(x - 128) / 128`) or
            `"pytorch_fid"` (half-pixel resize and `x / 127.5 - 1`); see the module docstring.
        """
        keys = iter(jax.random.split(key, 17))
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, key=next(keys))
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, key=next(keys))
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, key=next(keys))
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, key=next(keys))
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, key=next(keys))
        self.Mixed_5b = InceptionA(192, 32, key=next(keys))
        self.Mixed_5c = InceptionA(256, 64, key=next(keys))
        self.Mixed_5d = InceptionA(288, 64, key=next(keys))
        self.Mixed_6a = InceptionB(288, key=next(keys))
        self.Mixed_6b = InceptionC(768, 128, key=next(keys))
        self.Mixed_6c = InceptionC(768, 160, key=next(keys))
        self.Mixed_6d = InceptionC(768, 160, key=next(keys))
        self.Mixed_6e = InceptionC(768, 192, key=next(keys))
        self.Mixed_7a = InceptionD(768, key=next(keys))
        self.Mixed_7b = InceptionE(1280, "avg", key=next(keys))
        self.Mixed_7c = InceptionE(2048, "max", key=next(keys))
        bound = 1.0 / math.sqrt(2048)
        self.fc_weight = _uniform(next(keys), (_NUM_CLASSES, 2048), -bound, bound)
        self.fc_bias = jnp.zeros((_NUM_CLASSES,), jnp.float32)
        self.frontend = frontend

    def __check_init__(self):
        if self.frontend not in ("tf1", "pytorch_fid"):
            raise ValueError(
                f"frontend={self.frontend!r} is not allowed: expected 'tf1' or 'pytorch_fid'"
            )

    def __call__(self, x: Float[Array, "3 h w"]) -> InceptionFeatures:
        """Features of one image.

        **Arguments:**

        - `x`: one RGB image, channels first, float pixel values in [0, 255] (a uint8 image cast
            to float32), any size: it is resized to 299 x 299 inside (the net itself needs at least
            75 x 75).

        **Returns:** an `InceptionFeatures` (`pool3` 2048, `spatial` 2023, `logits` 1008).
        Batch with `jax.vmap`, or use `inception_features` for NumPy uint8 NHWC batches.
        """
        return self.forward_hwc(jnp.transpose(x, (1, 2, 0)))

    def forward_hwc(self, x: Float[Array, "h w 3"]) -> InceptionFeatures:
        """`__call__` on a channels-last image (the layout of uint8 image files), same values."""
        if self.frontend == "tf1":
            x = (resize_bilinear(x, "tf1") - 128.0) / 128.0
        else:
            x = 2.0 * resize_bilinear(x / 255.0, "pytorch_fid") - 1.0
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = _max_pool(x, stride=2, padding=0)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = _max_pool(x, stride=2, padding=0)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6a(x)
        x = self.Mixed_6c(self.Mixed_6b(x))
        x, mixed_6_conv = self.Mixed_6d.forward_with_branch1x1(x)
        x = self.Mixed_7a(self.Mixed_6e(x))
        x = self.Mixed_7c(self.Mixed_7b(x))
        pool3 = jnp.mean(x, axis=(0, 1))
        spatial = mixed_6_conv[:, :, :_SPATIAL_CHANNELS].reshape(-1)
        logits = jnp.matmul(self.fc_weight, pool3, precision=lax.Precision.HIGHEST)
        return InceptionFeatures(pool3=pool3, spatial=spatial, logits=logits)


# ----------------------------------------------------------------------------------------------
# State dict <-> model

_CONV_FIELDS = {
    "weight": "conv.weight",
    "bn_weight": "bn.weight",
    "bn_bias": "bn.bias",
    "bn_mean": "bn.running_mean",
    "bn_var": "bn.running_var",
}
_TOP_FIELDS = {"fc_weight": "fc.weight", "fc_bias": "fc.bias"}


def _state_key(path: tuple) -> tuple[str, bool]:
    """The state-dict key of the leaf at `path` and whether it is a conv kernel (HWIO <-> OIHW)."""
    names = [entry.name for entry in path]
    if len(names) == 1:
        return _TOP_FIELDS[names[0]], False
    return ".".join(names[:-1]) + "." + _CONV_FIELDS[names[-1]], names[-1] == "weight"


def _leaves_with_keys(model: Any) -> Iterator[tuple[str, bool, Any]]:
    for path, leaf in jax.tree_util.tree_flatten_with_path(model)[0]:
        key, is_kernel = _state_key(path)
        yield key, is_kernel, leaf


def expected_state_shapes(frontend: Frontend = "tf1") -> dict[str, tuple[int, ...]]:
    """Key -> shape of the released weight file (472 tensors; no `num_batches_tracked`), in file order."""
    template = eqx.filter_eval_shape(InceptionV3FID, key=jax.random.key(0), frontend=frontend)
    shapes = {}
    for key, is_kernel, leaf in _leaves_with_keys(template):
        shape = tuple(leaf.shape)
        shapes[key] = (shape[3], shape[2], shape[0], shape[1]) if is_kernel else shape
    return shapes


def model_to_state_dict(model: InceptionV3FID) -> dict[str, np.ndarray]:
    """The PyTorch-layout state dict (472 float32 arrays, conv kernels OIHW) of `model`.

    Inverse of `state_dict_to_model`, bit for bit. `num_batches_tracked` is not written, as in the
    released file.
    """
    state = {}
    for key, is_kernel, leaf in _leaves_with_keys(model):
        array = np.asarray(leaf, dtype=np.float32)
        state[key] = np.ascontiguousarray(array.transpose(3, 2, 0, 1)) if is_kernel else array
    return state


def state_dict_to_model(state: Mapping[str, Any], *, frontend: Frontend = "tf1") -> InceptionV3FID:
    """Build the model from a pytorch-fid / torch-fidelity state dict (NumPy arrays or array-likes).

    **Arguments:**

    - `state`: key -> array, PyTorch names and layouts (those of pytorch-fid's
        `pt_inception-2015-12-05-6726825d.pth`, i.e. `fid_inception_v3`'s state dict). The 94
        `*.bn.num_batches_tracked` entries may be present or absent; they are ignored.
    - `frontend`: see `InceptionV3FID`.

    **Returns:** the model, float32.

    **Raises:** `InceptionWeightsError` (one line) for missing, unexpected or misshapen keys.
    """
    expected = expected_state_shapes(frontend)
    extra = sorted(k for k in state if k not in expected and not k.endswith(".num_batches_tracked"))
    missing = [k for k in expected if k not in state]
    if missing or extra:
        raise InceptionWeightsError(
            f"not an FID Inception state dict: {len(missing)} missing keys "
            f"(first: {missing[:3]}), {len(extra)} unexpected keys (first: {extra[:3]})"
        )
    for key, shape in expected.items():
        got = tuple(np.shape(state[key]))
        if got != shape:
            raise InceptionWeightsError(f"{key} has shape {got}, expected {shape}")

    template = eqx.filter_eval_shape(InceptionV3FID, key=jax.random.key(0), frontend=frontend)

    def fill(path: tuple, leaf: Any) -> Array:
        key, is_kernel = _state_key(path)
        array = np.asarray(state[key], dtype=np.float32)
        return jnp.asarray(array.transpose(2, 3, 1, 0) if is_kernel else array)

    return jax.tree_util.tree_map_with_path(fill, template)


def load_inception(
    path: str | os.PathLike | None = None, *, frontend: Frontend = "tf1"
) -> InceptionV3FID:
    """Load the FID Inception from a weight file the user already has (never downloads).

    **Arguments:**

    - `path`: a `.pth` (pytorch-fid `pt_inception-2015-12-05-6726825d.pth` or torch-fidelity's
        identical `weights-inception-2015-12-05-6726825d.pth`; torch is not needed), or a
        `.safetensors` or `.npz` with the same keys. Default: `default_weights_path()`.
    - `frontend`: see `InceptionV3FID`.

    **Returns:** the model.

    **Raises:** `InceptionWeightsError` with a one-line message: where the file is expected and
    how to get it if it is missing; what is wrong if it is unreadable.
    """
    path = default_weights_path() if path is None else pathlib.Path(path).expanduser()
    if not path.is_file():
        raise InceptionWeightsError(
            f"Inception weights not found at {path}; pass a path, set ${WEIGHTS_ENV}, or put "
            f"{WEIGHTS_FILENAME} in ~/.cache/eqdisp/ (get it from {WEIGHTS_URL}; "
            "eqdisp never downloads)"
        )
    try:
        state = read_state_dict(path)
    except WeightsError as error:
        raise InceptionWeightsError(str(error)) from None
    return state_dict_to_model(state, frontend=frontend)


# ----------------------------------------------------------------------------------------------
# Batched feature extraction


@eqx.filter_jit
def _features_batch(
    model: InceptionV3FID, images: UInt8[Array, "batch h w 3"]
) -> tuple[Float[Array, "batch 2048"], Float[Array, "batch 2023"], Float[Array, "batch 1008"]]:
    features = jax.vmap(model.forward_hwc)(images.astype(jnp.float32))
    return features.pool3, features.spatial, features.logits


def inception_features(
    model: InceptionV3FID, images: UInt8[np.ndarray, "batch h w 3"], batch_size: int = 64
) -> dict[str, np.ndarray]:
    """Features of a uint8 NHWC image batch, computed in jitted batches of `batch_size`.

    **Arguments:**

    - `model`: the network (`load_inception`).
    - `images`: uint8 RGB images, channels last (ADM's `arr_0`; from [-1, 1] model outputs use
        `eqdisp.images.to_uint8`). Any size; resized to 299 inside.
    - `batch_size`: images per compiled call; the last batch is padded, so one compile serves all.

    **Returns:** `{"pool3": (N, 2048), "spatial": (N, 2023), "logits": (N, 1008)}`, float32 NumPy.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is not allowed: expected >= 1")
    count = images.shape[0]
    size = max(1, min(batch_size, count))
    outputs: dict[str, list[np.ndarray]] = {"pool3": [], "spatial": [], "logits": []}
    for start in range(0, count, size):
        chunk = images[start : start + size]
        real = chunk.shape[0]
        if real < size:
            pad = np.zeros((size - real,) + chunk.shape[1:], np.uint8)
            chunk = np.concatenate([chunk, pad])
        results = _features_batch(model, jnp.asarray(chunk))
        for name, value in zip(("pool3", "spatial", "logits"), results):
            outputs[name].append(np.asarray(value)[:real])
    dims = {"pool3": 2048, "spatial": 2023, "logits": _NUM_CLASSES}
    return {
        name: np.concatenate(parts) if parts else np.zeros((0, dims[name]), np.float32)
        for name, parts in outputs.items()
    }
