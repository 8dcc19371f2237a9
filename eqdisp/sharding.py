"""Devices, meshes and shardings: everything eqdisp knows about running on more than one device.

The mesh has two axes, ``("data", "fsdp")``. Batches are split over *all* devices; the parameters,
their EMA and the optimizer moments are replicated (``fsdp == 1``, pure data parallelism) or split
over the ``fsdp`` axis (ZeRO-3/FSDP: XLA all-gathers each weight where it is used and
reduce-scatters its gradient).

**Batch semantics.**

- The *global* batch is ``RunConfig.batch_size``: the examples that one optimizer step averages
  over, whatever the number of devices or processes.
- Each process reads ``global / jax.process_count()`` examples; process ``p`` holds the ``p``-th
  consecutive slice of the global batch (`global_batch` assembles the slices).
- Each device holds ``global / jax.device_count()`` consecutive examples (`batch_sharding`).
- The train step is one SPMD program over the *global* batch, so the Dispersive Loss groups are
  consecutive ``group_size`` examples of the global batch, exactly as on one device: results do
  not depend on the number of devices. A group stands in for one of the paper's devices (batch
  256, Wang & He 2025, Table 8; 16 devices of 16 examples each, ``raywang4/DispLoss`` README,
  "Differences from JAX"). For speed, ``group_size`` should divide the per-device batch;
  otherwise a group straddles two devices, which is still correct (XLA moves the rows it needs)
  but adds communication. Nothing is raised for it.

**Multi-host.** Call `initialize_distributed` first thing in the program, before anything touches
a device; build the mesh with `make_mesh`; feed each process's slice through `global_batch`.

**Example:**

```python
initialize_distributed()                      # before anything touches a device
mesh = make_mesh(cfg.train.fsdp)
state = shard_state(init_train_state(model, optimizer, key=key), mesh)  # same seed everywhere
step = make_train_step(optimizer, objective, cfg.disp, ema_decay=..., mesh=mesh)
# x, y: this process's batch_size // jax.process_count() examples (its consecutive slice)
batch = global_batch({"x": x, "y": y}, mesh)
state, metrics = step(state, batch["x"], batch["y"])
```
"""

import math
import os
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, PyTree

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)
"""The mesh axes the leading batch dimension is split over: all of them."""

FSDP_MIN_SIZE = 2**14
"""Leaves with fewer elements than this stay replicated under FSDP (biases, norms, scalars):
splitting them saves little memory and costs a collective each."""


# ----------------------------------------------------------------------------------------------
# Processes and meshes


