"""pytorch-fid's Inception weights, read safely and cached as plain arrays.

    weights = load_fid_inception_weights()        # {pytorch state_dict name: np.ndarray}
    model = fid_inception()                       # the same, built into a `FIDInception`

The weights file is pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (a `torch.save`d state
dict; `FID_WEIGHTS_URL`). It is read without torch and without running code from the file:
`read_torch_state_dict` unpickles with an allow-list of the few globals a state dict of tensors
needs, mapped to NumPy, and refuses any other (`pickle.UnpicklingError`). Both of torch's formats
are read: the zip archive (torch >= 1.6) and the legacy stream (the published file is from 2019).

The first read of a file is converted to an `.npz` of plain arrays (loaded with
`allow_pickle=False`), keyed by the file's sha256, in the cache folder (`cache_dir`, else
$VDM_JAX_CACHE, else ~/.cache/vdm_jax); later loads read that. Without a path the published file
is looked for in the cache folder and, if absent, downloaded there (its sha256 must start with
the name's '6726825d', torch hub's convention).
"""
from __future__ import annotations

import collections
import hashlib
import http.client
import os
import pickle
import re
import sys
import urllib.error
import urllib.request
import warnings
import zipfile
from collections.abc import Mapping
from typing import Any, BinaryIO, NamedTuple

import ml_dtypes  # installed with jax: NumPy's bfloat16
import numpy as np

from vdm_jax._files import atomic_write

__all__ = ["FID_WEIGHTS_URL", "FID_WEIGHTS_FILE", "FID_WEIGHTS_HASH_PREFIX", "read_torch_state_dict",
           "default_cache_dir", "load_fid_inception_weights", "fid_inception"]

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FID_WEIGHTS_FILE = FID_WEIGHTS_URL.rsplit("/", 1)[-1]
FID_WEIGHTS_HASH_PREFIX = "6726825d"  # the first 8 hex digits of the file's sha256
_DOWNLOAD_TIMEOUT_S = 30  # per blocking socket operation, not for the whole download
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[^.]+$")  # torch hub: name-<sha256 prefix>.ext


# --------------------------------------------------------------------------------------------
# Reading torch.save files without torch
# --------------------------------------------------------------------------------------------

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of a legacy torch.save stream
_LEGACY_PROTOCOL = 1001


class _StorageType(NamedTuple):
    """Stands in for `torch.FloatStorage` etc.: only its dtype is used (immutable, so that a
    pickle's BUILD cannot change it)."""
    name: str
    dtype: np.dtype


_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _Storage:
    """A storage of the file: `numel` elements of `dtype`; `data` is set once its bytes are read."""

    def __init__(self, key: str, dtype: np.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel
        self.data: np.ndarray | None = None

    def values(self) -> np.ndarray:
        if self.data is None:
            raise pickle.UnpicklingError(f"storage {self.key!r} was not found in the file")
        return self.data


class _ViewStorage(_Storage):
    """A legacy storage view (torch < 0.4): `numel` elements of `root` from `offset`."""

    def __init__(self, key: str, root: _Storage, offset: int, numel: int):
        if offset < 0 or numel < 0 or offset + numel > root.numel:
            raise pickle.UnpicklingError(f"storage view {key!r} reaches outside its storage")
        super().__init__(key, root.dtype, numel)
        self.root, self.offset = root, offset

    def values(self) -> np.ndarray:
        return self.root.values()[self.offset:self.offset + self.numel]


class _Tensor:
    """A tensor of the file, rebuilt into an array once its storage has been read."""

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def array(self) -> np.ndarray:
        data, n = self.storage.values(), self.storage.numel
        # Bounds first: as_strided would read past the buffer for a lying offset or stride.
        last = self.offset + sum((d - 1) * s for d, s in zip(self.size, self.stride))
        if 0 not in self.size and not 0 <= self.offset <= last < n:
            raise pickle.UnpicklingError(f"a tensor of shape {self.size} (offset {self.offset}, stride "
                                         f"{self.stride}) reaches outside its storage of {n} elements")
        if 0 in self.size:
            return np.zeros(self.size, self.storage.dtype)
        view = np.lib.stride_tricks.as_strided(
            data[self.offset:], self.size, tuple(s * data.itemsize for s in self.stride), writeable=False)
        return np.array(view, order="C")  # a contiguous copy (0-d stays 0-d)


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(type(v) is int and v >= 0 for v in value):
        raise pickle.UnpicklingError(f"a tensor's {what} must be a tuple of ints >= 0, got {value!r}")
    return tuple(value)


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored) -> _Tensor:
    """torch._utils._rebuild_tensor(_v2): (storage, offset, size, stride, requires_grad, hooks, ...)."""
    if not isinstance(storage, _Storage) or type(storage_offset) is not int or storage_offset < 0:
        raise pickle.UnpicklingError("a tensor must be rebuilt from a storage of the file and an int offset")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if len(size) != len(stride):
        raise pickle.UnpicklingError(f"a tensor's size {size} and stride {stride} differ in length")
    return _Tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *_ignored):
    """torch._utils._rebuild_parameter(_with_state): a Parameter is its data here."""
    return data


