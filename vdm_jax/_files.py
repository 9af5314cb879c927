"""Files written whole or not at all.

Every file vdm_jax writes (a run's config, metrics, sample grids and samples, evaluation results,
FID statistics, cached weights) goes through `atomic_write`, so a reader never sees half a file: not
another process reading while it is written, nor a rerun after the writer was killed mid-write.
"""
from __future__ import annotations

import contextlib
import os
import tempfile


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w"):
    """Yields a file to write `path` through: a temporary file in the same directory, renamed onto
    `path` (`os.replace`, atomic on POSIX) once it is written and flushed to disk.

    If the body raises, `path` is left as it was (absent, or its old contents) and the temporary file
    is removed. A process killed inside the body leaves `path` as it was and a hidden
    `.<name>.*.tmp` beside it. `mode` is 'w' (text) or 'wb'; the parent directory is created.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', got {mode!r}.")
    path = os.path.abspath(os.path.expanduser(path))
    directory, name = os.path.split(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, encoding="utf-8" if mode == "w" else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
