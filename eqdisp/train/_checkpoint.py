"""Checkpoints of a training run: the train state, the Grain iterator and the config, in one place.

A run directory holds an orbax ``CheckpointManager`` directory, ``<run>/checkpoints/``, with one
sub-directory per saved step::

    <run>/checkpoints/
        1000/
            _CHECKPOINT_METADATA
            state/        the array leaves of the TrainState (OCDBT/zarr, written by orbax)
            data/         the Grain iterator state (process_0-of-1.json), when one was saved
            config/       the ExperimentConfig as JSON (metadata)
        2000/
        ...

Saves are asynchronous and atomic: orbax writes ``<step>.orbax-checkpoint-tmp-*`` and renames it
to ``<step>`` only once every item is complete, so a crash (even SIGKILL) in the middle of a save
leaves the previous checkpoint as the latest one; the leftover temporary directory is removed the
next time a writing ``Checkpointer`` is opened. Only array leaves are stored; the rest of the
TrainState (the model's static structure) is rebuilt from the config, as Equinox recommends.

Reading a run from custom code, a sampler or an analysis::

    ckpt = eqdisp.load_checkpoint("runs/sit-tiny")
    ckpt.ema      # the EMA model, ready for sampling
    ckpt.config   # the ExperimentConfig it was trained with
"""

import gc
import logging
import os
import pathlib
import re
import shutil
import sys
import time
import warnings
from typing import Any

import equinox as eqx
import grain
import jax
import jax.numpy as jnp
import jax.random as jr
import orbax.checkpoint as ocp

from .._config_json import config_from_dict, config_to_dict
from ..config import ConfigError, ExperimentConfig
from ..models import make_model
from ._step import TrainState, init_train_state, make_optimizer

_STATE, _DATA, _CONFIG = "state", "data", "config"
_CHECKPOINTS_SUBDIR = "checkpoints"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not match. The message is one line for the user."""


def _one_line(text: object, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _reason(error: BaseException) -> str:
    """What a failed read or write says, in a few words: the operating system's error, else the
    first array that failed and tensorstore's status code, when the message names them."""
    text = str(error)
    os_error = re.search(r"os_error_code='(\d+)'", text)
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    if os_error:
        return os.strerror(int(os_error.group(1)))
    leaf = re.search(r'Error (reading|writing) "([^"/]+)', text)
    code = re.match(r"\s*([A-Z_]{4,}):", text)
    if leaf:
        verb = "read" if leaf.group(1) == "reading" else "written"
        return f"{leaf.group(2)} cannot be {verb}" + (f": {code.group(1)}" if code else "")
    return f"{type(error).__name__}: {_one_line(text, 160)}"


class _OrbaxNoise:
    """Keeps what orbax reports of a failed save or restore to the one-line error we raise.

    Orbax logs each failure of a background write with its traceback (absl, ERROR), several
    times, before raising it to the caller. And when one array of a save or restore fails, orbax
    closes its event loop while tensorstore's operations on the other arrays are still
    completing: each then reports ``RuntimeError('Event loop is closed')`` through
    ``sys.unraisablehook``, some after the call has returned, and the futures of the failed
    operations log "<class> exception was never retrieved" (asyncio, ERROR; the class is
    ``Future``, ``Task`` or ``_GatheringFuture``, depending on which object is collected first),
    beside coroutines that warn that they were never awaited.
    While active, exactly those records and reports are dropped; everything else passes through.
    """

    def __init__(self):
        self.dropped = 0
        self._previous_hook = sys.unraisablehook
        sys.unraisablehook = self._hook
        logging.getLogger("absl").addFilter(self._orbax_errors)
        logging.getLogger("asyncio").addFilter(self._lost_futures)

    def _hook(self, unraisable):
        error = unraisable.exc_value
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            self.dropped += 1
        else:
            self._previous_hook(unraisable)

    # Methods, not static methods: each instance's filters are distinct objects, so one
    # checkpointer removing its own filters leaves those a failed one keeps in place.
    def _orbax_errors(self, record: logging.LogRecord) -> bool:
        from_orbax = f"{os.sep}orbax{os.sep}checkpoint{os.sep}" in record.pathname
        return not (record.levelno >= logging.ERROR and from_orbax)

    def _lost_futures(self, record: logging.LogRecord) -> bool:
        # asyncio names the future's class ("Future", "Task", "_GatheringFuture", ...) before
        # these words, and appends "future: <...>" and the traceback on the lines after the first.
        first_line = record.getMessage().partition("\n")[0]
        return not re.fullmatch(r"\w+ exception was never retrieved", first_line)

    def stop(self, failed: bool) -> None:
        """Put the hooks back. After a failure, wait until the reports have gone quiet (0.5 s
        without one, 10 s at most) and collect the failed futures; the unraisable hook and the
        asyncio filter then stay for the rest of the process, since tensorstore may still finish
        (and report) a straggling operation at any later time, even at exit."""
        deadline, seen = time.monotonic() + 10.0, -1
        while failed and self.dropped != seen and time.monotonic() < deadline:
            seen = self.dropped
            time.sleep(0.5)
        logging.getLogger("absl").removeFilter(self._orbax_errors)
        if failed:
            with warnings.catch_warnings():  # coroutines of the failed operation, never awaited
                warnings.simplefilter("ignore", RuntimeWarning)
                gc.collect()
            return
        if sys.unraisablehook == self._hook:
            sys.unraisablehook = self._previous_hook
        logging.getLogger("asyncio").removeFilter(self._lost_futures)


