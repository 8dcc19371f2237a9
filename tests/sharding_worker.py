"""Helper process for ``test_sharding.py``: a few train steps on a chosen layout, results as JSON.

``python tests/sharding_worker.py SPEC`` where SPEC is a JSON object:

- ``devices``: fake CPU devices in this process (set before anything touches a device);
- ``runs``: a list of ``null`` (the plain step, no mesh) or an int ``fsdp`` (a mesh step);
- ``out``: a path prefix; run ``i`` writes its final parameters to ``{out}.{i}.npz``.

For a multi-process run, set ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
``JAX_PROCESS_ID``: the worker calls ``initialize_distributed`` and feeds its slice of the batch
through ``global_batch``. It prints one JSON line: per run, the metrics of every step (as
``float.hex``, so comparisons can be exact), the sharding specs of the state and whether the old
state was donated.
"""

import json
import sys
import time

import jax

SPEC = json.loads(sys.argv[1])
jax.config.update("jax_num_cpu_devices", SPEC.get("devices", 1))

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax.experimental import multihost_utils

import eqdisp
from eqdisp import sharding
from eqdisp.config import DispConfig, OptimConfig, TransportConfig

BATCH, STEPS = 32, 2


def setup():
    optimizer = eqdisp.make_optimizer(OptimConfig(lr=1e-3, weight_decay=0.01))

    # One compiled program instead of hundreds of small eager ones (most of the start-up time).
    @eqx.filter_jit
    def init():
        model = eqdisp.make_model(
            "SiT-T/2", input_size=8, in_channels=1, num_classes=10, key=jr.key(0)
        )
        # Move off the adaLN-Zero init so every weight gets a gradient in the first step.
        params, static = eqx.partition(model, eqx.is_inexact_array)
        leaves, tree = jax.tree.flatten(params)
        keys = jr.split(jr.key(1), len(leaves))
        leaves = [leaf + 0.02 * jr.normal(k, leaf.shape) for leaf, k in zip(leaves, keys)]
        model = eqx.combine(jax.tree.unflatten(tree, leaves), static)
        return eqdisp.init_train_state(model, optimizer, key=jr.key(2))

    state = init()
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((STEPS, BATCH, 1, 8, 8)).astype(np.float32)
    ys = rng.integers(0, 10, (STEPS, BATCH)).astype(np.int32)
    kwargs = {
        "optimizer": optimizer,
        "objective": eqdisp.make_transport(TransportConfig()),
        "disp": DispConfig(variant="infonce_l2", weight=0.5, group_size=8),
        "ema_decay": 0.9,
    }
    return state, xs, ys, kwargs


def to_host(leaf):
    if leaf.is_fully_addressable:
        return np.asarray(leaf)
    return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))


def first_examples(x, mesh):
    index = x.sharding.devices_indices_map(x.shape)
    return [index[device][0].start or 0 for device in mesh.devices.flat]


def spec_str(spec):
    entries = list(spec)
    while entries and entries[-1] is None:  # P('fsdp', None) and P('fsdp') are the same layout
        entries.pop()
    return str(jax.sharding.PartitionSpec(*entries))


def specs(tree):
    arrays = eqx.filter(tree, eqx.is_array)
    flat = jax.tree_util.tree_flatten_with_path(arrays)[0]
    return {jax.tree_util.keystr(path): spec_str(leaf.sharding.spec) for path, leaf in flat}


def run(index, fsdp, state, xs, ys, kwargs):
    state = jax.tree.map(lambda a: jnp.array(a, copy=True) if eqx.is_array(a) else a, state)
    if fsdp is None:
        step = eqdisp.make_train_step(**kwargs)
        batches = [(jnp.asarray(x), jnp.asarray(y)) for x, y in zip(xs, ys)]
    else:
        mesh = sharding.make_mesh(fsdp)
        step = eqdisp.make_train_step(**kwargs, mesh=mesh)
        state = sharding.shard_state(state, mesh)
        # This process's consecutive slice of each global batch.
        n, p = jax.process_count(), jax.process_index()
        size = BATCH // n
        batches = []
        for x, y in zip(xs, ys):
            local = {"x": x[p * size : (p + 1) * size], "y": y[p * size : (p + 1) * size]}
            batch = sharding.global_batch(local, mesh)
            batches.append((batch["x"], batch["y"]))
    specs_in = specs(state) if fsdp is not None else None
    if fsdp is not None:
        # The same layout from shapes alone (an orbax restore template).
        template = sharding.state_sharding(eqx.filter_eval_shape(lambda: state), mesh)
        flat = jax.tree_util.tree_flatten_with_path(template)[0]
        specs_template = {jax.tree_util.keystr(path): spec_str(s.spec) for path, s in flat}
    else:
        specs_template = None
    metrics, donated = [], True
    for x, y in batches:
        old = state
        state, m = step(state, x, y)
        donated &= all(leaf.is_deleted() for leaf in jax.tree.leaves(eqx.filter(old, eqx.is_array)))
        metrics.append({k: float(to_host(v)).hex() for k, v in sorted(m.items())})
    final = {
        "model": eqx.filter(state.model, eqx.is_inexact_array),
        "ema": state.ema,
    }
    flat = jax.tree_util.tree_flatten_with_path(final)[0]
    arrays = {jax.tree_util.keystr(path): to_host(leaf) for path, leaf in flat}
    if jax.process_index() == 0:
        np.savez(f"{SPEC['out']}.{index}.npz", **arrays)
    return {
        "fsdp": fsdp,
        "metrics": metrics,
        "specs_in": specs_in,
        "specs_template": specs_template,
        "specs_out": specs(state) if fsdp is not None else None,
        "donated": bool(donated),
        "x_shards": sorted({str(s.data.shape) for s in batches[0][0].addressable_shards}),
        # First example held by each device, devices in mesh order (global view, every process).
        "x_starts": None if fsdp is None else first_examples(batches[0][0], mesh),
    }


def main():
    sharding.initialize_distributed()
    sharding.initialize_distributed()  # idempotent
    t0 = time.perf_counter()
    state, xs, ys, kwargs = setup()
    timings = {"setup": time.perf_counter() - t0}
    results = []
    for i, fsdp in enumerate(SPEC["runs"]):
        t0 = time.perf_counter()
        results.append(run(i, fsdp, state, xs, ys, kwargs))
        timings[f"run{i}"] = time.perf_counter() - t0
    info = {
        "process_count": jax.process_count(),
        "process_index": jax.process_index(),
        "device_count": jax.device_count(),
        "runs": results,
        "seconds": {k: round(v, 2) for k, v in timings.items()},
    }
    print("RESULT " + json.dumps(info), flush=True)


if __name__ == "__main__":
    main()
