"""Tiny run directories for the analysis tests, written without training (fast).

adaLN-Zero makes every block of a fresh model the identity, so the weights are perturbed with
Gaussian noise to give each block (and each run) a different representation.
"""

import dataclasses
import pathlib

import equinox as eqx
import jax
import jax.random as jr


def make_run(
    out: pathlib.Path,
    *,
    variant: str,
    steps: tuple[int, ...] = (1,),
    seed: int = 0,
    class_dropout_prob: float | None = None,
):
    """Write a sit-tiny run directory at `out` with one checkpoint per step; returns its config.

    `class_dropout_prob` overrides the preset's label dropout (0: a run whose null label was never
    trained; it only changes the config, the weights are drawn the same way).
    """
    import eqdisp
    from eqdisp.config import PRESETS, DispConfig, RunConfig
    from eqdisp.train import Checkpointer

    base = PRESETS["sit-tiny"][1]
    disp = base.disp if variant != "none" else DispConfig(variant="none")
    if class_dropout_prob is not None:
        model_cfg = dataclasses.replace(base.model, class_dropout_prob=class_dropout_prob)
        base = dataclasses.replace(base, model=model_cfg)
    cfg = dataclasses.replace(
        base,
        disp=dataclasses.replace(disp, variant=variant),
        train=RunConfig(steps=max(steps), batch_size=16, out=str(out), sample_count=0),
    )
    key_model, key_train = jr.split(jr.key(cfg.train.seed))
    model = eqdisp.make_model(cfg.model, key=key_model)
    optimizer = eqdisp.make_optimizer(cfg.optim)
    with Checkpointer(out / "checkpoints", keep=10) as ckpt:
        for i, step in enumerate(steps):
            key = jr.fold_in(jr.key(seed), i)
            params, static = eqx.partition(model, eqx.is_inexact_array)
            leaves, treedef = jax.tree.flatten(params)
            keys = jr.split(key, len(leaves))
            noisy = [p + 0.2 * jr.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)]
            perturbed = eqx.combine(jax.tree.unflatten(treedef, noisy), static)
            state = eqdisp.init_train_state(perturbed, optimizer, key=key_train)
            ckpt.save(step, state, config=cfg)
        ckpt.wait()
    return cfg
