"""`load_source`: one entry point that turns a spec string into a random-access source."""
from typing import Any

from vdm_jax.data.cifar10_python import read_cifar10_python
from vdm_jax.data.digits import load_digits
from vdm_jax.data.image_files import ImageFilesSource
from vdm_jax.data.npz import read_npz
from vdm_jax.data.tfds_source import TfdsSource

SPECS = (
    "tfds:NAME",
    "tfds:NAME@DATA_DIR",
    "cifar10_tar:PATH",
    "npz:PATH",
    "images:PATH",
    "digits",
    "digits16",
)
"""The spec forms `load_source` accepts (upper case: filled in by the caller)."""


def load_source(spec: str, split: str, **kwargs: Any):
    """Opens split `split` of the data named by `spec`.

    Specs:
        - `tfds:NAME` or `tfds:NAME@DATA_DIR`: a prepared TFDS dataset, e.g. `tfds:cifar10`
          (`TfdsSource`; kwargs such as `download=True` go to it). Any TFDS split string.
        - `cifar10_tar:PATH`: the official `cifar-10-python.tar.gz`, or its extracted folder
          (`read_cifar10_python`). Splits 'train', 'test'.
        - `npz:PATH`: a `.npz` of uint8 arrays `x_train`, `y_train`, `x_test`, `y_test`
          (`read_npz`, which lists the other accepted keys).
        - `images:PATH`: a folder or `.zip` of `<split>/<class>/*.png|jpg|jpeg`
          (`ImageFilesSource`). Splits: the top-level folders.
        - `digits`, `digits16`: scikit-learn's digits at 8x8 or upsampled to 16x16
          (`load_digits`). Splits 'train' (1,500), 'test' (297).

    Returns:
        A source: `len(source)` and `source[i] == {'image': uint8 [H, W, C], 'label': int}`.

    Raises:
        TypeError: a spec or split that is not a string.
        ValueError: an unknown spec (the message lists `SPECS`) or split.
        DataNotFoundError: the data is not on this machine.
    """
    for name, value in (("spec", spec), ("split", split)):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a string, got {value!r} ({type(value).__name__})")
    kind, _, rest = spec.partition(":")
    if kind == "tfds" and rest:
        name, _, data_dir = rest.partition("@")
        return TfdsSource(name, split, data_dir=data_dir or None, **kwargs)
    if kind == "cifar10_tar" and rest:
        return read_cifar10_python(rest, split, **kwargs)
    if kind == "npz" and rest:
        return read_npz(rest, split, **kwargs)
    if kind == "images" and rest:
        return ImageFilesSource(rest, split, **kwargs)
    if spec in ("digits", "digits16"):
        return load_digits(split, upsample=2 if spec == "digits16" else 1, **kwargs)
    raise ValueError(f"unknown data spec {spec!r}; valid forms: {', '.join(SPECS)}")


class FirstExamples:
    """The first `n` examples of a random-access source (all of them if it has fewer), as a source."""

    def __init__(self, source, n: int):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        self.source, self.n = source, min(n, len(source))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for the first {self.n} examples")
        return self.source[index]
