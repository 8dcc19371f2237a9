"""Probes of trained eqdisp models: why does dispersion help? (Imports go cli -> analysis -> eqdisp.)

- Pure, jitted reductions of block representations (`Taps.blocks`): `block_norms`,
  `pairwise_distance_quantiles`, `singular_values`, `effective_rank`, `uniformity`,
  `dispersive_values`; split into same-class and different-class pairs by the examples' labels:
  `class_distance_means`, `class_distance_quantiles`, `class_uniformity`.
- Host-side linear probes (scikit-learn): `probe_accuracy`, on the blocks of the model fed the
  null label by default (`Options.probe_labels`).
- Collection over runs and a t grid on identical inputs: `analyze_runs` (latest checkpoints,
  overlaid) and `analyze_dynamics` (every checkpoint of a run), configured by `Options`.
- Figure builders returning plotly figures: `metric_vs_t`, `metric_vs_block`, `distance_boxes`,
  `singular_spectrum`, `metric_vs_step`, `class_pairs_vs_t`.
- Writers: `write_analysis` (HTML + JSON + CSV per analysis, or one `report` page), `write_html`.

Times follow SiT: t = 0 is pure noise, t = 1 is clean data. Blocks are numbered from 1.
"""

from ._collect import (
    ANALYSES as ANALYSES,
)
from ._collect import (
    DATA_SOURCES as DATA_SOURCES,
)
from ._collect import (
    Inputs as Inputs,
)
from ._collect import (
    PROBE_LABELS as PROBE_LABELS,
)
from ._collect import (
    PROBE_NOTES as PROBE_NOTES,
)
from ._collect import (
    Options as Options,
)
from ._collect import (
    Run as Run,
)
from ._collect import (
    RunMetrics as RunMetrics,
)
from ._collect import (
    analyze_dynamics as analyze_dynamics,
)
from ._collect import (
    analyze_runs as analyze_runs,
)
from ._collect import (
    collect as collect,
)
from ._collect import (
    list_steps as list_steps,
)
from ._collect import (
    load_inputs as load_inputs,
)
from ._collect import (
    load_run as load_run,
)
from ._collect import (
    null_label_trained as null_label_trained,
)
from ._collect import (
    parse_blocks as parse_blocks,
)
from ._errors import AnalysisError as AnalysisError
from ._figures import (
    class_pairs_vs_t as class_pairs_vs_t,
)
from ._figures import (
    distance_boxes as distance_boxes,
)
from ._figures import (
    metric_vs_block as metric_vs_block,
)
from ._figures import (
    metric_vs_step as metric_vs_step,
)
from ._figures import (
    metric_vs_t as metric_vs_t,
)
from ._figures import (
    singular_spectrum as singular_spectrum,
)
from ._metrics import (
    DISPERSIVE_VARIANTS as DISPERSIVE_VARIANTS,
)
from ._metrics import (
    PAIR_KINDS as PAIR_KINDS,
)
from ._metrics import (
    QUANTILE_LEVELS as QUANTILE_LEVELS,
)
from ._metrics import (
    block_norms as block_norms,
)
from ._metrics import (
    class_distance_means as class_distance_means,
)
from ._metrics import (
    class_distance_quantiles as class_distance_quantiles,
)
from ._metrics import (
    class_uniformity as class_uniformity,
)
from ._metrics import (
    dispersive_values as dispersive_values,
)
from ._metrics import (
    effective_rank as effective_rank,
)
from ._metrics import (
    pairwise_distance_quantiles as pairwise_distance_quantiles,
)
from ._metrics import (
    singular_values as singular_values,
)
from ._metrics import (
    uniformity as uniformity,
)
from ._probes import probe_accuracy as probe_accuracy
from ._report import (
    KINDS as KINDS,
)
from ._report import (
    default_out as default_out,
)
from ._report import (
    figures as figures,
)
from ._report import (
    key_numbers as key_numbers,
)
from ._report import (
    write_analysis as write_analysis,
)
from ._report import (
    write_html as write_html,
)
