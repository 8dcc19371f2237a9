"""Running a study: every (seed, arm) trained, sampled, evaluated and analysed, resumably.

Runs go seed by seed (all arms of seed 0, then seed 1, ...) so that complete pairs exist early.
A run is done when its ``study-result.json`` exists and names the same protocol and flags; a
killed study rerun with the same command redoes nothing finished and resumes the run that was
interrupted (training, sampling and the FID batches all resume by themselves).

A study moves between machines as its ledger (`write_ledger`, `restore`): one line per finished
run with everything the summary reads (the FIDs, the probes, the curves' metrics, when it
finished), a few kB where the run's directory holds megabytes of checkpoints and samples.
"""

import contextlib
import dataclasses
import functools
import json
import math
import os
import pathlib
import sys
import time
from collections.abc import Sequence

import numpy as np

from eqdisp.io import write_text_atomically

from .._errors import AnalysisError
from ._plan import Arm, Protocol, Study, arm_config
from ._report import curve_rows, metrics_rows

RESULT = "study-result.json"
_DIAGNOSTIC_PREFIXES = ("disp_gap", "grad_norm_disp", "grad_norm_diff", "grad_cos")


def _identity(study: Study, arm: Arm, seed: int, cores: int) -> dict:
    # The core count is part of a run's identity: XLA:CPU splits its reductions by thread count,
    # so the same run on 1 or 2 cores differs in the last digits (FID-classifier 212.914 vs
    # 212.921 in a 400-step probe), and paired arms must not differ in anything but their flags.
    identity = {
        "protocol": dataclasses.asdict(study.protocol),
        "flags": list(arm.flags),
        "seed": seed,
        "cores": cores,
    }
    if arm.preset is not None:  # absent otherwise, so results written before it stay valid
        identity["preset"] = arm.preset
    return identity


