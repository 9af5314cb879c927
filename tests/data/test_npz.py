"""Tests for vdm_jax.data.npz."""
import numpy as np
import pytest

from vdm_jax.data import DataNotFoundError, read_npz


@pytest.mark.parametrize("split", ["train", "test"])
def test_reads_split(npz_file, split):
    path, arrays = npz_file
    source = read_npz(path, split)
    images, labels = arrays[f"x_{split}"], arrays[f"y_{split}"]
    assert len(source) == len(images)
    assert source[0]["image"].dtype == np.uint8 and source[0]["image"].shape == (8, 6, 3)
    np.testing.assert_array_equal(source[len(images) - 1]["image"], images[-1])
    assert [source[i]["label"] for i in range(len(images))] == labels.tolist()


def test_other_key_styles(tmp_path):
    images, labels = np.zeros((3, 4, 4, 1), np.uint8), np.arange(3)
    np.savez(tmp_path / "a.npz", train_images=images, train_labels=labels)
    assert len(read_npz(tmp_path / "a.npz", "train")) == 3
    np.savez(tmp_path / "b.npz", images=images, labels=labels)
    assert len(read_npz(tmp_path / "b.npz", "all")) == 3


def test_missing_keys_are_named(npz_file, tmp_path):
    with pytest.raises(ValueError, match=r"'x_valid'\+'y_valid'.*has \['x_test', 'x_train', "
                                         r"'y_test', 'y_train'\].*splits \['test', 'train'\]"):
        read_npz(npz_file[0], "valid")
    np.savez(tmp_path / "no_labels.npz", x_train=np.zeros((3, 4, 4, 1), np.uint8))
    with pytest.raises(ValueError, match=r"'y_train'.*the file has \['x_train'\]"):
        read_npz(tmp_path / "no_labels.npz", "train")


def test_bad_files(tmp_path):
    with pytest.raises(DataNotFoundError, match="missing.npz"):
        read_npz(tmp_path / "missing.npz", "train")
    (tmp_path / "junk.npz").write_bytes(b"junk" * 100)
    with pytest.raises(ValueError, match="not an npz file .*junk.npz"):
        read_npz(tmp_path / "junk.npz", "train")
    np.savez(tmp_path / "float.npz", x_train=np.zeros((3, 4, 4, 1)), y_train=np.arange(3))
    with pytest.raises(TypeError, match="float.npz.*uint8"):
        read_npz(tmp_path / "float.npz", "train")
    np.savez(tmp_path / "rank.npz", x_train=np.zeros((3, 4, 4), np.uint8), y_train=np.arange(3))
    with pytest.raises(ValueError, match=r"rank.npz.*\[N, H, W, C\]"):
        read_npz(tmp_path / "rank.npz", "train")
