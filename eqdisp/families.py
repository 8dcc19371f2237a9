"""The model families eqdisp trains, and the objective each family is trained with.

Decoding a configuration into its objective needs the model name, SiT's transport, DiT's
diffusion and MeanFlow; it lives here so that :mod:`eqdisp.objective` (the abstraction) imports
none of them.
"""

from .config import ExperimentConfig
from .diffusion import make_diffusion
from .meanflow import MeanFlow
from .models import parse_model_name
from .objective import AbstractObjective
from .transport import make_transport


def make_objective(cfg: ExperimentConfig) -> AbstractObjective:
    """The objective of the references for this model: DiT's diffusion for DiT (``learn_sigma``
    as configured), MeanFlow (``cfg.meanflow``) for MF, and a transport (``cfg.transport``) for
    SiT and the U-Net (flow_matching's CondOT path is SiT's Linear path)."""
    family = parse_model_name(cfg.model.name).family
    if family == "DiT":
        return make_diffusion(learn_sigma=cfg.model.learn_sigma)
    if family == "MF":
        return MeanFlow(cfg.meanflow, cfg.model.num_classes)
    return make_transport(cfg.transport)


__all__ = ["make_objective"]
