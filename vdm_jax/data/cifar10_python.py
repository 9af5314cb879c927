"""CIFAR-10 from the official `cifar-10-python.tar.gz` (or its extracted folder).

The archive holds pickled batches `cifar-10-batches-py/data_batch_1` .. `data_batch_5` (train,
10,000 images each) and `test_batch` (test): dicts with `data` uint8 [N, 3072] (each row is the
32x32 red plane, then green, then blue: CHW order) and `labels` (list of ints in 0..9).
"""
import codecs
import io
import os
import pickle
import tarfile

import numpy as np

from vdm_jax.data.array_source import ArraySource
from vdm_jax.data.validation import DataNotFoundError

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
_BATCHES = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}


def _reconstruct(subtype, shape, dtype):
    """numpy's `_reconstruct` for plain arrays: an empty array, filled by `__setstate__`."""
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"refusing to reconstruct {subtype}")
    return np.ndarray(shape, dtype=np.dtype(dtype))


def _frombuffer(buffer, dtype, shape, order):
    """numpy's `_frombuffer` (pickle protocol 5): an array over the pickled bytes."""
    return np.frombuffer(buffer, dtype=np.dtype(dtype)).reshape(shape, order=order)


# The only globals a CIFAR-10 batch pickle refers to: numpy's array reconstruction (under its
# numpy 1 and numpy 2 module names; `_frombuffer` for protocol 5) and, in pickles written by
# Python 3 at protocol <= 2, `_codecs.encode` for bytes. None of them runs arbitrary code.
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only `_SAFE_GLOBALS` and refuses everything else."""

    def find_class(self, module: str, name: str):
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def _parse_batch(data: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Unpickles one batch: images uint8 [N, 32, 32, 3] (HWC) and labels int64 [N]."""
    try:
        batch = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
        batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
        pixels, labels = np.asarray(batch["data"]), np.asarray(batch["labels"], np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, AttributeError, ValueError, TypeError) as e:
        raise ValueError(f"corrupt CIFAR-10 batch {where}: {type(e).__name__}: {e}") from None
    if pixels.dtype != np.uint8 or pixels.ndim != 2 or pixels.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f"corrupt CIFAR-10 batch {where}: data must be uint8 [N, 3072], got "
            f"{pixels.dtype} {pixels.shape}"
        )
    if labels.shape != pixels.shape[:1]:
        raise ValueError(
            f"corrupt CIFAR-10 batch {where}: {len(labels)} labels, {len(pixels)} images")
    images = pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _read_batch_files(path: str, names: tuple[str, ...]) -> dict[str, tuple[bytes, str]]:
    """The raw bytes of each named batch (and where it came from), from a tarball or folder."""
    found = {}
    if os.path.isdir(path):
        for folder in (path, os.path.join(path, "cifar-10-batches-py")):
            for name in names:
                file = os.path.join(folder, name)
                if name not in found and os.path.isfile(file):
                    with open(file, "rb") as f:
                        found[name] = (f.read(), file)
        return found
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                name = os.path.basename(member.name)
                if member.isfile() and name in names and name not in found:
                    found[name] = (tar.extractfile(member).read(), f"{path}:{member.name}")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ValueError(f"cannot read CIFAR-10 archive {path}: {e}") from None
    return found


def read_cifar10_python(path: str | os.PathLike, split: str) -> ArraySource:
    """Reads a split of the official python-format CIFAR-10: images uint8 [N, 32, 32, 3].

    `path` is `cifar-10-python.tar.gz` (read directly, not extracted) or a folder holding the
    batch files (`cifar-10-batches-py/` itself or its parent). `split` is 'train' (50,000 images,
    data_batch_1..5 in order) or 'test' (10,000, test_batch). Labels index `CIFAR10_CLASSES`.

    The batches are pickles, which can run code when loaded; they are read with a restricted
    unpickler that resolves only `numpy.ndarray`, `numpy.dtype`, numpy's `_reconstruct` and
    `_frombuffer` (replaced by equivalents that make only plain arrays) and `_codecs.encode`, and
    refuses any other global: a tampered file fails with an error instead of running code.

    Raises:
        ValueError: unknown split; an unreadable archive or corrupt batch (named).
        DataNotFoundError: no such path, or batches missing from it (named).
    """
    if split not in _BATCHES:
        raise ValueError(f"cifar10_tar: unknown split {split!r}; valid: {sorted(_BATCHES)}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataNotFoundError(f"CIFAR-10 python archive or folder not found: {path}")
    names = _BATCHES[split]
    found = _read_batch_files(path, names)
    missing = [name for name in names if name not in found]
    if missing:
        raise DataNotFoundError(f"{path}: CIFAR-10 batches {missing} not found")
    batches = [_parse_batch(*found[name]) for name in names]
    images = np.concatenate([images for images, _ in batches])
    labels = np.concatenate([labels for _, labels in batches])
    return ArraySource(images, labels, name=f"cifar10_tar:{path}[{split}]")