class _Function:
    """An allowed function as one read sees it: a fresh wrapper per reference, so that a pickle's
    BUILD on it changes nothing beyond that read."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args)


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): lambda: collections.OrderedDict,  # a builtin class: immutable
    ("torch._utils", "_rebuild_tensor"): lambda: _Function(_rebuild_tensor),
    ("torch._utils", "_rebuild_tensor_v2"): lambda: _Function(_rebuild_tensor),
    ("torch._utils", "_rebuild_parameter"): lambda: _Function(_rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): lambda: _Function(_rebuild_parameter),
    ("torch.storage", "UntypedStorage"): lambda: _StorageType("UntypedStorage", np.dtype(np.uint8)),
    **{("torch", name): (lambda name=name, dtype=dtype: _StorageType(name, np.dtype(dtype)))
       for name, dtype in _STORAGE_DTYPES.items()},
}  # (module, name) -> a function returning its stand-in


class _RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a global outside the allow-list."""


class _StateDictUnpickler(pickle.Unpickler):
    """An unpickler that resolves only `_ALLOWED_GLOBALS` and torch's storage references.

    Nothing from the file is imported or called: every global it names is looked up in the
    allow-list (NumPy stand-ins), and any other raises `pickle.UnpicklingError`.
    """

    def __init__(self, file: BinaryIO, storages: dict[str, _Storage], legacy: bool):
        super().__init__(file)
        self._storages, self._legacy = storages, legacy

    def find_class(self, module: str, name: str) -> Any:
        stand_in = _ALLOWED_GLOBALS.get((module, name))
        if stand_in is None:
            raise _RefusedGlobal(
                f"refusing the global {module}.{name}: a state dict of tensors needs only collections."
                "OrderedDict, torch._utils' tensor rebuilders and torch's storage types")
        return stand_in()

    def load(self) -> Any:
        try:
            return super().load()
        except pickle.UnpicklingError:
            raise
        except Exception as e:  # noqa: BLE001 (malformed pickles raise many kinds of error)
            raise pickle.UnpicklingError(f"malformed pickle ({type(e).__name__}: {e})") from None

    def persistent_load(self, pid: Any) -> _Storage:
        # zip: ('storage', type, key, location, numel); legacy: the same + view_metadata.
        if not (isinstance(pid, tuple) and len(pid) == 5 + self._legacy and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
                and type(pid[4]) is int and pid[4] >= 0):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.200}")
        storage_type, key, numel = pid[1], pid[2], pid[4]
        if key not in self._storages:
            self._storages[key] = _Storage(key, storage_type.dtype, numel)
        root = self._storages[key]
        if root.dtype != storage_type.dtype:
            raise pickle.UnpicklingError(f"storage {key!r} is referenced with two dtypes")
        view = pid[5] if self._legacy else None
        if view is None:
            return root
        return self._view(root, view)

    def _view(self, root: _Storage, view: Any) -> _Storage:
        """A legacy storage view: (view key, offset, size), in elements of the root storage."""
        if not (isinstance(view, tuple) and len(view) == 3 and all(type(v) is int for v in view[1:])):
            raise pickle.UnpicklingError(f"unexpected storage view {view!r:.200}")
        key, offset, size = view
        if key not in self._storages:
            self._storages[key] = _ViewStorage(key, root, offset, size)
        return self._storages[key]


