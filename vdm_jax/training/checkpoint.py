"""Orbax checkpoints in the work directory: arrays and plain JSON only, verified when restored.

Each checkpoint step holds two items: `state` (the train state's arrays: step, parameters, EMA,
optimiser state, fault counters) and `data` (JSON: the data iterator's position and a CRC-32 of
every array). The config is kept beside them as `config.json`. Nothing pickled is ever written or
read, so opening a checkpoint cannot run code.

Restoring checks the saved arrays' paths, shapes and dtypes against the target before reading any
(`CheckpointMismatchError`: another model) and every array's CRC-32 after (`CorruptCheckpointError`);
`restore_latest` falls back past damaged steps. Orbax writes each step into a temporary directory
and renames it when complete, so a process killed while saving never leaves a half-written step.

A save that fails (a full disk, above all) raises `CheckpointWriteError` when it is found, at the
next `save` or at `wait`: it names the step, the directory and the last complete step, and the
failed step's partial files are removed. A save that can't fit in the disk's free space is refused
before anything is written. The noise of orbax's background threads after such a failure (its own
error reports, asyncio's "Event loop is closed" from callbacks that outlive the writer) is kept out
of standard error; the exception carries the cause.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import sys
import zlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from vdm_jax._files import atomic_write

log = logging.getLogger(__name__)

CORRUPT_DIR = "checkpoints_corrupt"
"""Where `restore_latest` moves corrupt steps: a sibling of the checkpoint directory."""


class CheckpointMismatchError(ValueError):
    """The checkpoint in the work directory does not fit the model being trained."""


class CorruptCheckpointError(RuntimeError):
    """A checkpoint step that can't be read back intact (truncated, half written, altered)."""


class CheckpointWriteError(OSError):
    """A checkpoint step could not be written; `errno` is ENOSPC for a full disk. The steps saved
    before it are complete, and a rerun resumes from the newest (`last_step`, None if none)."""

    def __init__(self, message: str, *, step: int, last_step: int | None, code: int | None):
        super().__init__(code, message)
        self.step, self.last_step = step, last_step

    def __str__(self) -> str:
        return self.strerror


def path_str(path) -> str:
    """'a/b/0/c' for a key path, whether its entries are dict keys, attributes or indices."""
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def fingerprint(tree: Any) -> dict[str, int]:
    """{array path: CRC-32 of its bytes} for every array of `tree` (replicated or host arrays)."""
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
    return {path_str(p): zlib.crc32(np.ascontiguousarray(x).tobytes()) for p, x in leaves}


def _shapes(tree) -> dict[str, str]:
    """{array path: 'dtype[shape]'} for the arrays (or array metadata) of `tree`."""
    return {path_str(p): f"{np.dtype(x.dtype)}{list(x.shape)}"
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0] if hasattr(x, "shape")}


