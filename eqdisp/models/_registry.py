"""`make_model`: a model name or `ModelConfig` to an initialised transformer."""

import dataclasses

import jax
from jaxtyping import PRNGKeyArray

from ..config import ModelConfig
from ._names import parse_model_name
from ._transformer import DiffusionTransformer


def resolve_implementation(
    config: ModelConfig, *, backend: str | None = None, platform_version: str | None = None
) -> tuple[str, str]:
    """The `(block_impl, attention)` that `"auto"` stands for on `backend` (default: JAX's).

    Scan over blocks on CPU, unrolled blocks elsewhere; cuDNN flash attention on an NVIDIA GPU
    (CUDA platform) with bfloat16 compute, the einsum attention otherwise. Explicit choices are
    returned unchanged.
    """
    if backend is None:
        backend = jax.default_backend()
        platform_version = jax.devices()[0].client.platform_version
    block_impl = config.block_impl
    if block_impl == "auto":
        block_impl = "scan" if backend == "cpu" else "unroll"
    attention = config.attention
    if attention == "auto":
        on_cuda = backend == "gpu" and "cuda" in (platform_version or "").lower()
        attention = "cudnn" if on_cuda and config.dtype == "bfloat16" else "einsum"
    return block_impl, attention


def make_model(
    name_or_config: str | ModelConfig, *, key: PRNGKeyArray, **overrides
) -> DiffusionTransformer:
    """Build a DiT/SiT transformer from a name or a `ModelConfig`.

    **Arguments:**

    - `name_or_config`: a model name (see `parse_model_name`) or a `ModelConfig`.
    - `key`: a PRNG key for the initialisation.
    - `**overrides`: `ModelConfig` fields to replace (`input_size`, `in_channels`, `num_classes`,
        `learn_sigma`, `class_dropout_prob`, `block_impl`, `dtype`, `attention`).

    **Returns:** a `DiffusionTransformer` with float32 parameters.

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
    block_impl, attention = resolve_implementation(config)
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
        block_impl=block_impl,
        dtype=config.dtype,
        attention=attention,
        key=key,
    )


__all__ = ["make_model", "resolve_implementation"]
