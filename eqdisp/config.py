"""Frozen configuration dataclasses and named presets.

Configs never hold arrays; they are turned into runtime objects by ``make_*`` functions
(``eqdisp.make_model``, ``eqdisp.make_path``, ...). Every field carries an attribute docstring,
which ``tyro`` shows in ``--help``. Each ``__post_init__`` validates its fields and raises
``ConfigError`` with a one-line message naming the field, the bad value and what is allowed.
"""

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Literal, NamedTuple, get_args


class ConfigError(Exception):
    """A configuration value is not allowed. The message is one line meant for the user.

    Deliberately not a ``ValueError``: tyro wraps those in a multi-line box while parsing, and the
    command-line tools print a ``ConfigError`` as one line.
    """


def _check(ok: bool, field: str, value: object, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{field}={value!r} is not allowed: expected {allowed}")


def _check_choice(field: str, value: object, choices: tuple) -> None:
    _check(value in choices, field, value, "one of " + ", ".join(repr(c) for c in choices))


# ----------------------------------------------------------------------------------------------
# Model


ModelFamily = Literal["SiT", "DiT", "MF", "UNet"]
"""SiT (flow matching), DiT (Gaussian diffusion), MF (MeanFlow: a DiT backbone conditioned on
``(t, t - r)``), UNet (flow_matching's CIFAR-10 U-Net, trained by flow matching)."""

# Model names, decoded next to the config that holds them (as big_vision decodes its variant
# strings): `ExperimentConfig` checks block numbers against the depth a name stands for.

MODEL_SIZES: dict[str, tuple[int, int, int]] = {
    "T": (6, 192, 3),  # a small CPU size for tests and demos; not in the papers
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
"""`(depth, dim, num_heads)` per size letter (DiT, Peebles & Xie 2023, Table 1; MLP ratio 4)."""

PATCH_SIZES: tuple[int, ...] = (2, 4, 8)

UNET_SIZES: dict[str, dict[str, object]] = {
    # flow_matching examples/image/models/model_configs.py, MODEL_CONFIGS["cifar10"]:
    # 29 ResBlocks, 55,676,419 parameters.
    "CIFAR": {
        "model_channels": 128,
        "channel_mult": (2, 2, 2),
        "num_res_blocks": 4,
        "attention_resolutions": (2,),
        "dropout": 0.3,
    },
    # A small CPU size for tests and demos, not in the paper: 32 and 64 channels at two
    # resolutions, one ResBlock per encoder level (8 ResBlocks), attention at the lower level.
    "T": {
        "model_channels": 32,
        "channel_mult": (1, 2),
        "num_res_blocks": 1,
        "attention_resolutions": (2,),
        "dropout": 0.1,
    },
}
"""`eqdisp.models.UNet` arguments per U-Net size; the rest are the cifar10 configuration's."""

_NAME_PATTERN = "{SiT,DiT,MF}-{T,S,B,L,XL}/{2,4,8} or UNet-{CIFAR,T}"
_NAME_RE = re.compile(r"^(?:(SiT|DiT|MF)-)?(T|S|B|L|XL)/(2|4|8)$")
_UNET_RE = re.compile(r"^UNet-(CIFAR|T)$")


class ModelSpec(NamedTuple):
    """The architecture a model name stands for.

    For a U-Net, `depth` counts its ResBlocks (the blocks that can be tapped), `dim` is the
    widest feature map's channels, `num_heads` 1 and `patch_size` 1 (pixels are the tokens).
    """

    family: ModelFamily
    depth: int
    dim: int
    num_heads: int
    patch_size: int


def unet_depth(channel_mult: tuple[int, ...], num_res_blocks: int) -> int:
    """ResBlocks of a U-Net: `num_res_blocks` per encoder level, two in the middle, one more per
    decoder level (guided-diffusion's `UNetModel`; cifar10: 12 + 2 + 15 = 29)."""
    return len(channel_mult) * (2 * num_res_blocks + 1) + 2


def parse_model_name(name: str) -> ModelSpec:
    """Decode a model name into its architecture.

    **Arguments:**

    - `name`: `"{SiT,DiT,MF}-{T,S,B,L,XL}/{2,4,8}"`, e.g. `"SiT-B/2"` (a bare `"B/2"` means
        SiT), or `"UNet-CIFAR"` (flow_matching's CIFAR-10 U-Net) or `"UNet-T"` (a small one).

    **Returns:** a `ModelSpec(family, depth, dim, num_heads, patch_size)`.

    **Raises:** `ConfigError` naming the bad value and the accepted pattern.
    """
    unet = _UNET_RE.match(name) if isinstance(name, str) else None
    if unet is not None:
        size = UNET_SIZES[unet.group(1)]
        mult, channels = size["channel_mult"], size["model_channels"]
        depth = unet_depth(mult, size["num_res_blocks"])
        return ModelSpec("UNet", depth, channels * max(mult), 1, 1)
    match = _NAME_RE.match(name) if isinstance(name, str) else None
    if match is None:
        raise ConfigError(f"model.name={name!r} is not allowed: expected {_NAME_PATTERN}, e.g. 'SiT-B/2'")
    family, size, patch = match.groups()
    depth, dim, num_heads = MODEL_SIZES[size]
    return ModelSpec(family or "SiT", depth, dim, num_heads, int(patch))


BlockImpl = Literal["auto", "unroll", "scan"]
ComputeDtype = Literal["auto", "float32", "bfloat16"]
Bf16Mode = Literal["auto", "cast", "dots"]
AttentionImpl = Literal["auto", "einsum", "xla", "cudnn"]
Remat = Literal["auto", "none", "dots", "full"]
TimeConvention = Literal["sit", "repa"]


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a network. ``name`` fixes a transformer's depth, width, heads and patch, or
    a U-Net's configuration (``UNET_SIZES``); the implementation fields are the transformer's."""

    name: str = "SiT-B/2"
    """Model name, ``{SiT,DiT,MF}-{T,S,B,L,XL}/{2,4,8}`` or ``UNet-{CIFAR,T}`` (``T`` is a small
    CPU size, not in the papers)."""
    input_size: int = 32
    """Height and width of the input (a 32x32 SD-VAE latent for 256px ImageNet)."""
    in_channels: int = 4
    """Channels of the input (4 for SD-VAE latents)."""
    num_classes: int = 1000
    """Number of classes; the label ``num_classes`` is the null label used by classifier-free guidance."""
    learn_sigma: bool = True
    """Output twice ``in_channels`` as DiT/SiT do (SiT drops the second half; kept for weight compatibility)."""
    class_dropout_prob: float = 0.1
    """Probability of replacing a label by the null label during training (for CFG)."""
    block_impl: BlockImpl = "auto"
    """Run the stacked blocks under ``lax.scan`` or unrolled; ``auto``: scan on CPU (faster with remat, and compiles in seconds), unrolled elsewhere (README, Speed, has the figures)."""
    dtype: ComputeDtype = "float32"
    """Compute dtype of the forward pass; parameters stay float32 (master weights). ``auto``: bfloat16 on a CPU with bfloat16 matrix instructions (AMX or AVX-512-BF16; README, Speed), float32 elsewhere (choose bfloat16 on an accelerator yourself)."""
    bf16_mode: Bf16Mode = "auto"
    """How ``dtype bfloat16`` is applied: ``cast`` runs the network in bfloat16 (LayerNorm statistics and softmax in float32); ``dots`` keeps activations float32 and gives the blocks' matmuls and attention bfloat16 operands with float32 accumulation, forward and backward, in the forms XLA:CPU runs on AMX/AVX-512-BF16. ``auto``: dots on CPU, cast elsewhere. No effect with float32."""
    attention: AttentionImpl = "auto"
    """Attention kernel: ``einsum`` (two einsums, float32 softmax), ``xla`` (``jax.nn.dot_product_attention``) or ``cudnn`` (its cuDNN flash attention: NVIDIA GPUs, ``dtype bfloat16``); ``auto``: cudnn where it applies, else einsum (the fastest measured on CPU; README, Speed)."""
    remat: Remat = "auto"
    """What the backward pass recomputes per block instead of storing: ``none``; ``dots`` (keep the linear layers' outputs, recompute attention and elementwise ops); ``full`` (keep only block inputs). ``auto``: ``dots`` on CPU (the saved activations are what the CPU step waits for; README, Speed), ``none`` elsewhere."""
    time_convention: TimeConvention = "sit"
    """Time convention the weights were trained in: ``sit`` (t=1 data, the library's) or ``repa`` (REPA's released weights: t=1 noise, velocity noise - data; SiT names only). A ``repa`` network is fed 1-t and its output negated, so it returns SiT velocities like every eqdisp model."""

    def __post_init__(self):
        _check(self.input_size > 0, "model.input_size", self.input_size, "a positive int")
        _check(self.in_channels > 0, "model.in_channels", self.in_channels, "a positive int")
        _check(self.num_classes > 0, "model.num_classes", self.num_classes, "a positive int")
        _check(
            0.0 <= self.class_dropout_prob < 1.0,
            "model.class_dropout_prob",
            self.class_dropout_prob,
            "a probability in [0, 1)",
        )
        _check_choice("model.block_impl", self.block_impl, get_args(BlockImpl))
        _check_choice("model.dtype", self.dtype, get_args(ComputeDtype))
        _check_choice("model.bf16_mode", self.bf16_mode, get_args(Bf16Mode))
        _check(
            self.attention != "cudnn" or self.bf16_mode != "dots",
            "model.bf16_mode",
            self.bf16_mode,
            "'auto' or 'cast' with attention cudnn (cuDNN flash attention takes bfloat16 activations)",
        )
        _check(
            self.bf16_mode != "dots" or not str(self.name).startswith("MF-"),
            "model.bf16_mode",
            self.bf16_mode,
            f"'auto' or 'cast' for model.name={self.name!r} (MeanFlow differentiates the network "
            "forward-mode, which the 'dots' kernels do not support)",
        )
        _check_choice("model.attention", self.attention, get_args(AttentionImpl))
        _check_choice("model.remat", self.remat, get_args(Remat))
        _check(
            self.attention != "cudnn" or self.dtype == "bfloat16",
            "model.attention",
            self.attention,
            "'auto', 'einsum' or 'xla' with dtype float32 (cuDNN flash attention needs bfloat16)",
        )
        _check_choice("model.time_convention", self.time_convention, get_args(TimeConvention))
        unet = _UNET_RE.match(str(self.name))
        if unet is not None:  # every level below the first halves the resolution
            halvings = len(UNET_SIZES[unet.group(1)]["channel_mult"]) - 1
            _check(
                self.input_size % 2**halvings == 0,
                "model.input_size",
                self.input_size,
                f"a multiple of {2**halvings} for {self.name} (it halves the resolution "
                f"{halvings} times)",
            )
        _check(
            self.time_convention == "sit" or not str(self.name).startswith("DiT-"),
            "model.time_convention",
            self.time_convention,
            f"'sit' for model.name={self.name!r} (only SiT models take REPA's convention)",
        )


# ----------------------------------------------------------------------------------------------
# Dispersive loss


DispVariant = Literal["infonce_l2", "infonce_cosine", "hinge", "covariance", "none"]
DISP_VARIANTS: tuple[str, ...] = get_args(DispVariant)
"""The variants of `eqdisp.dispersive_loss` and `eqdisp.contrastive_loss` (``none``: no term)."""
ContrastiveMode = Literal["off", "independent", "restricted"]


@dataclass(frozen=True)
class DispConfig:
    """Dispersive Loss (Wang & He 2025): which variant, how strongly, on which blocks.

    Defaults are the paper's (Table 8 and Sec. 4.1): InfoNCE with the squared L2 distance,
    lambda 0.5, tau 0.5, one block at the first quarter of the depth, groups of 16 examples.
    """

    variant: DispVariant = "infonce_l2"
    """Loss variant (paper Table 1); ``none`` is the baseline and costs nothing."""
    weight: float = 0.5
    """lambda, the weight of the dispersive term; 0 reduces exactly to the baseline."""
    tau: float = 0.5
    """Temperature of the InfoNCE variants."""
    blocks: str = "quarter"
    """Blocks whose outputs are regularised, 1-based: ``quarter`` (depth//4, the paper), ``last`` (the public PyTorch code), ``all``, or a list such as ``3`` or ``3,6``; several blocks average."""
    group_size: int | None = 16
    """Examples per group: the loss is computed on consecutive groups of the batch and averaged (paper:
    16 per device; public PyTorch code: 32). When it divides the per-device batch every group lives
    on one device, as in the paper, and results do not depend on the device count. ``None``: one group."""
    margin: float = 1.0
    """epsilon of the hinge variant, on the squared L2 distance divided by the feature size D."""
    offdiag_weight: float = 0.005
    """w, the weight of the off-diagonal term of the contrastive covariance (Barlow Twins) loss."""
    contrastive: ContrastiveMode = "off"
    """Use the contrastive counterpart instead (paper Table 2): a second noised view of every example,
    with ``independent`` noise level or one ``restricted`` to within ``contrastive_max_dt``."""
    contrastive_max_dt: float = 0.005
    """Largest difference of the two views' times in ``restricted`` mode (paper: 0.005)."""

    def __post_init__(self):
        _check_choice("disp.variant", self.variant, DISP_VARIANTS)
        _check(self.weight >= 0.0, "disp.weight", self.weight, "a number >= 0")
        _check(self.tau > 0.0, "disp.tau", self.tau, "a number > 0")
        _check(
            self.group_size is None or self.group_size >= 1,
            "disp.group_size",
            self.group_size,
            "a positive int or None",
        )
        _check(self.margin > 0.0, "disp.margin", self.margin, "a number > 0")
        _check(self.offdiag_weight >= 0.0, "disp.offdiag_weight", self.offdiag_weight, "a number >= 0")
        _check_choice("disp.contrastive", self.contrastive, get_args(ContrastiveMode))
        _check(
            self.contrastive == "off" or self.variant != "none",
            "disp.contrastive",
            self.contrastive,
            "'off' when disp.variant is 'none'",
        )
        _check(
            0.0 <= self.contrastive_max_dt <= 1.0,
            "disp.contrastive_max_dt",
            self.contrastive_max_dt,
            "a number in [0, 1]",
        )
        _parse_blocks(self.blocks)  # syntax only; the range is checked against the depth later

    @property
    def active(self) -> bool:
        """Whether the dispersive (or contrastive) term enters the loss at all."""
        return self.variant != "none" and self.weight > 0.0

    def block_indices(self, depth: int) -> tuple[int, ...]:
        """The 0-based indices of the regularised blocks for a model of this ``depth``."""
        return resolve_blocks(self.blocks, depth)


def _parse_blocks(spec: str, field: str = "disp.blocks") -> tuple[str, ...] | tuple[int, ...]:
    spec = str(spec).strip().lower()
    if spec in ("quarter", "last", "all"):
        return (spec,)
    try:
        indices = tuple(int(s) for s in spec.split(","))
    except ValueError:
        indices = ()
    _check(
        bool(indices) and all(i >= 1 for i in indices),
        field,
        spec,
        "'quarter', 'last', 'all' or comma-separated 1-based block numbers such as '3' or '3,6'",
    )
    return indices


def resolve_blocks(spec: str, depth: int, *, field: str = "disp.blocks") -> tuple[int, ...]:
    """Turn a ``DispConfig.blocks`` string into sorted, unique 0-based block indices.

    ``quarter`` is block ``depth // 4`` (1-based; block 3 of 12 for SiT-B/2, as in the paper),
    ``last`` is block ``depth`` (the public PyTorch code), ``all`` every block. `field` names the
    option in the `ConfigError` a bad spec raises.
    """
    parsed = _parse_blocks(spec, field)
    if parsed == ("quarter",):
        return (max(depth // 4, 1) - 1,)
    if parsed == ("last",):
        return (depth - 1,)
    if parsed == ("all",):
        return tuple(range(depth))
    bad = [i for i in parsed if i > depth]
    _check(not bad, field, spec, f"block numbers between 1 and the model depth {depth}")
    return tuple(sorted({i - 1 for i in parsed}))


DISP_PRESETS: dict[str, DispConfig] = {
    "paper": DispConfig(),
    "reference-pytorch": DispConfig(weight=0.25, tau=1.0, blocks="last", group_size=32),
    "none": DispConfig(variant="none", weight=0.0),
}
"""Named dispersive settings: the paper (Table 8), the public PyTorch release, and the baseline."""


# ----------------------------------------------------------------------------------------------
# Transport (SiT interpolants)


PathType = Literal["Linear", "GVP", "VP"]
Prediction = Literal["velocity", "noise", "score"]
LossWeight = Literal["none", "velocity", "likelihood"]
TimeDistribution = Literal["uniform", "logit_normal"]


@dataclass(frozen=True)
class TransportConfig:
    """SiT's stochastic interpolant: ``x_t = alpha_t x1 + sigma_t x0`` with t=0 noise, t=1 data."""

    path: PathType = "Linear"
    """Interpolant: ``Linear`` (alpha=t, sigma=1-t), ``GVP`` (sin/cos) or ``VP`` (sigma_min 0.1, sigma_max 20)."""
    prediction: Prediction = "velocity"
    """What the network predicts."""
    loss_weight: LossWeight = "none"
    """Loss weighting for noise/score prediction (ignored for velocity, as in SiT)."""
    train_eps: float | None = None
    """Distance of the training time interval from the singular ends; None uses SiT's defaults."""
    sample_eps: float | None = None
    """Same for sampling; None uses SiT's defaults."""
    time_distribution: TimeDistribution = "uniform"
    """Training times: ``uniform`` on the training interval (SiT), or ``logit_normal``:
    ``sigmoid(time_mean + time_std n)`` with ``n ~ N(0, 1)``, clipped to ``[1e-4, 1]``
    (flow_matching's ``--skewed_timesteps``: mean 1.2, std 1.2, towards data)."""
    time_mean: float = 0.0
    """Mean of the normal of ``logit_normal`` times (t = 1 is data)."""
    time_std: float = 1.0
    """Standard deviation of the normal of ``logit_normal`` times."""

    def __post_init__(self):
        _check_choice("transport.path", self.path, get_args(PathType))
        _check_choice("transport.prediction", self.prediction, get_args(Prediction))
        _check_choice("transport.loss_weight", self.loss_weight, get_args(LossWeight))
        _check_choice(
            "transport.time_distribution", self.time_distribution, get_args(TimeDistribution)
        )
        _check(math.isfinite(self.time_mean), "transport.time_mean", self.time_mean, "a finite number")
        _check(
            math.isfinite(self.time_std) and self.time_std > 0.0,
            "transport.time_std",
            self.time_std,
            "a finite number > 0",
        )
        for name in ("train_eps", "sample_eps"):
            value = getattr(self, name)
            _check(value is None or 0.0 <= value < 0.5, f"transport.{name}", value, "None or in [0, 0.5)")


# ----------------------------------------------------------------------------------------------
# Samplers


SamplerMode = Literal["ode", "sde"]
OdeMethod = Literal["euler", "heun", "dopri5"]
SdeMethod = Literal["euler", "heun"]
DiffusionForm = Literal["constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing"]
LastStep = Literal["none", "Mean", "Tweedie", "Euler"]
TimeGrid = Literal["uniform", "edm"]


@dataclass(frozen=True)
class SamplerConfig:
    """How to draw samples. Defaults: the paper's ODE sampler (Heun, 250 steps, SiT step counting)."""

    mode: SamplerMode = "ode"
    """Probability-flow ODE or reverse SDE."""
    ode_method: OdeMethod = "heun"
    """ODE solver: fixed-grid ``euler``/``heun`` or adaptive ``dopri5``."""
    sde_method: SdeMethod = "euler"
    """SDE solver: Euler-Maruyama or stochastic Heun (SiT's)."""
    steps: int = 250
    """Grid points, counted as SiT does: N points give N-1 steps (Heun: 2(N-1) evaluations); for
    ``dopri5`` the number of output times only. For the SDE, N-1 stochastic steps then the last step."""
    time_grid: TimeGrid = "uniform"
    """Grid of the fixed-step ODE solvers: ``uniform`` (SiT's ``linspace`` over the sampling
    interval) or ``edm`` (Karras et al. 2022's noise levels, rho 7 from sigma 80 to 0.002, then 0,
    as times ``1 / (1 + sigma)`` of the Linear path: flow_matching's ``--edm_schedule``, which
    starts at t = 1/81). ``steps`` counts the points either way (edm: ``steps - 1`` noise
    levels and the data end)."""
    atol: float = 1e-6
    """Absolute tolerance of ``dopri5``."""
    rtol: float = 1e-3
    """Relative tolerance of ``dopri5``."""
    diffusion_form: DiffusionForm = "sigma"
    """SDE diffusion coefficient w(t) (SiT's ``--diffusion-form``)."""
    diffusion_norm: float = 1.0
    """Scale of w(t)."""
    last_step: LastStep = "Mean"
    """Final deterministic SDE step (SiT's ``--last-step``)."""
    last_step_size: float = 0.04
    """Size of the final SDE step."""
    cfg_scale: float = 1.0
    """Classifier-free guidance scale; 1 runs the conditional model only."""
    cfg_channels: int | None = None
    """Guide only the first N output channels (3 reproduces DiT/SiT exactly); None guides all (REPA)."""
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    """Guide only for t in [low, high], in eqdisp's time (t=1 data); REPA's guidance-high 0.7 is (0.3, 1.0)."""

    def __post_init__(self):
        _check_choice("sampler.mode", self.mode, get_args(SamplerMode))
        _check_choice("sampler.ode_method", self.ode_method, get_args(OdeMethod))
        _check_choice("sampler.sde_method", self.sde_method, get_args(SdeMethod))
        _check_choice("sampler.time_grid", self.time_grid, get_args(TimeGrid))
        _check(
            self.time_grid == "uniform" or (self.mode == "ode" and self.ode_method != "dopri5"),
            "sampler.time_grid",
            self.time_grid,
            "'uniform' unless sampler.mode is 'ode' with ode_method 'euler' or 'heun'",
        )
        _check(
            self.time_grid == "uniform" or self.steps >= 3,
            "sampler.steps",
            self.steps,
            "an int >= 3 with time_grid 'edm' (grid points: at least two noise levels)",
        )
        _check(self.steps >= 2, "sampler.steps", self.steps, "an int >= 2 (grid points)")
        _check_choice("sampler.diffusion_form", self.diffusion_form, get_args(DiffusionForm))
        _check_choice("sampler.last_step", self.last_step, get_args(LastStep))
        _check(
            0.0 <= self.last_step_size < 1.0, "sampler.last_step_size", self.last_step_size, "in [0, 1)"
        )
        _check(self.cfg_scale >= 0.0, "sampler.cfg_scale", self.cfg_scale, "a number >= 0")
        _check(
            self.cfg_channels is None or self.cfg_channels >= 1,
            "sampler.cfg_channels",
            self.cfg_channels,
            "None or a positive int",
        )
        low, high = self.cfg_interval
        _check(0.0 <= low <= high <= 1.0, "sampler.cfg_interval", self.cfg_interval, "0 <= low <= high <= 1")



# ----------------------------------------------------------------------------------------------
# Optimisation


LrSchedule = Literal["constant", "cosine"]


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with a constant learning rate and an EMA of the weights (paper Table 8)."""

    lr: float = 1e-4
    """Learning rate: constant (the papers), or the peak of the ``cosine`` schedule."""
    schedule: LrSchedule = "constant"
    """``constant`` (DiT, SiT, REPA, the paper), or ``cosine``: linear warm-up from 0 over
    ``warmup_steps``, then cosine decay to 0 at ``decay_steps`` (short CPU runs such as ``sit-tiny``)."""
    warmup_steps: int = 0
    """Steps of linear warm-up of the ``cosine`` schedule."""
    decay_steps: int = 0
    """Step at which the ``cosine`` schedule reaches 0 (warm-up included); it stays 0 after."""
    b1: float = 0.9
    """Adam beta1."""
    b2: float = 0.95
    """Adam beta2 (paper: 0.95; the public PyTorch code keeps PyTorch's 0.999)."""
    eps: float = 1e-8
    """Adam epsilon, added outside the square root as in PyTorch."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    grad_clip: float | None = None
    """Clip the global gradient norm to this value (REPA: 1.0); None disables clipping (DiT/SiT)."""
    ema_decay: float = 0.9999
    """Decay of the exponential moving average of the weights, updated every step from an exact copy."""
    ema_warmup: bool = False
    """Lower the EMA decay of the first updates to ``min(ema_decay, (1 + n) / (10 + n))`` at
    update ``n = 1, 2, ...`` (flow_matching's ``EMA``; the DiT/SiT EMA has none)."""

    def __post_init__(self):
        _check(self.lr > 0.0, "optim.lr", self.lr, "a number > 0")
        _check_choice("optim.schedule", self.schedule, get_args(LrSchedule))
        _check(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, "an int >= 0")
        _check(
            self.schedule == "constant" or self.decay_steps > self.warmup_steps,
            "optim.decay_steps",
            self.decay_steps,
            f"more than optim.warmup_steps={self.warmup_steps} for the cosine schedule",
        )
        for name in ("b1", "b2"):
            value = getattr(self, name)
            _check(0.0 <= value < 1.0, f"optim.{name}", value, "a number in [0, 1)")
        _check(self.eps > 0.0, "optim.eps", self.eps, "a number > 0")
        _check(self.weight_decay >= 0.0, "optim.weight_decay", self.weight_decay, "a number >= 0")
        _check(
            self.grad_clip is None or self.grad_clip > 0.0,
            "optim.grad_clip",
            self.grad_clip,
            "None or a number > 0",
        )
        _check(0.0 <= self.ema_decay <= 1.0, "optim.ema_decay", self.ema_decay, "a number in [0, 1]")


# ----------------------------------------------------------------------------------------------
# Data, the run, and the whole experiment


DataSource = Literal["digits", "folder", "latents", "synthetic"]


@dataclass(frozen=True)
class DataConfig:
    """Where training examples come from (read with Grain, deterministic, resumable)."""

    source: DataSource = "digits"
    """``digits``: scikit-learn's 1,797 8x8 handwritten digits, bundled (no download); ``folder``: an
    ImageNet-layout image folder (``path/<class>/<image>``); ``latents``: precomputed SD-VAE latent shards;
    ``synthetic``: Gaussian inputs of the model's shape with uniform labels (smoke tests, benchmarks)."""
    path: str | None = None
    """Directory of a ``folder`` or ``latents`` source."""
    image_size: int = 256
    """Side of the ADM centre crop of ``folder`` images."""
    flip: bool = True
    """Random horizontal flips (DiT/SiT: yes; REPA: no)."""
    workers: int = 0
    """Grain worker processes (0 reads in the training process; keep it fixed across a resume)."""
    vae: str | None = None
    """SD-VAE weights that decode this run's latents (a diffusers directory or a weight file);
    ``cli.sample`` decodes with it. Taken from the ``latents`` manifest when not given."""

    def __post_init__(self):
        _check_choice("data.source", self.source, get_args(DataSource))
        _check(self.image_size > 0, "data.image_size", self.image_size, "a positive int")
        _check(self.workers >= 0, "data.workers", self.workers, "an int >= 0")


@dataclass(frozen=True)
class RunConfig:
    """Length, batch, seed and outputs of a training run."""

    steps: int = 400_000
    """Number of optimizer steps (paper: 80 epochs of ImageNet at batch 256 = 400k)."""
    batch_size: int = 256
    """Global batch size."""
    seed: int = 0
    """Seed of everything random in the run (init, data order, noise, label dropout)."""
    out: str = "runs/default"
    """Run directory."""
    log_every: int = 100
    """Print and record metrics every this many steps."""
    diagnostics_every: int = 100
    """Every this many steps, also record what the dispersive term does (``disp_gap/b*``,
    ``grad_norm_disp/b*``, ``grad_norm_diff``, ``grad_cos/b*``: ``make_diagnostics`` in
    ``eqdisp/train/_step.py``; for a baseline, the paper's term) in ``metrics.jsonl``, in a row of
    its own between two ``log_every`` rows. Measured on the train step's batch and key without
    changing the run. One call costs a forward and a backward pass per term, under two train
    steps (README, Speed), so 100 adds about 2% to a run. 0 disables."""
    sample_count: int = 64
    """Images in the sample grids (from the EMA model) written during and at the end of the run; 0
    skips them. They follow the run's sampler (250 Heun steps by default: minutes per image for a
    B/2 model on a CPU) and are drawn in batches with a progress line."""
    sample_every: int = 0
    """Write a sample grid every this many steps (0: only at the end)."""
    sample_seconds: float = 120.0
    """Time budget of one sample grid: once the batches drawn so far show that the grid would take
    longer, it stops early with fewer images (at least one batch is drawn) and says so."""
    checkpoint_every: int = 1000
    """Write a checkpoint every this many steps (and at the end, and on SIGTERM/SIGINT)."""
    keep: int = 3
    """Checkpoints kept (the newest)."""
    fsdp: int = 1
    """Devices along the mesh's ``fsdp`` axis (parameters and optimizer state sharded over it); the
    other devices form the ``data`` axis. 1 is pure data parallelism."""
    init_from: str | None = None
    """Start from the weights of this run directory, checkpoint directory, or converted released
    checkpoint (``cli.convert``): the model and its EMA are copied, the optimizer starts fresh and
    the step counter at 0. Ignored once the run has its own checkpoint (a resume continues it)."""
    resume_step: int | None = None
    """Resume from this checkpointed step instead of the newest readable one; newer checkpoints are
    moved to ``<out>/abandoned-checkpoints/``, never deleted."""

    def __post_init__(self):
        _check(self.steps >= 0, "train.steps", self.steps, "an int >= 0")
        _check(self.batch_size >= 1, "train.batch_size", self.batch_size, "a positive int")
        _check(self.log_every >= 1, "train.log_every", self.log_every, "a positive int")
        every = self.diagnostics_every
        _check(every >= 0, "train.diagnostics_every", every, "an int >= 0")
        _check(self.sample_count >= 0, "train.sample_count", self.sample_count, "an int >= 0")
        _check(self.sample_every >= 0, "train.sample_every", self.sample_every, "an int >= 0")
        _check(self.checkpoint_every >= 1, "train.checkpoint_every", self.checkpoint_every, "a positive int")
        _check(self.keep >= 1, "train.keep", self.keep, "a positive int")
        _check(self.fsdp >= 1, "train.fsdp", self.fsdp, "a positive int")
        _check(self.sample_seconds > 0, "train.sample_seconds", self.sample_seconds, "a number > 0")
        _check(
            self.resume_step is None or self.resume_step >= 1,
            "train.resume_step",
            self.resume_step,
            "None or a checkpointed step >= 1",
        )


@dataclass(frozen=True)
class MeanFlowConfig:
    """MeanFlow's training constants. Defaults are the official ``configs/default.py`` (MF-B/4),
    used in Gsunshine/meanflow ``meanflow.py`` (``sample_tr``, ``guidance_fn``, the loss); the
    MF-XL/2 guidance is ``omega=0.2, kappa=0.92, guidance_interval=(0.0, 0.75)`` (a third-party
    README, unverified)."""

    p_mean: float = -0.4
    """Mean of the normal whose sigmoid gives a time (logit-normal, ``sample_tr``)."""
    p_std: float = 1.0
    """Standard deviation of that normal (``sample_tr``)."""
    data_proportion: float = 0.75
    """Fraction of the batch, taken from its start, trained with ``r = t`` (plain flow matching)."""
    norm_p: float = 1.0
    """Power ``p`` of the adaptive loss weight ``1 / (err + norm_eps)^p`` (``meanflow.py`` loss)."""
    norm_eps: float = 0.01
    """Constant ``c`` of the adaptive loss weight (``meanflow.py``; HaoyiZhu's port uses 1.0, not this)."""
    omega: float = 1.0
    """Guidance weight ``omega`` of the plain velocity in the training target (``guidance_fn``)."""
    kappa: float = 0.5
    """Weight ``kappa`` of the conditional network output in the target; 0 guides with the null
    output only (one extra forward instead of two). Effective guidance ``omega / (1 - kappa)``."""
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    """Guide only the examples with ``low <= t <= high`` (MeanFlow time, t=1 noise); elsewhere
    ``(omega, kappa) = (1, 0)``, i.e. the plain velocity."""
    class_dropout_prob: float = 0.1
    """Probability of each example adding one to the number of null labels at the batch start."""

    def __post_init__(self):
        _check(math.isfinite(self.p_mean), "meanflow.p_mean", self.p_mean, "a finite number")
        _check(
            math.isfinite(self.p_std) and self.p_std > 0.0,
            "meanflow.p_std",
            self.p_std,
            "a finite number > 0",
        )
        _check(
            0.0 <= self.data_proportion <= 1.0,
            "meanflow.data_proportion",
            self.data_proportion,
            "a fraction in [0, 1]",
        )
        _check(
            math.isfinite(self.norm_p) and self.norm_p >= 0.0,
            "meanflow.norm_p",
            self.norm_p,
            "a finite number >= 0",
        )
        _check(
            math.isfinite(self.norm_eps) and self.norm_eps > 0.0,
            "meanflow.norm_eps",
            self.norm_eps,
            "a finite number > 0",
        )
        _check(
            math.isfinite(self.omega) and self.omega > 0.0,
            "meanflow.omega",
            self.omega,
            "a finite number > 0",
        )
        _check(0.0 <= self.kappa < 1.0, "meanflow.kappa", self.kappa, "a number in [0, 1)")
        interval = self.guidance_interval
        _check(
            len(interval) == 2 and 0.0 <= interval[0] <= interval[1] <= 1.0,
            "meanflow.guidance_interval",
            interval,
            "(low, high) with 0 <= low <= high <= 1",
        )
        _check(
            0.0 <= self.class_dropout_prob < 1.0,
            "meanflow.class_dropout_prob",
            self.class_dropout_prob,
            "a probability in [0, 1)",
        )

    @property
    def effective_guidance(self) -> float:
        """``omega' = omega / (1 - kappa)``, the CFG scale the target is equivalent to (README)."""
        return self.omega / (1.0 - self.kappa)


@dataclass(frozen=True)
class ExperimentConfig:
    """A complete training experiment: model, objective, optimizer, data, sampler and run."""

    model: ModelConfig = ModelConfig()
    disp: DispConfig = DispConfig()
    transport: TransportConfig = TransportConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()
    sampler: SamplerConfig = SamplerConfig()
    train: RunConfig = RunConfig()
    meanflow: MeanFlowConfig = MeanFlowConfig()
    """MeanFlow's constants (used by ``MF-*`` models only)."""

    def __post_init__(self):
        # Range-check the block numbers against this model's depth now, not at step 0.
        spec = parse_model_name(self.model.name)
        depth = spec.depth
        self.disp.block_indices(depth)
        if spec.family == "MF":
            # MeanFlow drops labels in its loss (meanflow.class_dropout_prob) and predicts no
            # variance; its network drops nothing itself (Gsunshine/meanflow: class_dropout_prob=0).
            _check(not self.model.learn_sigma, "model.learn_sigma", True, "False for MF models")
            _check(
                self.model.class_dropout_prob == 0.0,
                "model.class_dropout_prob",
                self.model.class_dropout_prob,
                "0 for MF models (MeanFlow drops labels itself: meanflow.class_dropout_prob)",
            )
            _check(
                self.disp.contrastive == "off",
                "disp.contrastive",
                self.disp.contrastive,
                "'off' for MF models",
            )
            _check(self.sampler.cfg_scale == 1.0, "sampler.cfg_scale", self.sampler.cfg_scale,
                   "1 for MF models (guidance is trained in: meanflow.omega, meanflow.kappa)")
        if spec.family == "UNet":
            self._check_unet()
        if self.sampler.time_grid == "edm":
            # The EDM noise levels become times through the Linear path's sigma_t / alpha_t.
            _check(
                spec.family in ("SiT", "UNet") and self.transport.path == "Linear",
                "sampler.time_grid",
                self.sampler.time_grid,
                f"'uniform' for model.name={self.model.name!r} with transport.path="
                f"{self.transport.path!r} (edm needs a SiT or UNet model on the Linear path)",
            )
        if self.disp.active and self.disp.group_size is not None:
            _check(
                self.train.batch_size % self.disp.group_size == 0,
                "disp.group_size",
                self.disp.group_size,
                f"a divisor of train.batch_size={self.train.batch_size}",
            )


    def _check_unet(self) -> None:
        # The U-Net predicts a velocity of the input's channels, ignores labels, and has one
        # implementation: the transformer's implementation choices do not apply to it.
        model = self.model
        _check(not model.learn_sigma, "model.learn_sigma", True, "False for UNet models")
        for field in ("block_impl", "attention", "remat"):
            value = getattr(model, field)
            _check(value == "auto", f"model.{field}", value, "'auto' for UNet models")
        _check(
            model.bf16_mode in ("auto", "cast"),
            "model.bf16_mode",
            model.bf16_mode,
            "'auto' or 'cast' for UNet models (the U-Net runs in its compute dtype)",
        )
        _check(
            model.time_convention == "sit",
            "model.time_convention",
            model.time_convention,
            "'sit' for UNet models",
        )


def _paper(name: str) -> ExperimentConfig:
    """Paper Table 8: AdamW 1e-4 constant, betas (0.9, 0.95), no decay, batch 256, EMA 0.9999."""
    family, size = name.split("-")
    return ExperimentConfig(
        model=ModelConfig(name=name),
        data=DataConfig(source="latents"),
        train=RunConfig(out=f"runs/{family.lower()}-{size.replace('/', '').lower()}"),
    )


_TINY = ExperimentConfig(
    # dtype auto: bfloat16 dots on a CPU with AMX/AVX-512-BF16, where this run is 1.47x faster
    # (README, Speed), float32 elsewhere.
    model=ModelConfig(
        name="SiT-T/2", input_size=8, in_channels=1, num_classes=10, learn_sigma=False, dtype="auto"
    ),
    disp=DispConfig(group_size=16),
    # Warm-up and cosine decay: readable digits in 1,500 steps (3 min on 2 cores), where a
    # constant 1e-3 needed 3,000 (FID-classifier of 1,000 samples 9.4 vs 8.2; README).
    optim=OptimConfig(
        lr=2e-3, schedule="cosine", warmup_steps=100, decay_steps=1500, ema_decay=0.99
    ),
    sampler=SamplerConfig(steps=50),
    train=RunConfig(steps=1500, batch_size=64, out="runs/sit-tiny", log_every=100, sample_count=100),
)

_MF_IMAGENET_STEPS = 240 * 5004  # 240 epochs of ImageNet at batch 256 (Gsunshine/meanflow run_b4.yml)


def _meanflow(size_patch: str, weight: float, meanflow: MeanFlowConfig) -> ExperimentConfig:
    """MeanFlow on ImageNet 256 latents (Gsunshine/meanflow ``configs/default.py``, ``run_b4.yml``):
    AdamW 1e-4 constant, betas (0.9, 0.95), no decay, batch 256, EMA 0.9999, 240 epochs,
    Dispersive Loss at block depth//4 with the paper's lambda, 1-step sampling."""
    return ExperimentConfig(
        model=ModelConfig(name=f"MF-{size_patch}", learn_sigma=False, class_dropout_prob=0.0),
        disp=DispConfig(weight=weight),
        data=DataConfig(source="latents"),
        sampler=SamplerConfig(steps=2),
        meanflow=meanflow,
        train=RunConfig(
            steps=_MF_IMAGENET_STEPS, out=f"runs/meanflow-{size_patch.replace('/', '').lower()}"
        ),
    )


_MEANFLOW_TINY = dataclasses.replace(
    _TINY,
    # float32: MeanFlow differentiates the network forward-mode, so bfloat16 would cast the
    # whole network (bf16_mode cast), slower than float32 on the CPUs measured (README, Speed).
    model=dataclasses.replace(
        _TINY.model, name="MF-T/2", learn_sigma=False, class_dropout_prob=0.0, dtype="float32"
    ),
    sampler=SamplerConfig(steps=2),
    train=dataclasses.replace(_TINY.train, out="runs/meanflow-tiny"),
)

_CIFAR_STEPS = 1800 * 97  # 1,800 epochs of 97 steps (50,000 images over 8 GPUs x 64, drop_last)


# flow_matching's CIFAR-10 recipe (examples/image: README's cifar10 command, train_arg_parser.py,
# training/train_loop.py, models/ema.py, training/edm_time_discretization.py): CondOT path
# with logit-normal(1.2, 1.2) times, AdamW 1e-4 with betas (0.9, 0.95) and torch's default weight
# decay 0.01, EMA 0.999 with warm-up, Heun on the EDM grid of 50 noise levels; Dispersive Loss
# with the paper's defaults at its "residual block 15" (0-based, so "16" here; the reading is
# argued in eqdisp/models/_unet.py, DEFAULT_DISP_BLOCK).
_UNET_CIFAR = ExperimentConfig(
    model=ModelConfig(
        name="UNet-CIFAR",
        input_size=32,
        in_channels=3,
        num_classes=10,
        learn_sigma=False,
        class_dropout_prob=0.0,
    ),
    disp=DispConfig(blocks="16"),
    transport=TransportConfig(time_distribution="logit_normal", time_mean=1.2, time_std=1.2),
    optim=OptimConfig(weight_decay=0.01, ema_decay=0.999, ema_warmup=True),
    data=DataConfig(source="folder", image_size=32),
    sampler=SamplerConfig(steps=51, time_grid="edm"),
    train=RunConfig(steps=_CIFAR_STEPS, batch_size=512, out="runs/unet-cifar"),
)

_UNET_TINY = dataclasses.replace(
    _UNET_CIFAR,
    model=dataclasses.replace(_UNET_CIFAR.model, name="UNet-T", input_size=8, in_channels=1),
    # UNet-T's second decoder ResBlock at the lowest resolution, as ResBlock 15 is for cifar10.
    disp=DispConfig(blocks="6"),
    optim=dataclasses.replace(_TINY.optim, weight_decay=0.01, ema_warmup=True),
    data=_TINY.data,
    train=dataclasses.replace(_TINY.train, out="runs/unet-tiny"),
)

PRESETS: dict[str, tuple[str, ExperimentConfig]] = {
    "sit-tiny": (
        "SiT-T/2 on the bundled 8x8 digits: a complete run on a laptop CPU in minutes.",
        _TINY,
    ),
    **{
        f"{fam.lower()}-{size.lower()}{patch}": (
            f"{fam}-{size}/{patch} on ImageNet 256 latents, paper Table 8 settings"
            + (" (DiT's diffusion: eps prediction, learned variance, DDPM sampling)." if fam == "DiT" else "."),
            _paper(f"{fam}-{size}/{patch}"),
        )
        # DiT models train with DiT's Gaussian diffusion (eqdisp.objective.make_objective).
        for fam in ("SiT", "DiT")
        for size in ("S", "B", "L", "XL")
        for patch in (2, 4, 8)
    },
    "meanflow-tiny": (
        "MeanFlow MF-T/2 on the bundled 8x8 digits, sit-tiny's recipe; samples in one step.",
        _MEANFLOW_TINY,
    ),
    "unet-tiny": (
        "flow_matching's U-Net, small (UNet-T), on the bundled 8x8 digits with sit-tiny's "
        "schedule; CIFAR-10's time sampling, EMA warm-up and EDM-grid Heun sampler.",
        _UNET_TINY,
    ),
    "unet-cifar": (
        "flow_matching's CIFAR-10 U-Net on a 32x32 image folder (--data.path), its recipe "
        "(batch 512, 1,800 epochs), Dispersive Loss at residual block 15 (paper App. B.2).",
        _UNET_CIFAR,
    ),
    "meanflow-b4": (
        "MeanFlow MF-B/4 on ImageNet 256 latents, lambda 0.25 (paper Table 7), 1-step sampling.",
        _meanflow("B/4", 0.25, MeanFlowConfig()),
    ),
    "meanflow-b2": (
        "MeanFlow MF-B/2 on ImageNet 256 latents, lambda 1.0 (paper Table 7), 1-step sampling.",
        _meanflow("B/2", 1.0, MeanFlowConfig()),
    ),
    "meanflow-xl2": (
        "MeanFlow MF-XL/2 on ImageNet 256 latents, lambda 1.5 (paper Table 7), guidance omega "
        "0.2, kappa 0.92 on t in [0, 0.75] (third-party README, unverified), 1-step sampling.",
        _meanflow("XL/2", 1.5, MeanFlowConfig(omega=0.2, kappa=0.92, guidance_interval=(0.0, 0.75))),
    ),
}
"""Named experiments (``python -m cli.train NAME``): every paper configuration plus CPU presets."""
