"""Any prepared TFDS image dataset (e.g. CIFAR-10) through `tfds.data_source`, without TensorFlow.

Reading a prepared dataset needs only `tensorflow-datasets` and `array_record`; preparing it
(`download_and_prepare`) needs TensorFlow and internet, so it is never attempted by default.
"""
import os

import numpy as np

from vdm_jax.data.validation import DataNotFoundError

_OFFLINE_SPECS = (
    "'cifar10_tar:/path/cifar-10-python.tar.gz' (or its extracted folder), "
    "'npz:/path/file.npz' (x_train/y_train/x_test/y_test), "
    "'images:/path/folder_or.zip' (<split>/<class>/*.png|jpg|jpeg), 'digits' or 'digits16'"
)


def _missing_message(name: str, data_dir: str, download_error: Exception | None) -> str:
    if download_error is None:
        not_here = "download=False"
    else:
        not_here = f"downloading failed: {type(download_error).__name__}: {download_error}"
    return (
        f"TFDS dataset {name!r} is not prepared in {data_dir} ({not_here}). "
        f"Supply the data one of these ways: (1) on a machine with internet, "
        f"`pip install -e \".[tf]\"` (the README's install) and run `tfds build {name} --file_format=array_record "
        f"--data_dir=DIR` (or `tfds.builder({name!r}, data_dir=DIR, "
        f"file_format='array_record').download_and_prepare()`), copy DIR here and use "
        f"'tfds:{name}@DIR'; (2) read a local copy with one of the offline sources: "
        f"{_OFFLINE_SPECS}."
    )


def _open(name: str, split: str, data_dir: str | None, download: bool):
    """`tfds.data_source(...)`, with TFDS's many failure modes turned into one clear error."""
    import tensorflow_datasets as tfds  # Imported on use: the import is slow and noisy.

    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=download)
    except tfds.core.DatasetNotFoundError:
        raise ValueError(f"tfds: unknown dataset {name!r}") from None
    except Exception as e:  # TFDS fails in many ways (NotImplementedError, ImportError, ...).
        error = e
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        message = _missing_message(name, builder.data_dir_root, error if download else None)
        raise DataNotFoundError(message) from None
    raise ValueError(
        f"tfds:{name}: cannot open split {split!r} from {builder.data_dir} (random access needs "
        f"file_format='array_record'): {type(error).__name__}: {error}"
    ) from None


class TfdsSource:
    """Random access to a prepared TFDS image dataset: `{'image': uint8 [H, W, C], 'label': int}`.

    Opened through `tfds.data_source` (array_record files; picklable, so it can go to grain
    worker processes). `split` is any TFDS split string ('train', 'test', 'train[:90%]', ...).
    """

    def __init__(
        self,
        name: str,
        split: str,
        *,
        data_dir: str | os.PathLike | None = None,
        download: bool = False,
        image_key: str = "image",
        label_key: str = "label",
    ):
        """Opens the split; never downloads unless `download=True` (needs TensorFlow, internet).

        Raises:
            DataNotFoundError: the dataset is not prepared in `data_dir` (the message lists the
                ways to supply it).
            ValueError: an unknown dataset name, or a prepared dataset that cannot be opened
                (e.g. a bad split or a non-array_record file format).
        """
        data_dir = None if data_dir is None else os.fspath(data_dir)
        self.name, self.split = name, split
        self._source = _open(name, split, data_dir, download)
        self._image_key, self._label_key = image_key, label_key

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        example = self._source[index]
        return {
            "image": np.asarray(example[self._image_key]),
            "label": int(example[self._label_key]),
        }

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r}, n={len(self)})"
