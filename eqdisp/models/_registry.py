"""`make_model`: a model name or `ModelConfig` to an initialised network."""

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import jax
from jaxtyping import PRNGKeyArray

from .._cpu import cpu_info
from ..config import UNET_SIZES, ModelConfig, parse_model_name
from ._base import AbstractDiffusionModel
from ._transformer import DiffusionTransformer
from ._unet import UNet


class Implementation(NamedTuple):
    """How the transformer is computed (never what it computes)."""

    block_impl: str
    attention: str
    remat: str
    bf16_mode: str


def resolve_implementation(
    config: ModelConfig, *, backend: str | None = None, platform_version: str | None = None
) -> Implementation:
    """What `"auto"` stands for on `backend` (default: JAX's default backend).

    On CPU: blocks under `lax.scan`, einsum attention, `remat="dots"` (a CPU step waits on the
    activations it stores; recomputing attention is faster) and `bf16_mode="dots"` (bfloat16
    dot operands in the forms that reach AMX/AVX-512-BF16; XLA:CPU runs everything else in
    float32 anyway). The measurements behind each choice are in the README (Speed).
    Elsewhere: unrolled blocks, no remat, `bf16_mode="cast"`, and cuDNN flash attention on an
    NVIDIA GPU (CUDA platform) with bfloat16 compute, einsum otherwise. Explicit choices are
    returned unchanged.
    """
    if backend is None:
        backend = jax.default_backend()
        platform_version = jax.devices()[0].client.platform_version
    on_cpu = backend == "cpu"
    is_meanflow = parse_model_name(config.name).family == "MF"
    on_cuda = backend == "gpu" and "cuda" in (platform_version or "").lower()
    auto = {
        "block_impl": "scan" if on_cpu else "unroll",
        "attention": "cudnn" if on_cuda and config.dtype == "bfloat16" else "einsum",
        "remat": "dots" if on_cpu else "none",
        # MeanFlow differentiates the network forward-mode (jvp): no custom_vjp kernels.
        "bf16_mode": "dots" if on_cpu and not is_meanflow else "cast",
    }
    chosen = {field: getattr(config, field) for field in Implementation._fields}
    return Implementation(**{f: auto[f] if v == "auto" else v for f, v in chosen.items()})


def resolve_dtype(
    config: ModelConfig, *, backend: str | None = None, isa: Sequence[str] | None = None
) -> str:
    """What `dtype="auto"` stands for: `"bfloat16"` on a CPU with bfloat16 matrix instructions
    (`isa`, default this CPU's, has AMX or AVX-512-BF16), `"float32"` elsewhere. Explicit dtypes
    are returned unchanged."""
    if config.dtype != "auto":
        return config.dtype
    backend = jax.default_backend() if backend is None else backend
    isa = cpu_info()["isa"] if isa is None else isa
    return "bfloat16" if backend == "cpu" and {"AMX", "AVX-512-BF16"} & set(isa) else "float32"


def make_model(
    name_or_config: str | ModelConfig, *, key: PRNGKeyArray, **overrides
) -> AbstractDiffusionModel:
    """Build a network from a name or a `ModelConfig`: a `DiffusionTransformer` for SiT, DiT and
    MF names, a `UNet` for UNet names.

    **Arguments:**

    - `name_or_config`: a model name (see `parse_model_name`) or a `ModelConfig`.
    - `key`: a PRNG key for the initialisation.
    - `**overrides`: `ModelConfig` fields to replace (`input_size`, `in_channels`, `num_classes`,
        `learn_sigma`, `class_dropout_prob`, `block_impl`, `dtype`, `bf16_mode`, `attention`,
        `remat`).

    **Returns:** the network, with float32 parameters. A `UNet` takes its architecture from
    `UNET_SIZES`, `in_channels` in and out, and `dtype`; it ignores `num_classes`, `learn_sigma`
    and `class_dropout_prob` (it is unconditional), and the transformer's implementation fields.

    **Raises:** `ConfigError` for a bad name or a value the config does not allow; `ValueError`
    for an unknown override or an architecture that does not fit (e.g. `dim % heads != 0`).
    """
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"unknown model override(s) {', '.join(unknown)}: expected ModelConfig fields "
            + ", ".join(sorted(fields))
        )
    if isinstance(name_or_config, ModelConfig):
        config = dataclasses.replace(name_or_config, **overrides)
    else:
        config = ModelConfig(name=name_or_config, **overrides)
    spec = parse_model_name(config.name)
    config = dataclasses.replace(config, dtype=resolve_dtype(config))
    if spec.family == "UNet":
        return _make_unet(config, key=key)
    implementation = resolve_implementation(config)
    return DiffusionTransformer(
        input_size=config.input_size,
        in_channels=config.in_channels,
        patch_size=spec.patch_size,
        dim=spec.dim,
        depth=spec.depth,
        num_heads=spec.num_heads,
        num_classes=config.num_classes,
        learn_sigma=config.learn_sigma,
        class_dropout_prob=config.class_dropout_prob,
        family=spec.family,
        time_convention=config.time_convention,
        block_impl=implementation.block_impl,
        dtype=config.dtype,
        bf16_mode=implementation.bf16_mode,
        attention=implementation.attention,
        remat=implementation.remat,
        key=key,
    )


def _make_unet(config: ModelConfig, *, key: PRNGKeyArray) -> UNet:
    # ModelConfig has checked that the input size halves as often as the levels need.
    size = UNET_SIZES[config.name.removeprefix("UNet-")]
    return UNet(
        in_channels=config.in_channels,
        out_channels=config.in_channels,
        dtype=config.dtype,
        key=key,
        **size,
    )


__all__ = ["Implementation", "make_model", "resolve_dtype", "resolve_implementation"]
