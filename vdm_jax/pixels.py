"""How 8-bit pixels map to data in [-1, 1], for the two conventions in use.

- 'ddpm' (Ho et al. 2020; MATH.md §5, discretized decoder): k ∈ {0..255} ↦ 2k/255 - 1, so the
  values are -1, ..., 1 and the decoder's bins have width 2/255.
- 'vdm' (Kingma et al. 2021; MATH.md §5, VDM's decoder): k ↦ 2(k + 0.5)/256 - 1, the centres of
  256 equal bins of [-1, 1].

Images stay uint8 until they are on the device; these run there.
"""
from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from vdm_jax import _checks

Grid = Literal["ddpm", "vdm"]


def _check_grid(grid: str) -> None:
    if grid not in ("ddpm", "vdm"):
        raise ValueError(f"grid must be 'ddpm' or 'vdm', got {grid!r}.")


def check_pixels(pixels) -> jax.Array:
    """Checks that `pixels` are integers (any shape), in 0..255 where their values are concrete."""
    pixels = jnp.asarray(pixels)
    if not jnp.issubdtype(pixels.dtype, jnp.integer):
        raise TypeError(f"pixels must be integers in 0..255 (e.g. uint8), got dtype {pixels.dtype}.")
    if pixels.dtype != jnp.uint8:
        _checks.check_in_range("pixels", pixels, 0, 255, "0..255")
    return pixels


def pixels_to_data(pixels, *, grid: Grid = "ddpm", dtype=jnp.float32) -> jax.Array:
    """Maps integer pixels in 0..255 to data in [-1, 1] on the given grid.

    Raises TypeError for non-integer pixels and ValueError for concrete values outside 0..255.
    """
    _check_grid(grid)
    k = check_pixels(pixels).astype(dtype)
    return 2.0 * k / 255.0 - 1.0 if grid == "ddpm" else 2.0 * (k + 0.5) / 256.0 - 1.0


def data_to_pixels(x, *, grid: Grid = "ddpm") -> jax.Array:
    """Inverse of `pixels_to_data`: rounds data in [-1, 1] to the nearest pixel (int32, 0..255)."""
    _check_grid(grid)
    x = jnp.asarray(x)
    k = (x + 1.0) * 127.5 if grid == "ddpm" else (x + 1.0) * 128.0 - 0.5
    return jnp.clip(jnp.round(k), 0, 255).astype(jnp.int32)
