"""``python -m cli.sample`` and ``python -m cli.evaluate`` end to end on a tiny run."""

import dataclasses
import io
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A ``sit-tiny`` run directory with one checkpoint of the initial weights (no training step:
    sampling only needs a valid checkpoint, and this avoids compiling the train step)."""
    import jax.random as jr

    from eqdisp.config import PRESETS, RunConfig
    from eqdisp.models import make_model
    from eqdisp.train import Checkpointer, init_train_state, make_optimizer

    out = tmp_path_factory.mktemp("run")
    cfg = PRESETS["sit-tiny"][1]
    cfg = dataclasses.replace(cfg, train=RunConfig(steps=0, batch_size=16, out=str(out), sample_count=0))
    key_model, key_train = jr.split(jr.key(0))
    state = init_train_state(make_model(cfg.model, key=key_model), make_optimizer(cfg.optim), key=key_train)
    with Checkpointer(out / "checkpoints") as ckpt:
        ckpt.save(0, state, config=cfg)
    return out


def _cmd(run, out, *extra):
    return [sys.executable, "-m", "cli.sample", str(run), "--num", "22", "--batch-size", "2",
            "--steps", "8", "--cfg-scale", "1.5", "--out", str(out), *extra]


def test_sample_cli_resumes_after_sigkill_and_matches_a_one_shot_run(tiny_run, tmp_path, monkeypatch):
    from cli.sample import main
    from eqdisp.eval import EvalError, generate, partial_dir

    out = tmp_path / "samples.npz"
    partial = partial_dir(out)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(_cmd(tiny_run, out), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list(partial.glob("batch_*.npz")):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "no batch written within 120 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(partial.glob("batch_*.npz")))
    assert not out.exists() and 1 <= done < 11, f"{done} of 11 batches before the kill"

    # Another seed must not be mixed into these batches.
    with pytest.raises(EvalError, match="another sampling run"):
        generate(tiny_run, num=22, out=out, batch_size=2, seed=1, progress=False)

    resumed = subprocess.run(_cmd(tiny_run, out), check=False, cwd=REPO, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr and not partial.exists()

    one_shot = tmp_path / "one_shot.npz"
    writes = []  # (stream, text) in the order written, across stdout and stderr
    for name in ("stdout", "stderr"):
        monkeypatch.setattr(sys, name, _Recorder(name, writes))
    main([str(tiny_run), "--num", "22", "--batch-size", "2", "--steps", "8", "--cfg-scale", "1.5",
          "--out", str(one_shot), "--grid", str(tmp_path / "grid.png")])
    monkeypatch.undo()
    # One line on stderr with the plan and its estimate, before the progress lines and the summary.
    plans = [i for i, (name, text) in enumerate(writes) if "estimated total" in text]
    assert len(plans) == 1 and writes[plans[0]][0] == "stderr", writes
    plan = writes[plans[0]][1]
    assert plan.count("\n") <= 1 and plan.startswith(
        "sampling 22 images in 11 batches of 2 (ODE heun, 8 grid points = 14 evaluations each, "
        "guidance 1.5 doubles the batch); compile "
    ), plan
    progress = [i for i, (name, text) in enumerate(writes) if "/22" in text]
    summary = [i for i, (name, text) in enumerate(writes) if name == "stdout" and text.strip()]
    assert progress and summary and plans[0] < min(progress) and plans[0] < min(summary)
    with np.load(out) as a, np.load(one_shot) as b:
        assert a["arr_0"].shape == (22, 8, 8, 1) and a["arr_0"].dtype == np.uint8
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        np.testing.assert_array_equal(a["labels"], b["labels"])
        assert a["labels"].min() >= 0 and a["labels"].max() < 10
    assert (tmp_path / "grid.png").is_file()

    # An existing output is not overwritten by accident.
    with pytest.raises(EvalError, match="exists"):
        generate(tiny_run, num=22, out=out, batch_size=2, progress=False)


class _Recorder(io.StringIO):
    """A text stream that logs each write with the stream's name, to check the order of lines."""

    def __init__(self, name: str, writes: list):
        super().__init__()
        self.stream, self.writes = name, writes

    def write(self, text: str) -> int:
        self.writes.append((self.stream, text))
        return super().write(text)


