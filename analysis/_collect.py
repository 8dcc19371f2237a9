"""Collect block representations of trained models over a grid of times, and reduce them on device.

Every run is analysed on identical inputs: the same data examples `x1`, labels `y`, noise `x0`
(drawn once from `seed`) and times `t`. Times follow SiT (`eqdisp.transport`): `t = 0` is pure
noise, `t = 1` is data; the noisy input is `x_t = alpha_t x1 + sigma_t x0`. DiT runs are noised
with their own Gaussian diffusion at the same fraction of its step range, counted from the data
end: step `round((1 - t) * (T - 1))` (each objective's `model_time`).

The work is batched (`jax.vmap` over examples, a Python loop over batches and times only) and
reduced per time on device: only the reduced metrics and the token-pooled features (for the
probes) leave it. The spectra need all examples of a block at once, so their peak memory grows
as `examples x blocks x tokens x dim` float32 per time (two to three such arrays: the batches'
outputs, their concatenation, the reduction's working copies); bound it with `blocks` and
`examples`. The forward returns only the analysed blocks (`tap_blocks`).

Labels: the norms and spectra see the model fed the true class, as in training (`unconditional`:
the null label). The probes see the model fed the label `probe_labels` says, by default the null
label (index `num_classes`, the classifier-free-guidance label): given the true label, a
class-conditional model's blocks carry the class from the conditioning, and a probe would read it
rather than infer it from `x_t`. The null label means something only for a model trained with
label dropout (`model.class_dropout_prob > 0`); for one trained without, the null-label probes are
skipped and the result says why (`RunMetrics.probe_note`).
"""

import dataclasses
import functools
import math
import os
import pathlib
import sys
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

import eqdisp
from eqdisp.config import ConfigError, DataConfig, ExperimentConfig, resolve_blocks

from ._errors import AnalysisError
from ._metrics import (
    DISPERSIVE_VARIANTS,
    block_norms,
    class_distance_means,
    class_distance_quantiles,
    class_uniformity,
    dispersive_values,
    effective_rank,
    pairwise_distance_quantiles,
    singular_values,
    uniformity,
)
from ._probes import check_probe_labels, probe_accuracy

DATA_SOURCES: tuple[str, ...] = ("config", "digits", "synthetic", "folder", "latents")
"""`Options.data`: ``config`` uses each run's own data configuration (without flips)."""

ANALYSES: tuple[str, ...] = ("norms", "spectra", "probes")

PROBE_LABELS: tuple[str, ...] = ("null", "true")
"""`Options.probe_labels`: the label fed to the model for the probes' features."""

PROBE_NOTES: dict[str, str] = {
    "null": "probed with the null label: the model saw no class",
    "true": (
        "probed with the true label: the model was given the class, so its blocks carry it from "
        "the conditioning and accuracies near 1.0 say nothing about the representation"
    ),
    "untrained": (
        "not meaningful: the run was trained with model.class_dropout_prob=0 (MF models: "
        "meanflow.class_dropout_prob=0), so its null label was never trained, and with the true "
        "label the blocks carry the class from the conditioning (accuracies near 1.0); no probe "
        "was run (--probe-labels true forces one)"
    ),
}
"""`RunMetrics.probe_note` for each case: null-label probes, true-label probes, and null-label
probes asked of a run trained without label dropout (skipped)."""


