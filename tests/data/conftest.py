"""Small generated data files in the real formats, built in a temporary folder."""
import io
import pickle
import tarfile
import zipfile

import numpy as np
import PIL.Image
import pytest

CIFAR_PER_BATCH = 3  # images in each fake cifar-10 batch file


def random_images(n: int, shape=(8, 6, 3), seed: int = 0) -> np.ndarray:
    """uint8 [n, *shape] random images."""
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def _cifar_batch(first: int, n: int) -> tuple[dict, np.ndarray]:
    """A cifar-10-python batch dict (bytes keys, as in the real Python 2 pickles), HWC images."""
    images = random_images(n, (32, 32, 3), seed=first)
    labels = [(first + i) % 10 for i in range(n)]
    data = images.transpose(0, 3, 1, 2).reshape(n, 3072)  # rows: R plane, G plane, B plane
    batch = {
        b"batch_label": b"fake batch",
        b"labels": labels,
        b"data": data,
        b"filenames": [b"%d.png" % (first + i) for i in range(n)],
    }
    return batch, images


def _add_file(tar: tarfile.TarFile, name: str, content: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(content)
    tar.addfile(info, io.BytesIO(content))


@pytest.fixture(scope="session")
def cifar_tar(tmp_path_factory):
    """(path of a fake cifar-10-python.tar.gz, train images, labels, test images, labels)."""
    path = tmp_path_factory.mktemp("cifar") / "cifar-10-python.tar.gz"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    arrays = {}
    with tarfile.open(path, "w:gz") as tar:
        _add_file(tar, "cifar-10-batches-py/batches.meta", pickle.dumps({b"label_names": []}, 2))
        for k, name in enumerate(names):
            batch, images = _cifar_batch(k * CIFAR_PER_BATCH, CIFAR_PER_BATCH)
            _add_file(tar, f"cifar-10-batches-py/{name}", pickle.dumps(batch, protocol=2))
            arrays[name] = (images, np.array(batch[b"labels"]))
    train = [arrays[name] for name in names[:5]]
    return (
        path,
        np.concatenate([images for images, _ in train]),
        np.concatenate([labels for _, labels in train]),
        *arrays["test_batch"],
    )


@pytest.fixture(scope="session")
def npz_file(tmp_path_factory):
    """(path to a .npz, its arrays): x_train [10, 8, 6, 3], y_train, x_test [4, 8, 6, 3], y_test."""
    path = tmp_path_factory.mktemp("npz") / "data.npz"
    arrays = {
        "x_train": random_images(10, seed=1), "y_train": np.arange(10) % 3,
        "x_test": random_images(4, seed=2), "y_test": np.arange(4) % 3,
    }
    np.savez(path, **arrays)
    return path, arrays


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def image_files():
    """Relative path `<split>/<class>/<name>.png` -> the uint8 [8, 6, 3] image it holds."""
    counts = {"train": {"cat": 3, "airplane": 2}, "test": {"cat": 1, "truck": 2}}
    images = iter(random_images(8, seed=3))
    return {
        f"{split}/{name}/{k:04d}.png": next(images)
        for split, classes in counts.items()
        for name, count in classes.items()
        for k in range(count)
    }


@pytest.fixture(scope="session")
def image_zip(tmp_path_factory, image_files):
    """A zip of `image_files` as PNG."""
    path = tmp_path_factory.mktemp("zip") / "images.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for name, image in image_files.items():
            archive.writestr(name, _png(image))
    return path


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory, image_files):
    """A folder of `image_files` as PNG."""
    root = tmp_path_factory.mktemp("folder")
    for name, image in image_files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(_png(image))
    return root
