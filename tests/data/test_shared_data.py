"""Optional checks on the real CIFAR-10 copies in ../shared/data (skipped where absent)."""
import pathlib

import numpy as np
import pytest

from vdm_jax.data import CIFAR10_CLASSES, load_source

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data"
JPEG_ZIP = SHARED_DATA / "cifar10_jpeg.zip"
LOSSLESS_NPZ = SHARED_DATA / "cifar10_lossless_subset.npz"

needs_zip = pytest.mark.skipif(not JPEG_ZIP.exists(), reason=f"no real CIFAR-10 at {JPEG_ZIP}")


@needs_zip
def test_cifar10_jpeg_zip():
    train = load_source(f"images:{JPEG_ZIP}", "train")
    assert len(train) == 50_000 and train.class_names == CIFAR10_CLASSES
    for i in (0, 24_999, 49_999):
        example = train[i]
        assert example["image"].shape == (32, 32, 3) and example["image"].dtype == np.uint8
        assert example["label"] == i // 5000


@needs_zip
@pytest.mark.skipif(not LOSSLESS_NPZ.exists(), reason=f"no lossless subset at {LOSSLESS_NPZ}")
def test_jpeg_test_images_match_the_exact_pixels():
    """test/<class>/NNNN.jpg is the NNNN-th image of its class in the original order."""
    exact = load_source(f"npz:{LOSSLESS_NPZ}", "test")
    jpeg = load_source(f"images:{JPEG_ZIP}", "test")
    labels = exact.labels[:50]
    for k in (0, 17, 49):
        rank = int((labels[:k] == labels[k]).sum())
        jpeg_image = jpeg[1000 * labels[k] + rank]["image"].astype(float)
        rmse = np.sqrt(np.mean((jpeg_image - exact[k]["image"]) ** 2))
        assert rmse < 20, (k, rmse)  # about 8 for JPEG quality 75; unrelated images: ~80
