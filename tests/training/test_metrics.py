"""Sample grids: each image at its tile, white margins between and around them."""
import numpy as np
import pytest

from vdm_jax.training.metrics import image_grid


@pytest.mark.parametrize("n, columns, pad", [(7, None, 1), (16, None, 2), (5, 2, 0), (1, None, 1)])
def test_image_grid_places_each_image_in_its_tile(n, columns, pad):
    h, w, c = 3, 4, 3
    images = np.random.default_rng(n).integers(0, 255, (n, h, w, c), dtype=np.uint8)
    grid = image_grid(images, columns, pad)
    cols = columns or int(np.ceil(np.sqrt(n)))
    rows = -(-n // cols)
    assert grid.shape == (rows * (h + pad) + pad, cols * (w + pad) + pad, c) and grid.dtype == np.uint8
    covered = np.zeros(grid.shape[:2], bool)
    for i in range(n):
        r, col = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        np.testing.assert_array_equal(grid[top:top + h, left:left + w], images[i])
        covered[top:top + h, left:left + w] = True
    assert np.all(grid[~covered] == 255)  # margins and empty tiles are white
