"""One run of a study in a process of its own, pinned to some of the machine's cores.

``python -m analysis.study._unit OUT ARM SEED --cores 0,1`` runs the unfinished run (ARM, SEED)
of the study written in ``OUT/study.json`` and writes its ``study-result.json``. `run_study` starts
these when it runs several runs at a time; the pinning happens before jax starts its CPU client,
which sizes its thread pool by the cores it may use.
"""

import argparse
import json
import os
import pathlib
import signal
import sys


def _die_with_parent() -> None:
    """Ask Linux to kill this process when the study that started it dies (a killed study must not
    leave runs writing into the directory that its rerun resumes)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the parent terminates its runs itself
        pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m analysis.study._unit")
    parser.add_argument("out", type=pathlib.Path)
    parser.add_argument("arm")
    parser.add_argument("seed", type=int)
    parser.add_argument("--cores", required=True, help="comma-separated CPU numbers")
    parser.add_argument("--parent", type=int, required=True, help="pid of the study")
    args = parser.parse_args(argv)
    _die_with_parent()
    if os.getppid() != args.parent:  # the study died before the line above took effect
        sys.exit("error: the study that started this run is gone")
    os.sched_setaffinity(0, {int(c) for c in args.cores.split(",")})

    from ._plan import Arm, Protocol, Study
    from ._run import RESULT, _one_run, _write_json

    spec = json.loads((args.out / "study.json").read_text())
    arms = tuple(Arm(a["name"], tuple(a["flags"]), a.get("preset")) for a in spec["arms"])
    study = Study(spec["name"], spec["description"], arms, Protocol(**spec["protocol"]))
    arm = next(a for a in arms if a.name == args.arm)
    result = _one_run(study, args.out, arm, args.seed)
    _write_json(study.run_dir(args.out, arm, args.seed) / RESULT, result)


if __name__ == "__main__":
    main()
