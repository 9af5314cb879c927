"""Tests for vdm_jax.data.tfds_source, on `tfds.testing.mock_data` (no TensorFlow, no network).

`mock_data` patches `DatasetBuilder.as_data_source`, so `tfds.data_source` returns random but
deterministic examples of the dataset's real features; it ignores `data_dir`.
"""
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from vdm_jax.data import DataNotFoundError, TfdsSource, load_source


def test_mock_cifar10():
    with tfds.testing.mock_data(num_examples=6):
        source = load_source("tfds:cifar10", "train")
        assert isinstance(source, TfdsSource) and len(source) == 6
        example = source[5]
        assert example["image"].dtype == np.uint8 and example["image"].shape == (32, 32, 3)
        assert isinstance(example["label"], int) and 0 <= example["label"] < 10
        np.testing.assert_array_equal(source[5]["image"], example["image"])  # deterministic


def test_mock_grayscale_dataset_with_data_dir(tmp_path):
    with tfds.testing.mock_data(num_examples=3):
        source = load_source(f"tfds:mnist@{tmp_path}", "test")
        assert len(source) == 3 and source[0]["image"].shape == (28, 28, 1)


def test_missing_data_fails_fast_with_the_ways_to_get_it(tmp_path):
    start = time.monotonic()
    with pytest.raises(DataNotFoundError) as info:
        load_source(f"tfds:cifar10@{tmp_path}", "train")
    assert time.monotonic() - start < 30  # no download attempt
    message = str(info.value)
    assert str(tmp_path) in message and "download=False" in message
    for option in ("tfds build cifar10 --file_format=array_record", "pip install -e \".[tf]\"",
                   "'tfds:cifar10@DIR'", "'cifar10_tar:", "'npz:", "'images:", "'digits'",
                   "'digits16'"):
        assert option in message, option
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_unknown_dataset(tmp_path):
    with pytest.raises(ValueError, match="tfds: unknown dataset 'no_such_dataset'"):
        TfdsSource("no_such_dataset", "train", data_dir=tmp_path)
