"""Tests for vdm_jax.data.validation and vdm_jax.data.array_source."""
import numpy as np
import pytest

from vdm_jax.data import ArraySource, check_image, check_source


def test_array_source_items():
    images = np.arange(2 * 4 * 3 * 1, dtype=np.uint8).reshape(2, 4, 3, 1)
    source = ArraySource(images, np.array([7, 2]))
    assert len(source) == 2
    example = source[1]
    assert example["image"].dtype == np.uint8 and example["image"].shape == (4, 3, 1)
    np.testing.assert_array_equal(example["image"], images[1])
    assert example["label"] == 2 and isinstance(example["label"], int)


@pytest.mark.parametrize(
    "images, labels, error, match",
    [
        (np.zeros((2, 4, 4, 3), np.float32), np.zeros(2, int), TypeError, "uint8"),
        (np.zeros((2, 4, 4), np.uint8), np.zeros(2, int), ValueError, r"\[N, H, W, C\]"),
        (np.zeros((0, 4, 4, 3), np.uint8), np.zeros(0, int), ValueError, "no examples"),
        (np.zeros((2, 4, 4, 3), np.uint8), np.zeros(3, int), ValueError, "labels must have shape"),
        (np.zeros((2, 4, 4, 3), np.uint8), np.zeros(2, float), TypeError, "integers"),
    ],
)
def test_array_source_rejects_bad_arrays(images, labels, error, match):
    with pytest.raises(error, match=match):
        ArraySource(images, labels)


def test_check_image():
    check_image(np.zeros((4, 4, 3), np.uint8), expected_shape=(4, 4, 3))
    with pytest.raises(TypeError, match="must be uint8, got float32"):
        check_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(TypeError, match="numpy array"):
        check_image([[0]])
    with pytest.raises(ValueError, match=r"\[H, W, C\], got \(4, 4\)"):
        check_image(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"got \(4, 5, 3\), expected \(4, 4, 3\) \(example 9\)"):
        check_image(np.zeros((4, 5, 3), np.uint8), expected_shape=(4, 4, 3), where="example 9")


def test_check_source():
    images = np.zeros((3, 5, 4, 2), np.uint8)
    assert check_source(ArraySource(images, np.zeros(3, int))) == (5, 4, 2)
    with pytest.raises(ValueError, match="source is empty"):
        check_source([])
    with pytest.raises(ValueError, match="'image' and 'label'"):
        check_source([{"img": images[0]}])
    with pytest.raises(TypeError, match="uint8"):
        check_source([{"image": np.zeros((5, 4, 2)), "label": 0}])
