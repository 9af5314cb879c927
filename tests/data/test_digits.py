"""Tests for vdm_jax.data.digits."""
import numpy as np
import pytest

from vdm_jax.data import load_digits


def test_split_shapes_and_values():
    """scikit-learn's digits in its order (read from its file, without importing it: checked
    here against `sklearn.datasets.load_digits`), scaled to 0..255; the last 297 are the test split."""
    import sklearn.datasets  # (here: collecting the tests on every worker need not import scikit-learn)

    train, test = load_digits("train"), load_digits("test")
    assert (len(train), len(test)) == (1500, 297)
    assert train.images.shape == (1500, 8, 8, 1) and train.images.dtype == np.uint8
    digits = sklearn.datasets.load_digits()
    pixels = np.round(digits.images * 255 / 16).astype(np.uint8)
    np.testing.assert_array_equal(np.concatenate([train.images, test.images])[..., 0], pixels)
    np.testing.assert_array_equal(np.concatenate([train.labels, test.labels]), digits.target)
    assert test[296]["label"] == digits.target[-1]
    assert train.images.max() == 255 and train.images.min() == 0
    assert set(train.labels.tolist()) == set(range(10))


def test_upsampled_is_nearest_neighbour():
    small, big = load_digits("test"), load_digits("test", upsample=2)
    assert big[0]["image"].shape == (16, 16, 1)
    np.testing.assert_array_equal(big.images[:, ::2, ::2], small.images)
    np.testing.assert_array_equal(big.images[:, 1::2, 1::2], small.images)


def test_errors():
    with pytest.raises(ValueError, match=r"unknown split 'validation'; valid: \['test', 'train'\]"):
        load_digits("validation")
    with pytest.raises(ValueError, match="upsample must be a positive integer, got 0"):
        load_digits("train", upsample=0)
    with pytest.raises(ValueError, match="upsample must be a positive integer, got 1.5"):
        load_digits("train", upsample=1.5)
