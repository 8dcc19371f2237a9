"""Model names (`SiT-B/2`, `DiT-XL/2`, ...) decoded in one place.

This module imports nothing from `eqdisp.config`: the config module calls `parse_model_name` while
it builds its presets, so the name decoding must be importable before `ModelConfig` exists.
"""

import re
from typing import NamedTuple

from ..config import ConfigError, ModelFamily

MODEL_SIZES: dict[str, tuple[int, int, int]] = {
    "T": (6, 192, 3),  # a small CPU size for tests and demos; not in the papers
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
"""`(depth, dim, num_heads)` per size letter (`reference/sit_dit_repa.md` §1.1; MLP ratio 4)."""

PATCH_SIZES: tuple[int, ...] = (2, 4, 8)

_NAME_PATTERN = "{SiT,DiT,MF}-{T,S,B,L,XL}/{2,4,8}"
_NAME_RE = re.compile(r"^(?:(SiT|DiT|MF)-)?(T|S|B|L|XL)/(2|4|8)$")


class ModelSpec(NamedTuple):
    """The architecture a model name stands for."""

    family: ModelFamily
    depth: int
    dim: int
    num_heads: int
    patch_size: int


def parse_model_name(name: str) -> ModelSpec:
    """Decode a model name into its architecture.

    **Arguments:**

    - `name`: `"{SiT,DiT,MF}-{T,S,B,L,XL}/{2,4,8}"`, e.g. `"SiT-B/2"`; a bare `"B/2"` means SiT.

    **Returns:** a `ModelSpec(family, depth, dim, num_heads, patch_size)`.

    **Raises:** `ValueError` naming the bad value and the accepted pattern.
    """
    match = _NAME_RE.match(name) if isinstance(name, str) else None
    if match is None:
        raise ConfigError(f"model.name={name!r} is not allowed: expected {_NAME_PATTERN}, e.g. 'SiT-B/2'")
    family, size, patch = match.groups()
    depth, dim, num_heads = MODEL_SIZES[size]
    return ModelSpec(family or "SiT", depth, dim, num_heads, int(patch))


__all__ = ["MODEL_SIZES", "PATCH_SIZES", "ModelSpec", "parse_model_name"]