# ----------------------------------------------------------------------------------------------
# Abstract state


def abstract_train_state(cfg: ExperimentConfig) -> TrainState:
    """The `TrainState` that `cfg` trains, as `jax.ShapeDtypeStruct` leaves; nothing is allocated.

    Built exactly as the training loop builds the real one (model from `cfg.model`, optimizer
    from `cfg.optim`, key from `cfg.train.seed` with JAX's default PRNG implementation), so it is
    the template `Checkpointer.restore` needs for a run of `cfg`.
    """

    def build() -> TrainState:
        key_model, key_train = jr.split(jr.key(cfg.train.seed))
        model = make_model(cfg.model, key=key_model)
        return init_train_state(model, make_optimizer(cfg.optim), key=key_train)

    return eqx.filter_eval_shape(build)


# ----------------------------------------------------------------------------------------------
# Checkpointer


def _is_leaf_array(x: Any) -> bool:
    return eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)


def _is_key(x: Any) -> bool:
    return _is_leaf_array(x) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _key_impl(key: Any):
    if isinstance(key, jax.ShapeDtypeStruct):
        return key.dtype._impl  # jax.random.key_impl only accepts concrete keys
    return jr.key_impl(key)


def _split(state: TrainState) -> dict:
    """The stored tree: array leaves only (None elsewhere), the key as its raw data."""
    key = jr.key_data(state.key) if _is_key(state.key) else state.key
    return {
        "model": eqx.filter(state.model, _is_leaf_array),
        "ema": eqx.filter(state.ema, _is_leaf_array),
        "opt_state": eqx.filter(state.opt_state, _is_leaf_array),
        "step": state.step,
        "key": key,
    }


def _restore_target(x: Any) -> Any:
    """A ShapeDtypeStruct with a sharding for one template leaf (None stays None)."""
    if x is None:
        return None
    if isinstance(x, jax.ShapeDtypeStruct):
        sharding = x.sharding
        if sharding is None:
            sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    return ocp.utils.to_shape_dtype_struct(x)


def _template(like: TrainState) -> dict:
    tree = {
        "model": eqx.filter(like.model, _is_leaf_array),
        "ema": eqx.filter(like.ema, _is_leaf_array),
        "opt_state": eqx.filter(like.opt_state, _is_leaf_array),
        "step": like.step,
    }
    tree = jax.tree.map(_restore_target, tree)
    key = like.key
    if _is_key(key):
        data = jax.eval_shape(jr.key_data, jax.ShapeDtypeStruct(key.shape, key.dtype))
        sharding = getattr(key, "sharding", None)
        key = jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
    tree["key"] = _restore_target(key)
    return tree


def _path_name(path: tuple) -> str:
    return jax.tree_util.keystr(path, simple=True, separator=".")


