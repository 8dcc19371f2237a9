"""eqdisp: diffusion and flow models regularised by Dispersive Loss, in JAX and Equinox.

The public API is re-exported here; the modules behind it are:

- ``eqdisp.dispersive``: the Dispersive Loss variants and their contrastive counterparts.
- ``eqdisp.models``: the SiT/DiT transformer with typed activation taps.
- ``eqdisp.transport``: SiT's interpolants and training loss (the time convention is documented there).
- ``eqdisp.samplers``: ODE/SDE samplers and classifier-free guidance.
- ``eqdisp.objective``: the training loss, diffusion + lambda x dispersive.
- ``eqdisp.train``: the train state, the compiled step, Orbax checkpoints and the loop.
- ``eqdisp.data``, ``eqdisp.sharding``: Grain pipelines; device meshes and shardings.
- ``eqdisp.config``: frozen configuration dataclasses and named presets.
"""

from .config import (
    DISP_PRESETS as DISP_PRESETS,
    PRESETS as PRESETS,
    ConfigError as ConfigError,
    DataConfig as DataConfig,
    DispConfig as DispConfig,
    ExperimentConfig as ExperimentConfig,
    ModelConfig as ModelConfig,
    OptimConfig as OptimConfig,
    RunConfig as RunConfig,
    SamplerConfig as SamplerConfig,
    TransportConfig as TransportConfig,
)
from .data import DataError as DataError, make_dataset as make_dataset
from .dispersive import (
    VARIANTS as VARIANTS,
    contrastive_loss as contrastive_loss,
    dispersive_loss as dispersive_loss,
    pairwise_sq_dists as pairwise_sq_dists,
)
from .models import (
    AbstractDiffusionModel as AbstractDiffusionModel,
    DiffusionTransformer as DiffusionTransformer,
    Taps as Taps,
    make_model as make_model,
    parse_model_name as parse_model_name,
)
from .objective import diffusion_loss as diffusion_loss
from .samplers import (
    cfg_velocity as cfg_velocity,
    integrate_ode as integrate_ode,
    integrate_sde as integrate_sde,
    sample as sample,
    solve_ode as solve_ode,
)
from .train import (
    Checkpoint as Checkpoint,
    CheckpointError as CheckpointError,
    load_checkpoint as load_checkpoint,
    TrainingError as TrainingError,
    train as train,
    TrainState as TrainState,
    init_train_state as init_train_state,
    make_optimizer as make_optimizer,
    make_train_step as make_train_step,
)
from .transport import (
    GVPPath as GVPPath,
    LinearPath as LinearPath,
    Transport as Transport,
    VPPath as VPPath,
    make_path as make_path,
    make_transport as make_transport,
)

__version__ = "0.1.0"