@dataclasses.dataclass(frozen=True)
class Options:
    """What to analyse and on which inputs (shared by every analysis and the command line)."""

    t: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    """Times of the grid, in [0, 1]; SiT convention: t = 0 is pure noise, t = 1 is clean data."""
    examples: int = 256
    """Number of data examples (the same examples, noise and times for every run)."""
    blocks: str = "all"
    """Blocks to analyse, 1-based: ``all``, ``quarter`` (depth // 4), ``last`` or a list such as ``1,3``."""
    ema: bool = True
    """Analyse the EMA weights (else the raw optimizer weights)."""
    seed: int = 0
    """Seed of the example choice and of the noise x0; also the probes' cross-validation seed."""
    batch_size: int = 64
    """Examples per forward pass."""
    data: str = "config"
    """Data source: ``config`` (each run's own), ``digits``, ``synthetic``, ``folder`` or ``latents``."""
    data_path: str | None = None
    """Directory of a ``folder`` or ``latents`` source (overrides the run's)."""
    tau: float = 0.5
    """Temperature of the InfoNCE variants reported by the spectra."""
    group_size: int | None = 16
    """Group size of the dispersive values (must divide ``examples``); None: one group."""
    folds: int = 5
    """Cross-validation folds of the linear probes."""
    unconditional: bool = False
    """Feed the models the null label instead of the class for the norms and spectra (the probes'
    label is `probe_labels`); needs a run that learned the null label (`null_label_trained`)."""
    probe_labels: str = "null"
    """Label fed to the model for the linear probes: ``null`` (the classifier-free-guidance label,
    index num_classes: the model sees no class, so a probe must infer it from x_t; meaningful only
    for a run that learned the null label (`null_label_trained`), else the probes are skipped with a
    warning) or ``true`` (the class itself: the blocks carry it from the conditioning, so
    accuracies near 1.0 are expected)."""
    progress: bool = True
    """Show a progress bar on stderr."""

    def __post_init__(self):
        if not self.t:
            raise AnalysisError("t: the time grid is empty; give at least one time in [0, 1]")
        bad = [t for t in self.t if not (0.0 <= t <= 1.0 and math.isfinite(t))]
        if bad:
            raise AnalysisError(
                f"t={bad[0]!r} is out of range: times lie in [0, 1] (0 = noise, 1 = data)"
            )
        if self.examples < 2:
            raise AnalysisError(f"examples={self.examples} is not allowed: expected at least 2")
        if self.batch_size < 1:
            raise AnalysisError(
                f"batch_size={self.batch_size} is not allowed: expected a positive int"
            )
        if self.data not in DATA_SOURCES:
            raise AnalysisError(
                f"data={self.data!r} is not allowed: expected one of {', '.join(DATA_SOURCES)}"
            )
        if self.group_size is not None and (
            self.group_size < 2 or self.examples % self.group_size != 0
        ):
            raise AnalysisError(
                f"group_size={self.group_size} must be at least 2 and divide examples={self.examples}"
            )
        if self.probe_labels not in PROBE_LABELS:
            raise AnalysisError(
                f"probe_labels={self.probe_labels!r} is not allowed: expected one of "
                + ", ".join(PROBE_LABELS)
            )
        if self.folds < 2:
            raise AnalysisError(f"folds={self.folds} is not allowed: expected at least 2")
        if not 0 <= self.seed < 2**32:
            raise AnalysisError(f"seed={self.seed} is not allowed: expected an int in [0, 2**32)")


def null_label_trained(cfg: ExperimentConfig) -> bool:
    """Whether the run's model learned what the null label means: it dropped labels in training
    (``model.class_dropout_prob``, or MeanFlow's own ``meanflow.class_dropout_prob``), or it is
    unconditional (a U-Net ignores every label, so any label feeds it no class)."""
    family = eqdisp.parse_model_name(cfg.model.name).family
    if family == "UNet":
        return True
    if family == "MF":
        return cfg.meanflow.class_dropout_prob > 0
    return cfg.model.class_dropout_prob > 0


def parse_blocks(spec: str, depth: int) -> tuple[int, ...]:
    """`Options.blocks` as sorted, unique **1-based** block numbers for a model of `depth` blocks
    (the grammar of ``DispConfig.blocks``: ``all``, ``quarter``, ``last`` or ``1,3``).

    **Raises:** `AnalysisError` naming the spec when a block is out of range or it is malformed.
    """
    try:
        return tuple(b + 1 for b in resolve_blocks(spec, depth, field="blocks"))
    except ConfigError as e:
        raise AnalysisError(str(e)) from None


