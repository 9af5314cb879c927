"""Logging: TensorBoard event files (tensorboardX, no TensorFlow needed) and sample grids."""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Mapping

import jax
import numpy as np
from PIL import Image

from vdm_jax._files import atomic_write


def image_grid(images: np.ndarray, columns: int | None = None, pad: int = 1) -> np.ndarray:
    """Tiles uint8 images [N, H, W, C] into one [rows·(H+pad)+pad, cols·(W+pad)+pad, C] picture."""
    images = np.asarray(images)
    n, h, w, c = images.shape
    columns = columns or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / columns))
    tiles = np.full((rows * columns, h + pad, w + pad, c), 255, np.uint8)  # each image after a top-left margin
    tiles[:n, pad:, pad:] = images
    grid = tiles.reshape(rows, columns, h + pad, w + pad, c).transpose(0, 2, 1, 3, 4)
    return np.pad(grid.reshape(rows * (h + pad), columns * (w + pad), c), ((0, pad), (0, pad), (0, 0)),
                  constant_values=255)


def save_png(path: str, picture: np.ndarray, scale: int = 1) -> None:
    """Writes a uint8 [H, W, C] picture (C = 1 or 3) as PNG, enlarged `scale` times (nearest)."""
    picture = np.asarray(picture).repeat(scale, axis=0).repeat(scale, axis=1)
    with atomic_write(path, "wb") as f:
        Image.fromarray(picture[..., 0] if picture.shape[-1] == 1 else picture).save(f, format="PNG")


class MetricWriter:
    """Scalars and images to TensorBoard event files in `logdir`, and scalars as JSON lines to
    `jsonl_path` (one `{"step": ..., name: value}` object a line); only on process 0.

    `resume_step`: a run resumed from this step drops what it logged after it before being
    stopped (TensorBoard's purge; those lines of the JSON file), so each step appears once.
    """

    def __init__(self, logdir: str, enabled: bool = True, jsonl_path: str | None = None,
                 resume_step: int | None = None):
        self._jsonl, self._writer = (jsonl_path if enabled else None), None
        if enabled:
            self._writer = _summary_writer_class()(logdir, purge_step=None if resume_step is None else resume_step + 1)
            if resume_step is not None and jsonl_path and os.path.exists(jsonl_path):
                _drop_lines_after(jsonl_path, resume_step)

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


def _summary_writer_class():
    """tensorboardX's `SummaryWriter`, imported without importing PyTorch.

    tensorboardX imports torch when it can, only to accept torch tensors (which this module never
    passes); with torch installed that import adds 1.5-2 s to every run's start. Unless torch is
    already imported, it is hidden while tensorboardX is imported (tensorboardX then takes NumPy
    arrays only), and visible again after.
    """
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # `import torch` raises ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide:
            del sys.modules["torch"]
    return SummaryWriter


def _drop_lines_after(path: str, step: int) -> None:
    """Rewrites a metrics JSON-lines file without the records of steps > `step` (atomically)."""
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line.rstrip("\n") + "\n")
            except (ValueError, KeyError, TypeError):  # a line cut short by a kill: drop it
                pass
    with atomic_write(path) as f:
        f.writelines(keep)


def progress_bar(enabled: bool, **tqdm_kwargs):
    """A tqdm bar on process 0 when `enabled`; else a disabled one (its methods do nothing)."""
    from tqdm import tqdm  # (not tqdm.auto: in a notebook stderr is no terminal, so the bar is off there)
    return tqdm(dynamic_ncols=True, disable=not enabled or jax.process_index() != 0, **tqdm_kwargs)
