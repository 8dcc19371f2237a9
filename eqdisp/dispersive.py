"""Dispersive Loss (Wang & He 2025, Table 1) and its contrastive counterparts, as pure functions.

Conventions:

- ``z`` is a batch of representations of any per-example shape; each example is flattened to ``D``
  features (``D = tokens * dim`` for a SiT block output).
- The batch is split into consecutive groups of ``group_size`` examples; each group is one "batch"
  in the paper's formulas; per-group losses are averaged. Groups, not devices, fix the result.
- Distances are the squared L2 distance divided by ``D`` (as the public reference code does): at
  ``D ~ 2e5`` the raw distance makes ``exp(-d / tau)`` underflow and the loss loses all gradient.
  Pairwise quantities come from ``N x N`` Gram matrices; nothing ``D x D`` is ever built.
- Reductions accumulate in float32 whatever the dtype of ``z``; losses are float32 scalars.
"""

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from ._types import Array, Float, Scalar
from .config import DISP_VARIANTS as VARIANTS

# Norms below _NORM_EPS count as zero vectors for the cosine (torch's cosine_similarity uses 1e-8).
_NORM_EPS = 1e-8
# Added to the per-feature variance before dividing by the std, as BatchNorm (and so Barlow Twins)
# does: a constant feature standardises to 0 instead of NaN, with finite gradients.
_VAR_EPS = 1e-5


# ----------------------------------------------------------------------------------------------
# Pairwise building blocks (float32 accumulation)


def _gram(a: Float[Array, "n feature"], b: Float[Array, "m feature"]) -> Float[Array, "n m"]:
    return jnp.einsum("nd,md->nm", a, b, preferred_element_type=jnp.float32)


def _sq_norms(a: Float[Array, "n feature"]) -> Float[Array, " n"]:
    return jnp.einsum("nd,nd->n", a, a, preferred_element_type=jnp.float32)


def pairwise_sq_dists(z: Float[Array, "n feature"]) -> Float[Array, "n n"]:
    """Squared Euclidean distances between all rows of `z`, in float32.

    Computed from the Gram matrix, `||z_i||^2 + ||z_j||^2 - 2 z_i.z_j`, and clamped at 0 (rounding
    can make it slightly negative). The squared norms are read off the Gram diagonal, so the
    diagonal of the result is exactly 0.

    **Arguments:**

    - `z`: `n` points with `feature` coordinates, any float dtype.

    **Returns:**

    The `(n, n)` float32 matrix of raw (not divided by `feature`) squared distances.
    """
    gram = _gram(z, z)
    sq = jnp.diagonal(gram)
    return jnp.maximum(sq[:, None] + sq[None, :] - 2 * gram, 0.0)


def _cross_sq_dists(
    a: Float[Array, "n feature"], b: Float[Array, "n feature"]
) -> Float[Array, "n n"]:
    d = _sq_norms(a)[:, None] + _sq_norms(b)[None, :] - 2 * _gram(a, b)
    return jnp.maximum(d, 0.0)


def _cosine(a: Float[Array, "n feature"], b: Float[Array, "n feature"]) -> Float[Array, "n n"]:
    # rsqrt(max(|x|^2, eps^2)) rather than x / |x|: no sqrt at 0, no 0/0, so a zero vector has
    # cosine 0 with everything and finite gradients (no jnp.where needed).
    inv_a = lax.rsqrt(jnp.maximum(_sq_norms(a), _NORM_EPS**2))
    inv_b = lax.rsqrt(jnp.maximum(_sq_norms(b), _NORM_EPS**2))
    return _gram(a, b) * inv_a[:, None] * inv_b[None, :]


def _standardise(x: Float[Array, "n feature"]) -> Float[Array, "n feature"]:
    # Each feature to zero mean and unit (biased) variance over the group, as BatchNorm does in
    # Barlow Twins; then A^T A / n is the correlation matrix, with diagonal var / (var + eps) ~ 1.
    x = x.astype(jnp.float32)
    x = x - jnp.mean(x, axis=0)
    return x * lax.rsqrt(jnp.mean(jnp.square(x), axis=0) + _VAR_EPS)


def _log_mean_exp(logits: Float[Array, "n m"]) -> Scalar:
    # logsumexp - log(n m), never log(mean(exp)): exp(-d / tau) underflows for spread points.
    return jax.nn.logsumexp(logits) - math.log(logits.size)


# ----------------------------------------------------------------------------------------------
# Groups and variant names


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        allowed = ", ".join(repr(v) for v in VARIANTS)
        raise ValueError(f"unknown dispersive loss variant {variant!r}: expected one of {allowed}")


