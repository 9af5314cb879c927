"""A random-access source over images and labels already in memory."""
import numpy as np

from vdm_jax.data.validation import uint8_hint


class ArraySource:
    """Random access to `images` uint8 [N, H, W, C] and integer `labels` [N] (kept as int64; None:
    unlabelled images, each labelled -1, which an unconditional model never reads).

    `source[i]` is `{'image': uint8 [H, W, C], 'label': int}`; the image is a view, not a copy.
    Backs the npz, cifar-10-python and digits sources.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray | None, *, name: str = "arrays"):
        """Checks the arrays eagerly (dtype, rank, matching lengths, not empty).

        Raises:
            TypeError: images not a uint8 ndarray, or labels not integers.
            ValueError: images not [N, H, W, C], labels not [N], or N == 0.
        """
        if not isinstance(images, np.ndarray):
            raise TypeError(f"{name}: images must be a uint8 array, got {type(images).__name__}")
        if images.dtype != np.uint8:
            raise TypeError(
                f"{name}: images must be a uint8 array in 0..255, got {images.dtype} "
                f"({uint8_hint(images)})")
        if images.ndim != 4:
            raise ValueError(f"{name}: images must have shape [N, H, W, C], got {images.shape}")
        labels = np.full(images.shape[:1], -1) if labels is None else np.asarray(labels)
        if not np.issubdtype(labels.dtype, np.integer):
            raise TypeError(f"{name}: labels must be integers, got {labels.dtype}")
        if labels.shape != images.shape[:1]:
            raise ValueError(
                f"{name}: labels must have shape [N] = [{len(images)}], got {labels.shape}")
        if len(images) == 0:
            raise ValueError(f"{name}: no examples")
        self.images = images
        self.labels = labels.astype(np.int64)
        self.name = name

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "label": int(self.labels[index])}

    def __repr__(self) -> str:
        return f"ArraySource({self.name}, images={self.images.shape})"
