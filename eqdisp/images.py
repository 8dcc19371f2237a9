"""Turning model outputs into viewable images."""

import pathlib

import numpy as np
from jaxtyping import Float, UInt8

from .io import atomic_path


def to_uint8(images: Float[np.ndarray, "batch c h w"]) -> UInt8[np.ndarray, "batch h w c"]:
    """Map [-1, 1] channels-first images to uint8 NHWC as DiT/SiT do: trunc(clip(127.5 x + 128))."""
    scaled = np.clip(127.5 * np.asarray(images, np.float32) + 128.0, 0.0, 255.0)
    return scaled.astype(np.uint8).transpose(0, 2, 3, 1)


def save_grid(
    images: Float[np.ndarray, "batch c h w"],
    path: str | pathlib.Path,
    *,
    columns: int = 8,
    scale: int = 4,
    padding: int = 1,
) -> None:
    """Write a PNG grid of images in [-1, 1], each upscaled ``scale`` times (nearest neighbour)."""
    from PIL import Image

    pixels = to_uint8(images)
    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    pixels = pixels.repeat(scale, axis=1).repeat(scale, axis=2)
    count, height, width, channels = pixels.shape
    columns = max(1, min(columns, count))
    rows = -(-count // columns)
    grid = np.full(
        (rows * (height + padding) + padding, columns * (width + padding) + padding, channels),
        255,
        np.uint8,
    )
    for index, image in enumerate(pixels):
        row, col = divmod(index, columns)
        top, left = padding + row * (height + padding), padding + col * (width + padding)
        grid[top : top + height, left : left + width] = image
    with atomic_path(path) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")
