"""The training objective: lambda = 0 is exactly the baseline; the regulariser is what it claims."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import pytest

import eqdisp
from eqdisp.config import DispConfig, TransportConfig


def _model(key, **overrides):
    model = eqdisp.make_model(
        "SiT-T/2",
        input_size=8,
        in_channels=1,
        num_classes=10,
        learn_sigma=False,
        key=key,
        **overrides,
    )
    # Move off the adaLN-Zero init so every block (and hence every tap) does something.
    noise = jr.split(jr.key(1), len(jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))))
    leaves, tree = jax.tree.flatten(eqx.filter(model, eqx.is_inexact_array))
    leaves = [leaf + 0.02 * jr.normal(k, leaf.shape) for leaf, k in zip(leaves, noise)]
    return eqx.combine(jax.tree.unflatten(tree, leaves), model)


def _batch(key, n=16):
    key_x, key_y = jr.split(key)
    return jr.normal(key_x, (n, 1, 8, 8)), jr.randint(key_y, (n,), 0, 10)


def _loss_and_grad(model, x, y, key, disp):
    transport = eqdisp.make_transport(TransportConfig())
    fn = eqx.filter_value_and_grad(eqdisp.training_loss, has_aux=True)
    return eqx.filter_jit(fn)(model, x, y, key=key, objective=transport, disp=disp)


def _baseline(model, x1, y, key):
    """SiT's loss written out by hand, with the same randomness as ``training_loss``."""
    key_noise, key_time, key_drop, _ = jr.split(key, 4)
    x0 = jr.normal(key_noise, x1.shape)
    t = jr.uniform(key_time, (x1.shape[0],))
    x_t = t[:, None, None, None] * x1 + (1 - t[:, None, None, None]) * x0
    out = jax.vmap(lambda a, b, c, k: model(a, b, c, key=k))(
        x_t, t, y, jr.split(key_drop, x1.shape[0])
    )
    return jnp.mean((out - (x1 - x0)) ** 2)


def test_zero_weight_and_none_are_exactly_the_baseline(getkey):
    model, (x, y), key = _model(getkey()), _batch(getkey()), getkey()
    (loss_none, _), grads_none = _loss_and_grad(model, x, y, key, DispConfig(variant="none"))
    (loss_zero, aux), grads_zero = _loss_and_grad(model, x, y, key, DispConfig(weight=0.0))
    assert jnp.array_equal(loss_none, loss_zero) and float(aux["loss_disp"]) == 0.0
    assert jax.tree.all(jax.tree.map(jnp.array_equal, grads_none, grads_zero))
    baseline = eqx.filter_jit(_baseline)(model, x, y, key)
    assert jnp.allclose(loss_none, baseline, rtol=1e-6, atol=0)


def test_zero_weight_compiles_to_the_baseline_program(getkey):
    model, (x, y), key = _model(getkey()), _batch(getkey()), getkey()
    transport = eqdisp.make_transport(TransportConfig())

    def hlo(disp):
        fn = lambda m: eqdisp.training_loss(m, x, y, key=key, objective=transport, disp=disp)[0]
        return eqx.filter_jit(eqx.filter_grad(fn)).lower(model).as_text()

    assert hlo(DispConfig(weight=0.0)) == hlo(DispConfig(variant="none"))
    assert hlo(DispConfig(weight=0.5)) != hlo(DispConfig(variant="none"))