def _over_groups(
    loss: Callable[..., Scalar], group_size: int | None, *zs: Float[Array, "batch *feature"]
) -> Scalar:
    """Flatten each example, split the batch into consecutive groups, average `loss` over groups."""
    batch = zs[0].shape[0]
    group = batch if group_size is None else group_size
    if group < 1 or batch % group != 0:
        raise ValueError(f"group_size={group_size} must be a positive divisor of the batch size {batch}")
    grouped = [z.reshape(batch // group, group, -1) for z in zs]
    return jnp.mean(jax.vmap(loss)(*grouped))


# ----------------------------------------------------------------------------------------------
# Dispersive Loss (Table 1, right column): one group of n examples, D features each


def _disp_infonce_l2(x: Float[Array, "n feature"], tau: float) -> Scalar:
    # Eq. 6 with D(z_i, z_j) = ||z_i - z_j||^2 / D; the mean runs over all n^2 pairs, i = j too.
    return _log_mean_exp(-pairwise_sq_dists(x) / (x.shape[-1] * tau))


def _disp_infonce_cosine(x: Float[Array, "n feature"], tau: float) -> Scalar:
    # Eq. 6 with D(z_i, z_j) = -cos(z_i, z_j).
    return _log_mean_exp(_cosine(x, x) / tau)


def _disp_hinge(x: Float[Array, "n feature"], margin: float) -> Scalar:
    # Table 1, row 2: E_{i,j} max(0, eps - D(z_i, z_j))^2; the i = j terms add margin^2 / n.
    d = pairwise_sq_dists(x) / x.shape[-1]
    return jnp.mean(jnp.square(jax.nn.relu(margin - d)))


def _disp_covariance(x: Float[Array, "n feature"]) -> Scalar:
    # Table 1, row 3, divided by D^2: with A standardised, Cov = A^T A / n and
    # sum_{m,n} Cov_mn^2 = ||A^T A||_F^2 / n^2 = ||A A^T||_F^2 / n^2 (n x n, not D x D).
    n, dim = x.shape
    a = _standardise(x)
    return jnp.sum(jnp.square(_gram(a, a) / (n * dim)))


def dispersive_loss(
    z: Float[Array, "batch *feature"],
    variant: str = "infonce_l2",
    *,
    tau: float = 0.5,
    group_size: int | None = None,
    margin: float = 1.0,
) -> Scalar:
    """Dispersive Loss of a batch of representations (paper Table 1, right column).

    With `d_ij = ||z_i - z_j||^2 / D` the squared L2 distance divided by the feature size `D`
    (the public reference divides by `D`; without it the loss underflows at `D ~ 2e5`):

    - `"infonce_l2"`: `log mean_{i,j} exp(-d_ij / tau)` (Eq. 6, Algorithm 1). The mean includes
      `i = j`, so the value lies in `[-log n, 0]` for groups of `n`: 0 when all `z_i` coincide, and
      the floor `-log n` once the points are far apart (the public code's `-3.465 = -log 32`).
    - `"infonce_cosine"`: `log mean_{i,j} exp(cos(z_i, z_j) / tau)` (Eq. 6 with `D = -cos`); a zero
      vector has cosine 0 with everything.
    - `"hinge"`: `mean_{i,j} max(0, margin - d_ij)^2`, `i = j` included as in the paper's
      `E_{i,j}`. The paper gives no margin; the default 1.0 is on the scale of `d`: for independent
      unit-variance features `d_ij ~ 2`, so such points are already outside the margin (zero loss
      and gradient) and the loss only pushes apart pairs closer than half that typical distance.
    - `"covariance"`: `(1 / D^2) sum_{m,n} Cov_mn^2`, with `Cov` the `D x D` covariance (here: the
      correlation) of the features standardised over the group, computed through the `n x n` Gram
      matrix. Table 1 writes the plain sum `sum_{m,n}`; dividing by `D^2` puts the value in
      `[~1/(n-1), 1]` so that `lambda` means the same at every `D` (the raw sum is at least
      `D^2 / (n-1) ~ 2.6e9` for SiT-B/2 and groups of 16), as the `1/D` of the L2 variants does.
    - `"none"`: exactly 0, with no computation (the baseline).

    **Arguments:**

    - `z`: the representations; each example is flattened to `D` features. Any float dtype; all
      accumulation is in float32.
    - `variant`: one of `VARIANTS`.
    - `tau`: temperature of the InfoNCE variants.
    - `group_size`: examples per group; the batch is split into consecutive groups of this size and
      the per-group losses are averaged (paper: 16 per device; public PyTorch code: 32). `None`
      makes the whole batch one group.
    - `margin`: margin `epsilon` of the hinge variant, on the scale of `d_ij`.

    **Returns:**

    The loss, a float32 scalar.

    **Raises:**

    `ValueError` for an unknown `variant` or a `group_size` that does not divide the batch
    (not checked for `"none"`, which does no work).
    """
    _check_variant(variant)
    if variant == "none":
        return jnp.zeros((), jnp.float32)
    per_group = {
        "infonce_l2": lambda x: _disp_infonce_l2(x, tau),
        "infonce_cosine": lambda x: _disp_infonce_cosine(x, tau),
        "hinge": lambda x: _disp_hinge(x, margin),
        "covariance": _disp_covariance,
    }[variant]
    return _over_groups(per_group, group_size, z)


def dispersive_floor(
    variant: str,
    group: int,
    *,
    tau: float = 0.5,
    margin: float = 1.0,
    features: int | None = None,
) -> float:
    """The smallest value `dispersive_loss` can take on groups of `group` examples.

    Derived per variant (each group's loss has this lower bound, so their mean has it too):

    - `"infonce_l2"`: `-log(group)`. The `group` diagonal terms of the mean are `exp(0) = 1` and
      the others are positive, so the loss is `-log(group) + log(1 + (group - 1) k)` with
      `k = mean_{i != j} exp(-d_ij / tau)`: the floor is approached (never reached) as the points
      move apart, and the gap above it is `log(1 + (group - 1) k)`, about `(group - 1) k`.
    - `"infonce_cosine"`: `log((exp(1 / tau) + (group - 1) exp(-1 / ((group - 1) tau))) / group)`,
      not `-log(group)`: the loss is convex in the Gram matrix of the unit vectors and symmetric
      under permutations, so the regular simplex (every off-diagonal cosine `-1 / (group - 1)`)
      minimises it; it is reached when `features >= group - 1`, and a lower bound otherwise.
      Always `> 0` for `group > 1` (`sum_ij cos_ij = |sum_i u_i|^2 >= 0`, then Jensen). For
      nonzero representations: a group of zero vectors has cosine 0 everywhere, loss 0.
    - `"hinge"`: `margin^2 / group`, the diagonal `d_ii = 0` terms; reached once every pair is at
      least `margin` apart.
    - `"covariance"`: `1 / (min(group, features + 1) - 1)`, and 0 for a group of one: the value is
      `|K|_F^2 / (group D)^2` with `K` the Gram matrix of the standardised group, whose trace is
      about `group D` and whose rank is at most `min(group - 1, D)`; equality when the standardised
      points form a regular simplex. This ignores the `1e-5` added to each feature's variance, so
      features of variance `v` give values lower by a factor `(v / (v + 1e-5))^2`, down to 0 for a
      collapsed group (constant features standardise to 0): the floor of non-degenerate features.
    - `"none"`: 0.

    **Arguments:**

    - `variant`: one of `VARIANTS`.
    - `group`: examples per group (the batch size when `dispersive_loss`'s `group_size` is None).
    - `tau`, `margin`: as in `dispersive_loss`.
    - `features`: `D`, the features per example; None means at least `group - 1` (any SiT block:
      `D = tokens * dim`). Only `"covariance"` depends on it.

    **Returns:**

    The floor, a Python float.

    **Raises:**

    `ValueError` for an unknown `variant` or a `group` below 1.
    """
    _check_variant(variant)
    if group < 1:
        raise ValueError(f"group={group} is not allowed: expected a positive number of examples")
    rank = group - 1 if features is None else min(group - 1, features)
    if variant == "infonce_l2":
        return -math.log(group)
    if variant == "infonce_cosine":
        if group == 1:
            return 1.0 / tau
        # log(e^{1/tau} + (n - 1) e^{-1/((n - 1) tau)}) - log n, without exp(1/tau) overflowing.
        off = (group - 1) * math.exp(-(1.0 + 1.0 / (group - 1)) / tau)
        return 1.0 / tau + math.log1p(off) - math.log(group)
    if variant == "hinge":
        return margin**2 / group
    if variant == "covariance":
        return 1.0 / rank if rank > 0 else 0.0
    return 0.0


# ----------------------------------------------------------------------------------------------
# Contrastive counterparts (Table 1, left column; Table 2): two views of the same n examples


def _infonce_from_logits(logits: Float[Array, "n n"]) -> Scalar:
    # Eq. 3 = Eq. 2: cross-entropy of the positive j = i among all j (the positive included).
    return -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=1)))


