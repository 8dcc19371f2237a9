"""The U-Net as a model family: names, presets, flow_matching's recipe (logit-normal times, EMA
warm-up, EDM grid) and the tools (train, sample, analyze) on a U-Net run.

The network itself is tested in `test_unet.py`; the facts are flow_matching's `examples/image`.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqdisp
from eqdisp.config import PRESETS, ConfigError, ExperimentConfig, RunConfig, SamplerConfig


def _count(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree) if hasattr(leaf, "shape"))


# ----------------------------------------------------------------------------------------------
# Names, sizes and presets


def test_unet_names_decode_to_the_depth_of_the_network_they_build():
    from eqdisp.models import make_model, parse_model_name

    cifar = jax.eval_shape(
        lambda k: make_model("UNet-CIFAR", in_channels=3, key=k), jax.random.key(0)
    )
    assert type(cifar).__name__ == "UNet"
    assert parse_model_name("UNet-CIFAR") == ("UNet", 29, 256, 1, 1)
    assert cifar.depth == 29 and cifar.dropout == 0.3
    assert _count(cifar) == 55_676_419  # the cifar10 configuration (test_unet.py)
    tiny = jax.eval_shape(lambda k: make_model("UNet-T", in_channels=1, key=k), jax.random.key(0))
    assert parse_model_name("UNet-T").depth == tiny.depth == 8
    with pytest.raises(
        ConfigError, match=r"model.name='UNet-B/2' is not allowed: .*UNet-\{CIFAR,T\}"
    ):
        parse_model_name("UNet-B/2")


def test_unet_presets_follow_flow_matching_and_the_paper():
    cifar = PRESETS["unet-cifar"][1]
    assert cifar.model.name == "UNet-CIFAR" and cifar.model.in_channels == 3
    assert cifar.disp.block_indices(29) == (15,)  # "residual block 15", 0-based
    assert (cifar.disp.weight, cifar.disp.tau) == (0.5, 0.5)
    t = cifar.transport
    assert (t.time_distribution, t.time_mean, t.time_std) == ("logit_normal", 1.2, 1.2)
    o = cifar.optim
    assert (o.lr, o.b1, o.b2, o.weight_decay, o.ema_decay, o.ema_warmup) == (
        1e-4,
        0.9,
        0.95,
        0.01,
        0.999,
        True,
    )
    s = cifar.sampler
    assert (s.mode, s.ode_method, s.steps, s.time_grid) == ("ode", "heun", 51, "edm")
    assert (cifar.train.batch_size, cifar.train.steps) == (512, 174_600)
    tiny = PRESETS["unet-tiny"][1]
    assert tiny.data.source == "digits" and tiny.model.input_size == 8
    assert tiny.disp.block_indices(8) == (5,)  # the second decoder block at the lowest level


@pytest.mark.parametrize(
    "model, match",
    [
        ({"learn_sigma": True}, r"model.learn_sigma=True is not allowed: expected False for UNet"),
        ({"remat": "dots"}, r"model.remat='dots' is not allowed: expected 'auto' for UNet"),
        (
            {"bf16_mode": "dots"},
            r"model.bf16_mode='dots' is not allowed: expected 'auto' or 'cast'",
        ),
        (
            {"input_size": 7},
            r"model.input_size=7 is not allowed: expected a multiple of 2 for UNet-T",
        ),
    ],
)
def test_unet_configs_that_do_not_apply_are_one_line_errors(model, match):
    cfg = PRESETS["unet-tiny"][1]
    with pytest.raises(ConfigError, match=match):
        dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model))


def test_the_edm_grid_is_only_for_fixed_step_odes_of_the_linear_path():
    with pytest.raises(
        ConfigError, match=r"sampler.time_grid='edm' is not allowed: expected 'uniform' unless"
    ):
        SamplerConfig(mode="sde", time_grid="edm")
    with pytest.raises(ConfigError, match=r"sampler.steps=2 is not allowed: expected an int >= 3"):
        SamplerConfig(steps=2, time_grid="edm")
    edm = SamplerConfig(steps=51, time_grid="edm")
    with pytest.raises(ConfigError, match=r"'uniform' for model.name='DiT-B/2'"):
        ExperimentConfig(model=eqdisp.config.ModelConfig(name="DiT-B/2"), sampler=edm)
    with pytest.raises(ConfigError, match=r"transport.path='GVP'"):
        ExperimentConfig(sampler=edm, transport=eqdisp.config.TransportConfig(path="GVP"))


# ----------------------------------------------------------------------------------------------
# flow_matching's recipe: times, grid, EMA


def test_logit_normal_times_have_the_configured_logit_moments():
    from eqdisp.config import TransportConfig
    from eqdisp.transport import LOGIT_NORMAL_CLIP

    cfg = TransportConfig(time_distribution="logit_normal", time_mean=1.2, time_std=1.2)
    t = np.asarray(eqdisp.make_transport(cfg).sample_train_time(jax.random.key(1), (200_000,)))
    assert t.dtype == np.float32 and LOGIT_NORMAL_CLIP[0] <= t.min() and t.max() <= 1.0
    logit = np.log(t) - np.log1p(-t.astype(np.float64))
    # Standard errors of the mean and std of 200k normals: 0.0027 and 0.0019.
    assert abs(logit.mean() - 1.2) < 0.015 and abs(logit.std() - 1.2) < 0.01
    # Skewed towards data (t = 1): P(t > 1/2) = P(n > -1) = 0.841.
    assert abs((t > 0.5).mean() - 0.8413) < 0.005
    uniform = eqdisp.make_transport(TransportConfig()).sample_train_time(jax.random.key(1), (4,))
    np.testing.assert_array_equal(uniform, jax.random.uniform(jax.random.key(1), (4,)))


def test_edm_grid_matches_the_noise_levels_of_karras_et_al():
    from eqdisp.samplers import edm_time_grid

    ts = edm_time_grid(51)
    assert ts.shape == (51,) and ts.dtype == np.float32
    for i in (0, 1, 24, 49):  # sigma_i of EDM's eq. (5), written out independently
        sigma = (80 ** (1 / 7) + i / 49 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
        assert ts[i] == pytest.approx(1 / (1 + sigma), rel=1e-6)
    assert ts[0] == pytest.approx(1 / 81) and ts[49] == pytest.approx(1 / 1.002) and ts[50] == 1.0
    assert np.all(np.diff(ts) > 0)


def test_an_ode_on_the_edm_grid_steps_through_its_points():
    from eqdisp.samplers import edm_time_grid, solve_ode

    # dx/dt = t integrates exactly under Heun's trapezoid: x(1) - x(t_0) = (1 - t_0^2) / 2.
    x, stats = solve_ode(
        lambda x, t: t * jnp.ones_like(x), jnp.zeros(3), t0=0.0, t1=1.0, steps=11, grid="edm"
    )
    t0 = float(edm_time_grid(11)[0])
    np.testing.assert_allclose(x, (1 - t0**2) / 2, rtol=1e-6)
    assert int(stats.nfe) == 20
    uniform, _ = solve_ode(
        lambda x, t: t * jnp.ones_like(x), jnp.zeros(3), t0=0.0, t1=1.0, steps=11
    )
    np.testing.assert_allclose(uniform, 0.5, rtol=1e-6)


def test_ema_warmup_decays_as_flow_matching_then_as_configured():
    from eqdisp.train import ema_decay_at

    decays = [float(ema_decay_at(jnp.asarray(n), 0.999)) for n in (1, 8, 10_000)]
    assert decays == pytest.approx([2 / 11, 0.5, 0.999])


def test_a_unet_train_step_under_the_type_checker_applies_the_ema_warmup():
    import equinox as eqx

    from eqdisp.train import init_train_state, make_optimizer, make_train_step

    cfg = PRESETS["unet-tiny"][1]
    model = eqdisp.make_model(cfg.model, key=jax.random.key(0))
    optimizer = make_optimizer(cfg.optim)
    state = init_train_state(model, optimizer, key=jax.random.key(1))
    before = jax.tree.map(jnp.copy, state.ema)
    step = make_train_step(
        optimizer, eqdisp.make_objective(cfg), cfg.disp, ema_decay=0.99, ema_warmup=True
    )
    x = jax.random.normal(jax.random.key(2), (16, 1, 8, 8))
    state, metrics = step(state, x, jnp.zeros((16,), jnp.int32))
    assert np.isfinite(float(metrics["loss_disp"])) and np.isfinite(float(metrics["loss_diff"]))
    params = eqx.filter(state.model, eqx.is_inexact_array)
    decay = 2 / 11  # update 1: min(0.99, 2 / 11)
    expect = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, before, params)
    for a, b in zip(jax.tree.leaves(state.ema), jax.tree.leaves(expect), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# The tools on a U-Net run


@pytest.fixture(scope="module")
def unet_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("unet") / "run"
    cfg = PRESETS["unet-tiny"][1]
    run = RunConfig(steps=3, batch_size=16, out=str(out), log_every=1, sample_count=0)
    eqdisp.train(dataclasses.replace(cfg, train=run))
    return out


def test_sampling_a_unet_run_uses_its_edm_heun_sampler(unet_run, tmp_path):
    from cli import sample

    summary = sample.main(
        [str(unet_run), "--num", "4", "--batch-size", "4", "--out", str(tmp_path / "s.npz")]
    )
    images = np.load(tmp_path / "s.npz")["arr_0"]
    assert summary["num"] == 4 and images.shape == (4, 8, 8, 1) and images.dtype == np.uint8
    with pytest.raises(ConfigError, match=r"sampler.time_grid='edm' is not allowed"):
        sample.main(
            [str(unet_run), "--num", "4", "--mode", "sde", "--out", str(tmp_path / "t.npz")]
        )


def test_analysing_a_unet_gives_each_block_what_it_gets_alone(unet_run):
    from analysis import Options, analyze_runs

    model = eqdisp.load_checkpoint(unet_run).state.model
    assert model.tap_groups((0, 1, 2, 5, 6, 7)) == ((0, 6, 7), (1, 2, 5))
    opts = Options(t=(0.5,), examples=32, group_size=8, progress=False)
    every = analyze_runs([unet_run], opts, analyses=("norms", "spectra"))[0]
    assert every.blocks == tuple(range(1, 9)) and every.disp_blocks == (6,)
    for block in (2, 7):  # one block of each resolution, 1-based
        alone = analyze_runs(
            [unet_run], dataclasses.replace(opts, blocks=str(block)), analyses=("norms", "spectra")
        )[0]
        for key in ("norm_token", "norm_example", "effective_rank", "disp_infonce_l2"):
            np.testing.assert_allclose(
                every.values[key][:, block - 1], alone.values[key][:, 0], rtol=1e-5, err_msg=key
            )


def test_unet_diagnostics_mask_what_the_dispersive_term_reaches():
    import equinox as eqx

    from eqdisp.objective import loss_terms
    from eqdisp.train import init_train_state, make_diagnostics, make_optimizer

    cfg = PRESETS["unet-tiny"][1]
    model = eqdisp.make_model(cfg.model, key=jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    # Perturb the zero-initialised output convs, so every ResBlock's own branch is live.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    leaves = [a + 0.05 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys, strict=True)]
    model = eqx.combine(jax.tree.unflatten(tree, leaves), static)
    x = jax.random.normal(jax.random.key(2), (16, 1, 8, 8))
    y = jnp.zeros((16,), jnp.int32)
    objective = eqdisp.make_objective(cfg)

    def disp_term(p):
        m = eqx.combine(p, static)
        return loss_terms(m, x, y, key=jax.random.key(4), objective=objective, disp=cfg.disp)[1][0]

    grads = jax.grad(disp_term)(eqx.filter(model, eqx.is_inexact_array))
    mask = model.upstream_mask(5)
    outside = jax.tree.map(lambda g, m: jnp.max(jnp.abs(g * (1 - m))), grads, mask)
    inside = jax.tree.map(lambda g, m: jnp.max(jnp.abs(g * m)), grads, mask)
    assert max(float(v) for v in jax.tree.leaves(outside)) == 0.0
    assert float(jnp.max(jnp.abs(grads.res_blocks[5].out_conv.weight))) > 0  # the tapped block
    assert float(jnp.max(jnp.abs(grads.input_conv.weight))) > 0
    assert sum(float(v) > 0 for v in jax.tree.leaves(inside)) > len(jax.tree.leaves(inside)) // 2

    optimizer = make_optimizer(cfg.optim)
    state = init_train_state(model, optimizer, key=jax.random.key(1))
    out = {k: float(v) for k, v in make_diagnostics(objective, cfg.disp)(state, x, y).items()}
    assert set(out) == {
        "grad_norm_diff",
        "disp_gap/b6",
        "grad_norm_disp/b6",
        "grad_norm_disp_unweighted/b6",
        "grad_norm_diff/b6",
        "grad_cos/b6",
    }
    assert all(np.isfinite(v) for v in out.values()) and out["disp_gap/b6"] >= -1e-5
    assert out["grad_norm_disp/b6"] == pytest.approx(0.5 * out["grad_norm_disp_unweighted/b6"])


def test_the_analysis_knows_which_families_learned_the_null_label():
    from analysis import null_label_trained

    assert null_label_trained(PRESETS["sit-tiny"][1])  # model.class_dropout_prob 0.1
    assert null_label_trained(PRESETS["unet-tiny"][1])  # unconditional: no label is ever seen
    mf = PRESETS["meanflow-tiny"][1]  # model.class_dropout_prob 0; MeanFlow drops labels itself
    assert mf.model.class_dropout_prob == 0.0 and null_label_trained(mf)
    no_drop = dataclasses.replace(mf.meanflow, class_dropout_prob=0.0)
    assert not null_label_trained(dataclasses.replace(mf, meanflow=no_drop))
