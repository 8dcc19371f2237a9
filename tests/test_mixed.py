"""The bfloat16 kernels of `eqdisp.models._mixed`: values and gradients against float64 formulas
on bfloat16-rounded operands, the batch merging under `vmap`, and the dot forms XLA keeps in
bfloat16 on a CPU with bfloat16 matrix units."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqdisp.bench import cpu_info
from eqdisp.models._mixed import attention_bf16, linear_bf16


def _rounded(a) -> np.ndarray:
    """`a` rounded to bfloat16, as float64."""
    return np.asarray(jnp.asarray(a, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32), np.float64)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize(
    "shape, d_out",
    [
        ((2, 6, 8), 12),  # even rows (split contraction), narrow input (transposed result)
        ((3, 5, 12), 8),  # odd rows (plain contraction), wide input
        ((7, 16), 16),
    ],
)
def test_linear_is_float32_accumulation_of_rounded_operands(getkey, shape, d_out):
    x = jax.random.normal(getkey(), shape)
    w = jax.random.normal(getkey(), (d_out, shape[-1]))
    b = jax.random.normal(getkey(), (d_out,))
    g = jax.random.normal(getkey(), (*shape[:-1], d_out))
    y, vjp = jax.vjp(linear_bf16, x, w, b)
    dx, dw, db = vjp(g)
    xr, wr, gr = _rounded(x), _rounded(w), _rounded(g)
    rows_x, rows_g = xr.reshape(-1, shape[-1]), gr.reshape(-1, d_out)
    # Products of bfloat16 numbers are exact in float32; only the float32 sums round.
    np.testing.assert_allclose(y, xr @ wr.T + np.asarray(b), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, gr @ wr, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, rows_g.T @ rows_x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(db, np.asarray(g).reshape(-1, d_out).sum(0), rtol=1e-5, atol=1e-5)
    assert y.dtype == dx.dtype == dw.dtype == db.dtype == jnp.float32


def test_linear_under_vmap_merges_the_batch_into_its_rows(getkey):
    # A per-example layer, vmapped (once and twice), has the gradients of one layer applied to
    # all rows; with a per-example weight each example gets its own weight gradient.
    x = jax.random.normal(getkey(), (2, 3, 4, 8))
    w = jax.random.normal(getkey(), (6, 8))
    b = jax.random.normal(getkey(), (6,))
    c = jax.random.normal(getkey(), (2, 3, 4, 6))

    def loss_vmapped(w, b, x):
        per_example = lambda xe: linear_bf16(xe, w, b)
        return jnp.sum(jax.vmap(jax.vmap(per_example))(x) * c)

    def loss_flat(w, b, x):
        return jnp.sum(linear_bf16(x.reshape(-1, 8), w, b) * c.reshape(-1, 6))

    got = jax.grad(loss_vmapped, argnums=(0, 1, 2))(w, b, x)
    want = jax.grad(loss_flat, argnums=(0, 1, 2))(w, b, x)
    for a, e in zip(got, want):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5)
    # One vector per example (no row axis of its own).
    vectors, cv = x.reshape(-1, 8), c.reshape(-1, 6)
    got = jax.grad(lambda w: jnp.sum(jax.vmap(lambda xe: linear_bf16(xe, w, b))(vectors) * cv))(w)
    np.testing.assert_allclose(got, want[0], rtol=1e-5, atol=1e-5)

    ws = jax.random.normal(getkey(), (2, 6, 8))
    per_weight = jax.grad(
        lambda ws: jnp.sum(jax.vmap(lambda we, xe: linear_bf16(xe, we, b))(ws, x[:, 0]) * c[:, 0])
    )(ws)
    single = lambda we, xe, ce: jnp.sum(linear_bf16(xe, we, b) * ce)
    for i in range(2):
        want_i = jax.grad(single)(ws[i], x[i, 0], c[i, 0])
        np.testing.assert_allclose(per_weight[i], want_i, rtol=1e-5, atol=1e-5)


def _attention_f64(q, k, v):
    s = np.einsum("hnd,hmd->hnm", q, k)
    p = np.exp(s - s.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def test_attention_matches_the_formula_and_float32_gradients(getkey):
    heads, tokens, head_dim = 3, 10, 8
    q, k, v, d_out = (jax.random.normal(getkey(), (heads, tokens, head_dim)) for _ in range(4))
    q = q * head_dim**-0.5
    out, vjp = jax.vjp(attention_bf16, q, k, v)
    dq, dk, dv = vjp(d_out)
    # Forward: rounded operands, float32 scores and softmax, rounded probabilities.
    p = _attention_f64(_rounded(q), _rounded(k), _rounded(v))
    pr = _rounded(p)
    assert _rel(out, np.einsum("hnm,hmd->hnd", pr, _rounded(v))) < 1e-3
    # Backward: the standard formulas on the same rounded operands.
    dor = _rounded(d_out)
    dp = np.einsum("hnd,hmd->hnm", dor, _rounded(v))
    delta = np.sum(np.asarray(d_out, np.float64) * np.asarray(out, np.float64), -1, keepdims=True)
    ds = _rounded(pr * (dp - delta))
    assert _rel(dq, np.einsum("hnm,hmd->hnd", ds, _rounded(k))) < 1e-3
    assert _rel(dk, np.einsum("hnm,hnd->hmd", ds, _rounded(q))) < 1e-3
    assert _rel(dv, np.einsum("hnm,hnd->hmd", pr, dor)) < 1e-3

    # And they are the float32 attention's gradients to bfloat16 accuracy.
    def exact(q, k, v):
        weights = jax.nn.softmax(jnp.einsum("hnd,hmd->hnm", q, k), axis=-1)
        return jnp.einsum("hnm,hmd->hnd", weights, v)

    want_out, want_vjp = jax.vjp(exact, q, k, v)
    assert _rel(out, want_out) < 2e-2
    for got, want in zip((dq, dk, dv), want_vjp(d_out)):
        assert _rel(got, want) < 3e-2


def _dot_operand_types(hlo: str) -> list[tuple[str, str]]:
    """The element types of every dot's two operands in a compiled HLO module."""
    types = {}
    pairs = []
    for line in hlo.splitlines():
        defined = re.match(r"\s*(?:ROOT )?%(\S+) = (\w+)\[", line)
        if defined:
            types[defined.group(1)] = defined.group(2)
        dot = re.search(r" dot\(%([^,\s]+), %([^)\s]+)\)", line)
        if dot:
            pairs.append((types.get(dot.group(1)), types.get(dot.group(2))))
    return pairs