def _con_infonce_l2(
    x: Float[Array, "n feature"], y: Float[Array, "n feature"], tau: float
) -> Scalar:
    return _infonce_from_logits(-_cross_sq_dists(x, y) / (x.shape[-1] * tau))


def _con_infonce_cosine(
    x: Float[Array, "n feature"], y: Float[Array, "n feature"], tau: float
) -> Scalar:
    return _infonce_from_logits(_cosine(x, y) / tau)


def _con_hinge(x: Float[Array, "n feature"], y: Float[Array, "n feature"], margin: float) -> Scalar:
    # Table 1, row 2: D(z_i, z_i^+)^2 + E_{j != i} max(0, eps - D(z_i, z_j^+))^2.
    n = x.shape[0]
    d = _cross_sq_dists(x, y) / x.shape[-1]
    negative = jnp.where(jnp.eye(n, dtype=bool), 0.0, jnp.square(jax.nn.relu(margin - d)))
    return jnp.mean(jnp.square(jnp.diagonal(d)) + jnp.sum(negative, axis=1) / max(n - 1, 1))


def _con_covariance(
    x: Float[Array, "n feature"], y: Float[Array, "n feature"], offdiag_weight: float
) -> Scalar:
    # Barlow Twins (Table 1, row 3) on the cross-correlation C = A^T B / n of the standardised
    # views: mean_m (1 - C_mm)^2 + w (1 / D^2) sum_{m != n} C_mn^2. The diagonal costs O(nD); the
    # full sum uses ||A^T B||_F^2 = sum_ij (A A^T)_ij (B B^T)_ij, so nothing is D x D.
    n, dim = x.shape
    a, b = _standardise(x), _standardise(y)
    c_diag = jnp.einsum("nd,nd->d", a, b) / n
    all_sq = jnp.sum((_gram(a, a) / (n * dim)) * (_gram(b, b) / (n * dim)))
    off_diag_sq = all_sq - jnp.sum(jnp.square(c_diag / dim))
    return jnp.mean(jnp.square(1 - c_diag)) + offdiag_weight * off_diag_sq