# ----------------------------------------------------------------------------------------------
# Runs and inputs


@dataclasses.dataclass(frozen=True)
class Run:
    """One checkpoint of a run, ready to analyse."""

    name: str
    path: pathlib.Path
    step: int
    config: ExperimentConfig
    model: eqx.Module


def run_name(path: pathlib.Path) -> str:
    """A short label for a run directory (its name; `checkpoints/` directories name their parent)."""
    path = pathlib.Path(path).absolute()
    return path.parent.name if path.name == "checkpoints" else path.name


def list_steps(path: str | os.PathLike) -> list[int]:
    """The committed checkpoint steps of a run directory, oldest first.

    **Raises:** `eqdisp.CheckpointError` (one line) when `path` is not a run directory.
    """
    from eqdisp.train import Checkpointer

    path = pathlib.Path(path).absolute()
    if not path.is_dir():
        raise eqdisp.CheckpointError(f"{path}: no such run directory")
    directory = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if not any(p.is_dir() and p.name.isdigit() for p in directory.iterdir()):
        raise eqdisp.CheckpointError(
            f"{path}: not a run directory (expected checkpoints in {path / 'checkpoints'})"
        )
    with Checkpointer(directory, read_only=True) as ckpt:
        steps = ckpt.all_steps()
    if not steps:
        raise eqdisp.CheckpointError(f"{directory}: no complete checkpoint in this directory")
    return steps


def load_run(
    path: str | os.PathLike, *, step: int | None = None, ema: bool = True, name: str | None = None
) -> Run:
    """Load a run's checkpoint (the latest, or `step`) with its EMA (or raw) model."""
    path = pathlib.Path(path)
    ckpt = eqdisp.load_checkpoint(path, step)
    return Run(
        name=name or run_name(path),
        path=path.absolute(),
        step=int(ckpt.step),
        config=ckpt.config,
        model=ckpt.ema if ema else ckpt.model,
    )


class Inputs(eqx.Module):
    """The fixed inputs of an analysis: data `x1`, labels `y`, noise `x0` (one per example)."""

    x1: Float[Array, "n c h w"]
    x0: Float[Array, "n c h w"]
    y: Int[Array, " n"]


def load_inputs(config: ExperimentConfig, options: Options) -> Inputs:
    """Draw `options.examples` examples of the data source and their noise, from `options.seed`.

    **Raises:** `eqdisp.DataError` (one line) for a missing, empty or too small data source.
    """
    model = config.model
    if options.data == "config":
        data = config.data
    else:
        data = DataConfig(source=options.data, image_size=config.data.image_size)
    data = dataclasses.replace(data, flip=False, workers=0, path=options.data_path or data.path)
    shape = (model.in_channels, model.input_size, model.input_size)
    dataset = eqdisp.make_dataset(
        data,
        batch_size=options.examples,
        seed=options.seed,
        shape=shape,
        num_classes=model.num_classes,
    )
    batch = next(iter(dataset))
    x1 = jnp.asarray(batch["x"], jnp.float32)
    x0 = jax.random.normal(jax.random.key(options.seed), x1.shape, jnp.float32)
    return Inputs(x1=x1, x0=x0, y=jnp.asarray(batch["y"], jnp.int32))


def check_comparable(configs: Sequence[ExperimentConfig], names: Sequence[str]) -> None:
    """Runs compared side by side must take the same inputs (channels, size, classes): every run
    is fed the same examples, drawn from the first run's data configuration."""
    first = configs[0]
    for cfg, name in zip(configs[1:], names[1:]):
        for field in ("in_channels", "input_size", "num_classes"):
            if getattr(cfg.model, field) != getattr(first.model, field):
                raise AnalysisError(
                    f"{name}: model.{field}={getattr(cfg.model, field)} differs from "
                    f"{names[0]}'s {getattr(first.model, field)}; runs compared must take the same inputs"
                )


# ----------------------------------------------------------------------------------------------
# Progress


