"""Logging: TensorBoard event files (tensorboardX, no TensorFlow needed) and sample grids."""
from __future__ import annotations

import json
import math
import os
from typing import Mapping

import jax
import numpy as np
from PIL import Image


def image_grid(images: np.ndarray, columns: int | None = None, pad: int = 1) -> np.ndarray:
    """Tiles uint8 images [N, H, W, C] into one [rows·(H+pad)+pad, cols·(W+pad)+pad, C] picture."""
    images = np.asarray(images)
    n, h, w, c = images.shape
    columns = columns or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / columns))
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = image
    return grid


def save_png(path: str, picture: np.ndarray, scale: int = 1) -> None:
    """Writes a uint8 [H, W, C] picture (C = 1 or 3) as PNG, enlarged `scale` times (nearest)."""
    picture = np.asarray(picture)
    if scale > 1:
        picture = picture.repeat(scale, axis=0).repeat(scale, axis=1)
    mode_picture = picture[..., 0] if picture.shape[-1] == 1 else picture
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(mode_picture).save(path)


class MetricWriter:
    """Scalars and images to TensorBoard event files in `logdir`, and scalars as JSON lines to
    `jsonl_path` (one `{"step": ..., name: value}` object a line); only on process 0."""

    def __init__(self, logdir: str, enabled: bool = True, jsonl_path: str | None = None):
        self._writer = None
        self._jsonl = jsonl_path if enabled else None
        if enabled:
            from tensorboardX import SummaryWriter
            self._writer = SummaryWriter(logdir)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if self._writer is None:
            return
        for name, value in values.items():
            self._writer.add_scalar(name, float(value), int(step))
        self._writer.flush()
        if self._jsonl:
            with open(self._jsonl, "a") as f:
                f.write(json.dumps({"step": int(step), **{k: float(v) for k, v in values.items()}}) + "\n")

    def image(self, step: int, name: str, picture: np.ndarray) -> None:
        if self._writer is not None:
            self._writer.add_image(name, np.asarray(picture), int(step), dataformats="HWC")
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class _NoBar:
    """Stands in for a progress bar that is not shown."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(enabled: bool, **tqdm_kwargs):
    """A tqdm bar on process 0 when `enabled`, else an object with the same no-op methods."""
    if not enabled or jax.process_index() != 0:
        return _NoBar()
    from tqdm.auto import tqdm
    return tqdm(dynamic_ncols=True, **tqdm_kwargs)
