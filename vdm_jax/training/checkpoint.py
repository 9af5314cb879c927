"""Orbax checkpoints in the work directory: arrays and plain JSON only, always restored to a target.

Each checkpoint step holds two items: `state` (the train state's arrays: step, parameters, EMA,
optimiser state) and `data` (the data iterator's position, JSON). The config is kept beside them
as `config.json`. Nothing pickled is ever written, so opening a checkpoint cannot run code.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
    """The checkpoint in the work directory does not fit the model being trained."""


def _path(path) -> str:
    """'a/b/0/c' for a key path, whether its entries are dict keys, attributes or indices."""
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


class Checkpointer:
    """Keeps the last `keep` checkpoints plus every `keep_every`-th step; saves asynchronously."""

    def __init__(self, directory: str, *, keep: int = 3, keep_every: int = 0, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, keep_period=keep_every or None, create=True,
            enable_async_checkpointing=async_save)
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state_tree: Any, data_state: dict | None, *, force: bool = False) -> bool:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state_tree),
                                  data=ocp.args.JsonSave(data_state or {}))
        return self.manager.save(int(step), args=args, force=force)

    def restore(self, target_tree: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restores `step` (default: the latest) into the structure, shapes and shardings of
        `target_tree` (arrays, or `jax.ShapeDtypeStruct`s with shardings, e.g. from `jax.eval_shape`).
        Raises CheckpointMismatchError if the saved arrays don't fit it."""
        step = self.latest_step() if step is None else step
        self._check_fits(step, target_tree)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_tree)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore())
        try:
            restored = self.manager.restore(step, args=args)
        except ValueError as e:  # shapes or structure orbax could not match to the target
            raise CheckpointMismatchError(
                f"the checkpoint at step {step} in {self.directory} does not fit this model: {e}") from None
        return restored["state"], dict(restored["data"] or {})

    def _check_fits(self, step: int, target_tree: Any) -> None:
        try:
            meta = self.manager.item_metadata(step)["state"]
        except Exception:  # noqa: BLE001 - metadata is an optional, best-effort check
            return
        if meta is None:
            return
        saved = {_path(p): tuple(m.shape) for p, m in
                 jax.tree_util.tree_flatten_with_path(meta)[0] if hasattr(m, "shape")}
        wanted = {_path(p): tuple(getattr(x, "shape", np.shape(x))) for p, x in jax.tree_util.tree_flatten_with_path(target_tree)[0]}
        missing = sorted(set(wanted) - set(saved))
        extra = sorted(set(saved) - set(wanted))
        differ = sorted(k for k in set(wanted) & set(saved) if wanted[k] != saved[k])
        if missing or extra or differ:
            detail = []
            if differ:
                k = differ[0]
                detail.append(f"{len(differ)} arrays differ in shape (e.g. {k}: saved {saved[k]}, model {wanted[k]})")
            if missing:
                detail.append(f"{len(missing)} arrays missing from the checkpoint (e.g. {missing[0]})")
            if extra:
                detail.append(f"{len(extra)} unexpected arrays in it (e.g. {extra[0]})")
            raise CheckpointMismatchError(
                f"the checkpoint at step {step} in {self.directory} was written by a different model: "
                + "; ".join(detail) + ". Use a new --workdir, or the config that wrote it.")

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def save_config(workdir: str, config_dict: dict) -> None:
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config_dict, f, indent=2, sort_keys=True, default=list)


def saved_config(workdir: str) -> dict | None:
    """The config dict a run saved in `workdir/config.json`, or None if there is none."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def config_changes(workdir: str, config_dict: dict) -> list[str]:
    """Differences between the config saved in `workdir` and `config_dict`, as 'key: old -> new'."""
    old = saved_config(workdir)
    if old is None:
        return []
    new = json.loads(json.dumps(config_dict, default=list))

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    a, b = flat(old), flat(new)
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