class Progress:
    """A one-line progress bar on stderr (`enabled=False`: silent)."""

    def __init__(self, total: int, label: str, enabled: bool = True):
        self.total, self.label, self.done = max(total, 1), label, 0
        self.enabled = enabled

    def update(self, n: int = 1, note: str = "") -> None:
        self.done += n
        if self.enabled:
            filled = int(30 * self.done / self.total)
            bar = "#" * filled + "." * (30 - filled)
            end = "\n" if self.done >= self.total else ""
            sys.stderr.write(f"\r{self.label} [{bar}] {self.done}/{self.total} {note:<40}{end}")
            sys.stderr.flush()


# ----------------------------------------------------------------------------------------------
# Collection


@eqx.filter_jit
def _forward_blocks(
    model: eqx.Module,
    objective: eqdisp.AbstractObjective,
    x0: Float[Array, "b c h w"],
    x1: Float[Array, "b c h w"],
    y: Int[Array, " b"],
    t: Float[Array, ""],
    tap_blocks: tuple[int, ...],
) -> Float[Array, "b k tokens dim"]:
    def one(x0, x1, y):
        xt, _ = objective.interpolate(x0, x1, t)
        _, taps = model.forward_with_taps(xt, t, y, tap_blocks=tap_blocks)
        return taps.blocks.astype(jnp.float32)

    return jax.vmap(one)(x0, x1, y)


@functools.partial(jax.jit, static_argnames=("spectra", "tau", "group_size"))
def _reduce(
    z: Float[Array, "n k tokens dim"], *, spectra: bool, tau: float, group_size: int | None
):
    """All metrics of one time, for every selected block (vmapped over blocks)."""
    per_token, per_example = block_norms(z)
    out = {"norm_token": per_token, "norm_example": per_example}
    if spectra:
        zb = jnp.moveaxis(z, 1, 0)  # (k, n, tokens, dim)
        sv = jax.vmap(singular_values)(zb)
        out |= {
            "dist_quantiles": jax.vmap(pairwise_distance_quantiles)(zb),
            "singular_values": sv,
            "effective_rank": jax.vmap(effective_rank)(sv),
            "uniformity": jax.vmap(uniformity)(zb),
        }
        disp = jax.vmap(lambda b: dispersive_values(b, tau=tau, group_size=group_size))(zb)
        out |= {f"disp_{v}": disp[:, i] for i, v in enumerate(DISPERSIVE_VARIANTS)}
    return out


@jax.jit
def _reduce_classes(z: Float[Array, "n k tokens dim"], labels: Int[Array, " n"]):
    """The same-class / different-class split of the distances and the uniformity at one time,
    for every selected block. Kept out of `_reduce`, so the metrics there compile as before."""
    zb = jnp.moveaxis(z, 1, 0)  # (k, n, tokens, dim)
    means = jax.vmap(class_distance_means, in_axes=(0, None))(zb, labels)
    quantiles = jax.vmap(class_distance_quantiles, in_axes=(0, None))(zb, labels)
    unif = jax.vmap(class_uniformity, in_axes=(0, None))(zb, labels)
    return {
        "dist_same": means[:, 0],
        "dist_diff": means[:, 1],
        "dist_ratio": means[:, 1] / means[:, 0],
        "dist_quantiles_same": quantiles[:, 0],
        "dist_quantiles_diff": quantiles[:, 1],
        "uniformity_same": unif[:, 0],
        "uniformity_diff": unif[:, 1],
    }


def _has_both_pair_kinds(labels: np.ndarray) -> bool:
    """Whether the examples hold a same-class pair and a different-class pair."""
    counts = np.unique(labels, return_counts=True)[1]
    return bool(counts.size >= 2 and counts.max() >= 2)