@pytest.mark.skipif(
    not {"AMX", "AVX-512-BF16"} & set(cpu_info()["isa"]) or jax.default_backend() != "cpu",
    reason="XLA:CPU keeps bfloat16 dots only where the CPU has bfloat16 matrix instructions",
)
def test_every_dot_of_forward_and_backward_stays_bfloat16_on_this_cpu(getkey):
    # The point of the kernels: no dot of the per-example block, vmapped and differentiated,
    # is upcast to float32 by XLA (a dot that contracts rows, or a float32 cotangent, would be).
    batch, tokens, dim, heads = 4, 16, 32, 2
    x = jax.random.normal(getkey(), (batch, tokens, dim))
    w1 = jax.random.normal(getkey(), (4 * dim, dim))
    w2 = jax.random.normal(getkey(), (dim, 4 * dim))
    wqkv = jax.random.normal(getkey(), (3 * dim, dim))
    zeros = lambda n: jnp.zeros((n,))

    def block(xe, w1, w2, wqkv):
        qkv = linear_bf16(xe, wqkv, zeros(3 * dim)).reshape(tokens, 3, heads, dim // heads)
        q, k, v = qkv.transpose(1, 2, 0, 3)
        h = xe + attention_bf16(q, k, v).transpose(1, 0, 2).reshape(tokens, dim)
        return h + linear_bf16(jax.nn.gelu(linear_bf16(h, w1, zeros(4 * dim))), w2, zeros(dim))

    loss = lambda *ws: jnp.sum(jnp.sin(jax.vmap(lambda xe: block(xe, *ws))(x)))
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(w1, w2, wqkv).compile().as_text()
    pairs = _dot_operand_types(hlo)
    assert len(pairs) >= 13  # 3 linear layers x 3 dots, attention 2 forward + 4 backward, fused
    assert all(pair == ("bf16", "bf16") for pair in pairs), pairs
