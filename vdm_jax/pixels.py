"""How 8-bit pixels map to data in [-1, 1], for the two conventions in use (docs/math.md §5.9).

- 'ddpm' (Ho et al. 2020, discretised decoder): k ∈ {0..255} ↦ 2k/255 - 1, so the values are
  -1, ..., 1 and the decoder's bins have width 2/255.
- 'vdm' (Kingma et al. 2021, VDM's decoder): k ↦ 2(k + 0.5)/256 - 1, the centres of 256 equal
  bins of [-1, 1].

Images stay uint8 until they are on the device; these run there. The discrete decoders read the
pixels off the data with `data_to_pixels`, so their data must lie on the decoder's grid (the
ELBOs check host data against it).
"""
from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from vdm_jax import _checks

Grid = Literal["ddpm", "vdm"]
GRIDS = ("ddpm", "vdm")


def pixels_to_data(pixels, *, grid: Grid = "ddpm", dtype=jnp.float32) -> jax.Array:
    """Maps integer pixels k in 0..255 (any shape) to data in [-1, 1] on the given grid.

    'ddpm': x = 2k/255 - 1;  'vdm': x = 2(k + 0.5)/256 - 1.
    """
    _checks.arguments("pixels_to_data", grid=grid)
    k = jnp.asarray(pixels).astype(dtype)
    return 2.0 * k / 255.0 - 1.0 if grid == "ddpm" else 2.0 * (k + 0.5) / 256.0 - 1.0


def data_to_pixels(x, *, grid: Grid = "ddpm") -> jax.Array:
    """Inverse of `pixels_to_data`: rounds data in [-1, 1] to the nearest pixel (int32, 0..255)."""
    _checks.arguments("data_to_pixels", grid=grid)
    k = (x + 1.0) * 127.5 if grid == "ddpm" else (x + 1.0) * 128.0 - 0.5
    return jnp.clip(jnp.round(k), 0, 255).astype(jnp.int32)
