"""Checkpoints: config JSON, bit-exact save/restore, exact resume, Grain iterator, keep-N, crashes, errors."""

import json
import os
import signal
import subprocess
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

_BATCH = 16


@pytest.fixture(scope="module")
def tiny():
    """The sit-tiny config, its optimizer and train step, and a state a few Adam steps in."""
    import eqdisp
    from eqdisp.config import PRESETS

    cfg = PRESETS["sit-tiny"][1]
    optimizer = eqdisp.make_optimizer(cfg.optim)
    step_fn = eqdisp.make_train_step(
        optimizer, eqdisp.make_transport(cfg.transport), cfg.disp, ema_decay=cfg.optim.ema_decay
    )
    key_model, key_train = jr.split(jr.key(cfg.train.seed))
    state = eqdisp.init_train_state(
        eqdisp.make_model(cfg.model, key=key_model), optimizer, key=key_train
    )
    batches = [_batch(i) for i in range(6)]
    state = _train(step_fn, state, batches[:2])
    return cfg, step_fn, state, batches


def _train(step_fn, state, batches):
    """Run the train step over `batches`. optax's Adam bias correction (`b1 ** count`, a Python
    float to an int32 power) has no strict promotion path, so the step runs under standard rules."""
    with jax.numpy_dtype_promotion("standard"):
        for x, y in batches:
            state, _ = step_fn(state, x, y)
    return state


def _batch(i: int):
    kx, ky = jr.split(jr.fold_in(jr.key(123), i))
    return jr.normal(kx, (_BATCH, 1, 8, 8)), jr.randint(ky, (_BATCH,), 0, 10)


def _copy(state):
    """A deep copy (the train step donates its input)."""
    return jax.tree.map(lambda x: jnp.copy(x) if eqx.is_array(x) else x, state)


def _assert_bitwise_equal(a, b):
    la, ta = jax.tree.flatten(eqx.filter(a, eqx.is_array))
    lb, tb = jax.tree.flatten(eqx.filter(b, eqx.is_array))
    assert ta == tb
    for u, v in zip(la, lb):
        assert u.dtype == v.dtype and u.shape == v.shape
        if jax.dtypes.issubdtype(u.dtype, jax.dtypes.prng_key):
            u, v = jr.key_data(u), jr.key_data(v)
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def _one_line_error(excinfo, *needles):
    message = str(excinfo.value)
    assert "\n" not in message, message
    for needle in needles:
        assert str(needle) in message, message
    return message


# ----------------------------------------------------------------------------------------------
# Config


def test_config_round_trip_every_preset():
    from eqdisp.train import config_from_dict, config_to_dict
    from eqdisp.config import PRESETS

    for name, (_, cfg) in PRESETS.items():
        text = json.dumps(config_to_dict(cfg), allow_nan=False)
        back = config_from_dict(json.loads(text))
        assert back == cfg, name
        assert isinstance(back.sampler.cfg_interval, tuple)


def test_config_from_dict_defaults_and_errors():
    import dataclasses

    from eqdisp.train import config_from_dict, config_to_dict
    from eqdisp.config import PRESETS, ConfigError, SamplerConfig

    cfg = dataclasses.replace(
        PRESETS["sit-tiny"][1],
        sampler=SamplerConfig(cfg_interval=(0.3, 1.0), cfg_channels=3),
    )
    d = config_to_dict(cfg)
    assert config_from_dict(d) == cfg
    del d["sampler"]["cfg_scale"]  # a field an older checkpoint did not have
    del d["transport"]
    assert config_from_dict(d).sampler.cfg_scale == SamplerConfig().cfg_scale
    assert config_from_dict(d).sampler.cfg_interval == (0.3, 1.0)
    d["model"]["depthh"] = 3
    with pytest.raises(ConfigError) as excinfo:
        config_from_dict(d)
    _one_line_error(excinfo, "model.depthh")
    with pytest.raises(ConfigError) as excinfo:
        config_from_dict({"optim": {"lr": "fast"}})
    _one_line_error(excinfo, "optim.lr")


