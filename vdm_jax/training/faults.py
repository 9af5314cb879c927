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

The record lives in `TrainState.faults` (int32 scalars, checkpointed with the state):
`step` (the state's step when the last bad update was computed, -1 if none), `terms` (a bit
mask over `term_names`), `grad_leaf` (index of the first non-finite gradient array, -1 if none),
`skipped` and `consecutive`.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

ON_NONFINITE = ("stop", "skip")


class NonFiniteError(FloatingPointError):
    """Training produced a NaN or Inf loss or gradient (see `vdm_jax.training.faults`)."""


def init_faults() -> dict[str, jax.Array]:
    """A record of no faults."""
    return {name: jnp.asarray(value, jnp.int32) for name, value in
            (("step", -1), ("terms", 0), ("grad_leaf", -1), ("skipped", 0), ("consecutive", 0))}


def term_names(terms: dict[str, Any]) -> list[str]:
    """The order of the bits of `faults['terms']`: the mean loss, then each loss term by name."""
    return ["loss", *sorted(terms)]


def inspect(loss, terms: dict[str, jax.Array], grads) -> dict[str, jax.Array]:
    """Whether a step's loss, terms and gradients are finite, and the gradients' global norm.

    Returns {'ok': bool, 'terms': bit mask of the non-finite terms, 'grad_leaf': index of the first
    non-finite gradient array or -1, 'grad_norm'}. The per-array sums of squares that give the
    norm also give the finiteness (a sum of squares is finite iff the array is, barring overflow
    past ~1e19 per element), so the check costs no extra pass over the gradients.
    """
    values = [loss, *(terms[name] for name in sorted(terms))]
    bad_terms = jnp.stack([~jnp.all(jnp.isfinite(v)) for v in values])
    squares = jnp.stack([jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads)])
    bad_grads = ~jnp.isfinite(squares)
    return {"ok": ~(jnp.any(bad_terms) | jnp.any(bad_grads)),
            "terms": jnp.sum(bad_terms.astype(jnp.int32) << jnp.arange(len(values), dtype=jnp.int32)),
            "grad_leaf": jnp.where(jnp.any(bad_grads), jnp.argmax(bad_grads), -1).astype(jnp.int32),
            "grad_norm": jnp.sqrt(jnp.sum(squares))}


def should_apply(faults: dict[str, jax.Array], ok: jax.Array, mode: str) -> jax.Array:
    """Whether to apply this step: it is finite and (in 'stop' mode) no earlier step was not."""
    return ok & (faults["step"] < 0) if mode == "stop" else ok


def record(faults: dict[str, jax.Array], report: dict[str, jax.Array], step: jax.Array, mode: str):
    """The fault record after a step computed at `step` (see the module docstring).

    Returns (new record, how much the step counter advances: 0 or 1).
    """
    ok = report["ok"]
    new = ~ok & (faults["step"] < 0) if mode == "stop" else ~ok
    advance = should_apply(faults, ok, mode) if mode == "stop" else jnp.bool_(True)
    out = {
        "step": jnp.where(new, step, faults["step"]),
        "terms": jnp.where(new, report["terms"], faults["terms"]),
        "grad_leaf": jnp.where(new, report["grad_leaf"], faults["grad_leaf"]),
        "skipped": faults["skipped"] + (new & (mode == "skip")),
        "consecutive": jnp.where(ok, 0, faults["consecutive"] + 1),
    }
    return {k: v.astype(jnp.int32) for k, v in out.items()}, advance.astype(jnp.int32)


def describe(faults: dict[str, Any], names: Sequence[str], grad_paths: Sequence[str]) -> str:
    """'step N+1 (the update from step N): non-finite loss terms a, b; the first non-finite gradient is p'."""
    step, bits, leaf = int(faults["step"]), int(faults["terms"]), int(faults["grad_leaf"])
    bad = [name for i, name in enumerate(names) if bits >> i & 1]
    parts = [f"non-finite loss terms {', '.join(bad)}" if bad else "finite loss terms"]
    if leaf >= 0:
        parts.append(f"the first non-finite gradient is {grad_paths[leaf]}")
    return f"step {step + 1} (the update from step {step}): " + "; ".join(parts)


def check(faults: dict[str, Any], mode: str, max_consecutive_skips: int, explain) -> None:
    """Raises NonFiniteError if the host-side `faults` say training must stop.

    explain() -> str describes the fault (called only when raising).
    """
    if mode == "stop" and int(faults["step"]) >= 0:
        raise NonFiniteError(f"training stopped at {explain()}. The update was not applied and nothing "
                             "from it on was saved; lower the learning rate, or set "
                             "training.on_nonfinite='skip' to drop such steps.")
    if mode == "skip" and 0 < max_consecutive_skips <= int(faults["consecutive"]):
        raise NonFiniteError(f"training stopped after {int(faults['consecutive'])} non-finite steps in a row "
                             f"(training.max_consecutive_skips={max_consecutive_skips}); the last was at "
                             f"{explain()}. None of them was applied.")