@pytest.mark.parametrize("blocks, indices", [("2,3", (1, 2)), ("all", tuple(range(6)))])
def test_dispersive_term_is_the_loss_of_the_tapped_block(getkey, blocks, indices):
    model, (x, y), key = _model(getkey()), _batch(getkey()), getkey()
    assert model.depth == 6
    disp = DispConfig(variant="infonce_l2", weight=0.5, tau=0.5, blocks=blocks, group_size=8)
    (loss, aux), _ = _loss_and_grad(model, x, y, key, disp)
    assert jnp.allclose(loss, aux["loss_diff"] + 0.5 * aux["loss_disp"], rtol=1e-6)

    key_noise, key_time, key_drop, _ = jr.split(key, 4)
    x0 = jr.normal(key_noise, x.shape)
    t = jr.uniform(key_time, (x.shape[0],))
    x_t = t[:, None, None, None] * x + (1 - t[:, None, None, None]) * x0
    _, taps = jax.vmap(lambda a, b, c, k: model.forward_with_taps(a, b, c, key=k))(
        x_t, t, y, jr.split(key_drop, x.shape[0])
    )
    expected = sum(
        eqdisp.dispersive_loss(taps.blocks[:, b], "infonce_l2", tau=0.5, group_size=8)
        for b in indices
    ) / len(indices)
    assert jnp.allclose(aux["loss_disp"], expected, rtol=1e-5)


def test_regulariser_gradient_stops_at_the_tapped_block(getkey):
    """Blocks after the regularised one get no gradient from the dispersive term."""
    model, (x, y), key = _model(getkey()), _batch(getkey()), getkey()
    transport = eqdisp.make_transport(TransportConfig())
    disp = DispConfig(blocks="2", weight=1.0)

    def disp_only(m):
        return eqdisp.training_loss(m, x, y, key=key, objective=transport, disp=disp)[1][
            "loss_disp"
        ]

    grads = eqx.filter_jit(eqx.filter_grad(disp_only))(model)
    per_block = jnp.stack(
        [
            jnp.sum(jnp.abs(leaf.reshape(leaf.shape[0], -1)), axis=1)
            for leaf in jax.tree.leaves(eqx.filter(grads.blocks, eqx.is_inexact_array))
        ]
    ).sum(axis=0)
    assert per_block.shape == (model.depth,)
    assert jnp.all(per_block[:2] > 0) and jnp.all(per_block[2:] == 0)


@pytest.mark.parametrize("mode", ["independent", "restricted"])
@pytest.mark.parametrize("variant", ["infonce_l2", "infonce_cosine", "hinge", "covariance"])
def test_contrastive_counterparts_train(getkey, mode, variant):
    model, (x, y), key = _model(getkey()), _batch(getkey()), getkey()
    disp = DispConfig(variant=variant, contrastive=mode, group_size=8)
    (loss, aux), grads = _loss_and_grad(model, x, y, key, disp)
    assert jnp.isfinite(loss) and jnp.isfinite(aux["loss_disp"])
    assert jax.tree.all(jax.tree.map(lambda g: bool(jnp.all(jnp.isfinite(g))), grads))


def test_restricted_second_view_stays_close(getkey):
    from eqdisp.objective import _second_view_time

    t = jr.uniform(getkey(), (4096,))
    disp = DispConfig(contrastive="restricted")
    t_pos = _second_view_time(getkey(), t, disp, eqdisp.make_transport(TransportConfig()))
    assert float(jnp.max(jnp.abs(t_pos - t))) <= 0.005 + 1e-7
    assert float(jnp.min(t_pos)) >= 0.0 and float(jnp.max(t_pos)) <= 1.0
    # DiT: integer steps in [0, 999], within 0.005 of the range (5 steps).
    steps = jnp.round(t * 999)
    s_pos = _second_view_time(getkey(), steps, disp, eqdisp.make_diffusion())
    assert jnp.array_equal(s_pos, jnp.round(s_pos)) and float(jnp.max(jnp.abs(s_pos - steps))) <= 5


def test_dit_models_train_with_dits_diffusion():
    from eqdisp.config import ExperimentConfig, ModelConfig
    from eqdisp.diffusion import GaussianDiffusion

    assert isinstance(
        eqdisp.make_objective(ExperimentConfig(model=ModelConfig("DiT-B/2"))), GaussianDiffusion
    )
    assert isinstance(eqdisp.make_objective(ExperimentConfig()), eqdisp.Transport)