def _rearrange(tree: Any, layout: Any) -> Any:
    """`tree`'s leaves in `layout`'s containers, matched by path name (`model.blocks.fc1.weight`).

    A checkpoint stores modules as nested dicts and lists; restoring into that layout rather than
    the template's modules means a field that holds no arrays (`None`, such as the `h_embedder`
    that SiT and DiT models gained with the MF family) is not a structural difference to orbax,
    so checkpoints written before such a field existed still restore.
    """
    leaves = {_path_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
    return jax.tree_util.tree_map_with_path(lambda p, _: leaves[_path_name(p)], layout)


def _describe(x: Any) -> str:
    return f"{jnp.dtype(x.dtype).name}{list(x.shape)}"


class Checkpointer:
    """Asynchronous, atomic checkpoints of a run: the `TrainState`, the Grain iterator, the config.

    Wraps an orbax `CheckpointManager` with three items, `state`, `data` (optional) and `config`.
    `save` returns as soon as the arrays are copied off the device; the files are written in the
    background and committed atomically, so a crash mid-save leaves the previous checkpoint as the
    latest. Call `wait()` (or `close()`) before the process exits to be sure the last save landed.

    ```python
    with Checkpointer(run_dir / "checkpoints", keep=3) as ckpt:
        if ckpt.latest_step() is not None:
            state = ckpt.restore(state, data_iterator=it)
        ...
        ckpt.save(step, state, config=cfg, data_iterator=it)
    ```
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, read_only: bool = False):
        """**Arguments:**

        - `directory`: the orbax directory (`<run>/checkpoints`); created unless `read_only`.
        - `keep`: how many of the newest checkpoints to keep.
        - `read_only`: open an existing directory for reading only: nothing is created or deleted
            (in particular not the temporary directory of a save that a running job is writing).
        """
        if keep < 1:
            raise CheckpointError(f"keep={keep!r} is not allowed: expected a positive int")
        self.directory = pathlib.Path(directory).absolute()
        self.read_only = read_only
        # A reader must not delete anything: the tmp directory it sees may be a save in flight.
        # (orbax's own `read_only` option does the same but logs warnings on every open.)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep,
            create=not read_only,
            cleanup_tmp_directories=not read_only,
            enable_async_checkpointing=True,
        )
        # Explicit handlers per item: without them a failed restore leaves the manager broken
        # (orbax then asks for `Composite` args on every later call; seen with orbax-checkpoint
        # 0.12.8).
        handlers = {
            _STATE: ocp.StandardCheckpointHandler(),
            _DATA: grain.checkpoint.CheckpointHandler(),
            _CONFIG: ocp.JsonCheckpointHandler(),
        }
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=handlers
        )
        self._pending: int | None = None  # the newest save started
        self._failed = False  # a save or restore failed
        self._noise = _OrbaxNoise()

    # -- steps -----------------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """The committed steps, oldest first (waits for saves in flight: Orbax lists a step as
        soon as its background write starts)."""
        self.wait()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest committed step, or None when there is none (waits for saves in flight)."""
        self.wait()
        return self._manager.latest_step()

    def _step_dir(self, step: int) -> pathlib.Path:
        return self.directory / str(step)

    def _resolve_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise CheckpointError(f"{self.directory}: no complete checkpoint in this directory")
            return steps[-1]
        if step not in steps:
            available = ", ".join(map(str, steps)) or "none"
            raise CheckpointError(
                f"{self.directory}: no checkpoint for step {step} (available steps: {available})"
            )
        return step

    # -- save ------------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        state: TrainState,
        *,
        config: ExperimentConfig,
        data_iterator=None,
        force: bool = False,
    ) -> bool:
        """Start saving `state` (and the iterator and config) as `step`; returns without waiting.

        The device arrays are copied before this returns, so the caller may donate `state` to the
        next train step at once. The iterator's position is read now as well.

        **Arguments:**

        - `step`: the step number the checkpoint is filed under.
        - `state`: the train state.
        - `config`: the experiment config, stored as JSON beside the arrays.
        - `data_iterator`: a Grain iterator (`DatasetIterator` or `DataLoaderIterator`) whose
            position is stored so that `restore` can continue it; None stores none.
        - `force`: save even if orbax's policy would skip this step. For SIGTERM: `save(...,
            force=True)` then `wait()` leaves a committed checkpoint before the process exits.

        **Returns:** whether a save was started.

        **Raises:** `CheckpointError` (one line) if this save, or one still in flight, cannot be
        written (a full disk, a directory gone or not writable); what it left is removed.
        """
        if self.read_only:
            raise CheckpointError(f"{self.directory}: opened read-only, cannot save step {step}")
        items = {
            _STATE: ocp.args.StandardSave(_split(state)),
            _CONFIG: ocp.args.JsonSave(config_to_dict(config)),
        }
        if data_iterator is not None:
            items[_DATA] = grain.checkpoint.CheckpointSave(data_iterator)
        self.wait()  # a save still in flight reports its own failure (orbax waits here anyway)
        error = None
        try:
            started = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
        except Exception as e:  # noqa: BLE001 - orbax raises what the file system raised
            error = self._write_error(step, e)
        if error is not None:
            raise error  # outside the handler: no __context__ keeping orbax's futures alive
        if started:
            self._pending = step
        return started

    def _write_error(self, step: int | None, error: Exception) -> CheckpointError:
        """The one-line error of a failed save, after removing its temporary directories."""
        self._failed = True
        for leftover in self.directory.glob("*.orbax-checkpoint-tmp*"):
            shutil.rmtree(leftover, ignore_errors=True)
        complete = sorted(
            int(p.name) for p in self.directory.iterdir() if p.is_dir() and p.name.isdigit()
        ) if self.directory.is_dir() else []
        last = f"step {complete[-1]}" if complete else "none"
        return CheckpointError(
            f"{self.directory}: could not write checkpoint {step} ({_reason(error)}); "
            f"the last complete checkpoint is {last}"
        )

    # -- restore ---------------------------------------------------------------------------------

    def restore(
        self, like: TrainState, *, step: int | None = None, data_iterator=None
    ) -> TrainState:
        """Restore the `TrainState` saved at `step` (default: the latest).

        **Arguments:**

        - `like`: a state of the same structure, concrete or abstract (`abstract_train_state`).
            Its leaves' shardings are used when they carry one (a multi-device run); otherwise the
            arrays land on the first local device. The key is rewrapped with `like.key`'s PRNG
            implementation.
        - `step`: the step to restore; None for the latest.
        - `data_iterator`: a fresh Grain iterator of the same pipeline; its position is set in
            place to the saved one.

        **Returns:** the restored `TrainState` (static parts taken from `like`).

        **Raises:** `CheckpointError` (one line) for a missing step, a missing data item, or stored
        arrays that do not match `like` (other shapes, a corrupt or truncated checkpoint).
        """
        step = self._resolve_step(step)  # waits for saves in flight
        step_dir = self._step_dir(step)
        template = _template(like)
        stored = self._check_matches(step, template)
        target = template if stored is None else _rearrange(template, stored)
        items = {_STATE: ocp.args.StandardRestore(target)}
        if data_iterator is not None:
            if not (step_dir / _DATA).is_dir():
                raise CheckpointError(
                    f"{step_dir}: no data iterator state was saved with this step"
                )
            items[_DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
        error = None
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax/tensorstore errors run to many lines
            self._failed = True
            error = CheckpointError(f"{step_dir}: the checkpoint is truncated or corrupt ({_reason(e)})")
        if error is not None:
            raise error  # outside the handler: no __context__ keeping the failed reads alive
        tree = restored[_STATE]
        if stored is not None:
            tree = _rearrange(tree, template)
        key = tree["key"]
        if _is_key(like.key):
            key = jr.wrap_key_data(key, impl=_key_impl(like.key))
        return TrainState(
            model=eqx.combine(tree["model"], like.model, is_leaf=lambda x: x is None),
            ema=eqx.combine(tree["ema"], like.ema, is_leaf=lambda x: x is None),
            opt_state=eqx.combine(tree["opt_state"], like.opt_state, is_leaf=lambda x: x is None),
            step=tree["step"],
            key=key,
        )

    def _check_matches(self, step: int, template: dict) -> Any:
        """Compare stored shapes and dtypes with the template before orbax reads anything.

        Orbax would otherwise fail with a long tensorstore message, or for some mismatches not at
        all; here the first differing leaf is named. Returns the stored tree's metadata (its
        layout), None where it cannot be read (the restore then reports what is wrong).
        """
        step_dir = self._step_dir(step)
        if not (step_dir / _STATE).is_dir():
            raise CheckpointError(f"{step_dir}: no train state in this checkpoint")
        try:
            stored = self._manager.item_metadata(step)[_STATE]
        except Exception:  # noqa: BLE001 - unreadable metadata: let the restore report it
            stored = None
        if stored is None:
            return None  # unreadable metadata: the restore itself reports what is wrong
        stored = getattr(stored, "tree", stored)
        want = {_path_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(template)[0]}
        have = {_path_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(stored)[0]}
        missing = sorted(set(want) - set(have))
        extra = sorted(set(have) - set(want))
        if missing or extra:
            what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
            raise CheckpointError(
                f"{step_dir}: stored train state does not match the expected structure "
                f"({what}; {len(missing)} missing, {len(extra)} unexpected leaves)"
            )
        for name, w in want.items():
            h = have[name]
            if tuple(h.shape) != tuple(w.shape) or jnp.dtype(h.dtype) != jnp.dtype(w.dtype):
                raise CheckpointError(
                    f"{step_dir}: stored {name} is {_describe(h)}, expected {_describe(w)} "
                    "(a checkpoint of another model or optimizer?)"
                )
        return stored

    def read_config(self, step: int | None = None) -> ExperimentConfig:
        """The `ExperimentConfig` stored with `step` (default: the latest)."""
        step = self._resolve_step(step)  # waits for saves in flight
        step_dir = self._step_dir(step)
        if not (step_dir / _CONFIG).is_dir():
            raise CheckpointError(f"{step_dir}: no config was saved with this step")
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(**{_CONFIG: ocp.args.JsonRestore()})
            )
        except Exception as e:
            raise CheckpointError(
                f"{step_dir}: unreadable config ({type(e).__name__}: {_one_line(e, 200)})"
            ) from e
        try:
            return config_from_dict(restored[_CONFIG])
        except (ConfigError, ValueError) as e:
            raise CheckpointError(f"{step_dir}: stored config is not valid: {_one_line(e)}") from e

    # -- lifecycle -------------------------------------------------------------------------------

    def wait(self) -> None:
        """Block until every save started so far is committed to disk.

        **Raises:** `CheckpointError` (one line) if one of them could not be written.
        """
        error = None
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - a background write failed
            error = self._write_error(self._pending, e)
        if error is not None:
            raise error  # outside the handler: no __context__ keeping orbax's futures alive

    def close(self) -> None:
        """Wait for pending saves and release orbax's threads (a failed save that was already
        raised is not raised again)."""
        error = None
        try:
            self._manager.close()
        except Exception as e:  # noqa: BLE001
            if not self._failed:  # else it was raised already
                error = self._write_error(self._pending, e)
        if self._failed:
            self._manager = None  # holds the failed operations, collected (and silenced) now
        self._noise.stop(failed=self._failed)
        if error is not None:
            raise error

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpointer({str(self.directory)!r}, steps={self.all_steps()})"


