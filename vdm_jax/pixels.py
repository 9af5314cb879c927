"""How 8-bit pixels map to data in [-1, 1], for the two conventions in use (docs/math.md §5.9).

- 'ddpm' (Ho et al. 2020, discretised decoder): k ∈ {0..255} ↦ 2k/255 - 1, so the values are
  -1, ..., 1 and the decoder's bins have width 2/255.
- 'vdm' (Kingma et al. 2021, VDM's decoder): k ↦ 2(k + 0.5)/256 - 1, the centres of 256 equal
  bins of [-1, 1].

Images stay uint8 until they are on the device; these run there. The discrete decoders read the
pixels off the data with `data_to_pixels`, so their data must lie on the decoder's grid.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import jax
import jax.numpy as jnp

from vdm_jax import _checks

Grid = Literal["ddpm", "vdm"]
GRIDS = ("ddpm", "vdm")


@_checks.boundary(ints=("pixels",), pixels=_checks.in_range(0, 255, "{lo}..{hi}"), grid=_checks.one_of(*GRIDS))
def pixels_to_data(pixels, *, grid: Grid = "ddpm", dtype=jnp.float32) -> jax.Array:
    """Maps integer pixels k in 0..255 (any shape) to data in [-1, 1] on the given grid.

    'ddpm': x = 2k/255 - 1;  'vdm': x = 2(k + 0.5)/256 - 1.
    """
    k = pixels.astype(dtype)
    return 2.0 * k / 255.0 - 1.0 if grid == "ddpm" else 2.0 * (k + 0.5) / 256.0 - 1.0


@_checks.boundary(floats=("x",), grid=_checks.one_of(*GRIDS))
def data_to_pixels(x, *, grid: Grid = "ddpm") -> jax.Array:
    """Inverse of `pixels_to_data`: rounds data in [-1, 1] to the nearest pixel (int32, 0..255)."""
    k = (x + 1.0) * 127.5 if grid == "ddpm" else (x + 1.0) * 128.0 - 0.5
    return jnp.clip(jnp.round(k), 0, 255).astype(jnp.int32)


def on_grid(grid: Grid):
    """A `_checks` rule: host data x lies on the grid's pixel values (to 1e-3 of a bin)."""
    def rule(name, value, args):
        x = _checks.host_value(value)
        if x is None or not x.size or not np.issubdtype(x.dtype, np.floating):
            return
        k = (x.astype(np.float64) + 1.0) * 127.5 if grid == "ddpm" else (x.astype(np.float64) + 1.0) * 128.0 - 0.5
        bad = ~((np.abs(k - np.round(k)) < 1e-3) & (k > -0.5) & (k < 255.5))
        if np.any(bad):
            i = tuple(int(j) for j in np.unravel_index(np.argmax(bad), bad.shape))
            raise ValueError(f"{name} must be data on the {grid!r} pixel grid (pixels_to_data(pixels, grid={grid!r})), "
                             f"got {name}[{', '.join(map(str, i))}] = {x[i]}.")
    return rule
