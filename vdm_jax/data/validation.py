"""Checks that a source yields what the pipelines expect, with one-line errors.

Every source yields examples `{'image': uint8 [H, W, C], 'label': int}`, all images of one shape.
"""
from collections.abc import Sequence
from typing import Any

import numpy as np


class DataNotFoundError(FileNotFoundError):
    """The data a source needs is not on this machine (and will not be downloaded)."""


def uint8_hint(images: np.ndarray) -> str:
    """What to do with images of another dtype than uint8: their value range and how to convert them.

    Returns e.g. "values in [0, 1]: convert with np.round(images * 255).astype(np.uint8)".
    """
    if images.size == 0 or not (np.issubdtype(images.dtype, np.integer)
                                or np.issubdtype(images.dtype, np.floating)):
        return "convert them to uint8 in 0..255"
    if np.issubdtype(images.dtype, np.floating) and not np.all(np.isfinite(images)):
        return "some values are NaN or Inf"
    lo, hi = images.min(), images.max()
    if np.issubdtype(images.dtype, np.integer):
        if 0 <= lo and hi <= 255:
            return f"values in {lo}..{hi}: convert with images.astype(np.uint8)"
        return f"values in {lo}..{hi}, outside 0..255: rescale them to 0..255, then .astype(np.uint8)"
    if 0 <= lo and hi <= 1:
        return f"values in [{lo:.3g}, {hi:.3g}]: convert with np.round(images * 255).astype(np.uint8)"
    if -1 <= lo and hi <= 1:
        return (f"values in [{lo:.3g}, {hi:.3g}]: convert with "
                "np.round((images + 1) * 127.5).astype(np.uint8)")
    if 0 <= lo and hi <= 255:
        return f"values in [{lo:.3g}, {hi:.3g}]: convert with np.round(images).astype(np.uint8)"
    return f"values in [{lo:.3g}, {hi:.3g}]: rescale them to 0..255, then round to uint8"


def check_image(
    image: Any, *, expected_shape: Sequence[int] | None = None, where: str = ""
) -> None:
    """Raises unless `image` is a uint8 array [H, W, C] (of `expected_shape`, when given).

    Raises:
        TypeError: not a numpy array, or not uint8.
        ValueError: not rank 3, or a shape other than `expected_shape`.
    """
    at = f" ({where})" if where else ""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a numpy array, got {type(image).__name__}{at}")
    if image.dtype != np.uint8:
        raise TypeError(
            f"image must be uint8, got {image.dtype} ({uint8_hint(image)}){at}; "
            "scaling is done on device")
    if image.ndim != 3:
        raise ValueError(f"image must have shape [H, W, C], got {image.shape}{at}")
    if expected_shape is not None and image.shape != tuple(expected_shape):
        raise ValueError(
            f"all images must share one shape: got {image.shape}, expected "
            f"{tuple(expected_shape)}{at}"
        )


def check_source(source: Any) -> tuple[int, int, int]:
    """Checks a source's length and first example; returns the image shape (H, W, C).

    The pipelines check every later image against this shape when they batch it.

    Raises:
        ValueError: empty source, or a first example that is not `{'image', 'label'}` [H, W, C].
        TypeError: not a random-access source, or a first image that is not a uint8 array.
    """
    if not (hasattr(source, "__len__") and hasattr(source, "__getitem__")):
        raise TypeError(f"source must support len() and [index] (e.g. from load_source), got "
                        f"{type(source).__name__}")
    if len(source) == 0:
        raise ValueError(f"source is empty: {source!r}")
    example = source[0]
    if not isinstance(example, dict) or not {"image", "label"} <= example.keys():
        got = sorted(example) if isinstance(example, dict) else type(example).__name__
        raise ValueError(
            f"examples must be dicts with 'image' and 'label', got {got} from {source!r}")
    check_image(example["image"], where=f"example 0 of {source!r}")
    return example["image"].shape
