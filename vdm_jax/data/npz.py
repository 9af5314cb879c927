"""Images and labels from a `.npz` file of uint8 arrays."""
import os
import zipfile

import numpy as np

from vdm_jax.data.array_source import ArraySource
from vdm_jax.data.validation import DataNotFoundError


def _key_pairs(split: str) -> list[tuple[str, str]]:
    """The (images, labels) key pairs that hold `split`, in the order they are tried (the labels may
    be missing: unlabelled images)."""
    pairs = [(f"x_{split}", f"y_{split}"), (f"{split}_images", f"{split}_labels")]
    if split == "all":
        pairs.append(("images", "labels"))
    return pairs


def _splits_in(keys: list[str]) -> list[str]:
    """The split names that `read_npz` can serve from a file with `keys`."""
    splits = {k[2:] for k in keys if k.startswith("x_")}
    splits |= {k[: -len("_images")] for k in keys if k.endswith("_images")}
    if "images" in keys:
        splits.add("all")
    return sorted(splits)


def read_npz(path: str | os.PathLike, split: str) -> ArraySource:
    """Reads one split of a `.npz` file (never unpickles: `allow_pickle=False`).

    Keys, tried in order for split `s`:
        - `x_s` and `y_s` (e.g. `x_train`, `y_train`, `x_test`, `y_test`, Keras-style);
        - `s_images` and `s_labels`;
        - `images` and `labels`, a file holding one split, served as split `'all'` (e.g. the
          samples `experiments.evaluate` writes: `--config.data.train_split=all`).
    Images must be uint8 [N, H, W, C]; labels integers [N], or absent (unlabelled images: each
    label is -1, which an unconditional model never reads).

    Raises:
        DataNotFoundError: no such file.
        ValueError: a directory or not a readable npz file (truncated, corrupt), or none of the
            key pairs present (the message names the keys it looked for and the keys in the file).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"npz: {path} is a directory, expected a .npz file")
    if not os.path.isfile(path):
        raise DataNotFoundError(f"npz file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"not an npz file (not a zip archive): {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = sorted(npz.keys())
            pair = next((p for p in _key_pairs(split) if p[0] in keys), None)
            if pair is not None:
                images, labels = npz[pair[0]], (npz[pair[1]] if pair[1] in keys else None)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        why = "it holds pickled Python objects, which are never loaded" if "pickle" in str(e) else str(e)
        raise ValueError(f"cannot read npz file {path}: {why}; expected uint8 image arrays") from None
    if pair is None:
        wanted = " or ".join(f"{i!r} (with {l!r}, or alone)" for i, l in _key_pairs(split))
        raise ValueError(
            f"{path}: split {split!r} needs keys {wanted}; the file has {keys} "
            f"(splits {_splits_in(keys)})"
        )
    return ArraySource(images, labels, name=f"npz:{path}[{split}]")
