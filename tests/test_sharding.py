"""Sharding: the same global batch gives the same training on 1 device, 8 devices, FSDP and 2 processes.

The multi-device cases run in fresh processes (``sharding_worker.py``) that ask for 8 fake CPU
devices before touching one, so this process keeps its single device.

The reference is the plain step (no mesh) on one device of the 8-device process; the 2-process
run (one CPU device each) is compared with it too.

Tolerances (float32, two AdamW steps on SiT-T/2, Dispersive Loss on groups of 8). Nothing is
bitwise, and nothing can be: a sharded step sums each gradient (and the batch mean of the loss) as
per-device partial sums followed by an all-reduce, a different float32 order from one device's
reduction. Even the *same* single-device program differs by ~3e-6 in the parameters between a
process with 1 CPU device and one with 8 (XLA's CPU thread pool splits reductions differently).

- Losses and the gradient norm agree to ``LOSS_RTOL`` = 5e-7, about 4 float32 ulps (measured: at
  most 2 ulps). The gradient norm is what catches a gradient scaled by the device count, to which
  Adam's parameters are blind.
- Parameters agree to ``PARAM_ATOL`` = 1e-5, 1% of one update at the learning rate 1e-3
  (measured: 4.8e-6 data parallel, 6.4e-6 FSDP, 2.6e-6 two processes). Adam divides by
  ``sqrt(v) + eps`` with ``eps = 1e-8``: for a weight whose gradient is ~eps (a near
  cancellation), a rounding difference of 1e-11 in the gradient moves the update by
  ``lr * 1e-11 / eps = 1e-6``.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("sharding_worker.py")
TIMEOUT = 120
LOSS_RTOL = 5e-7
PARAM_ATOL = 1e-5


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env.update(JAX_PLATFORMS="cpu", **extra)
    return env


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(spec: dict, **env) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(WORKER), json.dumps(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(**env),
    )


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    """All worker processes, started together so their start-up and compiles overlap.

    - ``eight``: one process, 8 fake CPU devices: the plain step on one device (the reference),
      data parallel (8 x 1) and FSDP (data 4 x fsdp 2);
    - ``two``: two processes with one CPU device each, joined over loopback (data parallel 2 x 1).
    """
    out = tmp_path_factory.mktemp("sharding")
    address = f"127.0.0.1:{_free_port()}"
    procs = {
        "eight": _start({"devices": 8, "runs": [None, 1, 2], "out": str(out / "eight")}),
        **{
            f"two{i}": _start(
                {"devices": 1, "runs": [1], "out": str(out / "two")},
                JAX_COORDINATOR_ADDRESS=address,
                JAX_NUM_PROCESSES="2",
                JAX_PROCESS_ID=str(i),
            )
            for i in range(2)
        },
    }
    results = {}
    try:
        for name, proc in procs.items():
            try:
                stdout, stderr = proc.communicate(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                stdout, stderr = proc.communicate()
            results[name] = (proc.returncode, stdout, stderr)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return out, results


def _result(workers, name) -> dict:
    _, results = workers
    returncode, stdout, stderr = results[name]
    assert returncode == 0, f"{name} exited with {returncode}:\n{stderr[-4000:]}"
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, stdout
    return json.loads(lines[-1].removeprefix("RESULT "))


def _params(workers, name, index) -> dict[str, np.ndarray]:
    out, _ = workers
    with np.load(out / f"{name}.{index}.npz") as data:
        return {k: data[k] for k in data.files}


def _metric(run, key) -> np.ndarray:
    return np.array([float.fromhex(m[key]) for m in run["metrics"]])


def _assert_same_training(run, ref, params, ref_params):
    for key in ("loss", "loss_diff", "loss_disp", "grad_norm"):
        got, want = _metric(run, key), _metric(ref, key)
        np.testing.assert_allclose(got, want, rtol=LOSS_RTOL, atol=0, err_msg=key)
    assert params.keys() == ref_params.keys()
    for name in ref_params:
        np.testing.assert_allclose(
            params[name], ref_params[name], rtol=0, atol=PARAM_ATOL, err_msg=name
        )


def test_data_parallel_matches_one_device(workers):
    info = _result(workers, "eight")
    assert info["device_count"] == 8
    single, dp = info["runs"][0], info["runs"][1]
    assert single["x_shards"] == ["(32, 1, 8, 8)"]
    # 4 consecutive examples per device: every group of 8 straddles two devices (correct, slower).
    assert dp["x_shards"] == ["(4, 1, 8, 8)"]
    assert dp["x_starts"] == list(range(0, 32, 4))  # in order: the global batch order is kept
    assert all(spec == "P()" for spec in dp["specs_out"].values())
    assert dp["donated"]
    _assert_same_training(dp, single, _params(workers, "eight", 1), _params(workers, "eight", 0))


def test_fsdp_matches_one_device_and_shards_parameters(workers):
    info = _result(workers, "eight")
    single, fsdp = info["runs"][0], info["runs"][2]
    _assert_same_training(fsdp, single, _params(workers, "eight", 2), _params(workers, "eight", 0))
    assert fsdp["x_starts"] == list(range(0, 32, 4))  # the batch is split over data AND fsdp
    specs = fsdp["specs_out"]
    assert specs == fsdp["specs_in"]  # the step keeps the layout it was given (donation reuses it)
    assert specs == fsdp["specs_template"]  # state_sharding of ShapeDtypeStructs: the same layout
    assert fsdp["donated"]
    # The stacked MLP weight, (depth, out, in) = (6, 768, 192), is split along its largest dimension.
    assert specs[".model.blocks.fc1.weight"] == "P(None, 'fsdp')"
    # The weight, its EMA and both Adam moments are split the same way.
    for prefix in (".ema", ".opt_state[0].mu", ".opt_state[0].nu"):
        assert specs[prefix + ".blocks.fc1.weight"] == specs[".model.blocks.fc1.weight"]
    sharded = [name for name, spec in specs.items() if "'fsdp'" in spec]
    assert len(sharded) >= 4 * 6, sharded  # every big weight of model, EMA and moments
    # Small leaves (biases, scalars), the step and the key stay replicated.
    assert specs[".step"] == specs[".key"] == specs[".opt_state[0].count"] == "P()"
    assert specs[".model.blocks.fc1.bias"] == "P()"


def test_two_processes_match_one_process(workers):
    infos = [_result(workers, f"two{i}") for i in range(2)]
    ref = _result(workers, "eight")["runs"][0]  # one process, the whole batch on one device
    assert [(i["process_count"], i["process_index"], i["device_count"]) for i in infos] == [
        (2, 0, 2),
        (2, 1, 2),
    ]
    assert infos[0]["runs"] == infos[1]["runs"]  # both processes saw the same global step
    run = infos[0]["runs"][0]
    assert run["x_shards"] == ["(16, 1, 8, 8)"]  # each process holds its half of the batch
    assert run["x_starts"] == [0, 16]  # process p holds the p-th half
    assert run["donated"]
    _assert_same_training(run, ref, _params(workers, "two", 0), _params(workers, "eight", 0))


def test_make_mesh_rejects_fsdp_not_dividing_devices():
    import jax

    from eqdisp.sharding import make_mesh

    devices = jax.devices() * 1
    with pytest.raises(ValueError) as info:
        make_mesh(fsdp=3, devices=devices * 4)  # 4 "devices", fsdp 3
    message = str(info.value)
    assert "\n" not in message and "fsdp=3" in message and "4" in message


def test_single_device_mesh_and_shardings():
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    from eqdisp.sharding import batch_sharding, global_batch, make_mesh, state_sharding

    mesh = make_mesh()
    assert mesh.axis_names == ("data", "fsdp") and mesh.devices.shape == (1, 1)
    assert batch_sharding(mesh).spec == P(("data", "fsdp"))
    tree = {"w": jnp.zeros((256, 128)), "b": jnp.zeros(128), "step": jnp.zeros((), jnp.int32)}
    shapes = eqx.filter_eval_shape(lambda: tree)
    assert jax.tree.map(lambda s: s.spec, state_sharding(shapes, mesh)) == {
        "w": P(),
        "b": P(),
        "step": P(),
    }
    batch = global_batch({"x": np.ones((4, 3), np.float32)}, mesh)
    assert batch["x"].shape == (4, 3) and batch["x"].sharding == batch_sharding(mesh)


def test_initialize_distributed_single_process_and_bad_environment(monkeypatch):
    import jax

    from eqdisp import sharding

    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sharding, "_cluster_detected", lambda: False)
    sharding.initialize_distributed()  # nothing to join: a no-op
    assert not jax.distributed.is_initialized()

    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    with pytest.raises(ValueError, match="JAX_PROCESS_ID") as info:
        sharding.initialize_distributed()
    assert "\n" not in str(info.value)
