"""Probes of trained eqdisp models: why does dispersion help? (Imports go cli -> analysis -> eqdisp.)

- Pure, jitted reductions of block representations (`Taps.blocks`): `block_norms`,
  `pairwise_distance_quantiles`, `singular_values`, `effective_rank`, `uniformity`,
  `dispersive_values`.
- Host-side linear probes (scikit-learn): `probe_accuracy`.
- Collection over runs and a t grid on identical inputs: `analyze_runs` (latest checkpoints,
  overlaid) and `analyze_dynamics` (every checkpoint of a run), configured by `Options`.
- Figure builders returning plotly figures: `metric_vs_t`, `metric_vs_block`, `distance_boxes`,
  `singular_spectrum`, `metric_vs_step`.
- Writers: `write_analysis` (HTML + JSON + CSV per analysis, or one `report` page), `write_html`.

Times follow SiT: t = 0 is pure noise, t = 1 is clean data. Blocks are numbered from 1.
"""

from ._collect import (
    ANALYSES as ANALYSES,
    DATA_SOURCES as DATA_SOURCES,
    Inputs as Inputs,
    Options as Options,
    Run as Run,
    RunMetrics as RunMetrics,
    analyze_dynamics as analyze_dynamics,
    analyze_runs as analyze_runs,
    collect as collect,
    list_steps as list_steps,
    load_inputs as load_inputs,
    load_run as load_run,
    parse_blocks as parse_blocks,
)
from ._errors import AnalysisError as AnalysisError
from ._figures import (
    distance_boxes as distance_boxes,
    metric_vs_block as metric_vs_block,
    metric_vs_step as metric_vs_step,
    metric_vs_t as metric_vs_t,
    singular_spectrum as singular_spectrum,
)
from ._metrics import (
    DISPERSIVE_VARIANTS as DISPERSIVE_VARIANTS,
    QUANTILE_LEVELS as QUANTILE_LEVELS,
    block_norms as block_norms,
    dispersive_values as dispersive_values,
    effective_rank as effective_rank,
    pairwise_distance_quantiles as pairwise_distance_quantiles,
    singular_values as singular_values,
    uniformity as uniformity,
)
from ._probes import probe_accuracy as probe_accuracy
from ._report import (
    KINDS as KINDS,
    default_out as default_out,
    figures as figures,
    key_numbers as key_numbers,
    write_analysis as write_analysis,
    write_html as write_html,
)
