"""Input embedders of the DiT/SiT transformer: patches, fixed 2-D positions, timesteps, labels.

Constants follow the official `models.py` of DiT (`facebookresearch/DiT`) and SiT (`willisma/SiT`,
a copy of DiT's) exactly; the class or function each follows is cited inline.
"""

import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

# ----------------------------------------------------------------------------------------------
# Initialisers and a Linear built with the reference init (Equinox's default is replaced everywhere).


def xavier_uniform(
    key: PRNGKeyArray, out_features: int, in_features: int
) -> Float[Array, "out_features in_features"]:
    """Glorot/Xavier uniform on a `(out, in)` matrix: bound `sqrt(6 / (fan_in + fan_out))`.

    Applied to the *full* fused matrix (e.g. qkv's `(3D, D)`), as `torch.nn.init.xavier_uniform_`.
    """
    bound = math.sqrt(6.0 / (in_features + out_features))
    return jax.random.uniform(
        key, (out_features, in_features), jnp.float32, minval=-bound, maxval=bound
    )


def make_linear(
    in_features: int, out_features: int, init: str, *, key: PRNGKeyArray
) -> eqx.nn.Linear:
    """An `eqx.nn.Linear` (weight `(out, in)`, as PyTorch) with bias 0 and the weight drawn by `init`.

    **Arguments:**

    - `in_features`, `out_features`: sizes.
    - `init`: `"xavier"` (xavier-uniform), `"normal"` (N(0, 0.02), the timestep MLP) or `"zero"`
        (adaLN-Zero and the final projection).
    - `key`: a PRNG key.

    **Returns:** the layer, float32.
    """
    if init == "xavier":
        weight = xavier_uniform(key, out_features, in_features)
    elif init == "normal":
        weight = 0.02 * jax.random.normal(key, (out_features, in_features), jnp.float32)
    elif init == "zero":
        weight = jnp.zeros((out_features, in_features), jnp.float32)
    else:
        raise ValueError(f"init={init!r} is not allowed: expected 'xavier', 'normal' or 'zero'")
    linear = eqx.nn.Linear(in_features, out_features, key=key)
    # Replace Equinox's default uniform(+-1/sqrt(fan_in)) init (DiT `DiT.initialize_weights`).
    return eqx.tree_at(
        lambda lin: (lin.weight, lin.bias), linear, (weight, jnp.zeros((out_features,), jnp.float32))
    )


def dense(linear: eqx.nn.Linear, x: Float[Array, "*rows in_features"]) -> Float[Array, "*rows out_features"]:
    """Apply `linear` to the last axis of `x` (one matmul over all rows, no per-row vmap)."""
    return x @ linear.weight.T + linear.bias


# ----------------------------------------------------------------------------------------------
# Patches