# ----------------------------------------------------------------------------------------------
# Abstract state and bit-exact round trips


def test_abstract_train_state_matches_and_allocates_nothing(tiny):
    from eqdisp.train import abstract_train_state
    from eqdisp.config import PRESETS

    cfg, _, state, _ = tiny
    abstract = abstract_train_state(cfg)
    real = jax.tree.map(lambda x: x.shape, eqx.filter(state, eqx.is_array))
    shapes = jax.tree.map(
        lambda x: x.shape, abstract, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct)
    )
    assert jax.tree.structure(real) == jax.tree.structure(
        eqx.filter(shapes, lambda x: x is not None)
    )
    start = time.perf_counter()
    xl = abstract_train_state(PRESETS["sit-xl2"][1])
    assert time.perf_counter() - start < 20.0
    leaves = jax.tree.leaves(xl)
    assert leaves and not any(eqx.is_array(x) for x in leaves)
    params = sum(x.size for x in jax.tree.leaves(xl.model) if isinstance(x, jax.ShapeDtypeStruct))
    assert 670e6 < params < 680e6  # SiT-XL/2: 675M


def test_save_restore_bit_exact(tiny, tmp_path):
    import optax

    from eqdisp.train import Checkpointer, abstract_train_state

    cfg, _, state, _ = tiny
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.save(2, state, config=cfg)
        ckpt.wait()
        assert ckpt.all_steps() == [2] and ckpt.latest_step() == 2
        from_concrete = ckpt.restore(state)
        from_abstract = ckpt.restore(abstract_train_state(cfg), step=2)
        assert ckpt.read_config() == cfg
    for restored in (from_concrete, from_abstract):
        _assert_bitwise_equal(restored, state)
        assert int(restored.step) == 2
        adam = restored.opt_state[0]
        assert isinstance(adam, optax.ScaleByAdamState) and int(adam.count) == 2
        assert jr.key_impl(restored.key) == jr.key_impl(state.key)
        np.testing.assert_array_equal(jr.normal(restored.key, (5,)), jr.normal(state.key, (5,)))
        assert restored.model.__class__ is state.model.__class__


def test_a_checkpoint_from_before_a_field_without_arrays_restores(tiny, tmp_path):
    # SiT and DiT models gained `h_embedder` (None for them) with the MF family; checkpoints
    # written before it must still restore, bit-exact, into today's model.
    from eqdisp.models import DiffusionTransformer
    from eqdisp.train import Checkpointer, TrainState

    class _Before(eqx.Module):  # the transformer's fields as they were, arrays only
        x_embedder: eqx.Module
        t_embedder: eqx.Module
        y_embedder: eqx.Module
        blocks: eqx.Module
        final_layer: eqx.Module

    def before(tree):
        def convert(node):
            if not isinstance(node, DiffusionTransformer):
                return node
            assert node.h_embedder is None
            fields = ("x_embedder", "t_embedder", "y_embedder", "blocks", "final_layer")
            return _Before(*(getattr(node, f) for f in fields))

        return jax.tree.map(convert, tree, is_leaf=lambda x: isinstance(x, DiffusionTransformer))

    cfg, _, state, _ = tiny
    old = TrainState(
        model=before(state.model),
        ema=before(state.ema),
        opt_state=before(state.opt_state),
        step=state.step,
        key=state.key,
    )
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        assert ckpt.save(2, old, config=cfg)
        ckpt.wait()
        restored = ckpt.restore(state)
    _assert_bitwise_equal(restored, state)
    assert restored.model.__class__ is state.model.__class__ and restored.model.h_embedder is None