# ----------------------------------------------------------------------------------------------
# Loading a run


class Checkpoint(eqx.Module):
    """A restored run: its state, the models in it, its step and config."""

    state: TrainState
    step: int = eqx.field(static=True)
    config: ExperimentConfig = eqx.field(static=True)

    @property
    def model(self) -> eqx.Module:
        """The trained model (the optimizer's weights)."""
        return self.state.model

    @property
    def ema(self) -> eqx.Module:
        """The model with the EMA weights, the one to sample from."""
        return self.state.ema_model


def _checkpoint_dir(path: pathlib.Path) -> pathlib.Path:
    if not path.exists():
        raise CheckpointError(f"{path}: no such run directory or checkpoint directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: expected a run directory, found a file")
    sub = path / _CHECKPOINTS_SUBDIR
    if sub.is_dir():
        return sub
    if any(p.is_dir() and p.name.split(".")[0].isdigit() for p in path.iterdir()):
        return path  # the checkpoints directory itself
    raise CheckpointError(
        f"{path}: not a run directory (expected checkpoints in {path / _CHECKPOINTS_SUBDIR})"
    )


def load_checkpoint(path: str | os.PathLike, step: int | None = None) -> Checkpoint:
    """Load a run's checkpoint for sampling, analysis or custom JAX code.

    Nothing but the checkpoint is needed: the model is rebuilt from the stored config.

    **Arguments:**

    - `path`: a run directory (its checkpoints are in `<path>/checkpoints/`) or that checkpoints
        directory itself.
    - `step`: the step to load; None for the latest.

    **Returns:** a `Checkpoint` with `.model`, `.ema`, `.step`, `.config` and `.state`.

    **Raises:** `CheckpointError` (one line, naming the path) when the path does not exist, holds
    no checkpoints, lacks the step, or stores arrays that do not fit its config's model.
    """
    directory = _checkpoint_dir(pathlib.Path(path).absolute())
    with Checkpointer(directory, read_only=True) as ckpt:
        if not ckpt.all_steps():
            raise CheckpointError(f"{directory}: no complete checkpoint in this directory")
        step = ckpt._resolve_step(step)
        config = ckpt.read_config(step)
        state = ckpt.restore(abstract_train_state(config), step=step)
    return Checkpoint(state=state, step=step, config=config)


__all__ = [
    "Checkpoint",
    "CheckpointError",
    "Checkpointer",
    "abstract_train_state",
    "load_checkpoint",
]