def patchify(x: Float[Array, "c h w"], patch_size: int) -> Float[Array, "tokens patch_features"]:
    """Cut an image into non-overlapping `p x p` patches, one row per token.

    Tokens are row-major over the patch grid (token `k = i*G + j`) and each row is flattened in
    `(c, kh, kw)` order, the layout of PyTorch's Conv2d weight `(D, C, p, p)` (timm `PatchEmbed`,
    DiT's `x_embedder`), so a conv weight reshaped to `(D, C*p*p)` applies unchanged.
    """
    c, h, w = x.shape
    p = patch_size
    x = x.reshape(c, h // p, p, w // p, p)
    x = x.transpose(1, 3, 0, 2, 4)  # (gh, gw, c, kh, kw)
    return x.reshape((h // p) * (w // p), c * p * p)


def unpatchify(
    tokens: Float[Array, "tokens patch_features"], patch_size: int, channels: int
) -> Float[Array, "channels h w"]:
    """Inverse layout of the final layer's output: each token vector is ordered `(kh, kw, c)`,
    `c` fastest (DiT `DiT.unpatchify`; *not* the input's `(c, kh, kw)`); the grid is square and
    row-major.
    """
    p = patch_size
    grid = math.isqrt(tokens.shape[0])
    x = tokens.reshape(grid, grid, p, p, channels)  # (gh, gw, kh, kw, c)
    x = x.transpose(4, 0, 2, 1, 3)  # (c, gh, kh, gw, kw)
    return x.reshape(channels, grid * p, grid * p)


class PatchEmbed(eqx.Module):
    """Conv2d(k = s = p, bias) as a Linear on patches flattened in `(c, kh, kw)` order (timm
    `PatchEmbed`, DiT's `x_embedder`)."""

    proj: eqx.nn.Linear
    patch_size: int = eqx.field(static=True)

    def __init__(self, in_channels: int, dim: int, patch_size: int, *, key: PRNGKeyArray):
        # xavier on the (D, C*p*p) view of the conv weight: fan_in = C*p*p, fan_out = D.
        self.proj = make_linear(in_channels * patch_size**2, dim, "xavier", key=key)
        self.patch_size = patch_size

    def __call__(self, x: Float[Array, "c h w"]) -> Float[Array, "tokens dim"]:
        return dense(self.proj, patchify(x, self.patch_size))


# ----------------------------------------------------------------------------------------------
# Fixed 2-D sin-cos position embedding


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # sin block first


@functools.cache
def _sincos_2d_cached(dim: int, grid_size: int) -> np.ndarray:
    # grid = meshgrid(w, h) ("xy"): the first D/2 channels encode the column j, the last D/2 the
    # row i (the reference names the first half "emb_h" but feeds it grid[0] = w).
    coords = np.arange(grid_size, dtype=np.float64)
    col, row = np.meshgrid(coords, coords, indexing="xy")  # col[i, j] = j, row[i, j] = i
    pe = np.concatenate([_sincos_1d(dim // 2, col), _sincos_1d(dim // 2, row)], axis=1)
    pe = pe.astype(np.float32)
    pe.flags.writeable = False  # shared by the cache
    return pe


def sincos_pos_embed_2d(dim: int, grid_size: int) -> np.ndarray:
    """The fixed DiT/SiT position embedding, `(grid_size**2, dim)` float32 NumPy (DiT `models.py`
    `get_2d_sincos_pos_embed`).

    Token `k = i*G + j` gets `[sin(j w), cos(j w), sin(i w), cos(i w)]` with
    `w_m = 10000^(-m / (dim/4))`, `m = 0..dim/4-1`, computed in float64 then cast to float32.

    It is a NumPy array on purpose: the transformer adds it as a trace-time constant, so it is
    never a leaf of the model and never reaches gradients, the optimizer or the parameter count.
    """
    if dim % 4 != 0:
        raise ValueError(f"dim={dim} is not allowed for the 2-D sin-cos embedding: expected a multiple of 4")
    return _sincos_2d_cached(dim, grid_size)


# ----------------------------------------------------------------------------------------------
# Timesteps and labels


def timestep_embedding(
    t: Float[Array, ""], dim: int = 256, max_period: float = 10000.0
) -> Float[Array, " frequencies"]:
    """Sinusoidal features of a scalar time, `[cos(t f), sin(t f)]` (cos first, DiT
    `TimestepEmbedder.timestep_embedding`), float32.

    `f_k = exp(-ln(max_period) k / (dim/2))`, `k = 0..dim/2-1`. `t` is used as given: SiT passes
    `t` in [0, 1], DiT integer steps 0..999.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32) * freqs
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)])
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros((1,), jnp.float32)])
    return emb


class TimestepEmbedder(eqx.Module):
    """Sinusoidal features (256) then Linear -> SiLU -> Linear, both weights N(0, 0.02) (DiT
    `TimestepEmbedder`, `DiT.initialize_weights`)."""

    mlp_in: eqx.nn.Linear
    mlp_out: eqx.nn.Linear
    frequency_size: int = eqx.field(static=True)

    def __init__(self, dim: int, frequency_size: int = 256, *, key: PRNGKeyArray):
        in_key, out_key = jax.random.split(key)
        self.mlp_in = make_linear(frequency_size, dim, "normal", key=in_key)
        self.mlp_out = make_linear(dim, dim, "normal", key=out_key)
        self.frequency_size = frequency_size

    def __call__(self, t: Float[Array, ""]) -> Float[Array, " dim"]:
        # Features in float32, then the compute dtype of the weights (as REPA casts to t's dtype).
        freq = timestep_embedding(t, self.frequency_size).astype(self.mlp_in.weight.dtype)
        return dense(self.mlp_out, jax.nn.silu(dense(self.mlp_in, freq)))


class LabelEmbedder(eqx.Module):
    """Class table with one extra null row (index `num_classes`) and CFG label dropout (DiT
    `LabelEmbedder`)."""

    embedding_table: Float[Array, "num_classes_plus_one dim"]
    num_classes: int = eqx.field(static=True)
    dropout_prob: float = eqx.field(static=True)

    def __init__(self, num_classes: int, dim: int, dropout_prob: float, *, key: PRNGKeyArray):
        self.embedding_table = 0.02 * jax.random.normal(key, (num_classes + 1, dim), jnp.float32)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def __call__(self, y: Int[Array, ""], *, key: PRNGKeyArray | None = None) -> Float[Array, " dim"]:
        """**Arguments:** `y` a label in `[0, num_classes]`; `key` given means training: the label
        is replaced by the null label with probability `dropout_prob`.

        **Returns:** the embedding row.
        """
        if key is not None and self.dropout_prob > 0:
            drop = jax.random.bernoulli(key, self.dropout_prob)
            y = jnp.where(drop, self.num_classes, y)
        return self.embedding_table[y]
