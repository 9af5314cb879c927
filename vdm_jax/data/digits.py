"""scikit-learn's 8x8 handwritten digits: a real image dataset that needs no download."""
import functools
import importlib.util
import os

import numpy as np

from vdm_jax.data.array_source import ArraySource

NUM_TEST = 297
"""The last 297 of the 1,797 digits are the test split; the first 1,500 are train."""


def load_digits(split: str, *, upsample: int = 1) -> ArraySource:
    """The digits as uint8 [N, 8 * upsample, 8 * upsample, 1], labels 0..9.

    Pixel values v in 0..16 become round(v * 255 / 16). `upsample=2` repeats each pixel 2x2
    (nearest neighbour), giving 16x16 images that a U-Net can downsample twice. The split is
    fixed: 'train' is the first 1,500 images (in scikit-learn's order), 'test' the last 297.

    Raises:
        ValueError: an unknown split or an upsample factor below 1.
    """
    if split not in ("train", "test"):
        raise ValueError(f"digits: unknown split {split!r}; valid: ['test', 'train']")
    if isinstance(upsample, bool) or not isinstance(upsample, (int, np.integer)) or upsample < 1:
        raise ValueError(f"digits: upsample must be a positive integer, got {upsample!r}")
    values, labels = _digits()
    images = np.round(values * (255 / 16)).astype(np.uint8)
    images = images.repeat(upsample, axis=1).repeat(upsample, axis=2)[..., None]
    cut = len(images) - NUM_TEST
    part = slice(None, cut) if split == "train" else slice(cut, None)
    name = f"digits{8 * upsample}[{split}]"
    return ArraySource(images[part], labels[part], name=name)


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """(pixel values 0..16, float [1797, 8, 8]; labels, int64 [1797]), read-only, read once.

    Read from the file scikit-learn ships (`sklearn/datasets/data/digits.csv.gz`, one image and
    its label a row) without importing scikit-learn, whose import takes a second or more (it is
    what `sklearn.datasets.load_digits` reads); if that file is not where it was, through
    `load_digits` itself.
    """
    spec = importlib.util.find_spec("sklearn")  # (finds the package without importing it)
    if spec is None:
        raise ModuleNotFoundError("the digits come with scikit-learn: pip install scikit-learn "
                                  "(part of vdm_jax's training extra, pip install -e \".[train]\")")
    path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
    if os.path.isfile(path):
        rows = np.loadtxt(path, delimiter=",")
        values, labels = rows[:, :-1].reshape(-1, 8, 8), rows[:, -1].astype(np.int64)
    else:
        import sklearn.datasets

        digits = sklearn.datasets.load_digits()
        values, labels = digits.images, digits.target.astype(np.int64)
    for a in (values, labels):
        a.setflags(write=False)
    return values, labels
