"""The training loop: exact resume, NaN stops, SIGTERM keeps the work, one-line errors."""

import dataclasses
import json
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import pytest

import eqdisp
from eqdisp.config import PRESETS, ConfigError, DataConfig, OptimConfig, RunConfig


def _tiny(out, **run):
    _, cfg = PRESETS["sit-tiny"]
    defaults = dict(steps=6, batch_size=16, out=str(out), log_every=1, checkpoint_every=3, sample_count=0)
    return dataclasses.replace(cfg, train=RunConfig(**{**defaults, **run}))


def _params(path):
    ckpt = eqdisp.load_checkpoint(path)
    return ckpt, jax.tree.leaves(eqx_filter(ckpt.state))


def eqx_filter(tree):
    import equinox as eqx

    return eqx.filter(tree, eqx.is_inexact_array)


def test_resume_is_bit_exact(tmp_path):
    whole = eqdisp.train(_tiny(tmp_path / "whole"))
    eqdisp.train(_tiny(tmp_path / "split", steps=4))  # stops between two checkpoints
    resumed = eqdisp.train(_tiny(tmp_path / "split"))
    assert whole["step"] == resumed["step"] == 6
    a, leaves_a = _params(tmp_path / "whole")
    b, leaves_b = _params(tmp_path / "split")
    assert a.step == b.step == 6
    assert dataclasses.replace(a.config, train=b.config.train) == b.config
    assert all(bool(jnp.array_equal(x, y)) for x, y in zip(leaves_a, leaves_b, strict=True))
    lines = [json.loads(l) for l in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    whole_lines = [json.loads(l) for l in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == list(range(1, 7))
    assert [l["loss"] for l in lines] == [l["loss"] for l in whole_lines]


def test_resume_refuses_a_different_experiment(tmp_path):
    eqdisp.train(_tiny(tmp_path, steps=1))
    changed = dataclasses.replace(_tiny(tmp_path), optim=OptimConfig(lr=3e-4))
    with pytest.raises(ConfigError, match="optim.lr"):
        eqdisp.train(changed)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = dataclasses.replace(
        _tiny(tmp_path, steps=20, checkpoint_every=1), optim=OptimConfig(lr=1e30, ema_decay=0.9)
    )
    with pytest.raises(eqdisp.TrainingError, match=r"non-finite loss at step (\d+)") as info:
        eqdisp.train(cfg)
    bad_step = int(info.value.args[0].split("step ")[1].split()[0])
    ckpt = eqdisp.load_checkpoint(tmp_path)
    assert ckpt.step == bad_step - 1
    assert "\n" not in str(info.value)


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "cli.train", "sit-tiny", "--train.out", str(out),
           "--train.steps", "100000", "--train.log-every", "1", "--train.checkpoint-every", "100000",
           "--train.batch-size", "16"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            metrics = out / "metrics.jsonl"
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
                break
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by"] == "SIGTERM" and summary["step"] >= 3
    assert eqdisp.load_checkpoint(out).step == summary["step"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data.source", "folder", "--data.path", "/nonexistent/images"], "/nonexistent/images"),
        (["--train.batch-size", "20"], "disp.group_size"),
        (["--disp.blocks", "9"], "disp.blocks"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, args, message):
    cmd = [sys.executable, "-m", "cli.train", "sit-tiny", "--train.out", str(tmp_path / "r"), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.slow
def test_sit_b2_preset_runs_on_synthetic_data(tmp_path):
    _, cfg = PRESETS["sit-b2"]
    cfg = dataclasses.replace(
        cfg,
        data=DataConfig(source="synthetic"),
        disp=dataclasses.replace(cfg.disp, group_size=2),
        train=RunConfig(steps=2, batch_size=2, out=str(tmp_path), log_every=1, sample_count=0),
    )
    summary = eqdisp.train(cfg)
    assert summary["step"] == 2 and jnp.isfinite(summary["loss"])
