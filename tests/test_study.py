"""Studies: the Student-t interval against known answers, pairing, resuming a killed study."""

import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import time
import typing

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_t_quantiles_and_the_paired_interval_match_known_answers():
    from scipy import stats as scipy_stats

    from analysis.study import paired_interval, t_cdf, t_quantile

    for df in (1, 2, 4, 9, 30, 200):
        for p in (0.6, 0.9, 0.975, 0.995):
            assert t_quantile(p, df) == pytest.approx(scipy_stats.t.ppf(p, df), rel=1e-9, abs=1e-9)
        assert t_cdf(-1.3, df) == pytest.approx(scipy_stats.t.cdf(-1.3, df), rel=1e-10)
    assert t_quantile(0.975, 4) == pytest.approx(2.7764451052, abs=1e-9)  # the printed tables' value

    # Differences 1..5: mean 3, sd sqrt(2.5), half-width t(0.975, 4) * sd / sqrt(5).
    paired = paired_interval([11.0, 12.0, 13.0, 14.0, 15.0], [10.0] * 5)
    half = 2.7764451052 * math.sqrt(2.5) / math.sqrt(5)
    assert (paired.n, paired.mean) == (5, 3.0)
    assert paired.std == pytest.approx(math.sqrt(2.5))
    assert (paired.low, paired.high) == pytest.approx((3 - half, 3 + half))
    assert paired.excludes_zero
    assert not paired_interval([1.0, -1.0, 2.0], [0.0, 0.0, 0.0]).excludes_zero
    one = paired_interval([1.0], [0.0])
    assert one.mean == 1.0 and math.isnan(one.low) and math.isnan(one.high)
    with pytest.raises(ValueError, match="2 arm values for 3 baseline values"):
        paired_interval([1.0, 2.0], [0.0, 0.0, 0.0])