def contrastive_loss(
    z: Float[Array, "batch *feature"],
    z_pos: Float[Array, "batch *feature"],
    variant: str = "infonce_l2",
    *,
    tau: float = 0.5,
    group_size: int | None = None,
    margin: float = 1.0,
    offdiag_weight: float = 0.005,
) -> Scalar:
    """Contrastive counterpart of `dispersive_loss` (paper Table 1 left column, Table 2).

    `z_pos[i]` is the positive view of `z[i]`; within a group the negatives of `z[i]` are the other
    examples' positive views `z_pos[j]`. `d(a, b) = ||a - b||^2 / D` as in `dispersive_loss`.

    - `"infonce_l2"` / `"infonce_cosine"`: Eq. 2/3 as a categorical cross-entropy,
      `mean_i [D(z_i, z_i^+) / tau + log sum_j exp(-D(z_i, z_j^+) / tau)]` with `D = d` or
      `D = -cos`; the sum over `j` includes the positive `j = i`, as in SimCLR/MoCo, so the loss is
      `>= 0`.
    - `"hinge"`: `mean_i [d(z_i, z_i^+)^2 + mean_{j != i} max(0, margin - d(z_i, z_j^+))^2]`
      (Table 1: the positive term is squared too). A group of one has no negatives.
    - `"covariance"`: Barlow Twins on the cross-correlation `C = A^T B / n` of the two views,
      each standardised per feature over the group:
      `(1/D) sum_m (1 - C_mm)^2 + offdiag_weight (1/D^2) sum_{m != n} C_mn^2`. Both terms are means
      over their entries, matching the `1/D^2` of the dispersive covariance; Barlow Twins' raw sums
      with weight `w_BT` correspond to `offdiag_weight = w_BT * D` here.
    - `"none"`: exactly 0.

    **Arguments:**

    - `z`, `z_pos`: the two views, same shape; grouped identically.
    - `variant`: one of `VARIANTS`.
    - `tau`, `group_size`, `margin`: as in `dispersive_loss`.
    - `offdiag_weight`: `w`, the weight of the off-diagonal term of the covariance variant.

    **Returns:**

    The loss, a float32 scalar.

    **Raises:**

    `ValueError` for an unknown `variant` or a `group_size` that does not divide the batch
    (not checked for `"none"`, which does no work).
    """
    _check_variant(variant)
    if variant == "none":
        return jnp.zeros((), jnp.float32)
    per_group = {
        "infonce_l2": lambda x, y: _con_infonce_l2(x, y, tau),
        "infonce_cosine": lambda x, y: _con_infonce_cosine(x, y, tau),
        "hinge": lambda x, y: _con_hinge(x, y, margin),
        "covariance": lambda x, y: _con_covariance(x, y, offdiag_weight),
    }[variant]
    return _over_groups(per_group, group_size, z, z_pos)