def read_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a `torch.save`d state dict {name: tensor} into {name: np.ndarray}, without torch.

    Safe on untrusted files: no code from the file runs (see `_StateDictUnpickler`); a pickle
    naming any global other than a state dict's raises `pickle.UnpicklingError` naming it, and
    tensors reaching outside their storage are refused. Reads torch's zip format and its legacy
    format; tensors with offsets and strides (views) come back as contiguous copies.

    Raises:
      pickle.UnpicklingError: the file is not a torch.save stream of a state dict, or names a
        global outside the allow-list.
      ValueError: the pickled object is not a flat {str: tensor} mapping.
    """
    path = os.fspath(path)
    try:
        if zipfile.is_zipfile(path):
            obj = _read_zip(path)
        else:
            with open(path, "rb") as f:
                obj = _read_legacy(f)
        if not isinstance(obj, Mapping):
            raise ValueError(f"expected a state dict {{name: tensor}}, got a {type(obj).__name__}")
        out = {}
        for name, value in obj.items():
            if not isinstance(name, str) or not isinstance(value, _Tensor):
                raise ValueError(f"expected a state dict {{name: tensor}}; entry {name!r} holds a "
                                 f"{type(value).__name__}")
            out[name] = value.array()
        return out
    except (pickle.UnpicklingError, ValueError) as e:
        error = pickle.UnpicklingError if isinstance(e, pickle.UnpicklingError) else ValueError
        raise error(f"read_torch_state_dict: {path}: {e}") from None


def _read_zip(path: str) -> Any:
    """torch >= 1.6: <root>/data.pkl, with each storage's bytes in <root>/data/<key> (torch names
    <root> 'archive' or after the file)."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise pickle.UnpicklingError(f"a torch zip archive has one <root>/data.pkl, found {pickles}")
        root = pickles[0][:-len("data.pkl")]
        big_endian = f"{root}byteorder" in names and archive.read(f"{root}byteorder").strip() == b"big"
        storages: dict[str, _Storage] = {}
        with archive.open(pickles[0]) as f:
            obj = _StateDictUnpickler(f, storages, legacy=False).load()
        for key, storage in storages.items():
            record = f"{root}data/{key}"
            if record not in names:
                raise pickle.UnpicklingError(f"storage {key!r} is missing ({record})")
            storage.data = _from_bytes(archive.read(record), storage, big_endian)
    return obj


def _read_legacy(f: BinaryIO) -> Any:
    """torch < 1.6 (or `_use_new_zipfile_serialization=False`): pickles of the magic number, the
    protocol, the system info, the object and the storage keys; then each storage in that order
    as an int64 element count and its raw bytes."""
    storages: dict[str, _Storage] = {}

    def load() -> Any:
        return _StateDictUnpickler(f, storages, legacy=True).load()

    try:
        magic = load()
    except _RefusedGlobal:  # e.g. a plain pickle naming os.system
        raise
    except Exception:  # noqa: BLE001 (other bytes: pickle raises many kinds of error)
        magic = None
    if magic != _LEGACY_MAGIC:
        raise pickle.UnpicklingError("not a torch.save file (neither a zip archive nor the legacy format)")
    if load() != _LEGACY_PROTOCOL:
        raise pickle.UnpicklingError("unknown legacy torch.save protocol")
    info = load()
    little = not isinstance(info, dict) or info.get("little_endian", True)
    obj = load()
    keys = load()
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise pickle.UnpicklingError("malformed storage key list")
    for key in keys:
        storage = storages.get(key)
        if storage is None or isinstance(storage, _ViewStorage):
            raise pickle.UnpicklingError(f"storage {key!r} is not referenced by the object")
        count = int.from_bytes(_read_exactly(f, 8), "little" if little else "big")
        if count != storage.numel:
            raise pickle.UnpicklingError(f"storage {key!r} holds {count} elements, its tensors "
                                         f"expect {storage.numel}")
        storage.data = _from_bytes(_read_exactly(f, count * storage.dtype.itemsize), storage, not little)
    return obj


def _read_exactly(f: BinaryIO, n: int) -> bytes:
    raw = f.read(n)
    if len(raw) != n:
        raise pickle.UnpicklingError("the file ends inside a storage")
    return raw


def _from_bytes(raw: bytes, storage: _Storage, big_endian: bool) -> np.ndarray:
    if len(raw) < storage.numel * storage.dtype.itemsize:
        raise pickle.UnpicklingError(f"storage {storage.key!r} has {len(raw)} bytes, its tensors "
                                     f"expect {storage.numel * storage.dtype.itemsize}")
    dtype = storage.dtype.newbyteorder(">") if big_endian and storage.dtype.itemsize > 1 else storage.dtype
    return np.frombuffer(raw, dtype, count=storage.numel).astype(storage.dtype, copy=False)


# --------------------------------------------------------------------------------------------
# The cache and the download
# --------------------------------------------------------------------------------------------


def default_cache_dir() -> str:
    """$VDM_JAX_CACHE if set, else ~/.cache/vdm_jax."""
    return os.environ.get("VDM_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vdm_jax")


