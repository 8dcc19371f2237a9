"""bfloat16 matmuls with float32 accumulation, in forms that reach a CPU's matrix units.

On a CPU with AMX or AVX-512-BF16, XLA hands a dot to its YNNPACK kernels (which use those units)
only if the operands are bfloat16, the result float32, the left operand contracts its last
dimension and no operand has a transposed layout; any other dot is run in float32 at a fraction
of the speed (measured on a 2-core Xeon with AMX: 1,800 vs 290 GFLOP/s). Plain autodiff of a
bfloat16 network misses on two counts: XLA runs its elementwise ops in float32 anyway, and the
backward dots are float32 (the cotangent of a float32-accumulated dot is float32) or contract
the row dimension of both operands (the weight gradient), a transposed form. These kernels keep
activations float32 and give every forward and backward dot bfloat16 operands in a form XLA keeps
on those units:

- a dot that contracts rows (the weight gradient `g^T x`, attention's `dS^T Q` and `P^T dO`)
  contracts a `(rows/2, 2)` split of them instead, which XLA lowers to a row-major transpose
  and a supported dot (a plain transpose would be folded back into the dot's layout); the
  scores `Q K^T` split `head_dim` the same way, as q and k are slices of a transposed qkv;
- under `vmap` (the model runs per example), the linear layer's backward takes the batch as
  more rows (`custom_vmap`), so the weight gradient is one dot over every row of the batch
  rather than one per example.

Norms, softmax, the losses and the optimizer stay float32; only the dot operands are rounded.
"""

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

_BF16 = jnp.bfloat16
_F32 = jnp.float32