def test_resume_equals_uninterrupted(tiny, tmp_path):
    cfg, step_fn, state, batches = tiny
    from eqdisp.train import Checkpointer, abstract_train_state

    expected = _train(step_fn, _copy(state), batches[2:])
    with Checkpointer(tmp_path) as ckpt:
        saving = _copy(state)
        ckpt.save(2, saving, config=cfg)
        # The next steps donate `saving`'s buffers while the write may still run in the background.
        _train(step_fn, saving, batches[2:4])
        ckpt.wait()
        restored = ckpt.restore(abstract_train_state(cfg))
    resumed = _train(step_fn, restored, batches[2:])
    _assert_bitwise_equal(resumed, expected)


# ----------------------------------------------------------------------------------------------
# Grain iterator


def _pipeline():
    import grain

    records = [{"x": np.full((2,), i, np.float32), "y": np.int32(i)} for i in range(23)]
    return grain.MapDataset.source(records).seed(0).shuffle().batch(4).repeat().to_iter_dataset()


def test_grain_iterator_in_the_same_checkpoint(tiny, tmp_path):
    from eqdisp.train import Checkpointer, CheckpointError

    cfg, _, state, _ = tiny
    iterator = iter(_pipeline())
    for _ in range(7):  # across an epoch boundary (5 batches per epoch)
        next(iterator)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(7, state, config=cfg, data_iterator=iterator)
        expected = [next(iterator) for _ in range(6)]  # the position is captured at save()
        ckpt.save(8, state, config=cfg)  # no iterator
        ckpt.wait()
        fresh = iter(_pipeline())
        ckpt.restore(state, step=7, data_iterator=fresh)
        got = [next(fresh) for _ in range(6)]
        with pytest.raises(CheckpointError) as excinfo:
            ckpt.restore(state, step=8, data_iterator=iter(_pipeline()))
        _one_line_error(excinfo, "8", "data iterator")
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a["x"], b["x"])
        np.testing.assert_array_equal(a["y"], b["y"])


# ----------------------------------------------------------------------------------------------
# Retention and crashes


def test_keep_last_n(tiny, tmp_path):
    from eqdisp.train import Checkpointer

    cfg, _, state, _ = tiny
    with Checkpointer(tmp_path, keep=2) as ckpt:
        for step in range(1, 6):
            assert ckpt.save(step, state, config=cfg)
        ckpt.wait()
        assert ckpt.all_steps() == [4, 5]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["4", "5"]


def test_interrupted_save_keeps_the_last_good_checkpoint(tiny, tmp_path):
    from eqdisp.train import Checkpointer, load_checkpoint

    cfg, _, state, _ = tiny
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(2, state, config=cfg)
    # What a save killed before its commit leaves behind: a half-written temporary directory.
    partial = tmp_path / "3.orbax-checkpoint-tmp-1700000000"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "manifest.ocdbt").write_bytes(b"\x00" * 10)
    assert load_checkpoint(tmp_path).step == 2  # a reader leaves it alone (it may be in flight)
    assert partial.exists()
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 2 and ckpt.all_steps() == [2]
        _assert_bitwise_equal(ckpt.restore(state), state)
        ckpt.save(4, state, config=cfg)  # a writer removes it
        ckpt.wait()
        assert ckpt.all_steps() == [2, 4]
    assert not partial.exists()


