"""Running a study: every (seed, arm) trained, sampled, evaluated and analysed, resumably.

Runs go seed by seed (all arms of seed 0, then seed 1, ...) so that complete pairs exist early.
A run is done when its ``study-result.json`` exists and names the same protocol and flags; a
killed study rerun with the same command redoes nothing finished and resumes the run that was
interrupted (training, sampling and the FID batches all resume by themselves).
"""

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import sys
import time

import numpy as np

from .._errors import AnalysisError
from ._plan import Arm, Protocol, Study

RESULT = "study-result.json"
_DIAGNOSTIC_PREFIXES = ("disp_gap", "grad_norm_disp", "grad_norm_diff", "grad_cos")


def _identity(study: Study, arm: Arm, seed: int) -> dict:
    return {"protocol": dataclasses.asdict(study.protocol), "flags": list(arm.flags), "seed": seed}


def _write_json(path: pathlib.Path, value: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


def read_result(study: Study, out: pathlib.Path, arm: Arm, seed: int) -> dict | None:
    """The finished result of one run, or None when it has not finished under this protocol."""
    file = study.run_dir(out, arm, seed) / RESULT
    if not file.is_file():
        return None
    result = json.loads(file.read_text())
    return result if result.get("identity") == _identity(study, arm, seed) else None


def _metrics_rows(run_dir: pathlib.Path) -> list[dict]:
    file = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in file.read_text().splitlines()] if file.is_file() else []


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
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    tick = time.perf_counter()
    with open(out / "train.log", "a") as log, contextlib.redirect_stdout(log):
        print(f"=== {arm.name} seed {seed} ===", flush=True)
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
    rows = _metrics_rows(run_dir)
    return {
        "identity": _identity(study, arm, seed),
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
    }


def _depth(cfg) -> int:
    from eqdisp.models import parse_model_name

    return parse_model_name(cfg.model.name).depth


def real_digits_fid(out: pathlib.Path, protocol: Protocol) -> dict:
    """FID-classifier of real digits the classifier trained on (never in the held-out reference),
    as many as the arms sample (at most 1,500), against the protocol's reference: what a perfect
    generator scores at this sample count."""
    from eqdisp.data import load_digits
    from eqdisp.eval import evaluate, write_npz
    from eqdisp.eval._classifier import DIGITS_TRAIN_SIZE
    from eqdisp.images import to_uint8

    file = out / "real-digits.npz"
    count = min(protocol.samples, DIGITS_TRAIN_SIZE)
    if not file.is_file():
        images, labels = load_digits()
        chosen = np.random.default_rng(0).permutation(DIGITS_TRAIN_SIZE)[:count]
        write_npz(file, {"arr_0": to_uint8(images[chosen]), "labels": labels[chosen].astype(np.int32)})
    result = evaluate(file, protocol.reference, features="classifier")
    return {"count": count, "fid": result["fid"], "precision": result.get("precision"), "recall": result.get("recall")}


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min {rest:02d} s"


def plan(study: Study, out: pathlib.Path) -> list[tuple[int, Arm, dict | None]]:
    """Every (seed, arm) of the study in running order, with its finished result or None."""
    return [
        (seed, arm, read_result(study, out, arm, seed))
        for seed in range(study.protocol.seeds)
        for arm in study.arms
    ]


def estimate_seconds(study: Study, out: pathlib.Path) -> float:
    """Seconds the unfinished runs will take: the mean of the finished ones, else a short timed
    training run of the baseline (20 steps) scaled to the protocol, plus sampling at the cost of
    as many network evaluations (a train step costs about three)."""
    units = plan(study, out)
    done = [r["seconds"] for _, _, r in units if r is not None]
    left = sum(1 for _, _, r in units if r is None)
    if done:
        return left * float(np.mean(done))
    import tempfile

    from eqdisp.objective import make_objective, sampler_evaluations
    from eqdisp.train import train

    with tempfile.TemporaryDirectory() as tmp:
        probe = dataclasses.replace(study.protocol, steps=20)
        cfg = Study(study.name, "", study.arms, probe).config(study.baseline, 0, pathlib.Path(tmp))
        with contextlib.redirect_stdout(open(os.devnull, "w")):
            summary = train(cfg)
    step_seconds = cfg.train.batch_size / summary["images_per_second"]
    sampler = cfg.sampler
    if study.protocol.sampler_steps is not None:
        sampler = dataclasses.replace(sampler, steps=study.protocol.sampler_steps)
    nfe = sampler_evaluations(make_objective(cfg), sampler) or 100
    per_image_eval = step_seconds / cfg.train.batch_size / 3
    per_run = (
        study.protocol.steps * step_seconds
        + study.protocol.samples * nfe * per_image_eval
        + 2 * summary["compile_seconds"]
        + 15  # evaluation and analysis
    )
    return left * per_run


def _release_compiled_programs() -> None:
    """Drop every program jax has compiled: each run compiles its own (its closures differ), and
    XLA:CPU maps each compiled kernel into memory regions of its own, so a long study in one
    process would otherwise reach Linux's limit of 65,530 mappings and crash the compiler."""
    import gc

    import jax

    jax.clear_caches()
    gc.collect()


def run_study(study: Study, out: str | os.PathLike, *, progress: bool = True) -> list[dict]:
    """Run every unfinished (seed, arm) of `study` into `out` and return all results.

    Clears jax's caches of compiled programs after each run (`jax.clear_caches`), the caller's
    included.

    **Raises:** `AnalysisError` (one line) for an arm whose flags `cli.train` rejects (checked for
    every arm before anything runs), and whatever training, sampling or evaluation raise.
    """
    out = pathlib.Path(out)
    for arm in study.arms:  # every arm's flags are valid before hours of work start
        study.config(arm, 0, out)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "study.json", {"name": study.name, "description": study.description,
                                     "protocol": dataclasses.asdict(study.protocol),
                                     "arms": [dataclasses.asdict(a) for a in study.arms]})
    units = plan(study, out)
    todo = [(s, a) for s, a, r in units if r is None]
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if progress else (lambda m: None)
    if len(todo) < len(units):
        say(f"{study.name}: {len(units) - len(todo)} of {len(units)} runs already done")
    durations = [r["seconds"] for _, _, r in units if r is not None]
    for i, (seed, arm) in enumerate(todo):
        result = _one_run(study, out, arm, seed)
        _write_json(study.run_dir(out, arm, seed) / RESULT, result)
        _release_compiled_programs()
        durations.append(result["seconds"])
        left = len(todo) - i - 1
        say(
            f"{study.name}: {arm.name} seed {seed}: FID-classifier {result['fid']:.3f} "
            f"({result['seconds']:.0f} s); {len(units) - left}/{len(units)} done, "
            f"ETA {_duration(left * float(np.mean(durations)))}"
        )
    results = [read_result(study, out, a, s) for s, a, _ in units]
    if any(r is None for r in results):
        raise AnalysisError(f"{out}: some runs have no result after running; rerun the study")
    return results
