"""A two-arm study the study tests run in a process of their own: ``python tests/study_worker.py
OUT [JOBS]``. The arms differ only in ``--disp.weight 0`` vs ``--disp.variant none``, which are
the same experiment."""

import sys

from analysis.study import Arm, Protocol, Study, run_study

CONSTANT = ("--optim.schedule", "constant")  # 3 steps: shorter than the preset's cosine warm-up

STUDY = Study(
    "pairing",
    "weight 0 vs none",
    (
        Arm("none", ("--disp.variant", "none", *CONSTANT)),
        Arm("weight0", ("--disp.weight", "0", *CONSTANT)),
    ),
    Protocol(steps=3, seeds=1, samples=16, sampler_steps=3, examples=32),
)

if __name__ == "__main__":
    run_study(STUDY, sys.argv[1], jobs=int(sys.argv[2]) if len(sys.argv) > 2 else 1)