_KILLED_CHILD = """
import os, signal, sys, time
import jax, jax.numpy as jnp, jax.random as jr
import eqdisp
from eqdisp.train import Checkpointer
cfg = eqdisp.PRESETS["sit-tiny"][1]
optimizer = eqdisp.make_optimizer(cfg.optim)
key_model, key_train = jr.split(jr.key(cfg.train.seed))
state = eqdisp.init_train_state(eqdisp.make_model(cfg.model, key=key_model), optimizer, key=key_train)
ckpt = Checkpointer(sys.argv[1])
ckpt.save(1, state, config=cfg)
ckpt.wait()
# A second save, large enough to be still in flight when the process dies.
big = jax.tree.map(lambda x: jnp.tile(x, (16,) + (1,) * (x.ndim - 1)) if x.ndim and jnp.issubdtype(x.dtype, jnp.floating) else x, state)
ckpt.save(2, big, config=cfg)
print(sorted(os.listdir(sys.argv[1])), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.slow
def test_sigkill_during_save(tiny, tmp_path):
    from eqdisp.train import Checkpointer

    cfg, _, state, _ = tiny
    child = subprocess.run(
        [sys.executable, "-c", _KILLED_CHILD, str(tmp_path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert "1" in left and "2" not in left, left
    with Checkpointer(tmp_path, read_only=True) as ckpt:
        assert ckpt.latest_step() == 1
        assert int(ckpt.restore(state).step) == 0
    with Checkpointer(tmp_path) as ckpt:  # a writer removes the half-written save
        ckpt.save(3, state, config=cfg)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["1", "3"]


# ----------------------------------------------------------------------------------------------
# load_checkpoint and its errors


def test_load_checkpoint_run_dir_and_checkpoints_dir(tiny, tmp_path):
    from eqdisp.train import Checkpointer, load_checkpoint

    cfg, _, state, _ = tiny
    with Checkpointer(tmp_path / "run" / "checkpoints") as ckpt:
        ckpt.save(1, state, config=cfg)
        ckpt.save(2, state, config=cfg)
    for path in (tmp_path / "run", str(tmp_path / "run" / "checkpoints")):
        loaded = load_checkpoint(path)
        assert loaded.step == 2 and loaded.config == cfg
        _assert_bitwise_equal(loaded.state, state)
        _assert_bitwise_equal(loaded.model, state.model)
        _assert_bitwise_equal(loaded.ema, state.ema_model)
    assert load_checkpoint(tmp_path / "run", step=1).step == 1
    # The EMA model runs.
    out = loaded.ema(jnp.zeros((1, 8, 8)), jnp.asarray(0.5), jnp.asarray(3))
    assert out.shape == (1, 8, 8)


# tensorstore's callbacks on a corrupt file land on a closed event loop: noise, not a failure.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_load_checkpoint_errors_are_one_line(tiny, tmp_path):
    import dataclasses

    from eqdisp.train import Checkpointer, CheckpointError, load_checkpoint

    cfg, _, state, _ = tiny
    missing = tmp_path / "nope"
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(missing)
    _one_line_error(excinfo, missing)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(empty)
    _one_line_error(excinfo, empty, "not a run directory")

    run = tmp_path / "run"
    with Checkpointer(run / "checkpoints") as ckpt:
        ckpt.save(3, state, config=cfg)
        ckpt.save(5, state, config=cfg)
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(run, step=4)
    _one_line_error(excinfo, run / "checkpoints", "step 4", "3, 5")

    # A config whose model does not fit the stored arrays.
    other = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=11))
    with Checkpointer(tmp_path / "mismatch") as ckpt:
        ckpt.save(1, state, config=other)
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(tmp_path / "mismatch")
    _one_line_error(excinfo, tmp_path / "mismatch" / "1", "expected")

    # A stored config that no longer validates (edited by hand, or written by another version).
    bad = tmp_path / "badconfig"
    with Checkpointer(bad) as ckpt:
        ckpt.save(1, state, config=cfg)
    metadata = bad / "1" / "config" / "metadata"
    metadata.write_text(metadata.read_text().replace('"SiT-T/2"', '"SiT-Q/2"'))
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(bad)
    _one_line_error(excinfo, bad / "1", "stored config is not valid", "SiT-Q/2")

    # Truncated array files.
    for file in (run / "checkpoints" / "5" / "state").rglob("d/*"):
        os.truncate(file, file.stat().st_size // 2)
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(run)
    _one_line_error(excinfo, run / "checkpoints" / "5")
    assert load_checkpoint(run, step=3).step == 3  # the older one still loads


_SHARDED_CHILD = """
import jax
jax.config.update("jax_num_cpu_devices", 8)
import sys, equinox as eqx, numpy as np, jax.random as jr
import eqdisp
from eqdisp.train import Checkpointer, abstract_train_state
from eqdisp.sharding import make_mesh, shard_state, state_sharding
cfg = eqdisp.PRESETS["sit-tiny"][1]
key_model, key_train = jr.split(jr.key(0))
mesh = make_mesh(2)
state = eqdisp.init_train_state(
    eqdisp.make_model(cfg.model, key=key_model), eqdisp.make_optimizer(cfg.optim), key=key_train)
