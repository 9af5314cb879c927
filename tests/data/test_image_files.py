"""Tests for vdm_jax.data.image_files on small generated folders and zips of PNG/JPEG files."""
import io
import os
import pickle
import re
import zipfile

import numpy as np
import PIL.Image
import pytest

from vdm_jax.data import CIFAR10_CLASSES, DataNotFoundError, ImageFilesSource, eval_iterator


@pytest.fixture(params=["zip", "folder"])
def root(request, image_zip, image_folder):
    return image_zip if request.param == "zip" else image_folder


def test_reads_images_and_cifar10_labels(root, image_files):
    source = ImageFilesSource(root, "train")
    assert source.class_names == CIFAR10_CLASSES  # cat, airplane, truck are CIFAR-10 classes
    assert len(source) == 5
    # Ordered by label, then file name: airplane (0) twice, then cat (3) three times.
    assert [source[i]["label"] for i in range(5)] == [0, 0, 3, 3, 3]
    for i, path in enumerate(["train/airplane/0000.png", "train/airplane/0001.png",
                              "train/cat/0000.png"]):
        assert source[i]["image"].dtype == np.uint8 and source[i]["image"].shape == (8, 6, 3)
        np.testing.assert_array_equal(source[i]["image"], image_files[path])
    test = ImageFilesSource(root, "test")
    assert [test[i]["label"] for i in range(len(test))] == [3, 9, 9]


def test_other_class_names_are_sorted(tmp_path):
    for name in ("zebra", "apple"):
        (tmp_path / "train" / name).mkdir(parents=True)
        PIL.Image.new("L", (5, 4), 9).save(tmp_path / "train" / name / "a.png")
    source = ImageFilesSource(tmp_path, "train")
    assert source.class_names == ("apple", "zebra")
    assert [source[i]["label"] for i in range(2)] == [0, 1]
    assert source[0]["image"].shape == (4, 5, 1)  # grayscale keeps one channel
    assert (source[0]["image"] == 9).all()


def test_jpeg_and_rgba(tmp_path):
    (tmp_path / "train" / "x").mkdir(parents=True)
    PIL.Image.new("RGB", (6, 8), (200, 10, 10)).save(tmp_path / "train" / "x" / "a.jpg")
    PIL.Image.new("RGBA", (6, 8), (1, 2, 3, 4)).save(tmp_path / "train" / "x" / "b.PNG")
    source = ImageFilesSource(tmp_path, "train")
    assert source[0]["image"].shape == (8, 6, 3)
    assert abs(int(source[0]["image"][0, 0, 0]) - 200) < 8  # lossy
    np.testing.assert_array_equal(source[1]["image"][0, 0], [1, 2, 3])


def test_zip_source_pickles_without_its_open_file(image_zip):
    source = ImageFilesSource(image_zip, "train")
    first = source[0]["image"]  # opens the zip in this process
    copy = pickle.loads(pickle.dumps(source))
    assert copy._zip is None
    np.testing.assert_array_equal(copy[0]["image"], first)


def test_corrupt_file_is_named(tmp_path):
    path = tmp_path / "bad.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("train/cat/0000.png", b"not a png")
    source = ImageFilesSource(path, "train")
    with pytest.raises(ValueError, match=r"cannot decode image .*bad.zip:train/cat/0000.png"):
        source[0]


def test_bad_roots_and_splits(tmp_path, image_zip):
    with pytest.raises(ValueError, match=r"no split 'valid'.*splits found: \['test', 'train'\]"):
        ImageFilesSource(image_zip, "valid")
    with pytest.raises(DataNotFoundError, match="nowhere"):
        ImageFilesSource(tmp_path / "nowhere", "train")
    (tmp_path / "junk.zip").write_bytes(b"junk")
    with pytest.raises(ValueError, match="cannot read zip file .*junk.zip"):
        ImageFilesSource(tmp_path / "junk.zip", "train")
    (tmp_path / "empty" / "train" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"no split 'train' with images .*splits found: \[\]"):
        ImageFilesSource(tmp_path / "empty", "train")


def _encoded(image: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(image).save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt, ext", [("PNG", "png"), ("JPEG", "jpg")])
@pytest.mark.parametrize("container", ["folder", "zip"])
def test_truncated_file_is_named(tmp_path, fmt, ext, container):
    good = _encoded(np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8), fmt)
    files = {f"train/cat/a.{ext}": good, f"train/cat/b.{ext}": good[: len(good) * 2 // 3]}
    if container == "zip":
        root = tmp_path / "images.zip"
        with zipfile.ZipFile(root, "w") as archive:
            for name, data in files.items():
                archive.writestr(name, data)
        where = rf"images.zip:train/cat/b.{ext}"
    else:
        root = tmp_path
        for name, data in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
        where = rf"train{re.escape(os.sep)}cat{re.escape(os.sep)}b.{ext}"
    source = ImageFilesSource(root, "train")
    assert source[0]["image"].shape == (16, 16, 3)
    with pytest.raises(ValueError, match=rf"cannot decode image .*{where}: .*[Tt]runcated"):
        list(eval_iterator(source, global_batch_size=2, shard_index=0, shard_count=1))


def test_mixed_shapes_and_modes_name_the_file(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    PIL.Image.new("RGB", (6, 8)).save(tmp_path / "train" / "cat" / "a.png")
    PIL.Image.new("L", (6, 8)).save(tmp_path / "train" / "cat" / "b.png")  # one channel, not three
    PIL.Image.fromarray(np.zeros((8, 6), np.uint16)).save(tmp_path / "train" / "cat" / "c.png")
    source = ImageFilesSource(tmp_path, "train")
    with pytest.raises(ValueError, match=r"got \(8, 6, 1\), expected \(8, 6, 3\) \(file .*b.png\)"):
        list(eval_iterator(source, global_batch_size=1, shard_index=0, shard_count=1))
    with pytest.raises(ValueError, match=r"cannot decode image .*c.png: unsupported image mode 'I;16'"):
        source[2]


def test_split_without_images(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "train" / "cat" / "a.bmp").write_bytes(b"BM")
    (tmp_path / "train" / "b.png").write_bytes(b"")  # not inside a class folder
    with pytest.raises(ValueError, match=r"no split 'train' with images \(expected "
                                         r"<split>/<class>/<name>.png\|jpg\|jpeg\); splits found: \[\]"):
        ImageFilesSource(tmp_path, "train")
