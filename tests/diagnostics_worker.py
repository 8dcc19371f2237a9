"""Helper process for ``test_diagnostics.py``: the training diagnostics of one state and batch,
computed without a mesh and on a mesh of 8 fake CPU devices, printed as one JSON line.

``python tests/diagnostics_worker.py FSDP``: ``FSDP`` is the mesh's fsdp size (the rest of the 8
devices are data-parallel).
"""

import json
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)  # before anything touches a device

import equinox as eqx
import jax.random as jr

import eqdisp
from eqdisp import sharding
from eqdisp.config import DispConfig, OptimConfig, TransportConfig
from eqdisp.train._step import make_diagnostics

model = eqdisp.make_model("SiT-T/2", input_size=8, in_channels=1, num_classes=10, key=jr.key(0))
params, static = eqx.partition(model, eqx.is_inexact_array)
params = jax.tree.map(lambda a: a + 0.02 * jr.normal(jr.key(1), a.shape), params)
optimizer = eqdisp.make_optimizer(OptimConfig())
state = eqdisp.init_train_state(eqx.combine(params, static), optimizer, key=jr.key(2))
x, y = jr.normal(jr.key(3), (32, 1, 8, 8)), jr.randint(jr.key(4), (32,), 0, 10)
transport, disp = eqdisp.make_transport(TransportConfig()), DispConfig(group_size=8)
out = {"plain": {k: float(v) for k, v in make_diagnostics(transport, disp)(state, x, y).items()}}
mesh = sharding.make_mesh(int(sys.argv[1]))
batch = sharding.global_batch({"x": x, "y": y}, mesh)
diagnostics = make_diagnostics(transport, disp, mesh=mesh)
values = diagnostics(sharding.shard_state(state, mesh), batch["x"], batch["y"])
out["mesh"] = {k: float(v) for k, v in values.items()}
print(json.dumps(out))
