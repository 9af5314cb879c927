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
    with pytest.raises(ValueError, match=r"'x_valid' \(with 'y_valid', or alone\).*has \['x_test', 'x_train', "
                                         r"'y_test', 'y_train'\].*splits \['test', 'train'\]"):
        read_npz(npz_file[0], "valid")


def test_labels_are_optional(tmp_path):
    """Unlabelled images (e.g. the samples experiments.evaluate writes as 'images') are a source: each
    label is -1, which an unconditional model never reads."""
    images = np.arange(3 * 4 * 4, dtype=np.uint8).reshape(3, 4, 4, 1)
    np.savez(tmp_path / "x_only.npz", x_train=images)
    np.savez(tmp_path / "samples.npz", images=images)
    for path, split in ((tmp_path / "x_only.npz", "train"), (tmp_path / "samples.npz", "all")):
        source = read_npz(path, split)
        assert len(source) == 3 and [source[i]["label"] for i in range(3)] == [-1, -1, -1]
        np.testing.assert_array_equal(source[2]["image"], images[2])
    with pytest.raises(ValueError, match=r"split 'train' needs keys 'x_train' \(with 'y_train', or alone\) or "
                                         r".*splits \['all'\]"):
        read_npz(tmp_path / "samples.npz", "train")


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


@pytest.mark.parametrize("images, match", [
    (np.full((3, 4, 4, 1), 200, np.int64), r"got int64 \(values in 200..200: convert with images.astype\(np.uint8\)\)"),
    (np.full((3, 4, 4, 1), 1000, np.int32), r"got int32 \(values in 1000..1000, outside 0..255: rescale"),
    (np.full((3, 4, 4, 1), 0.5), r"got float64 \(values in \[0.5, 0.5\]: convert with np.round\(images \* 255\)"),
    (np.full((3, 4, 4, 1), -0.5, np.float32),
     r"got float32 \(values in \[-0.5, -0.5\]: convert with np.round\(\(images \+ 1\) \* 127.5\)"),
    (np.full((3, 4, 4, 1), np.nan), r"got float64 \(some values are NaN or Inf\)"),
])
def test_images_of_another_dtype_say_how_to_convert(tmp_path, images, match):
    np.savez(tmp_path / "x.npz", x_train=images, y_train=np.arange(3))
    with pytest.raises(TypeError, match=r"x.npz\[train\]: images must be a uint8 array in 0..255, " + match):
        read_npz(tmp_path / "x.npz", "train")


def test_corrupt_truncated_and_misplaced_files(tmp_path):
    np.savez(tmp_path / "good.npz", x_train=np.zeros((30, 4, 4, 3), np.uint8), y_train=np.arange(30))
    data = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "truncated.npz").write_bytes(data[:-10])  # loses the zip's central directory
    with pytest.raises(ValueError, match="not an npz file .*truncated.npz"):
        read_npz(tmp_path / "truncated.npz", "train")
    corrupt = bytearray(data)
    corrupt[200:260] = b"x" * 60  # inside x_train.npy's bytes: the zip's CRC no longer matches
    (tmp_path / "corrupt.npz").write_bytes(bytes(corrupt))
    with pytest.raises(ValueError, match="cannot read npz file .*corrupt.npz: Bad CRC-32 for file 'x_train.npy'; "
                                         "expected uint8 image arrays"):
        read_npz(tmp_path / "corrupt.npz", "train")
    (tmp_path / "folder.npz").mkdir()
    with pytest.raises(ValueError, match="folder.npz is a directory, expected a .npz file"):
        read_npz(tmp_path / "folder.npz", "train")
    np.savez(tmp_path / "objects.npz", x_train=np.array([None, 1]), y_train=np.arange(2))
    with pytest.raises(ValueError, match="cannot read npz file .*objects.npz: it holds pickled Python objects, "
                                         "which are never loaded; expected uint8 image arrays") as e:
        read_npz(tmp_path / "objects.npz", "train")
    assert "allow_pickle" not in str(e.value)  # (NumPy's own message suggests loading it unsafely)