def initialize_distributed() -> None:
    """Join a multi-process JAX run if the environment describes one; otherwise do nothing.

    In order:

    1. ``JAX_COORDINATOR_ADDRESS`` set (with ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``):
       ``jax.distributed.initialize`` with these values (on CPU, with gloo collectives).
    2. A cluster that ``jax.distributed.initialize()`` detects by itself (SLURM, Open MPI, Cloud
       TPU pods, ...): call it without arguments.
    3. Otherwise: a single-process run; nothing happens.

    Idempotent. Must run before anything touches a device (``jax.devices()``, the first array).

    **Raises:** `ValueError` when ``JAX_COORDINATOR_ADDRESS`` is set without the two other variables.
    """
    if jax.distributed.is_initialized():
        return
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address:
        missing = [v for v in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if v not in os.environ]
        if missing:
            raise ValueError(
                f"JAX_COORDINATOR_ADDRESS={address} is set but {' and '.join(missing)} is not; "
                "set all three or none"
            )
        _use_gloo_on_cpu()
        jax.distributed.initialize(
            coordinator_address=address,
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    elif _cluster_detected():
        _use_gloo_on_cpu()
        jax.distributed.initialize()


def _use_gloo_on_cpu() -> None:
    # The default CPU collectives stay inside one process; cross-process CPU runs need gloo. It only
    # concerns the CPU backend, so it is harmless on GPU/TPU hosts.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def _cluster_detected() -> bool:
    # Ask JAX's own detectors (the ones `jax.distributed.initialize()` uses); their home is private,
    # so fall back to the environment variables of the two common schedulers if it moves.
    try:
        from jax._src.clusters import ClusterEnv

        return any(
            not env.opt_in_only_method and env.is_env_present() for env in ClusterEnv._cluster_types
        )
    except (ImportError, AttributeError):
        slurm = (
            "SLURM_JOB_ID",
            "SLURM_STEP_NODELIST",
            "SLURM_NTASKS",
            "SLURM_PROCID",
            "SLURM_LOCALID",
        )
        return all(v in os.environ for v in slurm) or "OMPI_MCA_orte_hnp_uri" in os.environ


def make_mesh(fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``("data", "fsdp")`` mesh over all devices (of all processes), with Auto axis types.

    **Arguments:**

    - `fsdp`: devices along the ``fsdp`` axis (``RunConfig.fsdp``); 1 is pure data parallelism.
    - `devices`: the devices to use; default ``jax.devices()``, ordered by process so that
      process ``p`` owns the ``p``-th consecutive block of the batch.

    **Returns:** a `Mesh` of shape ``(n_devices // fsdp, fsdp)``.

    **Raises:** `ValueError` when `fsdp` does not divide the number of devices.
    """
    if devices is None:
        devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    n = len(devices)
    if fsdp < 1 or n % fsdp != 0:
        raise ValueError(f"train.fsdp={fsdp} must be a positive divisor of the device count {n}")
    grid = np.asarray(devices, dtype=object).reshape(n // fsdp, fsdp)
    # Auto, not jax.make_mesh's default Explicit: with_sharding_constraint needs Auto axes.
    return Mesh(grid, (DATA_AXIS, FSDP_AXIS), axis_types=(AxisType.Auto, AxisType.Auto))


def replicated(mesh: Mesh) -> NamedSharding:
    """The same full array on every device of `mesh`."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over all devices of `mesh`, in order: each device holds consecutive
    examples and the global batch order, hence the dispersive groups, is unchanged."""
    return NamedSharding(mesh, P(BATCH_AXES))


# ----------------------------------------------------------------------------------------------
# The train state


def _is_leaf_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))


def _leaf_sharding(leaf: Any, mesh: Mesh, fsdp: int) -> NamedSharding:
    shape = tuple(leaf.shape)
    if (
        fsdp == 1
        or jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)
        or not jax.dtypes.issubdtype(leaf.dtype, np.inexact)  # the step counter, integer state
        or math.prod(shape) < FSDP_MIN_SIZE
    ):
        return replicated(mesh)
    # big_vision/nanodo rule: split the largest dimension that the fsdp axis divides (the first
    # of equal ones), so every shard is the same size; leave the leaf whole if none does.
    candidates = [(size, -i) for i, size in enumerate(shape) if size % fsdp == 0]
    if not candidates:
        return replicated(mesh)
    axis = -max(candidates)[1]
    return NamedSharding(mesh, P(*[None] * axis, FSDP_AXIS))


def state_sharding(state: PyTree, mesh: Mesh) -> PyTree:
    """Where each array of a train state (or any pytree) lives.

    Replicated when the ``fsdp`` axis has size 1. Otherwise each floating-point leaf with at least
    `FSDP_MIN_SIZE` elements (weights, their EMA, Adam's moments) is split over ``fsdp`` along its
    largest dimension that the axis size divides; everything else (biases, norms, scalars, the
    step, PRNG keys) is replicated.

    **Arguments:**

    - `state`: a pytree of arrays, e.g. a `TrainState`, or of `jax.ShapeDtypeStruct`s (an orbax
      restore template from ``eqx.filter_eval_shape``).
    - `mesh`: a mesh from `make_mesh`.

    **Returns:** the same pytree with a `NamedSharding` at each array leaf and ``None`` elsewhere
    (the structure of ``eqx.filter(state, eqx.is_array)``).
    """
    fsdp = mesh.shape[FSDP_AXIS]
    return jax.tree.map(
        lambda x: _leaf_sharding(x, mesh, fsdp) if _is_leaf_array(x) else None, state
    )


def _put(leaf: Any, sharding: NamedSharding) -> Array:
    if sharding.is_fully_addressable or (
        isinstance(leaf, jax.Array) and not leaf.is_fully_addressable
    ):
        return jax.device_put(leaf, sharding)
    # Multi-process, from a process-local value (every process built the same one, e.g. from the
    # same seed): device_put cannot target other processes' devices, so each process fills in the
    # shards it owns.
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        data = _put(jax.random.key_data(leaf), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
    host = np.asarray(leaf)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _place(tree: PyTree, shardings: PyTree, *, inside_jit: bool) -> PyTree:
    dynamic, static = eqx.partition(tree, _is_leaf_array)
    if inside_jit:
        dynamic = jax.lax.with_sharding_constraint(dynamic, shardings)
    else:
        dynamic = jax.tree.map(_put, dynamic, shardings)
    return eqx.combine(dynamic, static)


def shard_state(state: PyTree, mesh: Mesh) -> PyTree:
    """`state` with its arrays placed as `state_sharding` says (its non-array parts unchanged).

    In a multi-process run every process passes the same state (same seed), as process-local
    arrays; each process keeps the shards its devices own. Global arrays are resharded.
    """
    return _place(state, state_sharding(state, mesh), inside_jit=False)


def constrain_state(state: PyTree, mesh: Mesh) -> PyTree:
    """Inside ``jit``: constrain the arrays of `state` to `state_sharding`."""
    return _place(state, state_sharding(state, mesh), inside_jit=True)


def constrain_batch(batch: PyTree, mesh: Mesh) -> PyTree:
    """Inside ``jit``: constrain every array of `batch` to `batch_sharding` (split on axis 0)."""
    shardings = jax.tree.map(lambda x: batch_sharding(mesh) if _is_leaf_array(x) else None, batch)
    return _place(batch, shardings, inside_jit=True)


# ----------------------------------------------------------------------------------------------
# Batches


def global_batch(local: dict[str, np.ndarray | Array], mesh: Mesh) -> dict[str, Array]:
    """Assemble each process's slice of the batch into global arrays split by `batch_sharding`.

    **Arguments:**

    - `local`: this process's examples, ``global_batch_size / jax.process_count()`` of them along
      axis 0 of every entry; process ``p`` passes the ``p``-th consecutive slice of the global batch.
      In a single process this is the whole batch, and the call is a sharded ``device_put``.
    - `mesh`: a mesh from `make_mesh`.

    **Returns:** a dict with the same keys, each a global `jax.Array` of
    ``process_count * local_size`` examples.

    **Raises:** `ValueError` when the global batch does not split evenly over the devices.
    """
    sharding = batch_sharding(mesh)
    processes, devices = jax.process_count(), mesh.devices.size
    out = {}
    for name, value in local.items():
        value = np.asarray(value)
        size = value.shape[0] * processes
        if size % devices != 0:
            raise ValueError(
                f"global batch {size} ({value.shape[0]} per process x {processes} processes) of "
                f"{name!r} must be divisible by the device count {devices}"
            )
        shape = (size, *value.shape[1:])
        out[name] = jax.make_array_from_process_local_data(sharding, value, shape)
    return out


__all__ = [
    "BATCH_AXES",
    "DATA_AXIS",
    "FSDP_AXIS",
    "FSDP_MIN_SIZE",
    "batch_sharding",
    "constrain_batch",
    "constrain_state",
    "global_batch",
    "initialize_distributed",
    "make_mesh",
    "replicated",
    "shard_state",
    "state_sharding",
]
