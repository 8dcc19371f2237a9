"""Paired A/B studies: arms x seeds under one fixed protocol, with paired confidence intervals.

- `Study`, `Arm`, `Protocol` and the built-in `STUDIES` (the paper's Tables 2-4, its two recipes,
  Fig. 4's models, the three model families, bfloat16 against float32) — `_plan`.
- `run_study` (resumable, seed by seed, one or several runs at a time), `cores_per_run`, `plan`,
  `estimate_seconds`, `real_digits_fid`, `with_secondary_fid`, `with_probes`, `wall_time`, and
  the ledger that moves a study between machines (`ledger`, `write_ledger`, `restore`) — `_run`.
- `summarize`, `markdown`, `write_results` — `_report`; `paired_interval`, `t_quantile` — `_stats`.

Within a seed every arm shares the initial weights, the data order and every noise, time and
label-dropout draw (all derive from ``train.seed`` alone), so only the regulariser differs.
"""

from ._plan import STUDIES, Arm, Protocol, Study, arm_config
from ._report import markdown, summarize, write_results
from ._run import (
    SECONDARY_REFERENCE,
    cores_per_run,
    estimate_seconds,
    finished_at,
    ledger,
    plan,
    read_result,
    real_digits_fid,
    restore,
    run_key,
    run_study,
    wall_time,
    with_probes,
    with_secondary_fid,
    write_ledger,
)
from ._stats import Paired, mean_std, paired_interval, t_cdf, t_quantile

__all__ = [
    "SECONDARY_REFERENCE",
    "STUDIES",
    "Arm",
    "Paired",
    "Protocol",
    "Study",
    "arm_config",
    "cores_per_run",
    "estimate_seconds",
    "finished_at",
    "ledger",
    "markdown",
    "mean_std",
    "paired_interval",
    "plan",
    "read_result",
    "real_digits_fid",
    "restore",
    "run_key",
    "run_study",
    "summarize",
    "t_cdf",
    "t_quantile",
    "wall_time",
    "with_probes",
    "with_secondary_fid",
    "write_ledger",
    "write_results",
]