@pytest.mark.parametrize(
    "options, expected",
    [
        ({}, "ODE heun, 250 grid points = 498 evaluations each"),
        ({"ode_method": "euler", "steps": 50}, "ODE euler, 50 grid points = 49 evaluations each"),
        ({"ode_method": "dopri5"}, "ODE dopri5, adaptive evaluations (rtol 0.001, atol 1e-06)"),
        ({"mode": "sde"}, "SDE euler, 250 grid points = 250 evaluations each"),
        ({"mode": "sde", "sde_method": "heun", "last_step": "none"},
         "SDE heun, 250 grid points = 498 evaluations each"),
        ({"cfg_scale": 4.0, "cfg_interval": (0.3, 1.0)},
         "ODE heun, 250 grid points = 498 evaluations each, "
         "guidance 4 doubles the batch for t in [0.3, 1]"),
        ({"steps": 250, "cfg_scale": 1.5, "diffusion": True},
         "DDPM, 250 steps = 250 evaluations each, guidance 1.5 doubles the batch"),
    ],
)
def test_the_plan_line_counts_network_evaluations(options, expected):
    from eqdisp.config import SamplerConfig, TransportConfig
    from eqdisp.diffusion import make_diffusion
    from eqdisp.transport import make_transport

    options = dict(options)
    dit = options.pop("diffusion", False)
    objective = make_diffusion() if dit else make_transport(TransportConfig())
    assert objective.describe_sampler(SamplerConfig(**options)) == expected


def test_sample_then_evaluate_reports_fid_classifier(tiny_run, tmp_path, tmp_path_factory, monkeypatch):
    from cli.evaluate import main as evaluate_main
    from eqdisp.eval import generate

    cache = tmp_path_factory.getbasetemp() / "xdg-cache"  # shared with test_eval's classifier
    cache.mkdir(exist_ok=True)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    out = tmp_path / "samples.npz"
    summary = generate(tiny_run, num=30, out=out, batch_size=8, labels=3, progress=False,
                       sampler=dataclasses.replace(_sampler(tiny_run), steps=4))
    assert summary["num"] == 30 and summary["batches"] == 4
    with np.load(out) as data:
        assert (data["labels"] == 3).all()
    result = evaluate_main([str(out), "--ref", "digits-test"])
    report = json.loads((tmp_path / "samples.metrics.json").read_text())
    assert report["fid"] == pytest.approx(result["fid"]) and np.isfinite(report["fid"])
    assert report["num_samples"] == 30 and report["num_reference_images"] == 297
    assert 1.0 <= report["inception_score"] <= 10.0
    assert 0.0 <= report["precision"] <= 1.0 and 0.0 <= report["recall"] <= 1.0


def _sampler(run):
    from eqdisp import load_checkpoint

    return load_checkpoint(run).config.sampler


def test_sampling_over_eight_devices_matches_one_device(tiny_run, tmp_path):
    """The batch is split over all devices; the images do not depend on how many there are."""
    from cli.sample import main

    args = ["--num", "16", "--batch-size", "8", "--steps", "6", "--cfg-scale", "1.5"]
    main([str(tiny_run), *args, "--out", str(tmp_path / "one.npz")])
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    code = "import jax, sys; from cli.sample import main; assert jax.device_count() == 8; main(sys.argv[1:])"
    subprocess.run([sys.executable, "-c", code, str(tiny_run), *args, "--out", str(tmp_path / "eight.npz")],
                   cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
    one, eight = (np.load(tmp_path / f"{n}.npz")["arr_0"].astype(np.int16) for n in ("one", "eight"))
    # Per-device batches of 1 instead of 8 may round matmuls differently: at most one uint8 level.
    assert one.shape == eight.shape == (16, 8, 8, 1)
    assert np.max(np.abs(one - eight)) <= 1 and np.mean(one == eight) > 0.99
