"""scikit-learn's 8x8 handwritten digits: a real image dataset that needs no download."""
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
    import sklearn.datasets  # Imported on use: the import takes seconds.

    digits = sklearn.datasets.load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    images = images.repeat(upsample, axis=1).repeat(upsample, axis=2)[..., None]
    cut = len(images) - NUM_TEST
    part = slice(None, cut) if split == "train" else slice(cut, None)
    name = f"digits{8 * upsample}[{split}]"
    return ArraySource(images[part], digits.target[part].astype(np.int64), name=name)
