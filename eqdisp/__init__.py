"""eqdisp: diffusion and flow models regularised by Dispersive Loss, in JAX and Equinox.

The public API is re-exported here; the modules behind it are:

- ``eqdisp.dispersive``: the Dispersive Loss variants and their contrastive counterparts.
- ``eqdisp.models``: the SiT/DiT transformer with typed activation taps.
- ``eqdisp.transport``: SiT's interpolants and training loss (the time convention is documented there).
- ``eqdisp.samplers``: ODE/SDE samplers and classifier-free guidance.
- ``eqdisp.diffusion``: DiT's Gaussian diffusion (eps prediction, learned variance, DDPM).
- ``eqdisp.objective``: ``AbstractObjective`` (what the loop, samplers and analysis need of an
  objective) and the training loss, objective + lambda x dispersive.
- ``eqdisp.families``: which objective a model family trains with (``make_objective``).
- ``eqdisp.meanflow``: MeanFlow's target, loss and one-/few-step sampler (pure functions).
- ``eqdisp.train``: the train state, the compiled step, Orbax checkpoints and the loop.
- ``eqdisp.data``, ``eqdisp.sharding``: Grain pipelines; device meshes and shardings.
- ``eqdisp.config``: frozen configuration dataclasses and named presets.
- ``eqdisp.vae``: the SD-VAE (diffusers ``AutoencoderKL``) that maps images to latents and back.
- ``eqdisp.latents``: image folders to latent shards (``cli.prepare``) and decoding of samples.
- ``eqdisp.convert``: released PyTorch SiT/DiT/REPA/Dispersive-Loss checkpoints to eqdisp.
- ``eqdisp.io``: torch-free readers of ``.pth``/``.pt``/``.bin``, ``.safetensors`` and ``.npz``;
  the atomic file writer.
"""

from .config import (
    DISP_PRESETS as DISP_PRESETS,
)
from .config import (
    PRESETS as PRESETS,
)
from .config import (
    ConfigError as ConfigError,
)
from .config import (
    DataConfig as DataConfig,
)
from .config import (
    DispConfig as DispConfig,
)
from .config import (
    ExperimentConfig as ExperimentConfig,
)
from .config import (
    ModelConfig as ModelConfig,
)
from .config import (
    OptimConfig as OptimConfig,
)
from .config import (
    RunConfig as RunConfig,
)
from .config import (
    SamplerConfig as SamplerConfig,
)
from .config import (
    TransportConfig as TransportConfig,
)
from .convert import ConvertError as ConvertError
from .convert import convert_checkpoint as convert_checkpoint
from .convert import from_torch as from_torch
from .data import DataError as DataError
from .data import make_dataset as make_dataset
from .diffusion import (
    GaussianDiffusion as GaussianDiffusion,
)
from .diffusion import (
    ddpm_sample as ddpm_sample,
)
from .diffusion import (
    make_diffusion as make_diffusion,
)
from .dispersive import (
    VARIANTS as VARIANTS,
)
from .dispersive import (
    contrastive_loss as contrastive_loss,
)
from .dispersive import dispersive_floor as dispersive_floor
from .dispersive import (
    dispersive_loss as dispersive_loss,
)
from .dispersive import (
    pairwise_sq_dists as pairwise_sq_dists,
)
from .io import WeightsError as WeightsError
from .io import read_state_dict as read_state_dict
from .io import read_torch as read_torch
from .latents import LatentDecoder as LatentDecoder
from .latents import latent_decoder as latent_decoder
from .latents import prepare_latents as prepare_latents
from .latents import read_manifest as read_manifest
from .models import (
    AbstractDiffusionModel as AbstractDiffusionModel,
)
from .models import (
    DiffusionTransformer as DiffusionTransformer,
)
from .models import (
    Taps as Taps,
)
from .models import UNet as UNet
from .models import (
    make_model as make_model,
)
from .models import (
    parse_model_name as parse_model_name,
)
from .families import make_objective as make_objective
from .objective import AbstractNoisingObjective as AbstractNoisingObjective
from .objective import AbstractObjective as AbstractObjective
from .objective import loss_terms as loss_terms
from .objective import training_loss as training_loss
from .samplers import (
    cfg_velocity as cfg_velocity,
)
from .samplers import (
    integrate_ode as integrate_ode,
)
from .samplers import (
    integrate_sde as integrate_sde,
)
from .samplers import (
    sample as sample,
)
from .samplers import (
    solve_ode as solve_ode,
)
from .train import (
    Checkpoint as Checkpoint,
)
from .train import (
    CheckpointError as CheckpointError,
)
from .train import (
    TrainingError as TrainingError,
)
from .train import (
    TrainState as TrainState,
)
from .train import (
    init_train_state as init_train_state,
)
from .train import (
    load_checkpoint as load_checkpoint,
)
from .train import make_diagnostics as make_diagnostics
from .train import (
    make_optimizer as make_optimizer,
)
from .train import (
    make_train_step as make_train_step,
)
from .train import (
    train as train,
)
from .transport import (
    GVPPath as GVPPath,
)
from .transport import (
    LinearPath as LinearPath,
)
from .transport import (
    Transport as Transport,
)
from .transport import (
    VPPath as VPPath,
)
from .transport import (
    make_path as make_path,
)
from .transport import (
    make_transport as make_transport,
)
from .vae import AutoencoderKL as AutoencoderKL
from .vae import VAEConfig as VAEConfig
from .vae import decode_latents as decode_latents
from .vae import encode_images as encode_images
from .vae import load_vae as load_vae

__version__ = "0.1.0"