def load_fid_inception_weights(path: str | os.PathLike | None = None, *,
                               cache_dir: str | os.PathLike | None = None,
                               download: bool = True) -> dict[str, np.ndarray]:
    """pytorch-fid's Inception weights as {pytorch state_dict name: np.ndarray}.

    Args:
      path: a weights file (a `torch.save`d state dict). If its name carries a hash prefix like
        the published one (`name-6726825d.pth`), the file's sha256 must start with it; other
        names are read as they are (e.g. random weights in tests). None: the published file
        `FID_WEIGHTS_FILE` in the cache folder, downloaded there first if absent.
      cache_dir: where the converted `.npz` (keyed by the source file's sha256) and the
        downloaded file live; default `default_cache_dir()`.
      download: with `path=None`, whether a missing published file may be downloaded.

    Raises:
      FileNotFoundError: `path` does not exist, or (path=None) the published file is neither in
        the cache nor downloadable; the message says what to download and where to put it.
      ValueError: a file's sha256 does not start with its name's hash prefix (a bad download
        is deleted).
      pickle.UnpicklingError: the file is not a plain state dict (see `read_torch_state_dict`).
    """
    cache_dir = os.fspath(cache_dir) if cache_dir is not None else default_cache_dir()
    if path is None:
        path = os.path.join(cache_dir, FID_WEIGHTS_FILE)
        if not os.path.exists(path):
            if not download:
                raise FileNotFoundError(_missing_message(path, reason="download=False"))
            _download(FID_WEIGHTS_URL, path, FID_WEIGHTS_HASH_PREFIX)
        return _converted(path, cache_dir, FID_WEIGHTS_HASH_PREFIX)
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_fid_inception_weights: no weights file at {path}")
    named = _HASH_IN_NAME.search(os.path.basename(path))
    return _converted(path, cache_dir, named.group(1) if named else None)


def _converted(path: str, cache_dir: str, hash_prefix: str | None) -> dict[str, np.ndarray]:
    """The arrays of the weights file `path`, from the `.npz` cache (written on the first read)."""
    digest = _sha256(path)
    if hash_prefix is not None and not digest.startswith(hash_prefix):
        raise ValueError(f"load_fid_inception_weights: {path}: its sha256 {digest} does not start with "
                         f"{hash_prefix}, the prefix in its name: a corrupt or different file")
    cached = os.path.join(cache_dir, f"fid_inception-{digest}.npz")
    if os.path.exists(cached):
        with np.load(cached, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    weights = read_torch_state_dict(path)
    try:
        with atomic_write(cached, "wb") as f:  # (it makes the folder)
            np.savez(f, **weights)
    except OSError as e:  # e.g. a read-only cache folder: the weights are still good
        warnings.warn(f"load_fid_inception_weights: could not cache the weights in {cached}: {e}",
                      stacklevel=3)
    return weights


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download(url: str, target: str, hash_prefix: str) -> None:
    """Downloads `url` to `target` (atomically), checking that its sha256 starts with `hash_prefix`."""
    print(f"Downloading {url} to {target}", file=sys.stderr)
    h = hashlib.sha256()
    try:
        with atomic_write(target, "wb") as out, urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
            for block in iter(lambda: response.read(1 << 20), b""):
                h.update(block)
                out.write(block)
            if not h.hexdigest().startswith(hash_prefix):
                raise ValueError(f"load_fid_inception_weights: the download of {url} has sha256 "
                                 f"{h.hexdigest()}, which does not start with {hash_prefix}; deleted")
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:  # offline, HTTP errors, timeouts
        raise FileNotFoundError(_missing_message(target, reason=f"the download failed: {e}")) from None


def _missing_message(target: str, reason: str) -> str:
    return (f"load_fid_inception_weights: the FID Inception weights are not in the cache ({target}) and "
            f"were not downloaded ({reason}). Download {FID_WEIGHTS_URL} and put it at {target} (the cache "
            f"folder is cache_dir, else $VDM_JAX_CACHE, else ~/.cache/vdm_jax), or pass the file's path "
            f"(--inception_weights=PATH).")


def fid_inception(path: str | os.PathLike | None = None, **kwargs):
    """A `FIDInception` with pytorch-fid's weights: `load_fid_inception_weights(path, **kwargs)`
    built by `fid_inception_from_weights`."""
    from vdm_jax.models.inception import fid_inception_from_weights
    return fid_inception_from_weights(load_fid_inception_weights(path, **kwargs))