def _contract(
    a: Float[Array, "*batch i j"], b: Float[Array, "*batch k l"], axis: int
) -> Float[Array, "*batch p q"]:
    """`a` and `b` contracted over their axis `axis` (-1 or -2, the same length in both), batched
    over their leading axes, float32 accumulation; each keeps its other axis, `a`'s first.

    An even-length axis is contracted as a `(n/2, 2)` split, which XLA:CPU lowers to a row-major
    copy of each operand and a bfloat16 dot on the matrix units; contracting it whole, XLA would
    see a transposed operand (a row contraction, or a slice of a transposed array) and run the
    dot in float32. An odd length falls back to that plain form.
    """
    batch = tuple(range(a.ndim - 2))
    n = a.shape[axis]
    if n % 2:
        contract = ((a.ndim + axis,), (b.ndim + axis,))
    else:
        at = lambda x: x.ndim + axis  # the axis, counted from the front
        split = lambda x: x.reshape(*x.shape[: at(x)], n // 2, 2, *x.shape[at(x) + 1 :])
        a, b = split(a), split(b)
        contract = ((a.ndim + axis - 1, a.ndim + axis), (b.ndim + axis - 1, b.ndim + axis))
    return lax.dot_general(a, b, (contract, (batch, batch)), preferred_element_type=_F32)


def _contract_rows(
    a: Float[Array, "*batch rows m"], b: Float[Array, "*batch rows n"]
) -> Float[Array, "*batch m n"]:
    """`a^T b` over the `rows` axis (batched over leading axes), float32 accumulation."""
    return _contract(a, b, -2)


# ----------------------------------------------------------------------------------------------
# Linear layer


def _linear_forward(x, weight, bias):
    xb, wb = x.astype(_BF16), weight.astype(_BF16)
    y = lax.dot_general(xb, wb, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=_F32)
    return y + bias, (xb, wb)


@jax.custom_batching.custom_vmap
def _linear_backward(xb, wb, g):
    gb = g.astype(_BF16)
    dx = lax.dot_general(gb, wb, (((g.ndim - 1,), (0,)), ((), ())), preferred_element_type=_F32)
    rows_g = gb.reshape(-1, gb.shape[-1])
    rows_x = xb.reshape(-1, xb.shape[-1])
    if rows_x.shape[-1] < rows_g.shape[-1]:
        # XLA transposes the left operand into a fresh buffer (a slow copy on CPU: 56 ms for
        # fc1's g in the SiT-S/2 batch-32 step): transpose the narrower one, then the small
        # result. The barrier keeps XLA from folding that last transpose into the dot, which
        # would swap its operands after XLA:CPU chose the kernel (a bfloat16 dot its fallback
        # kernel cannot run).
        dw = lax.optimization_barrier(_contract_rows(rows_x, rows_g)).T
    else:
        dw = _contract_rows(rows_g, rows_x)
    db = jnp.sum(g.reshape(-1, g.shape[-1]), axis=0)
    return dx, dw, db


@_linear_backward.def_vmap
def _linear_backward_batched(axis_size, in_batched, xb, wb, g):
    # The kernel treats every leading axis as rows, so a batch of examples is just more rows of
    # one matmul: the shared weight's gradient (and the bias') is one sum over all of them.
    x_batched, w_batched, g_batched = in_batched
    xb = xb if x_batched else jnp.broadcast_to(xb, (axis_size, *xb.shape))
    g = g if g_batched else jnp.broadcast_to(g, (axis_size, *g.shape))
    if w_batched:  # a per-example weight: nothing to merge, map the kernel over the batch
        return jax.lax.map(lambda args: _linear_backward(*args), (xb, wb, g)), (True, True, True)
    return _linear_backward(xb, wb, g), (True, False, False)


@jax.custom_vjp
def linear_bf16(
    x: Float[Array, "*rows in_features"],
    weight: Float[Array, "out_features in_features"],
    bias: Float[Array, " out_features"],
) -> Float[Array, "*rows out_features"]:
    """`x @ weight.T + bias` with bfloat16 operands and float32 accumulation, forward and backward.

    Inputs and output are float32; the gradient of each argument is float32 too.
    """
    return _linear_forward(x, weight, bias)[0]


linear_bf16.defvjp(_linear_forward, lambda residuals, g: _linear_backward(*residuals, g))


# ----------------------------------------------------------------------------------------------
# Attention


def _scores(qb, kb):
    # (heads, n, d) x (heads, m, d) -> (heads, n, m). q and k are usually slices of a transposed
    # qkv; `_contract` splits `d` so that XLA lays them out row-major first.
    return _contract(qb, kb, -1)


def _apply(pb, vb):
    # (heads, n, m) x (heads, m, d) -> (heads, n, d)
    return lax.dot_general(pb, vb, (((2,), (1,)), ((0,), (0,))), preferred_element_type=_F32)


def _attention_forward(q, k, v):
    qb, kb, vb = q.astype(_BF16), k.astype(_BF16), v.astype(_BF16)
    pb = jax.nn.softmax(_scores(qb, kb), axis=-1).astype(_BF16)
    out = _apply(pb, vb)
    return out, (qb, kb, vb, pb, out)


@jax.custom_vjp
def attention_bf16(
    q: Float[Array, "heads tokens head_dim"],
    k: Float[Array, "heads tokens head_dim"],
    v: Float[Array, "heads tokens head_dim"],
) -> Float[Array, "heads tokens head_dim"]:
    """`softmax(q k^T) v` per head (scale `q` first): bfloat16 operands for the four dots of the
    backward and the two of the forward, float32 accumulation, softmax in float32.

    The backward is the standard one, with `D = rowsum(dO * O)` in place of `rowsum(dP * P)`.
    """
    return _attention_forward(q, k, v)[0]


def _attention_backward(residuals, d_out):
    qb, kb, vb, pb, out = residuals
    dob = d_out.astype(_BF16)
    dp = _scores(dob, vb)  # dO V^T: (heads, n, m)
    delta = jnp.sum(d_out * out, axis=-1, keepdims=True)
    ds = (pb.astype(_F32) * (dp - delta)).astype(_BF16)
    dq = _apply(ds, kb)
    dk = _contract_rows(ds, qb)  # dS^T Q
    dv = _contract_rows(pb, dob)  # P^T dO
    return dq, dk, dv


attention_bf16.defvjp(_attention_forward, _attention_backward)


__all__ = ["attention_bf16", "linear_bf16"]