def _cores() -> int:
    """Cores this process may run on (its affinity mask, which XLA:CPU sizes its threads by)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _write_json(path: pathlib.Path, value: dict) -> None:
    write_text_atomically(path, json.dumps(value, indent=2) + "\n")


def read_result(
    study: Study, out: pathlib.Path, arm: Arm, seed: int, *, cores: int | None = None
) -> dict | None:
    """The finished result of one run, or None when it has not finished under this protocol on
    `cores` cores per run (default: those of this process)."""
    file = study.run_dir(out, arm, seed) / RESULT
    if not file.is_file():
        return None
    result = json.loads(file.read_text())
    identity = _identity(study, arm, seed, _cores() if cores is None else cores)
    return result if result.get("identity") == identity else None


def _diagnostics(rows: list[dict]) -> dict[str, float]:
    """Mean over the last tenth of the run of each logged diagnostic (present once the train loop
    logs them; absent otherwise)."""
    keys = sorted({k for r in rows for k in r if k.startswith(_DIAGNOSTIC_PREFIXES)})
    out = {}
    for key in keys:
        values = [r[key] for r in rows if key in r]
        tail = values[-max(1, len(values) // 10) :]
        out[key] = float(np.mean(tail))
    return out


def _analysis(run_dir: pathlib.Path, protocol: Protocol) -> dict[str, list[float]]:
    """Key representation numbers per block (mean over the t grid): norm, effective rank,
    uniformity, InfoNCE-L2 value."""
    from .._collect import Options, analyze_runs
    from .._report import key_numbers

    results = analyze_runs(
        [run_dir],
        Options(examples=protocol.examples, progress=False),
        analyses=("norms", "spectra"),
    )
    rows = key_numbers(results)
    keys = ("norm_token", "effective_rank", "uniformity", "disp_infonce_l2")
    return {k: [r[k] for r in rows] for k in keys if all(k in r for r in rows)}


def _sampler(run_dir: pathlib.Path, protocol: Protocol):
    from eqdisp import load_checkpoint

    sampler = load_checkpoint(run_dir).config.sampler
    if protocol.sampler_steps is not None:
        sampler = dataclasses.replace(sampler, steps=protocol.sampler_steps)
    return sampler


def _one_run(study: Study, out: pathlib.Path, arm: Arm, seed: int) -> dict:
    import jax

    from eqdisp.eval import evaluate, generate
    from eqdisp.train import train

    protocol = study.protocol
    cfg = study.config(arm, seed, out)
    run_dir = study.run_dir(out, arm, seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    tick = time.perf_counter()
    with open(run_dir / "train.log", "a") as log, contextlib.redirect_stdout(log):
        summary = train(cfg)
    train_seconds = time.perf_counter() - tick
    samples = run_dir / "samples.npz"
    devices = jax.device_count()
    batch = max(devices, (128 // devices) * devices)
    if not samples.is_file():
        # The same labels and noise for every arm: seed 0 of the sampler, whatever the run's seed.
        generate(
            run_dir, num=protocol.samples, out=samples, sampler=_sampler(run_dir, protocol),
            batch_size=batch, seed=0, progress=False,
        )
    fid = evaluate(samples, protocol.reference, features="classifier")
    rows = metrics_rows(run_dir)
    return {
        "identity": _identity(study, arm, seed, _cores()),
        "arm": arm.name,
        "seed": seed,
        "fid": fid["fid"],
        "inception_score": fid.get("inception_score"),
        "precision": fid.get("precision"),
        "recall": fid.get("recall"),
        "final_loss_diff": rows[-1].get("loss_diff") if rows else None,
        "final_loss_disp": rows[-1].get("loss_disp") if rows else None,
        "diagnostics": _diagnostics(rows),
        "analysis": _analysis(run_dir, protocol),
        "disp_blocks": list(cfg.disp.block_indices(_depth(cfg))),
        "train_seconds": round(train_seconds, 1),
        "images_per_second": summary.get("images_per_second"),
        "seconds": round(time.perf_counter() - tick, 1),
        "finished": time.time(),
    }


def _depth(cfg) -> int:
    from eqdisp.models import parse_model_name

    return parse_model_name(cfg.model.name).depth


SECONDARY_REFERENCE = "digits"
"""The reference of the secondary FID-classifier: all 1,797 digits, the data every arm trains on
(as ImageNet FIDs are taken against training images). Chosen after interim results showed the
pre-registered held-out reference to be dominated by its own noise (see `real_digits_fid`), so it
is reported beside the primary number, never instead of it."""


def _cached(file: pathlib.Path, stamp: dict, compute, *args):
    """``compute(*args)``, kept in `file` beside the `stamp` it holds for; recomputed when the stamp
    differs. The stamp is compared as JSON gives it back (tuples become lists)."""
    stamp = json.loads(json.dumps(stamp))
    cached = json.loads(file.read_text()) if file.is_file() else {}
    if cached.get("stamp") != stamp:
        cached = {"stamp": stamp, "value": compute(*args)}
        _write_json(file, cached)
    return cached["value"]


def _restored(result: dict, source: pathlib.Path, key: str) -> bool:
    """Whether `result` must keep its own `key` because `source` (the files it is computed from)
    is missing: a run restored from a ledger without them.

    **Raises:** `AnalysisError` when `source` is missing and the record has no `key` either.
    """
    if source.exists():
        return False
    if key not in result:
        raise AnalysisError(
            f"{source} is missing and the record of {result['arm']} seed {result['seed']} has no "
            f"{key!r}: rerun that run, or restore it from a ledger that has"
        )
    return True


def with_secondary_fid(
    study: Study, out: pathlib.Path, results: Sequence[dict], reference: str = SECONDARY_REFERENCE
) -> list[dict]:
    """`results`, each with ``fid_secondary``: the FID-classifier of its run's samples against
    `reference`, computed from ``samples.npz`` after the fact. Cached in the run's directory as
    ``fid-<reference>.json``, valid while the samples file keeps its size and modification time.
    A run restored from a ledger without its samples keeps the number its record carries."""
    from eqdisp.eval import evaluate

    def secondary_fid(samples: pathlib.Path) -> float:
        return evaluate(samples, reference, features="classifier")["fid"]

    augmented = []
    for result in results:
        run_dir = study.result_dir(out, result)
        samples = run_dir / "samples.npz"
        if reference == SECONDARY_REFERENCE and _restored(result, samples, "fid_secondary"):
            augmented.append(result)
            continue
        stat = samples.stat()
        stamp = {"reference": reference, "samples_bytes": stat.st_size, "samples_mtime_ns": stat.st_mtime_ns}
        fid = _cached(run_dir / f"fid-{reference}.json", stamp, secondary_fid, samples)
        augmented.append({**result, "fid_secondary": fid})
    return augmented


def with_probes(study: Study, out: pathlib.Path, results: Sequence[dict]) -> list[dict]:
    """`results`, each with ``probe``: the cross-validated accuracy of a linear probe of the class
    from the block the tables read (depth // 4), at each time of the analysis grid, the model fed
    the null label (`analysis.Options` defaults otherwise: the same 256 examples and noise for
    every run, 5 folds); None for a run whose model never learned the null label. Computed from
    the run's final checkpoint after the fact and cached in its directory as ``probe.json``,
    valid while the run's latest checkpoint and these options stay the same. A run restored from a
    ledger without its checkpoints keeps the probes its record carries."""
    from .._collect import Options, analyze_runs

    options = Options(examples=study.protocol.examples, blocks="quarter", progress=False)

    def probe(run_dir: pathlib.Path) -> dict | None:
        (metrics,) = analyze_runs([run_dir], options, analyses=("probes",))
        accuracy = metrics.values.get("probe_accuracy") if metrics.probe_meaningful else None
        return None if accuracy is None else {
            "t": list(metrics.t), "block": metrics.blocks[0],
            "accuracy": [float(a) for a in accuracy[:, 0]], "chance": metrics.chance,
        }

    augmented = []
    for result in results:
        run_dir = study.result_dir(out, result)
        if _restored(result, run_dir / "checkpoints", "probe"):
            augmented.append(result)
            continue
        steps = [int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()]
        stamp = {"step": max(steps, default=None), "options": dataclasses.asdict(options)}
        value = _cached(run_dir / "probe.json", stamp, probe, run_dir)
        augmented.append({**result, "probe": value})
    return augmented


def real_digits_fid(out: pathlib.Path, protocol: Protocol, reference: str | None = None) -> dict:
    """FID-classifier of real digits the classifier trained on, as many as the arms sample (at most
    1,500), against `reference` (default: the protocol's), with the classifier's mean confidence
    (largest class probability) on those digits and on the reference.

    Against the held-out digits this is *no* floor: the classifier is surer of the digits it
    trained on than of unseen ones, so its features of them lie off the held-out distribution and
    they score worse than a model's samples do. Against all digits (which contain them) it is what
    reproducing the training data scores.
    """
    from eqdisp.data import load_digits
    from eqdisp.eval import DIGITS_TRAIN_SIZE, digits_feature_extractor, evaluate, write_npz
    from eqdisp.images import to_uint8

    reference = protocol.reference if reference is None else reference
    file = out / "real-digits.npz"
    count = min(protocol.samples, DIGITS_TRAIN_SIZE)
    images, labels = load_digits()
    chosen = np.random.default_rng(0).permutation(DIGITS_TRAIN_SIZE)[:count]
    if not file.is_file():
        write_npz(file, {"arr_0": to_uint8(images[chosen]), "labels": labels[chosen].astype(np.int32)})
    result = evaluate(file, reference, features="classifier")

    classifier = digits_feature_extractor()

    def confidence(batch: np.ndarray) -> float:
        return float(classifier(to_uint8(batch)).probs.max(axis=1).mean())

    in_reference = {"digits": images, "digits-test": images[DIGITS_TRAIN_SIZE:]}.get(reference)
    return {
        "count": count, "reference": reference, "fid": result["fid"],
        "precision": result.get("precision"), "recall": result.get("recall"),
        "confidence_real": confidence(images[chosen]),
        "confidence_reference": None if in_reference is None else confidence(in_reference),
    }


def finished_at(study: Study, out: pathlib.Path, result: dict) -> float | None:
    """When the run of `result` finished (seconds since the epoch): its record's ``finished``, else
    its result file's modification time; None for a run restored from a record without one (its
    file's time is that of the restore) or made as another study's run."""
    if "made_as" in result:  # another study's (or arm's) run: not this study's time
        return None
    if "finished" in result:
        return result["finished"]
    if "restored_from" in result:
        return None
    return (study.result_dir(out, result) / RESULT).stat().st_mtime


def wall_time(study: Study, out: pathlib.Path, results: Sequence[dict]) -> dict:
    """When the runs of `results` ran: each run spans the ``seconds`` it took up to when it
    finished (`finished_at`). Returns ``busy`` (seconds during which at least one run was in
    progress: the study's wall time, without the pauses between invocations), ``first`` and
    ``last`` (the UTC times of the first start and of the last end), ``runs`` (the sum of the
    runs' own times) and ``untimed`` (runs restored without an end time, left out of ``busy``,
    ``first`` and ``last``, as are runs made as another study's). A run that was killed and
    resumed counts only its last invocation."""
    import datetime

    ends = [(finished_at(study, out, result), result["seconds"]) for result in results]
    spans = sorted((end - seconds, end) for end, seconds in ends if end is not None)
    busy, cursor = 0.0, -math.inf
    for start, end in spans:
        if end > cursor:
            busy += end - max(start, cursor)
            cursor = end

    def utc(t: float) -> str:
        return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")

    return {
        "busy": busy,
        "first": utc(spans[0][0]) if spans else None,
        "last": utc(max(e for _, e in spans)) if spans else None,
        "runs": sum(result["seconds"] for result in results),
        "untimed": len(results) - len(spans),
    }


def ledger(study: Study, out: pathlib.Path, results: Sequence[dict]) -> list[dict]:
    """The records of `results` as they travel (`write_ledger`): each with when it finished and the
    rows of its ``metrics.jsonl`` that the curves read, which its directory holds only here."""
    records = []
    for result in results:
        record = dict(result)
        end = finished_at(study, out, result)
        if end is not None:
            record["finished"] = end
        if "metrics" not in record:
            record["metrics"] = curve_rows(metrics_rows(study.result_dir(out, result)))
        records.append(record)
    return records


def write_ledger(path: pathlib.Path, records: Sequence[dict]) -> pathlib.Path:
    """`records` (from `ledger`) into `path`, one JSON object per line (in order, so that a ledger
    kept in git changes by lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    return path


def run_key(protocol: Protocol, arm: Arm, seed: int, cores: int) -> str:
    """What a run computes, whatever its study or arm is called: its resolved `cli.train` config
    (without its directory, the block choice as block indices) with the protocol's sampling,
    evaluation and analysis settings, its seed and its cores per run. Runs with one key give the
    same numbers: table3's ``block-1`` arm (``--disp.blocks 1``) is table2's ``infonce-l2``
    (the default ``quarter`` block of a depth-6 model)."""
    key = json.loads(_resolved(protocol, arm))
    key["config"]["train"]["seed"] = seed  # the only setting a run's seed changes, out aside
    return json.dumps({**key, "cores": cores}, sort_keys=True)


@functools.lru_cache(maxsize=1024)
def _resolved(protocol: Protocol, arm: Arm) -> str:
    cfg = arm_config(protocol, arm, 0, pathlib.Path("run"))
    config = dataclasses.asdict(cfg)
    del config["train"]["out"]
    config["disp"]["blocks"] = list(cfg.disp.block_indices(_depth(cfg)))
    settings = {k: v for k, v in dataclasses.asdict(protocol).items() if k not in ("seeds", "preset")}
    return json.dumps({"config": config, "protocol": settings}, sort_keys=True, default=str)


def _record_key(record: dict) -> str:
    identity = record["identity"]
    arm = Arm(record["arm"], tuple(identity["flags"]), identity.get("preset"))
    return run_key(Protocol(**identity["protocol"]), arm, identity["seed"], identity["cores"])


def restore(study: Study, out: str | os.PathLike, source: str | os.PathLike, *, jobs: int = 1) -> dict:
    """Take into `out` the finished runs recorded in `source` that `out` has not finished, so that
    a study moved to another machine trains only the runs it lacks and summarises all of them.

    `source` is a ledger (`write_ledger`: ``<study>-runs.jsonl``, which ``cli.study --publish``
    writes) or a published summary (``<study>.json``, whose ``runs`` it reads), of this study or
    of another: a record is taken as every run of `study` that computes the same thing (its
    `run_key`: config, protocol settings, seed and cores per run), so table3 and table4 take
    table2's baseline and paper-default runs instead of repeating them. Each is written as that
    run's result, marked ``restored_from`` (and ``made_as``, the arm and identity it was made
    under, when those differ: it then does not count in this study's wall time). Restored runs have no checkpoints or samples here: the summary reads their
    FIDs, probes and curves from the records.

    Returns the counts ``restored``, ``present`` (already finished in `out`) and ``skipped``
    (records of no run of `study` with `jobs` parallel runs here).

    **Raises:** `AnalysisError` for a missing or unreadable `source`, or a record whose flags
    `cli.train` rejects.
    """
    out, source = pathlib.Path(out).absolute(), pathlib.Path(source)
    try:
        text = source.read_text()
        if source.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)["runs"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise AnalysisError(
            f"--restore {source}: not a study's ledger (.jsonl) or published summary (.json): {error}"
        ) from None
    cores = cores_per_run(jobs)
    runs: dict[str, list[tuple[Arm, int]]] = {}
    for seed in range(study.protocol.seeds):
        for arm in study.arms:
            runs.setdefault(run_key(study.protocol, arm, seed, cores), []).append((arm, seed))
    counts = {"restored": 0, "present": 0, "skipped": 0}
    for record in records:
        matches = runs.get(_record_key(record), [])
        counts["skipped"] += not matches
        for arm, seed in matches:
            if read_result(study, out, arm, seed, cores=cores) is not None:
                counts["present"] += 1
                continue
            result = {**record, "arm": arm.name, "identity": _identity(study, arm, seed, cores)}
            result["restored_from"] = str(source)
            if result["identity"] != record["identity"]:
                result["made_as"] = record.get("made_as", {"arm": record["arm"], "identity": record["identity"]})
            run_dir = study.run_dir(out, arm, seed)
            run_dir.mkdir(parents=True, exist_ok=True)
            _write_json(run_dir / RESULT, result)
            counts["restored"] += 1
    return counts


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min {rest:02d} s"


def plan(
    study: Study, out: pathlib.Path, *, jobs: int = 1
) -> list[tuple[int, Arm, dict | None]]:
    """Every (seed, arm) of the study in running order, with its result when it has finished on
    the cores per run that `jobs` parallel runs get here, else None."""
    cores = cores_per_run(jobs)
    return [
        (seed, arm, read_result(study, out, arm, seed, cores=cores))
        for seed in range(study.protocol.seeds)
        for arm in study.arms
    ]


def estimate_seconds(study: Study, out: pathlib.Path, *, jobs: int = 1) -> float:
    """Wall seconds the unfinished runs will take with `jobs` runs at a time.

    Runs are estimated by the preset they start from, since a study may mix model families
    (``families``: SiT-T/2, UNet-T, MF-T/2): from the mean time of that preset's finished runs,
    else from a short timed training run of its first arm (20 steps, on all cores) scaled to the
    protocol, plus sampling at the cost of as many network evaluations (a train step costs about
    three). With ``jobs > 1`` each run is assumed to take `jobs` times as long on its share of
    the cores (pessimistic: on 2 cores two sit-tiny runs at a time were 1.2-1.4x faster than one
    after the other)."""
    by_preset: dict[str, list[tuple[Arm, dict | None]]] = {}
    for _, arm, result in plan(study, out, jobs=jobs):
        by_preset.setdefault(study.protocol.preset_of(arm), []).append((arm, result))
    seconds = 0.0
    for units in by_preset.values():
        done = [result["seconds"] for _, result in units if result is not None]
        left = sum(1 for _, result in units if result is None)
        if not left:
            continue
        per_run = float(np.mean(done)) / jobs if done else _probe_seconds(study, units[0][0])
        seconds += left * per_run
    return seconds


def _probe_seconds(study: Study, arm: Arm) -> float:
    """Seconds one run of `arm` takes on all cores, from 20 timed training steps."""
    import tempfile

    from eqdisp import make_objective
    from eqdisp.train import train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = study.config(arm, 0, pathlib.Path(tmp))
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=20))
        with contextlib.redirect_stdout(open(os.devnull, "w")):
            summary = train(cfg)
    step_seconds = cfg.train.batch_size / summary["images_per_second"]
    sampler = cfg.sampler
    if study.protocol.sampler_steps is not None:
        sampler = dataclasses.replace(sampler, steps=study.protocol.sampler_steps)
    nfe = make_objective(cfg).sampler_evaluations(sampler) or 100
    per_image_eval = step_seconds / cfg.train.batch_size / 3
    return (
        study.protocol.steps * step_seconds
        + study.protocol.samples * nfe * per_image_eval
        + 2 * summary["compile_seconds"]
        + 15  # evaluation and analysis
    )


def _release_compiled_programs() -> None:
    """Drop every program jax has compiled: each run compiles its own (its closures differ), and
    XLA:CPU maps each compiled kernel into memory regions of its own, so a long study in one
    process would otherwise reach Linux's limit of 65,530 mappings and crash the compiler."""
    import gc

    import jax

    jax.clear_caches()
    gc.collect()


def cores_per_run(jobs: int) -> int:
    """Cores each of `jobs` parallel runs gets on this machine (all of them for one run).

    **Raises:** `AnalysisError` when there are fewer cores than `jobs`.
    """
    cores = _cores()
    if not 1 <= jobs <= cores:
        raise AnalysisError(f"jobs={jobs} is not allowed: expected 1 to {cores} (the cores here)")
    return cores // jobs


def run_study(
    study: Study, out: str | os.PathLike, *, jobs: int = 1, progress: bool = True
) -> list[dict]:
    """Run every unfinished (seed, arm) of `study` into `out` and return all results.

    **Arguments:**

    - `study`: the arms, seeds and protocol.
    - `out`: the study's directory (rerun with the same one to resume).
    - `jobs`: runs at a time. 1 runs them one after another in this process on all cores, and
        clears jax's caches of compiled programs after each (`jax.clear_caches`, the caller's
        included). More starts each run as a process of its own pinned to ``cores // jobs``
        cores (on a 2-core Xeon two sit-tiny runs at a time, one core each, took 197 s where one
        after the other took 232-281 s). A run's numbers depend on its core count in the last
        digits, so that count is part of its identity: resuming with another `jobs` redoes the
        runs finished under a different count.
    - `progress`: print a line with the ETA after each run.

    **Raises:** `AnalysisError` (one line) for an arm whose flags `cli.train` rejects (checked for
    every arm before anything runs), a bad `jobs`, or a run that failed in its own process (its
    log named); otherwise whatever training, sampling or evaluation raise.
    """
    out = pathlib.Path(out).absolute()
    for arm in study.arms:  # every arm's flags are valid before hours of work start
        study.config(arm, 0, out)
    cores = cores_per_run(jobs)  # checks `jobs` before anything is written
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "study.json", {"name": study.name, "description": study.description,
                                     "protocol": dataclasses.asdict(study.protocol),
                                     "arms": [dataclasses.asdict(a) for a in study.arms]})
    units = plan(study, out, jobs=jobs)
    todo = [(s, a) for s, a, r in units if r is None]
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if progress else (lambda m: None)
    if len(todo) < len(units):
        say(f"{study.name}: {len(units) - len(todo)} of {len(units)} runs already done")
    durations = [r["seconds"] for _, _, r in units if r is not None]

    def report(seed: int, arm: Arm, result: dict, left: int) -> None:
        durations.append(result["seconds"])
        say(
            f"{study.name}: {arm.name} seed {seed}: FID-classifier {result['fid']:.3f} "
            f"({result['seconds']:.0f} s); {len(units) - left}/{len(units)} done, "
            f"ETA {_duration(left * float(np.mean(durations)) / jobs)}"
        )

    if jobs == 1:
        for i, (seed, arm) in enumerate(todo):
            result = _one_run(study, out, arm, seed)
            _write_json(study.run_dir(out, arm, seed) / RESULT, result)
            _release_compiled_programs()
            report(seed, arm, result, len(todo) - i - 1)
    else:
        _run_in_processes(study, out, todo, jobs, report)
    results = [read_result(study, out, a, s, cores=cores) for s, a, _ in units]
    if any(r is None for r in results):
        raise AnalysisError(f"{out}: some runs have no result after running; rerun the study")
    return results


def _run_in_processes(study: Study, out: pathlib.Path, todo: list, jobs: int, report) -> None:
    """Run `todo` in `jobs` processes at a time, each pinned to its own slice of the cores."""
    import subprocess

    cores = sorted(os.sched_getaffinity(0))
    share = len(cores) // jobs
    free = [cores[i * share : (i + 1) * share] for i in range(jobs)]
    root = pathlib.Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    queue = list(todo)
    running: dict = {}  # Popen -> (seed, arm, cores, log)
    try:
        while queue or running:
            while queue and free:
                seed, arm = queue.pop(0)
                slot = free.pop(0)
                run_dir = study.run_dir(out, arm, seed)
                run_dir.mkdir(parents=True, exist_ok=True)
                log = open(run_dir / "unit.log", "a")
                command = [
                    sys.executable, "-m", "analysis.study._unit", str(out), arm.name, str(seed),
                    "--cores", ",".join(map(str, slot)), "--parent", str(os.getpid()),
                ]
                proc = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
                running[proc] = (seed, arm, slot, log)
            time.sleep(1.0)
            for proc in [p for p in running if p.poll() is not None]:
                seed, arm, slot, log = running.pop(proc)
                log.close()
                free.append(slot)
                result = read_result(study, out, arm, seed, cores=share)
                if proc.returncode != 0 or result is None:
                    raise AnalysisError(
                        f"run {arm.name} seed {seed} failed (exit status {proc.returncode}): "
                        f"see {log.name}"
                    )
                report(seed, arm, result, len(queue) + len(running))
    finally:
        for proc, (*_, log) in running.items():
            proc.terminate()
            proc.wait()
            log.close()
