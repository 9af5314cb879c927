"""Images stored as files `<split>/<class>/<name>.png|jpg|jpeg`, in a folder or a `.zip`."""
import io
import os
import threading
import zipfile

import numpy as np
import PIL.Image

from vdm_jax.data.cifar10_python import CIFAR10_CLASSES
from vdm_jax.data.validation import DataNotFoundError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_GRAY_MODES = ("1", "L", "LA")
_COLOR_MODES = ("RGB", "RGBA", "P", "PA", "CMYK", "YCbCr")


def _decode(file, where: str) -> np.ndarray:
    """Decodes an image file (path or file object) to uint8 [H, W, 1] (gray) or [H, W, 3]."""
    try:
        with PIL.Image.open(file) as image:
            if image.mode in _GRAY_MODES:
                mode = "L"
            elif image.mode in _COLOR_MODES:
                mode = "RGB"
            else:
                raise ValueError(f"unsupported image mode {image.mode!r}")
            array = np.asarray(image if image.mode == mode else image.convert(mode))
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ValueError(f"cannot decode image {where}: {e}") from None
    return array[..., None] if array.ndim == 2 else array


def _split_tree(paths: list[str]) -> dict[str, dict[str, list[str]]]:
    """Groups relative paths `split/class/name.ext` as {split: {class: [path, ...]}}."""
    tree = {}
    for path in paths:
        parts = path.split("/")
        hidden = any(part.startswith((".", "__")) for part in parts)  # .DS_Store, __MACOSX, ...
        if len(parts) == 3 and parts[-1].lower().endswith(IMAGE_EXTENSIONS) and not hidden:
            tree.setdefault(parts[0], {}).setdefault(parts[1], []).append(path)
    return tree


def _list_folder(root: str) -> list[str]:
    """Relative paths (with '/') of the files two folders below `root`."""
    paths = []
    for split in sorted(os.listdir(root)):
        if not os.path.isdir(os.path.join(root, split)):
            continue
        for label in sorted(os.listdir(os.path.join(root, split))):
            folder = os.path.join(root, split, label)
            if os.path.isdir(folder):
                paths += [f"{split}/{label}/{name}" for name in os.listdir(folder)]
    return paths


def _class_names(tree: dict[str, dict[str, list[str]]]) -> tuple[str, ...]:
    """All splits' class names: CIFAR-10's order when they are CIFAR-10 classes, else sorted."""
    names = {name for classes in tree.values() for name in classes}
    if names <= set(CIFAR10_CLASSES):
        return CIFAR10_CLASSES
    return tuple(sorted(names))


class ImageFilesSource:
    """Random access to image files `<root>/<split>/<class>/*.png|jpg|jpeg`; root a folder or zip.

    `source[i]` is `{'image': uint8 [H, W, C], 'label': int}`, decoded with PIL on access:
    grayscale files give C = 1, colour files C = 3 (alpha dropped). Examples are ordered by
    label, then file name. Labels index `class_names`: the class folders of all splits, in
    CIFAR-10's order (`CIFAR10_CLASSES`, also alphabetical) when every name is a CIFAR-10 class
    (so a subset keeps CIFAR-10's labels), else sorted.

    A zip is listed once here and opened lazily, once per process (the open file is not
    pickled), so the source can be sent to grain worker processes. Reads from threads share
    the handle, which `zipfile` supports.
    """

    def __init__(self, root: str | os.PathLike, split: str):
        """Lists the split's files (without decoding them).

        Raises:
            DataNotFoundError: `root` does not exist.
            ValueError: `root` is not a readable zip, `split` is not one of its splits, or it
                holds no image files.
        """
        self.root = os.fspath(root)
        self.split = split
        if not os.path.exists(self.root):
            raise DataNotFoundError(f"image folder or zip not found: {self.root}")
        self._is_zip = os.path.isfile(self.root)
        tree = _split_tree(self._list())
        if split not in tree:
            raise ValueError(
                f"{self.root}: no split {split!r} with images (expected "
                f"<split>/<class>/<name>.png|jpg|jpeg); splits found: {sorted(tree)}"
            )
        self.class_names = _class_names(tree)
        files = [
            (self.class_names.index(name), path)
            for name, paths in tree[split].items() for path in paths
        ]
        files.sort()
        self._labels = np.array([label for label, _ in files], np.int64)
        self._paths = [path for _, path in files]
        self._zip = None
        self._zip_pid = None
        self._lock = threading.Lock()

    def _list(self) -> list[str]:
        if not self._is_zip:
            return _list_folder(self.root)
        try:
            with zipfile.ZipFile(self.root) as archive:
                return [info.filename for info in archive.infolist() if not info.is_dir()]
        except (zipfile.BadZipFile, OSError) as e:
            raise ValueError(f"cannot read zip file {self.root}: {e}") from None

    def _archive(self) -> zipfile.ZipFile:
        """This process's handle on the zip, opened on first use (and again after a fork)."""
        with self._lock:
            if self._zip is None or self._zip_pid != os.getpid():
                self._zip = zipfile.ZipFile(self.root)
                self._zip_pid = os.getpid()
            return self._zip

    def __len__(self) -> int:
        return len(self._paths)

    def _location(self, index: int) -> str:
        """Where example `index` is stored: `ROOT.zip:split/class/name` or the file's path."""
        path = self._paths[index]
        return f"{self.root}:{path}" if self._is_zip else os.path.join(self.root, *path.split("/"))

    def describe(self, index: int) -> str:
        """Names example `index` in errors (the pipelines use it): its file."""
        return f"file {self._location(index)}"

    def __getitem__(self, index: int) -> dict:
        where = self._location(index)
        if self._is_zip:
            try:
                file = io.BytesIO(self._archive().read(self._paths[index]))
            except (zipfile.BadZipFile, OSError, KeyError) as e:
                raise ValueError(f"cannot read {where}: {e}") from None
        else:
            file = where
        return {"image": _decode(file, where), "label": int(self._labels[index])}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_zip=None, _zip_pid=None, _lock=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def __repr__(self) -> str:
        return f"ImageFilesSource({self.root!r}, split={self.split!r}, n={len(self)})"