class Checkpointer:
    """Keeps the last `keep` checkpoints plus every `keep_every`-th step; saves asynchronously.

    `read_only` opens a run's checkpoints without changing anything (for evaluation while the run
    goes on); otherwise temporary directories left by a killed save are removed on opening.
    """

    def __init__(self, directory: str, *, keep: int = 3, keep_every: int = 0, async_save: bool = True,
                 read_only: bool = False):
        self.directory = os.path.abspath(directory)
        self.read_only = read_only
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
        if not read_only and os.path.isdir(self.directory) and jax.process_index() == 0:
            self._remove_unfinished()  # (orbax's own clean-up runs in the background, unawaited by close)
        absl_log = logging.getLogger("absl")
        absl_log.addFilter(_quiet_read_only)  # orbax's notices that read-only is read-only
        try:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=keep, keep_period=keep_every or None, create=not read_only, read_only=read_only,
                enable_async_checkpointing=async_save, cleanup_tmp_directories=False)
            self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        finally:
            absl_log.removeFilter(_quiet_read_only)
        self._pending = self._failed = None  # the step being written; the step whose write failed
        _quiet_failed_saves()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state_tree: Any, data_state: dict | None, *, force: bool = False) -> bool:
        """Saves the arrays of `state_tree` and the JSON `data_state` (plus the arrays' CRC-32s).

        The arrays must be replicated (every process holds the same values): their host copy, which
        the CRC-32s need anyway, is what is written, by process 0: writing orbax's device arrays
        instead made every save several times slower (per-shard bookkeeping for every array on
        every device). Restoring reads either into any sharding.
        """
        self.wait()  # (orbax waits for the save before anyway: this one reports its failure as such)
        host_tree = jax.device_get(state_tree)
        data = {**(data_state or {}), "fingerprint": fingerprint(host_tree)}
        self._check_space(int(step), host_tree)
        args = ocp.args.Composite(state=ocp.args.StandardSave(host_tree), data=ocp.args.JsonSave(data))
        self._pending = int(step)
        with self._failure(int(step)):
            saved = self.manager.save(int(step), args=args, force=force)
        if not saved:
            self._pending = None
        return saved

    def restore(self, target_tree: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restores `step` (default: the latest) into the structure, shapes and shardings of
        `target_tree` (arrays, or `jax.ShapeDtypeStruct`s with shardings, e.g. from `jax.eval_shape`).

        Raises:
          CheckpointMismatchError: the saved arrays don't fit the target (another model).
          CorruptCheckpointError: the step can't be read back intact.
        """
        step = self.latest_step() if step is None else int(step)
        where = os.path.join(self.directory, str(step))
        self._check_fits(step, target_tree)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_tree)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore())
        try:
            restored = self.manager.restore(step, args=args)
            tree, data = restored["state"], dict(restored["data"] or {})
        except Exception as e:  # noqa: BLE001 - the shapes fit, so any read failure is damage
            raise CorruptCheckpointError(f"{where} can't be read: {_one_line(e)}") from e
        saved = data.pop("fingerprint", None)
        bad = [] if saved is None else sorted(k for k, crc in fingerprint(tree).items() if saved.get(k) != crc)
        if bad:
            raise CorruptCheckpointError(f"{where}: {len(bad)} arrays differ from what was saved (CRC-32 mismatch, "
                                         f"e.g. {bad[0]})")
        return tree, data

    def restore_latest(self, target_tree: Any) -> tuple[int, Any, dict] | None:
        """(step, tree, data) of the newest checkpoint that restores intact, or None if there are none.

        Corrupt steps newer than it are skipped with a warning naming each, and (unless read-only)
        moved to `../checkpoints_corrupt/` so that training can write those steps again; nothing is
        deleted. If no step is intact, nothing is moved and CorruptCheckpointError lists them all.
        Raises CheckpointMismatchError at once for a checkpoint of another model.
        """
        skipped = []
        for step in reversed(self.all_steps()):
            try:
                tree, data = self.restore(target_tree, step)
            except CorruptCheckpointError as e:
                log.warning("skipping a corrupt checkpoint: %s", e)
                skipped.append((step, str(e)))
                continue
            for bad, _ in skipped:
                self._set_aside(bad)
            if skipped:
                self.manager.reload()
            return step, tree, data
        if skipped:
            raise CorruptCheckpointError(
                f"no checkpoint in {self.directory} can be restored: " + "; ".join(e for _, e in skipped)
                + ". Nothing was moved or deleted; use a new --workdir, or remove the damaged steps to start over.")
        return None

    def _set_aside(self, step: int) -> None:
        """Moves a corrupt step to ../checkpoints_corrupt/<step>[.n] (on process 0; all processes wait)."""
        if self.read_only:
            return
        if jax.process_index() == 0:
            aside = os.path.join(os.path.dirname(self.directory), CORRUPT_DIR)
            os.makedirs(aside, exist_ok=True)
            dest, n = os.path.join(aside, str(step)), 1
            while os.path.exists(dest):
                dest, n = os.path.join(aside, f"{step}.{n}"), n + 1
            shutil.move(os.path.join(self.directory, str(step)), dest)
            log.warning("moved the corrupt checkpoint %s to %s", os.path.join(self.directory, str(step)), dest)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"vdm_jax checkpoint set aside {step}")

    def _check_fits(self, step: int, target_tree: Any) -> None:
        """Raises CheckpointMismatchError if the step's metadata lists other arrays than the target's."""
        try:
            meta = self.manager.item_metadata(step)["state"]
            if meta is None:
                raise ValueError("the state's metadata is missing")
        except Exception as e:  # noqa: BLE001 - unreadable metadata: the step is damaged
            raise CorruptCheckpointError(
                f"{os.path.join(self.directory, str(step))} has no readable metadata: {_one_line(e)}") from e
        saved, wanted = _shapes(meta), _shapes(target_tree)
        differ = sorted(k for k in set(wanted) & set(saved) if wanted[k] != saved[k])
        problems = {"arrays differ in shape or dtype": differ, "arrays missing from the checkpoint":
                    sorted(set(wanted) - set(saved)), "unexpected arrays in it": sorted(set(saved) - set(wanted))}
        names = sum(problems.values(), [])
        if names and all(k.startswith(("opt_state/", "faults/")) for k in names):
            raise CheckpointMismatchError(
                f"the checkpoint at step {step} in {self.directory} was written by vdm_jax 0.1 (its "
                "optimiser state is one raveled vector, its fault record a bit mask); vdm_jax 0.2 keeps the "
                "parameter tree's structure and can't restore it. Use a new --workdir, or the older vdm_jax to "
                "finish or evaluate that run.")
        if names:
            detail = [f"{len(keys)} {what} (e.g. {keys[0]}" + (f": saved {saved[keys[0]]}, model {wanted[keys[0]]})"
                                                              if keys is differ else ")")
                      for what, keys in problems.items() if keys]
            raise CheckpointMismatchError(
                f"the checkpoint at step {step} in {self.directory} was written by a different model: "
                + "; ".join(detail) + ". Use a new --workdir, or the config that wrote it.")

    def wait(self) -> None:
        """Waits for the save being written; raises CheckpointWriteError if it failed."""
        step, self._pending = self._pending, None
        with self._failure(step):
            self.manager.wait_until_finished()

    def _complete_steps(self) -> list[int]:
        """The steps on disk whose save finished (orbax renames a step's directory when it is complete)."""
        names = os.listdir(self.directory) if os.path.isdir(self.directory) else []
        return sorted(int(n) for n in names if n.isdigit())

    def _write_error(self, step: int | None, cause: str, code: int | None) -> CheckpointWriteError:
        last = ([s for s in self._complete_steps() if step is None or s < step] or [None])[-1]
        what = "no space left on device" if code == errno.ENOSPC else cause
        kept = (f"the last complete checkpoint is step {last}; rerun to resume from it" if last is not None else
                "no checkpoint was saved before it")
        fix = " once there is space (or with a --workdir on another disk)" if code == errno.ENOSPC else ""
        return CheckpointWriteError(f"could not save the checkpoint at step {step} in {self.directory}: {what}. "
                                    f"Training stopped; {kept}{fix}.", step=step, last_step=last, code=code)

    def _check_space(self, step: int, host_tree) -> None:
        """Refuses a save whose arrays alone exceed the disk's free space (nothing is written then)."""
        need = sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(host_tree))
        try:
            free = shutil.disk_usage(self.directory).free
        except OSError:  # (a file system that can't say: the write will tell)
            return
        if need > free:
            raise self._write_error(step, "", errno.ENOSPC) from OSError(
                errno.ENOSPC, f"the checkpoint needs {need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free")

    @contextlib.contextmanager
    def _failure(self, step: int | None):
        """Turns a failed write into CheckpointWriteError and removes the step's partial files."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - orbax reports a failed write as any of several types
            if step is None:
                raise
            if jax.process_index() == 0:
                self._remove_unfinished(step)
            code = errno.ENOSPC if _out_of_space(e) else getattr(e, "errno", None)
            self._failed = step
            raise self._write_error(step, _one_line(e), code) from e

    def _remove_unfinished(self, step: int | None = None) -> None:
        """Removes orbax's unfinished directories ('<step>.orbax-checkpoint-tmp-…') of `step`, or of every step."""
        for name in os.listdir(self.directory):
            found = _UNFINISHED.fullmatch(name)
            if found and (step is None or int(found.group(1)) == step):
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    def close(self) -> None:
        try:
            self.manager.close()
        except Exception:  # noqa: BLE001 - a failed save was reported by wait(); closing can't add to it
            if self._failed is None:
                raise


_UNFINISHED = re.compile(r"(\d+)\..*tmp.*")  # orbax's directory of a save not yet finished


def _quiet_read_only(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(("CheckpointManagerOptions.read_only=True",
                                                "Given directory is read only"))


def _out_of_space(e: BaseException) -> bool:
    """Whether `e` or its causes report a full disk (an OSError's ENOSPC, or tensorstore's text for it)."""
    while e is not None:
        if getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


_ORBAX_FAILURE = re.compile(r"fail|raised an exception", re.IGNORECASE)


def _not_a_failed_save_report(record: logging.LogRecord) -> bool:
    """False for orbax's own error reports of a failed save: CheckpointWriteError reports it, once."""
    return not (record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname
                and _ORBAX_FAILURE.search(record.getMessage()))


def _not_an_orbax_task_left_failing(record: logging.LogRecord) -> bool:
    """False for asyncio's report of an orbax write whose failure nobody retrieved ("Task exception
    was never retrieved"): the other writes of a save that failed, which CheckpointWriteError reports, once."""
    message = record.getMessage()
    return not (message.startswith("Task exception was never retrieved") and f"{os.sep}orbax{os.sep}" in message)


def _quiet_failed_saves() -> None:
    """Once per process: keeps the noise of a failed background save off standard error.

    After a write fails, orbax closes its event loop while tensorstore still completes the other
    writes; each completion's callback then raises "Event loop is closed" into
    `sys.unraisablehook` (a traceback each, hundreds of them), and asyncio reports the writes whose
    failure no one awaited. Those are dropped here (the callbacks noted in the debug log); every other
    unraisable exception goes to the hook that was there before, every other asyncio report to its log.
    """
    if getattr(sys.unraisablehook, "_vdm_jax", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        e = unraisable.exc_value
        if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
            log.debug("dropped a callback into orbax's closed event loop: %s", unraisable.object)
            return
        previous(unraisable)

    hook._vdm_jax = True
    sys.unraisablehook = hook
    logging.getLogger("absl").addFilter(_not_a_failed_save_report)
    logging.getLogger("asyncio").addFilter(_not_an_orbax_task_left_failing)


def _one_line(e: Exception) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" + ("..." if len(text) > 300 else "")


def save_config(workdir: str, config_dict: dict) -> None:
    """Writes `workdir/config.json`, atomically (one process: process 0)."""
    with atomic_write(os.path.join(workdir, "config.json")) as f:
        json.dump(config_dict, f, indent=2, sort_keys=True, default=list)


def saved_config(workdir: str) -> dict | None:
    """The config dict a run saved in `workdir/config.json`, or None if there is none.

    Raises ValueError naming the file if it is not a JSON object (damaged or edited).
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        config = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{path} is damaged: {f'not JSON ({e})' if text.strip() else 'empty'}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} is damaged: JSON, but not an object")
    return config
