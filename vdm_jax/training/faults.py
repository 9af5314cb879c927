"""Non-finite training steps: caught inside the compiled step, never applied, reported by the host.

Every train step checks its loss, each loss term and each gradient array for NaN/Inf. A step that
has any is never applied: the parameters, EMA and optimiser state stay those of the last good
step. What happens next is `training.on_nonfinite`:

- `'stop'` (default): the state freezes (later steps in the same compiled call or before the next
  host check change nothing) and records the step and what was not finite. The loop checks at
  every log, checkpoint, evaluation and sample step, before saving, and raises `NonFiniteError`
  naming the step and the offending terms; the last checkpoint saved is the last good one.
- `'skip'`: the step is dropped and training goes on with the next batch (the step counter
  advances). `faults['skipped']` counts the dropped steps (logged as `skipped_steps`); more than
  `training.max_consecutive_skips` in a row raise `NonFiniteError` as above.

The record lives in `TrainState.faults` (checkpointed with the state): `step` (the state's step
when the last bad update was computed, -1 if none), `grad_leaf` (index of the first non-finite
gradient array in `jax.tree.leaves(params)` order, -1 if none), `skipped`, `consecutive`, and
`values`: that step's batch means of the loss and of each loss term, from which the host names
the terms that were not finite.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from vdm_jax.training.checkpoint import path_str

ON_NONFINITE = ("stop", "skip")


class NonFiniteError(FloatingPointError):
    """Training produced a NaN or Inf loss or gradient (see `vdm_jax.training.faults`)."""


def init_faults(terms: Sequence[str]) -> dict[str, Any]:
    """A record of no faults, for a loss with these term names."""
    return {**{name: jnp.asarray(value, jnp.int32) for name, value in dict(step=-1, grad_leaf=-1, skipped=0,
                                                                            consecutive=0).items()},
            "values": {name: jnp.zeros((), jnp.float32) for name in ("loss", *terms)}}


def inspect(loss, terms: dict[str, jax.Array], grads) -> dict[str, Any]:
    """Whether a step's loss, terms and gradients are finite, and the gradients' global norm.

    Returns {'ok', 'grad_leaf': index of the first non-finite gradient array or -1, 'grad_norm',
    'values': batch means of the loss and the terms}. A mean is finite iff every value is (barring
    overflow), and the per-array sums of squares that give the norm also give the gradients'
    finiteness, so the check costs no extra pass over the gradients; the optimiser's clipping
    reuses the norm (`state.clip_by_global_norm`). Each sum of squares is a dot product of the
    raveled array with itself, which XLA:CPU runs faster than a reduction (docs/benchmarks.md, "The
    update").
    """
    values = {"loss": jnp.mean(loss), **{name: jnp.mean(v) for name, v in terms.items()}}
    squares = jnp.stack([jnp.vdot(g, g).astype(jnp.float32) for g in
                         (g.astype(jnp.float32).ravel() for g in jax.tree.leaves(grads))])
    bad_grads = ~jnp.isfinite(squares)
    finite = jnp.all(jnp.stack([jnp.isfinite(v) for v in values.values()]))
    return {"ok": finite & ~jnp.any(bad_grads),
            "grad_leaf": jnp.where(jnp.any(bad_grads), jnp.argmax(bad_grads), -1).astype(jnp.int32),
            "grad_norm": jnp.sqrt(jnp.sum(squares)),
            "values": jax.tree.map(lambda v: v.astype(jnp.float32), values)}


def record(faults: dict[str, Any], report: dict[str, Any], step: jax.Array, mode: str):
    """(the fault record after a step computed at `step`, whether to apply the step, how far the step
    counter advances). A step is applied if it is finite and, in 'stop' mode, no earlier one was not."""
    ok, first = report["ok"], faults["step"] < 0  # (first: no step has stopped the run)
    apply, new = (ok & first, ~ok & first) if mode == "stop" else (ok, ~ok)
    out = {"step": jnp.where(new, step, faults["step"]),
           "grad_leaf": jnp.where(new, report["grad_leaf"], faults["grad_leaf"]),
           "skipped": faults["skipped"] + (new & (mode == "skip")),
           "consecutive": jnp.where(ok, 0, faults["consecutive"] + 1)}
    out = {k: v.astype(jnp.int32) for k, v in out.items()}
    out["values"] = jax.tree.map(lambda now, before: jnp.where(new, now, before), report["values"], faults["values"])
    return out, apply, (apply if mode == "stop" else jnp.bool_(True)).astype(jnp.int32)


def describe(faults: dict[str, Any], params) -> str:
    """'step N+1 (the update from step N): non-finite loss terms a, b; the first non-finite gradient is p'.

    `faults` is the host's copy of the record; `params` the parameter tree (for the gradient's path).
    """
    step, leaf, values = int(faults["step"]), int(faults["grad_leaf"]), faults["values"]
    bad = [name for name in ["loss", *sorted(set(values) - {"loss"})] if not math.isfinite(float(values[name]))]
    parts = [f"non-finite loss terms {', '.join(bad)}" if bad else "finite loss terms"]
    if leaf >= 0:
        paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
        parts.append(f"the first non-finite gradient is {paths[leaf]}")
    return f"step {step + 1} (the update from step {step}): " + "; ".join(parts)


def check(faults: dict[str, Any], params, mode: str, max_consecutive_skips: int) -> None:
    """Raises NonFiniteError, naming the step, the terms and the first bad gradient (`describe`), if
    the host-side `faults` say training must stop."""
    if mode == "stop" and int(faults["step"]) >= 0:
        raise NonFiniteError(f"training stopped at {describe(faults, params)}. The update was not applied and "
                             "nothing from it on was saved; lower the learning rate, or set "
                             "training.on_nonfinite='skip' to drop such steps.")
    if mode == "skip" and 0 < max_consecutive_skips <= int(faults["consecutive"]):
        raise NonFiniteError(f"training stopped after {int(faults['consecutive'])} non-finite steps in a row "
                             f"(training.max_consecutive_skips={max_consecutive_skips}); the last was at "
                             f"{describe(faults, params)}. None of them was applied.")