def test_arms_are_cli_train_options_checked_before_anything_runs(tmp_path):
    from analysis import AnalysisError
    from analysis.study import STUDIES, Arm, Protocol, Study, run_study

    for study in STUDIES.values():  # every built-in arm parses
        for arm in study.arms:
            cfg = study.config(arm, 3, tmp_path)
            assert cfg.train.seed == 3 and cfg.train.steps == study.protocol.steps
            assert cfg.train.sample_count == 0
    table2 = STUDIES["table2"]
    assert len(table2.arms) == 13 and table2.protocol.seeds >= 5
    assert STUDIES["table3"].protocol.seeds >= 3 and STUDIES["table4"].protocol.seeds >= 3
    restricted = table2.config(table2.arms[-1], 0, tmp_path).disp
    assert (restricted.variant, restricted.contrastive) == ("covariance", "restricted")
    families = [STUDIES["families"].config(arm, 0, tmp_path) for arm in STUDIES["families"].arms]
    assert [c.model.name for c in families] == ["SiT-T/2"] * 2 + ["UNet-T"] * 2 + ["MF-T/2"] * 2
    assert [c.disp.active for c in families] == [False, True] * 3
    assert families[3].sampler.time_grid == "edm" and families[3].optim.decay_steps == 1500
    # sit-tiny's dtype auto would depend on the CPU; a study computes in float32 unless an arm
    # chooses otherwise.
    precision = STUDIES["precision"]
    assert [precision.config(a, 0, tmp_path).model.dtype for a in precision.arms] == (
        ["float32"] * 2 + ["bfloat16"] * 2
    )
    assert all(c.model.dtype == "float32" for c in families)
    with pytest.raises(AnalysisError, match=r"arm 'x': preset='nope' is not allowed: expected one of"):
        Arm("x", (), "nope")
    assert table2.arm("hinge") is table2.arms[3]
    with pytest.raises(AnalysisError, match=r"arm 'hinj' is not in study 'table2': expected one of baseline, "):
        table2.arm("hinj")
    from cli.study import StudyArgs

    choices = typing.get_args(typing.get_args(StudyArgs.__annotations__["study"])[0])
    assert set(choices) == set(STUDIES)  # the command line offers every built-in study

    short = Study("short", "", table2.arms[:2], Protocol(steps=50))
    with pytest.raises(AnalysisError, match="steps=50 is not allowed with sit-tiny's 100 warm-up steps"):
        short.config(short.arms[1], 0, tmp_path)
    assert table2.config(table2.arms[1], 0, tmp_path).optim.decay_steps == table2.protocol.steps
    bad = Study("bad", "", (Arm("base", ("--disp.variant", "none")), Arm("typo", ("--disp.wieght", "1"))))
    with pytest.raises(AnalysisError, match=r"arm 'typo': '--disp.wieght 1' are not valid cli.train options"):
        run_study(bad, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_the_dry_run_estimate_times_a_short_run_of_the_baseline(tmp_path):
    from analysis.study import STUDIES, estimate_seconds

    table2 = STUDIES["table2"]  # its 1,500-step cosine protocol, probed with 20 steps
    seconds = estimate_seconds(table2, tmp_path / "none-done")
    assert 65 * 1500 * 0.001 < seconds < 65 * 3600  # more than 1 ms a step, less than 1 h a run


def test_the_dry_run_estimates_each_model_family_from_its_own_runs(tmp_path, monkeypatch):
    import importlib
    from analysis.study import STUDIES, cores_per_run, estimate_seconds
    from analysis.study._run import RESULT, _identity

    families = STUDIES["families"]  # SiT-T/2, UNet-T and MF-T/2 arms (2 each), 3 seeds
    probed, unet_speed = [], {"images_per_second": 1000.0}

    def timed(cfg):  # stands in for the 20 timed training steps
        probed.append(cfg.model.name)
        fast = not cfg.model.name.startswith("UNet")
        return {"images_per_second": 1000.0 if fast else unet_speed["images_per_second"], "compile_seconds": 0.0}

    monkeypatch.setattr(importlib.import_module("eqdisp.train"), "train", timed)  # the package exports train() too

    def estimate(speed: float) -> float:
        probed.clear()
        unet_speed["images_per_second"] = speed
        return estimate_seconds(families, tmp_path)

    same, slow = estimate(1000.0), estimate(100.0)
    assert sorted(probed) == ["MF-T/2", "SiT-T/2", "UNet-T"]  # one probe per preset
    assert slow > same * 1.5  # the UNet-T runs are estimated from UNet-T's own speed
    # Every UNet-T run finished in 50 s: those are done, and its speed no longer matters.
    for seed in range(3):
        for arm in families.arms[2:4]:
            run_dir = families.run_dir(tmp_path, arm, seed)
            run_dir.mkdir(parents=True)
            (run_dir / RESULT).write_text(json.dumps({
                "identity": _identity(families, arm, seed, cores_per_run(1)), "arm": arm.name,
                "seed": seed, "fid": 1.0, "seconds": 50.0,
            }))
    rest = estimate(100.0)
    assert sorted(probed) == ["MF-T/2", "SiT-T/2"] and rest == estimate(1000.0) < same
    # A UNet-T run left is estimated from the finished ones (50 s), not probed.
    (families.run_dir(tmp_path, families.arms[2], 0) / RESULT).unlink()
    assert estimate(100.0) == pytest.approx(rest + 50.0) and "UNet-T" not in probed


WORKER = [sys.executable, str(REPO / "tests" / "study_worker.py")]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def test_a_killed_study_resumes_and_paired_arms_differ_only_in_the_regulariser(tmp_path):
    """`--disp.weight 0` and `--disp.variant none` are the same experiment: identical weights and
    FID. The study is killed after its first run and resumed without redoing it."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    import eqdisp
    from analysis.study import read_result, summarize, with_probes

    from study_worker import STUDY as study

    out = tmp_path / "study"
    proc = subprocess.Popen([*WORKER, str(out)], env=ENV, stderr=subprocess.PIPE, text=True)
    first = out / "none" / "seed-0" / "study-result.json"
    deadline = time.monotonic() + 600
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists(), proc.stderr.read()[-2000:]
    stamp = first.stat().st_mtime_ns

    # The rerun, in a process of its own too: hours of a study's work never share the test process.
    rerun = subprocess.run([*WORKER, str(out)], env=ENV, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "1 of 2 runs already done" in rerun.stderr
    assert first.stat().st_mtime_ns == stamp  # the finished run was not redone
    results = [read_result(study, out, arm, 0) for arm in study.arms]
    none, weight0 = results
    assert none["fid"] == weight0["fid"] and none["analysis"] == weight0["analysis"]
    a = jax.tree.leaves(eqdisp.load_checkpoint(out / "none" / "seed-0").state.ema)
    b = jax.tree.leaves(eqdisp.load_checkpoint(out / "weight0" / "seed-0").state.ema)
    assert all(bool(jnp.array_equal(x, y)) for x, y in zip(a, b, strict=True))

    summary = summarize(study, results)
    diff = summary["arms"][1]["fid_diff"]
    assert diff["n"] == 1 and diff["mean"] == 0.0

    # Linear probes after the fact (on 128 examples: 5 folds need 5 of every class): identical
    # for the identical arms, at block depth // 4 = 1, computed once per checkpoint.
    probing = dataclasses.replace(study, protocol=dataclasses.replace(study.protocol, examples=128))
    probed = with_probes(probing, out, results)
    first_probe, second_probe = (r["probe"] for r in probed)
    assert first_probe == second_probe and first_probe["block"] == 1
    assert len(first_probe["accuracy"]) == len(first_probe["t"]) == 5
    assert all(0.0 <= a <= 1.0 for a in first_probe["accuracy"])
    cache = out / "none" / "seed-0" / "probe.json"
    stamp = cache.stat().st_mtime_ns
    assert with_probes(probing, out, results) == probed and cache.stat().st_mtime_ns == stamp
    row = summarize(study, probed)["arms"][1]
    assert row["probe_mid_diff"]["mean"] == 0.0 and row["probe_accuracy"] == first_probe["accuracy"]
    assert json.loads((out / "study.json").read_text())["protocol"]["steps"] == 3


def _unit_processes(out: pathlib.Path) -> list[int]:
    """Pids of the runs of the study in `out` that are still alive (Linux /proc)."""
    pids = []
    for entry in pathlib.Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"analysis.study._unit" in command and str(out).encode() in command:
            pids.append(int(entry.name))
    return pids


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="two runs at a time need 2 cores")
def test_runs_in_parallel_processes_pair_resume_and_die_with_the_study(tmp_path):
    """Two runs at a time, each in its own 1-core process: killing the study kills its runs, the
    rerun finishes them, and the paired arms still agree exactly."""
    from analysis import AnalysisError
    from analysis.study import cores_per_run, plan, read_result, run_study

    from study_worker import STUDY as study

    with pytest.raises(AnalysisError, match=r"jobs=99 is not allowed: expected 1 to \d+"):
        run_study(study, tmp_path / "bad", jobs=99)

    out = tmp_path / "parallel"
    proc = subprocess.Popen([*WORKER, str(out), "2"], env=ENV, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while len(_unit_processes(out)) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(_unit_processes(out)) == 2, proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while _unit_processes(out) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _unit_processes(out), "the runs outlived the killed study"

    rerun = subprocess.run([*WORKER, str(out), "2"], env=ENV, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    share = cores_per_run(2)
    none, weight0 = (read_result(study, out, arm, 0, cores=share) for arm in study.arms)
    assert none["identity"]["cores"] == share
    assert none["fid"] == weight0["fid"] and none["analysis"] == weight0["analysis"]
    # Finished on `share` cores: done for two at a time, to be redone for one run on all cores.
    assert all(r is not None for *_, r in plan(study, out, jobs=2))
    if cores_per_run(1) != share:
        assert all(r is None for *_, r in plan(study, out, jobs=1))


def test_interim_summarises_only_the_seeds_every_arm_finished(tmp_path):
    from analysis.study import STUDIES, cores_per_run
    from analysis.study._run import RESULT, _identity
    from cli.study import main

    study = STUDIES["table2"]
    with pytest.raises(SystemExit, match="no seed has finished in every arm yet"):
        main(["table2", "--out", str(tmp_path), "--interim", "--jobs", "1"])
    digits = _digits_uint8(60)
    for seed, arms in ((0, study.arms), (1, study.arms), (2, study.arms[:3])):  # seed 2 unfinished
        for i, arm in enumerate(arms):
            fid = 90.0 + i + 0.5 * seed * (arm is not study.baseline)
            run_dir = study.run_dir(tmp_path, arm, seed)
            run_dir.mkdir(parents=True)
            # Samples: 50 real digits, a different slice per arm and seed, for the secondary FID.
            _write_samples(run_dir / "samples.npz", digits[(i + seed) % 10 :][:50])
            (run_dir / RESULT).write_text(json.dumps({
                "identity": _identity(study, arm, seed, cores_per_run(1)), "arm": arm.name,
                "seed": seed, "fid": fid, "precision": 0.8, "recall": 0.9,
                "analysis": {}, "seconds": 100.0,
                "diagnostics": {"disp_gap/b1": 0.01 * (seed + 1), "grad_norm_diff/b1": 0.2},
            }))
            rows = [{"step": step, "loss_diff": 1.0 / step + i, "loss_disp": -2.7 + seed, "lr": 1e-3}
                    for step in (10, 20, 30)]
            (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # Before any seed is complete, --publish still saves the finished runs' ledger.
    import shutil

    early = tmp_path / "early"
    shutil.copytree(study.run_dir(tmp_path, study.baseline, 0), study.run_dir(early, study.baseline, 0))
    with pytest.raises(SystemExit, match="no seed has finished in every arm yet"):
        main(["table2", "--out", str(early), "--interim", "--jobs", "1", "--no-probes"])
    saved = main(["table2", "--out", str(early), "--interim", "--jobs", "1", "--no-probes", "--publish", str(early)])
    (record,) = [json.loads(line) for line in (early / "table2-runs.jsonl").read_text().splitlines()]
    assert saved["runs"] == 1 and (record["arm"], record["seed"], record["fid"]) == ("baseline", 0, 90.0)
    assert not (early / "interim.md").exists()
    # One complete seed: each cell holds the mean alone (no spread, no interval).
    one = tmp_path / "one"
    for arm in study.arms:
        shutil.copytree(study.run_dir(tmp_path, arm, 0), study.run_dir(one, arm, 0))
    main(["table2", "--out", str(one), "--interim", "--jobs", "1", "--no-probes"])
    page = (one / "interim.md").read_text()
    assert "**Interim**: seed 0 (1 of 5) finished in every arm; 13 of 65 runs done." in page
    assert "| infonce-l2 | 1 | 91.000 | +1.000 | +1.1% | 0.800 |" in page

    published = tmp_path / "published"
    summary = main([
        "table2", "--out", str(tmp_path), "--interim", "--jobs", "1", "--publish", str(published),
        "--no-probes",  # these runs have no checkpoints
    ])
    rows = {row["arm"]: row for row in summary["arms"]}
    assert all(row["seeds"] == 2 for row in rows.values())  # seed 2 left out of every arm
    # infonce-l2 is 1 above the baseline at seed 0 and 1.5 at seed 1: mean 1.25, std 0.354,
    # t(0.975, 1) = 12.706, half-width 12.706 * 0.354 / sqrt 2 = 3.177.
    diff = rows["infonce-l2"]["fid_diff"]
    assert diff["mean"] == pytest.approx(1.25) and diff["high"] - diff["mean"] == pytest.approx(3.1766, abs=1e-3)
    page = (tmp_path / "interim.md").read_text()
    assert "**Interim**: seeds 0, 1 (2 of 5) finished in every arm; 29 of 65 runs done." in page
    assert not (tmp_path / "results.md").exists()  # the final results are not touched
    assert "| baseline | 1 | 0.0150 |  | 0.2000 |  |" in page  # diagnostics: mean of seeds 0, 1
    # Published: the same page, and HTML that loads the one plotly.min.js beside it.
    assert (published / "table2-interim.md").read_text() == page
    assert json.loads((published / "table2-interim.json").read_text())["arms"] == summary["arms"]
    web = (published / "table2-interim.html").read_text()
    assert '<script charset="utf-8" src="plotly.min.js"></script>' in web and len(web) < 1_000_000
    assert (published / "plotly.min.js").stat().st_size > 1_000_000

    # The secondary FID-classifier (against all digits) is that of each run's own samples.
    from eqdisp.eval import evaluate

    assert "## Secondary: FID-classifier against `digits`" in page
    # The classifier is surer of its own training digits than of the held-out reference, so the
    # real digits' line is said to be no floor.
    real = summary["real_digits"]
    assert real["confidence_real"] > real["confidence_reference"] and "this line is no floor" in page
    baseline_runs = [study.run_dir(tmp_path, study.baseline, seed) / "samples.npz" for seed in (0, 1)]
    expected = [evaluate(f, "digits", features="classifier")["fid"] for f in baseline_runs]
    assert rows["baseline"]["fid2_mean"] == pytest.approx(sum(expected) / 2, rel=1e-9)
    assert summary["secondary"]["reference"] == "digits"

    # The ledger holds every finished run (seed 2's three too), with what the directory held.
    ledger = published / "table2-runs.jsonl"
    records = [json.loads(line) for line in ledger.read_text().splitlines()]
    assert len(records) == 29 and {(r["arm"], r["seed"]) for r in records} >= {("infonce-cos", 2)}
    assert records[0]["metrics"][0] == {"step": 10, "loss_diff": 0.1, "loss_disp": -2.7}  # no lr

    # Moved to a machine without the runs' files, the study restores them and summarises the
    # same: the FIDs, the secondary FID and the curves come from the records.
    from analysis.study._report import curves

    moved = tmp_path / "moved"
    again = main([
        "table2", "--out", str(moved), "--interim", "--jobs", "1", "--restore", str(ledger),
        "--no-probes",
    ])
    assert again["arms"] == summary["arms"]
    assert not (study.run_dir(moved, study.baseline, 0) / "samples.npz").exists()
    here = json.loads((tmp_path / "interim.json").read_text())["runs"]
    there = json.loads((moved / "interim.json").read_text())["runs"]
    for key in ("loss_diff", "loss_disp"):
        assert curves(study, moved, there, key).to_dict()["data"] == curves(study, tmp_path, here, key).to_dict()["data"]
    assert "(2 seeds)" in curves(study, moved, there).to_dict()["data"][0]["name"]
    page = (moved / "interim.md").read_text()
    assert "29 of 65 runs done" in page and "restored without an end time" not in page
    assert f"Restored: 26 of these 26 runs from `{ledger}`" in page


def test_restore_takes_only_the_runs_missing_here_and_made_under_the_same_identity(tmp_path):
    from analysis import AnalysisError
    from analysis.study import (
        STUDIES,
        cores_per_run,
        read_result,
        restore,
        wall_time,
        with_probes,
        with_secondary_fid,
    )
    from analysis.study._run import RESULT, _identity

    study = STUDIES["table2"]
    base, other = study.arms[:2]
    cores = cores_per_run(1)  # what restore(jobs=1) matches

    def record(arm, seed, **change):
        identity = _identity(study, arm, seed, cores)
        identity["protocol"] = {**identity["protocol"], **change}
        return {"identity": identity, "arm": arm.name, "seed": seed, "fid": 50.0 + seed, "seconds": 9.0,
                "fid_secondary": 5.0, "probe": None}

    here = study.run_dir(tmp_path, base, 0)
    here.mkdir(parents=True)
    (here / RESULT).write_text(json.dumps({**record(base, 0), "fid": 1.0}))  # finished here
    ledger = tmp_path / "table2-runs.jsonl"
    lines = [record(base, 0), record(other, 0), record(base, 1), record(other, 1, steps=1000)]
    ledger.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert restore(study, tmp_path, ledger) == {"restored": 2, "present": 1, "skipped": 1}
    assert read_result(study, tmp_path, base, 0, cores=cores)["fid"] == 1.0  # not overwritten
    restored = read_result(study, tmp_path, other, 0, cores=cores)
    assert restored["fid"] == 50.0 and restored["restored_from"] == str(ledger)
    assert read_result(study, tmp_path, other, 1, cores=cores) is None  # another protocol
    assert restore(study, tmp_path, ledger) == {"restored": 0, "present": 3, "skipped": 1}
    # Without the run's samples and checkpoints, its record's numbers stand; without those too,
    # the error names what is missing.
    assert with_secondary_fid(study, tmp_path, [restored]) == [restored]
    assert with_probes(study, tmp_path, [restored]) == [restored]
    bare = {key: value for key, value in restored.items() if key != "fid_secondary"}
    with pytest.raises(AnalysisError, match="infonce-l2 seed 0 has no 'fid_secondary'"):
        with_secondary_fid(study, tmp_path, [bare])

    with pytest.raises(AnalysisError, match="not a study's ledger"):
        restore(study, tmp_path, tmp_path / "missing.jsonl")
    ledger.write_text(json.dumps({**record(base, 2), "identity": {**record(base, 2)["identity"], "flags": ["--disp.nope", "1"]}}) + "\n")
    with pytest.raises(AnalysisError, match="'--disp.nope 1' are not valid cli.train options"):
        restore(study, tmp_path, ledger)

    # Another study takes the runs that compute the same: table3's baseline and block-1 (the
    # default block of a depth-6 model) are table2's baseline and infonce-l2; hinge is none of
    # table3's, and table2's seed 4 is beyond table3's 3 seeds.
    table3 = STUDIES["table3"]
    ledger.write_text("".join(json.dumps(record(a, s)) + "\n" for a in study.arms[:4] for s in (0, 4)))
    moved = tmp_path / "table3"
    assert restore(table3, moved, ledger) == {"restored": 2, "present": 0, "skipped": 6}
    block1 = read_result(table3, moved, table3.arm("block-1"), 0, cores=cores)
    assert block1["made_as"] == {"arm": "infonce-l2", "identity": record(other, 0)["identity"]}
    assert block1["identity"]["flags"] == ["--disp.blocks", "1"]
    assert wall_time(table3, moved, [{**block1, "finished": 1e9}])["untimed"] == 1  # table2's time
    assert read_result(table3, moved, table3.baseline, 0, cores=cores)["fid"] == 50.0
    assert STUDIES["table4"].arm("tau-0.5-lambda-0.5") and restore(STUDIES["table4"], tmp_path / "t4", ledger)["restored"] == 2


def _digits_uint8(count: int):
    from eqdisp.data import load_digits
    from eqdisp.images import to_uint8

    return to_uint8(load_digits()[0][:count])


def _write_samples(path: pathlib.Path, images) -> None:
    from eqdisp.eval import write_npz

    write_npz(path, {"arr_0": images})


def test_the_secondary_fid_is_computed_once_and_again_when_the_samples_change(tmp_path):
    from analysis.study import STUDIES, with_secondary_fid
    from eqdisp.eval import evaluate

    study = STUDIES["table2"]
    arm = study.arms[1]
    samples = study.run_dir(tmp_path, arm, 3) / "samples.npz"
    samples.parent.mkdir(parents=True)
    digits = _digits_uint8(120)
    _write_samples(samples, digits[:60])
    result = {"arm": arm.name, "seed": 3, "fid": 1.0}
    first = with_secondary_fid(study, tmp_path, [result])[0]
    assert first == {**result, "fid_secondary": evaluate(samples, "digits", features="classifier")["fid"]}
    cache = samples.parent / "fid-digits.json"
    stamp = cache.stat().st_mtime_ns
    assert with_secondary_fid(study, tmp_path, [result]) == [first] and cache.stat().st_mtime_ns == stamp

    _write_samples(samples, digits[60:])  # resampled: the cached number no longer holds
    again = with_secondary_fid(study, tmp_path, [result])[0]
    assert again["fid_secondary"] == evaluate(samples, "digits", features="classifier")["fid"]
    assert again["fid_secondary"] != first["fid_secondary"]


def test_the_wall_time_is_the_union_of_the_runs_intervals(tmp_path):
    """Two runs overlapping (0-100 s and 50-150 s) and one after a pause (300-400 s): busy 250 s."""
    from analysis.study import STUDIES, wall_time
    from analysis.study._run import RESULT

    study = STUDIES["table2"]
    results = []
    for seed, (end, seconds) in enumerate(((100.0, 100.0), (150.0, 100.0), (400.0, 100.0))):
        file = study.run_dir(tmp_path, study.baseline, seed) / RESULT
        file.parent.mkdir(parents=True)
        file.write_text("{}")
        os.utime(file, (1e9 + end, 1e9 + end))
        results.append({"arm": study.baseline.name, "seed": seed, "seconds": seconds})
    times = wall_time(study, tmp_path, results)
    assert times["busy"] == pytest.approx(250.0) and times["runs"] == pytest.approx(300.0)
    assert (times["first"], times["last"]) == ("2001-09-09 01:46 UTC", "2001-09-09 01:53 UTC")
    assert times["untimed"] == 0

    # A record's own end time wins over its file's (restored runs' files are as old as the
    # restore); a run restored without one is left out of the span, not placed at the restore.
    results[2] = {**results[2], "finished": 1e9 + 500.0, "restored_from": "ledger"}
    results.append({"arm": study.baseline.name, "seed": 0, "seconds": 50.0, "restored_from": "ledger"})
    times = wall_time(study, tmp_path, results)
    assert times["busy"] == pytest.approx(250.0) and times["runs"] == pytest.approx(350.0)
    assert times["last"] == "2001-09-09 01:55 UTC" and times["untimed"] == 1