@dataclasses.dataclass(frozen=True)
class RunMetrics:
    """The metrics of one checkpoint, as NumPy arrays indexed `[time, block, ...]`.

    `values` keys (present when computed): ``norm_token``, ``norm_example`` (mean L2 norm per token
    / per flattened example), ``dist_quantiles`` (`[t, block, QUANTILE_LEVELS]`, squared distances /
    D), ``singular_values`` (`[t, block, examples]`, centred), ``effective_rank``, ``uniformity``,
    ``disp_<variant>`` for each of `DISPERSIVE_VARIANTS`, ``probe_accuracy`` and ``probe_std``.

    With the spectra, when the examples hold a same-class and a different-class pair, their split
    by the examples' data labels, over all pairs i < j of the examples (not the loss's groups):
    ``dist_same`` / ``dist_diff`` (mean `||z_i - z_j||^2 / D` over same-class / different-class
    pairs), ``dist_ratio`` (``dist_diff / dist_same``; 1 where the block ignores the class),
    ``dist_quantiles_same`` / ``dist_quantiles_diff`` (`[t, block, QUANTILE_LEVELS]`) and
    ``uniformity_same`` / ``uniformity_diff`` (``uniformity`` over those pairs only).
    """

    name: str
    path: str
    step: int
    variant: str
    disp_blocks: tuple[int, ...]
    """The 1-based blocks the run's Dispersive Loss regularised (empty for the baseline)."""
    t: tuple[float, ...]
    blocks: tuple[int, ...]
    values: dict[str, np.ndarray]
    chance: float | None = None
    """Accuracy of always guessing the most frequent class (the probes' floor)."""
    probe_labels: str | None = None
    """The probes' `Options.probe_labels` (None: probes not asked for)."""
    probe_meaningful: bool | None = None
    """Whether the probe accuracies measure the representation: True for null-label probes of a
    run trained with label dropout; False for true-label probes, and for null-label probes asked
    of a run trained without dropout (then skipped: no ``probe_accuracy``). None: not asked for."""
    probe_note: str | None = None
    """What the probes' model saw, or why they were skipped (a value of `PROBE_NOTES`)."""

    def to_dict(self) -> dict:
        """A JSON-able dict (arrays become nested lists)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "values"}
        d["disp_blocks"], d["t"], d["blocks"] = (
            list(self.disp_blocks),
            list(self.t),
            list(self.blocks),
        )
        d["values"] = {k: np.asarray(v).tolist() for k, v in self.values.items()}
        return d


def collect(
    run: Run,
    inputs: Inputs,
    options: Options,
    *,
    analyses: Sequence[str] = ANALYSES,
    progress: Progress | None = None,
) -> RunMetrics:
    """Run `run`'s model on `inputs` at every time of `options.t` and reduce its block outputs.

    **Arguments:**

    - `run`: the loaded checkpoint.
    - `inputs`: the fixed examples and noise (`load_inputs`); the same for every run compared.
    - `options`: times, blocks, batch size, probe settings.
    - `analyses`: any of ``norms``, ``spectra``, ``probes`` (norms are always computed: they are free).
    - `progress`: advanced once per time.

    **Returns:** the `RunMetrics`.
    """
    unknown = set(analyses) - set(ANALYSES)
    if unknown:
        raise AnalysisError(
            f"unknown analysis {min(unknown)!r}: expected one of {', '.join(ANALYSES)}"
        )
    model = run.model
    depth = model.depth
    blocks = parse_blocks(options.blocks, depth)
    tap_blocks = tuple(b - 1 for b in blocks)
    objective = eqdisp.make_objective(run.config)
    n = inputs.y.shape[0]
    if n < 2:
        raise AnalysisError(f"the data source gave {n} examples; the analyses need at least 2")
    bs = min(options.batch_size, n)
    pad = (-n) % bs  # pad the last batch (repeating examples) so every batch has one shape
    take = jnp.concatenate([jnp.arange(n), jnp.arange(pad) % n])
    x0, x1, y_true = inputs.x0[take], inputs.x1[take], inputs.y[take]
    trained_null = null_label_trained(run.config)
    y_null = jnp.full_like(y_true, run.config.model.num_classes)  # the null label
    if options.unconditional and not trained_null:
        raise AnalysisError(
            f"--unconditional is not allowed for {run.path}: it was trained with "
            "model.class_dropout_prob=0 (MF models: meanflow.class_dropout_prob=0), so its null "
            "label was never trained"
        )
    y = y_null if options.unconditional else y_true
    spectra, probes = "spectra" in analyses, "probes" in analyses
    probe_labels = probe_meaningful = probe_note = None
    if probes:
        check_probe_labels(np.asarray(inputs.y), options.folds)
        probe_labels = options.probe_labels
        if probe_labels == "null" and not trained_null:
            probes, probe_meaningful, probe_note = False, False, PROBE_NOTES["untrained"]
        else:
            probe_meaningful, probe_note = probe_labels == "null", PROBE_NOTES[probe_labels]
    # The probes reuse the metrics' forward when both feed the same label, else run their own.
    probe_own_forward = probes and options.unconditional != (probe_labels == "null")
    y_probe = y_null if probe_labels == "null" else y_true

    def forward(y, tt, group):
        return jnp.concatenate(
            [
                _forward_blocks(
                    model, objective, x0[i : i + bs], x1[i : i + bs], y[i : i + bs], tt, group
                )
                for i in range(0, n + pad, bs)
            ]
        )[:n]

    def metrics(tt, group) -> dict[str, np.ndarray]:
        """Every metric of the blocks `group` (taps of one shape) at time `tt`, per block."""
        z = forward(y, tt, group)
        reduced = jax.device_get(
            _reduce(z, spectra=spectra, tau=options.tau, group_size=options.group_size)
        )
        if split:
            reduced |= jax.device_get(_reduce_classes(z, inputs.y))
        if probes:
            if probe_own_forward:
                del z
                z = forward(y_probe, tt, group)
            pooled = np.asarray(jnp.mean(z, axis=2))  # (n, blocks, dim): mean over tokens
            scores = [
                probe_accuracy(pooled[:, j], labels, folds=options.folds, seed=options.seed)
                for j in range(len(group))
            ]
            reduced["probe_accuracy"] = np.asarray([s[0] for s in scores])
            reduced["probe_std"] = np.asarray([s[1] for s in scores])
        return reduced

    # Taps of different shapes (a U-Net's resolutions) are collected one shape at a time.
    groups = model.tap_groups(tap_blocks)
    order = np.argsort(np.concatenate(groups))  # group-major -> the order of `blocks`
    labels = np.asarray(inputs.y)
    split = spectra and _has_both_pair_kinds(labels)
    per_t: list[dict] = []
    for t in options.t:
        tt = jnp.asarray(objective.model_time(t), jnp.float32)
        parts = [metrics(tt, group) for group in groups]
        reduced = {
            key: np.concatenate([np.asarray(part[key]) for part in parts])[order]
            for key in parts[0]
        }
        per_t.append(reduced)
        if progress is not None:
            progress.update(1, f"{run.name} step {run.step} t={t:g}")

    values = {k: np.stack([np.asarray(r[k]) for r in per_t]) for k in per_t[0]}
    chance = float(np.bincount(labels).max() / labels.size) if probes else None
    disp = run.config.disp
    disp_blocks = tuple(b + 1 for b in disp.block_indices(depth)) if disp.active else ()
    return RunMetrics(
        name=run.name,
        path=str(run.path),
        step=run.step,
        variant=disp.variant if disp.active else "none",
        disp_blocks=disp_blocks,
        t=tuple(float(t) for t in options.t),
        blocks=blocks,
        values=values,
        chance=chance,
        probe_labels=probe_labels,
        probe_meaningful=probe_meaningful,
        probe_note=probe_note,
    )


def _unique_names(paths: Sequence[pathlib.Path]) -> list[str]:
    names = [run_name(p) for p in paths]
    if len(set(names)) < len(names):  # e.g. a/run and b/run: qualify with the parent
        names = [f"{pathlib.Path(p).absolute().parent.name}/{n}" for p, n in zip(paths, names)]
    if len(set(names)) < len(names):
        names = [str(pathlib.Path(p)) for p in paths]
    return names


def analyze_runs(
    paths: Sequence[str | os.PathLike],
    options: Options | None = None,
    *,
    analyses: Sequence[str] = ANALYSES,
    step: int | None = None,
) -> list[RunMetrics]:
    """Analyse the latest checkpoint (or `step`) of each run, all on identical inputs.

    The inputs come from the first run's configuration (or `options.data`).

    **Raises:** `eqdisp.CheckpointError` for a path that is not a run directory, `AnalysisError`
    for a block out of range or runs that take different inputs, `eqdisp.DataError` for an empty
    or unusable data source. All have one-line messages.
    """
    options = Options() if options is None else options
    if not paths:
        raise AnalysisError("no run directory given")
    paths = [pathlib.Path(p) for p in paths]
    names = _unique_names(paths)
    runs = [load_run(p, step=step, ema=options.ema, name=nm) for p, nm in zip(paths, names)]
    for r in runs:
        parse_blocks(options.blocks, r.model.depth)  # fail before any work
    check_comparable([r.config for r in runs], names)
    inputs = load_inputs(runs[0].config, options)
    bar = Progress(len(runs) * len(options.t), "analysing", options.progress)
    return [collect(r, inputs, options, analyses=analyses, progress=bar) for r in runs]


def analyze_dynamics(
    paths: Sequence[str | os.PathLike],
    options: Options | None = None,
    *,
    analyses: Sequence[str] = ("norms", "spectra"),
    known: Sequence[RunMetrics] = (),
) -> list[list[RunMetrics]]:
    """Analyse every saved checkpoint of each run (representation change during training).

    **Arguments:**

    - `paths`, `options`: as for `analyze_runs`.
    - `analyses`: computed for every checkpoint (default: norms and spectra, no probes).
    - `known`: metrics already computed with the same options (e.g. by `analyze_runs`); a
      checkpoint whose run path and step match one of them is not computed again.

    **Returns:** one list per run, of `RunMetrics` ordered by step. Same errors as `analyze_runs`.
    """
    options = Options() if options is None else options
    if not paths:
        raise AnalysisError("no run directory given")
    paths = [pathlib.Path(p) for p in paths]
    names = _unique_names(paths)
    steps = [list_steps(p) for p in paths]
    first = [
        load_run(p, step=s[0], ema=options.ema, name=nm) for p, s, nm in zip(paths, steps, names)
    ]
    for r in first:
        parse_blocks(options.blocks, r.model.depth)
    check_comparable([r.config for r in first], names)
    done = {(m.path, m.step): m for m in known}
    todo = sum((str(p.absolute()), st) not in done for p, s in zip(paths, steps) for st in s)
    inputs = load_inputs(first[0].config, options) if todo else None
    bar = Progress(todo * len(options.t), "dynamics", options.progress and todo > 0)
    out = []
    for p, s, nm, r0 in zip(paths, steps, names, first):
        series = []
        for st in s:
            if (str(p.absolute()), st) in done:
                m = done[(str(p.absolute()), st)]
                series.append(dataclasses.replace(m, name=nm))
                continue
            r = r0 if st == r0.step else load_run(p, step=st, ema=options.ema, name=nm)
            series.append(collect(r, inputs, options, analyses=analyses, progress=bar))
        out.append(series)
    return out


__all__ = [
    "ANALYSES",
    "DATA_SOURCES",
    "Inputs",
    "Options",
    "PROBE_LABELS",
    "PROBE_NOTES",
    "Progress",
    "Run",
    "RunMetrics",
    "analyze_dynamics",
    "analyze_runs",
    "collect",
    "list_steps",
    "load_inputs",
    "load_run",
    "null_label_trained",
    "parse_blocks",
    "run_name",
]
