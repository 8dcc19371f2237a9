"""Pure, jitted reductions of block representations (the `Taps.blocks` of a batch of examples).

Conventions (shared with `eqdisp.dispersive`):

- `z` is a batch of one block's representations, `(batch, tokens, dim)` or any per-example shape;
  each example is flattened to `D = tokens * dim` features where a metric is "per example".
- Pairwise distances are squared L2 distances divided by `D`, the scale the Dispersive Loss sees.
- Every reduction accumulates in float32 and returns float32.
- The class-split reductions (`class_distance_means`, `class_distance_quantiles`,
  `class_uniformity`) take the examples' labels and reduce the pairs i < j of one kind: same class
  (row 0 of `PAIR_KINDS`) or different classes (row 1). A kind with no pair (every label distinct,
  or a single class) gives NaN.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

import eqdisp

QUANTILE_LEVELS: tuple[float, ...] = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)
"""Levels of `pairwise_distance_quantiles` (min, 5%, quartiles, 95%, max)."""

DISPERSIVE_VARIANTS: tuple[str, ...] = tuple(v for v in eqdisp.VARIANTS if v != "none")
"""The variants whose value `dispersive_values` reports, in this order."""


PAIR_KINDS: tuple[str, ...] = ("same", "diff")
"""The rows of the class-split reductions: same-class pairs, then different-class pairs."""


def _flat(z: Float[Array, "batch *feature"]) -> Float[Array, "batch feature"]:
    return z.reshape(z.shape[0], -1).astype(jnp.float32)


@jax.jit
def block_norms(
    blocks: Float[Array, "batch depth tokens dim"],
) -> tuple[Float[Array, " depth"], Float[Array, " depth"]]:
    """Mean L2 norm of each block's representation (the paper's Fig. 3, generalised).

    **Arguments:**

    - `blocks`: the stacked taps of a batch, `jax.vmap(model.forward_with_taps)(...)[1].blocks`.

    **Returns:** `(per_token, per_example)`, each `(depth,)` float32: the norm of one token's
    `dim`-vector averaged over tokens and examples, and the norm of the whole flattened
    `tokens * dim` representation averaged over examples.
    """
    b = blocks.astype(jnp.float32)
    per_token = jnp.mean(jnp.sqrt(jnp.sum(jnp.square(b), axis=-1)), axis=(0, 2))
    per_example = jnp.mean(jnp.sqrt(jnp.sum(jnp.square(b), axis=(2, 3))), axis=0)
    return per_token, per_example


@jax.jit
def pairwise_distance_quantiles(z: Float[Array, "batch *feature"]) -> Float[Array, " quantile"]:
    """Quantiles (`QUANTILE_LEVELS`) of the pairwise squared distances `||z_i - z_j||^2 / D`, i < j.

    **Arguments:**

    - `z`: a batch of at least two representations of one block.

    **Returns:** `(len(QUANTILE_LEVELS),)` float32.
    """
    flat = _flat(z)
    n, d = flat.shape
    dist = eqdisp.pairwise_sq_dists(flat) / d
    i, j = jnp.triu_indices(n, k=1)
    levels = jnp.asarray(QUANTILE_LEVELS, jnp.float32)
    return jnp.quantile(dist[i, j], levels)


@functools.partial(jax.jit, static_argnames="center")
def singular_values(
    z: Float[Array, "batch *feature"], *, center: bool = True
) -> Float[Array, " batch"]:
    """Singular values of the `(batch, D)` representation matrix, largest first.

    Computed as the singular values of the triangular factor of a QR decomposition of the matrix
    (of its transpose when `batch <= D`), so nothing `D x D` is built and small values are as
    accurate as the SVD's: the eigenvalues of the Gram matrix would square the condition number,
    and the square root of their float32 rounding (1e-7 of the largest) is an error of 3e-4.

    **Arguments:**

    - `z`: a batch of representations of one block.
    - `center`: subtract the batch mean first (the spectrum of the covariance), the default.

    **Returns:** `(batch,)` float32, non-increasing; zeros beyond `min(batch, D)`.
    """
    flat = _flat(z)
    if center:
        flat = flat - jnp.mean(flat, axis=0)
    n, d = flat.shape
    tall = flat.T if n <= d else flat  # the longer side first: R is min(n, D) square
    r = jnp.linalg.qr(tall, mode="r")
    s = jnp.linalg.svd(r, compute_uv=False)
    return jnp.pad(s, (0, n - s.shape[0]))


@jax.jit
def effective_rank(s: Float[Array, " k"]) -> Float[Array, ""]:
    """Effective rank (Roy & Vetterli 2007): `exp(H(p))` with `p = s / sum(s)`, `0 log 0 = 0`.

    Equals the rank for a matrix whose non-zero singular values are all equal (e.g. orthogonal).

    **Arguments:**

    - `s`: singular values (non-negative).

    **Returns:** a float32 scalar in `[1, k]` (0 for an all-zero `s`).
    """
    s = s.astype(jnp.float32)
    total = jnp.sum(s)
    p = s / jnp.where(total > 0, total, 1.0)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return jnp.where(total > 0, jnp.exp(entropy), 0.0)


@functools.partial(jax.jit, static_argnames=("t", "normalize"))
def uniformity(
    z: Float[Array, "batch *feature"], *, t: float = 2.0, normalize: bool = True
) -> Float[Array, ""]:
    """Uniformity of Wang & Isola (2020): `log mean_{i<j} exp(-t ||z_i - z_j||^2)`.

    As in their code, each flattened example is first projected on the unit sphere (`normalize`),
    so the value lies in `[-4 t, 0]`; lower is more uniform. Computed with a logsumexp.

    **Arguments:**

    - `z`: a batch of at least two representations.
    - `t`: the temperature (theirs: 2).
    - `normalize`: L2-normalise each example first.

    **Returns:** a float32 scalar.
    """
    flat = _flat(z)
    if normalize:
        flat = flat * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(flat), axis=1), 1e-16))[:, None]
    n = flat.shape[0]
    dist = eqdisp.pairwise_sq_dists(flat)
    i, j = jnp.triu_indices(n, k=1)
    return jax.nn.logsumexp(-t * dist[i, j]) - math.log(n * (n - 1) // 2)


def _pair_masks(labels: Int[Array, " batch"]) -> Bool[Array, "pair batch batch"]:
    """Masks of the pairs i < j with equal and with different labels, stacked as `PAIR_KINDS`."""
    n = labels.shape[0]
    upper = jnp.triu(jnp.ones((n, n), bool), k=1)
    equal = labels[:, None] == labels[None, :]
    return jnp.stack([upper & equal, upper & ~equal])


def _scaled_sq_dists(z: Float[Array, "batch *feature"]) -> Float[Array, "batch batch"]:
    flat = _flat(z)
    return eqdisp.pairwise_sq_dists(flat) / flat.shape[1]


@jax.jit
def class_distance_means(
    z: Float[Array, "batch *feature"], labels: Int[Array, " batch"]
) -> Float[Array, " pair"]:
    """Mean pairwise squared distance `||z_i - z_j||^2 / D` over same-class and over
    different-class pairs i < j (the scale of `pairwise_distance_quantiles` and of the loss).

    **Arguments:**

    - `z`: a batch of representations of one block.
    - `labels`: the class of each example.

    **Returns:** `(2,)` float32: same-class mean, different-class mean (`PAIR_KINDS`); NaN for a
    kind with no pair.
    """
    dist = _scaled_sq_dists(z)
    masks = _pair_masks(labels)
    count = jnp.sum(masks, axis=(1, 2), dtype=jnp.float32)
    total = jnp.sum(jnp.where(masks, dist[None], 0.0), axis=(1, 2))
    return jnp.where(count > 0, total / jnp.maximum(count, 1.0), jnp.nan)


@jax.jit
def class_distance_quantiles(
    z: Float[Array, "batch *feature"], labels: Int[Array, " batch"]
) -> Float[Array, "pair quantile"]:
    """Quantiles (`QUANTILE_LEVELS`) of `||z_i - z_j||^2 / D` over same-class and over
    different-class pairs i < j (linearly interpolated, as `pairwise_distance_quantiles`).

    **Returns:** `(2, len(QUANTILE_LEVELS))` float32, rows as `PAIR_KINDS`; NaN for a kind with
    no pair.
    """
    dist = _scaled_sq_dists(z)
    masks = _pair_masks(labels)
    i, j = jnp.triu_indices(labels.shape[0], k=1)
    pairs = jnp.where(masks[:, i, j], dist[i, j][None], jnp.nan)  # other kind's pairs: NaN
    levels = jnp.asarray(QUANTILE_LEVELS, jnp.float32)
    return jnp.nanquantile(pairs, levels, axis=1).T


@functools.partial(jax.jit, static_argnames=("t", "normalize"))
def class_uniformity(
    z: Float[Array, "batch *feature"],
    labels: Int[Array, " batch"],
    *,
    t: float = 2.0,
    normalize: bool = True,
) -> Float[Array, " pair"]:
    """`uniformity` restricted to same-class and to different-class pairs i < j:
    `log mean_{pairs of the kind} exp(-t ||z_i - z_j||^2)`, on the unit sphere when `normalize`.

    **Returns:** `(2,)` float32, rows as `PAIR_KINDS`; NaN for a kind with no pair.
    """
    flat = _flat(z)
    if normalize:
        flat = flat * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(flat), axis=1), 1e-16))[:, None]
    dist = eqdisp.pairwise_sq_dists(flat)
    masks = _pair_masks(labels)
    count = jnp.sum(masks, axis=(1, 2), dtype=jnp.float32)
    lse = jax.vmap(lambda m: jax.nn.logsumexp(-t * dist, b=m.astype(jnp.float32)))(masks)
    return jnp.where(count > 0, lse - jnp.log(jnp.maximum(count, 1.0)), jnp.nan)


@functools.partial(jax.jit, static_argnames=("tau", "group_size", "margin"))
def dispersive_values(
    z: Float[Array, "batch *feature"],
    *,
    tau: float = 0.5,
    group_size: int | None = 16,
    margin: float = 1.0,
) -> Float[Array, " variant"]:
    """The value of every Dispersive Loss variant (`DISPERSIVE_VARIANTS`) on one block's batch.

    **Arguments:**

    - `z`: a batch of representations of one block.
    - `tau`, `group_size`, `margin`: as in `eqdisp.dispersive_loss`.

    **Returns:** `(len(DISPERSIVE_VARIANTS),)` float32.
    """
    return jnp.stack(
        [
            eqdisp.dispersive_loss(z, v, tau=tau, group_size=group_size, margin=margin)
            for v in DISPERSIVE_VARIANTS
        ]
    )


__all__ = [
    "DISPERSIVE_VARIANTS",
    "PAIR_KINDS",
    "QUANTILE_LEVELS",
    "block_norms",
    "class_distance_means",
    "class_distance_quantiles",
    "class_uniformity",
    "dispersive_values",
    "effective_rank",
    "pairwise_distance_quantiles",
    "singular_values",
    "uniformity",
]