state = shard_state(state, mesh)
abstract = abstract_train_state(cfg)
is_sds = lambda x: isinstance(x, jax.ShapeDtypeStruct)
abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, state_sharding(abstract, mesh), is_leaf=is_sds)
with Checkpointer(sys.argv[1]) as ckpt:
    ckpt.save(1, state, config=cfg)
    ckpt.wait()
    restored = [ckpt.restore(state), ckpt.restore(abstract)]
data = lambda x: jr.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x
want = jax.tree.leaves(eqx.filter(state, eqx.is_array))
for r in restored:
    got = jax.tree.leaves(eqx.filter(r, eqx.is_array))
    assert all(a.sharding == b.sharding for a, b in zip(got, want))
    assert all(np.array_equal(data(a), data(b)) for a, b in zip(got, want))
assert any(a.sharding.spec != jax.sharding.PartitionSpec() for a in want)  # really sharded
print("ok")
"""


@pytest.mark.slow
def test_restore_keeps_shardings_on_8_devices(tmp_path):
    child = subprocess.run(
        [sys.executable, "-c", _SHARDED_CHILD, str(tmp_path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0 and child.stdout.strip().endswith("ok"), child.stderr[-3000:]


def test_straggler_reports_of_a_failed_checkpoint_stay_silent_and_nothing_else_does():
    """asyncio reports a lost future as "<class> exception was never retrieved" (Task, Future,
    _GatheringFuture) followed by the future and its traceback on further lines; after a failed
    read or write those reports (and "Event loop is closed") are dropped for the rest of the
    process, even once another, healthy checkpointer has come and gone. Every other asyncio
    error still gets through."""
    import asyncio
    import gc
    import logging
    import sys

    from eqdisp.train._checkpoint import _OrbaxNoise

    original_hook = sys.unraisablehook
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage().partition("\n")[0])
    asyncio_log = logging.getLogger("asyncio")
    asyncio_log.addHandler(handler)
    failed, healthy = _OrbaxNoise(), _OrbaxNoise()
    try:
        failed.stop(failed=True)
        healthy.stop(failed=False)

        async def lost():
            raise OSError("tensorstore: the read failed")

        async def lost_gather():
            # Orbax gathers a save's array writes; a failed gather nobody awaits is reported as
            # "_GatheringFuture exception was never retrieved" (seen on CI).
            return asyncio.gather(lost(), lost())

        loop = asyncio.new_event_loop()
        task = loop.create_task(lost())
        gathered = loop.run_until_complete(lost_gather())
        loop.run_until_complete(asyncio.sleep(0))
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()
        assert type(gathered).__name__ == "_GatheringFuture" and gathered.done()
        del task, gathered
        gc.collect()
        asyncio_log.error("some other asyncio error")
        asyncio_log.error("Future exception was never retrieved, and more words")
        assert seen == [
            "some other asyncio error",
            "Future exception was never retrieved, and more words",
        ]

        sys.unraisablehook(_unraisable(RuntimeError("Event loop is closed")))
        assert failed.dropped == 1
    finally:
        asyncio_log.removeHandler(handler)
        asyncio_log.removeFilter(failed._lost_futures)
        sys.unraisablehook = original_hook


def _unraisable(error):
    return type("Unraisable", (), {"exc_value": error, "exc_type": type(error), "object": None})()
