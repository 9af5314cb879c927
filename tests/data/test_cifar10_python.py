"""Tests for vdm_jax.data.cifar10_python on a fake cifar-10-python.tar.gz in the real format."""
import io
import pickle
import tarfile

import numpy as np
import pytest

from vdm_jax.data import DataNotFoundError, read_cifar10_python


def _tar(path, files: dict[str, bytes]):
    with tarfile.open(path, "w:gz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return path


def test_reads_train_and_test_in_hwc_order(cifar_tar):
    path, train_images, train_labels, test_images, test_labels = cifar_tar
    for split, images, labels in [("train", train_images, train_labels),
                                  ("test", test_images, test_labels)]:
        source = read_cifar10_python(path, split)
        assert len(source) == len(images)
        for i in (0, len(images) - 1):
            assert source[i]["image"].dtype == np.uint8
            assert source[i]["image"].shape == (32, 32, 3)
            np.testing.assert_array_equal(source[i]["image"], images[i])
            assert source[i]["label"] == labels[i]


def test_reads_extracted_folder(cifar_tar, tmp_path):
    path, train_images, *_ = cifar_tar
    with tarfile.open(path) as tar:
        tar.extractall(tmp_path, filter="data")
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):
        source = read_cifar10_python(root, "train")
        np.testing.assert_array_equal(source.images, train_images)


def test_refuses_pickles_that_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('ran code')",))

    path = _tar(tmp_path / "evil.tar.gz", {"test_batch": pickle.dumps({b"data": Evil()})})
    with pytest.raises(ValueError, match=r"test_batch.*refusing to load builtins.exec"):
        read_cifar10_python(path, "test")


def test_errors(cifar_tar, tmp_path):
    path = cifar_tar[0]
    with pytest.raises(ValueError, match=r"unknown split 'valid'; valid: \['test', 'train'\]"):
        read_cifar10_python(path, "valid")
    with pytest.raises(DataNotFoundError, match="not found"):
        read_cifar10_python(tmp_path / "nothing.tar.gz", "train")
    only_test = _tar(tmp_path / "partial.tar.gz", {"test_batch": b""})
    with pytest.raises(DataNotFoundError, match=r"data_batch_1.*not found"):
        read_cifar10_python(only_test, "train")
    with pytest.raises(ValueError, match=r"corrupt CIFAR-10 batch .*test_batch"):
        read_cifar10_python(only_test, "test")
    wrong_shape = pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, 2)
    with pytest.raises(ValueError, match=r"uint8 \[N, 3072\]"):
        read_cifar10_python(_tar(tmp_path / "shape.tar.gz", {"test_batch": wrong_shape}), "test")
    not_a_tar = tmp_path / "junk.tar.gz"
    not_a_tar.write_bytes(b"junk" * 100)
    with pytest.raises(ValueError, match="cannot read CIFAR-10 archive .*junk.tar.gz"):
        read_cifar10_python(not_a_tar, "test")


def test_truncated_archive_is_named(cifar_tar, tmp_path):
    data = open(cifar_tar[0], "rb").read()
    (tmp_path / "cut.tar.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read CIFAR-10 archive .*cut.tar.gz: Compressed file ended"):
        read_cifar10_python(tmp_path / "cut.tar.gz", "test")
