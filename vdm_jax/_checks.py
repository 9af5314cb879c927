"""How the core checks its arguments: at its entry points only, by the names of the arguments.

The formulas (`q_sample`, the conversions, the losses, the decoders) are plain jnp and check
nothing. An entry point (a family's constructor and methods, a sampler, an ELBO, the likelihood,
a schedule's constructor) checks what it is given once, at its top, in one call:

    _checks.arguments("ddim_sample", shape=shape, kind=kind, times=times, eta=eta, clip_x=clip_x)

An argument's name is its contract across the library (the table in `_rules`): `kind` is always
one of the predictions, `shape` a sample shape [B, ...], `times` a decreasing grid in [0, 1], `x`
floating data [B, ...]. Shapes and dtypes are checked at trace time under `jax.jit`; values only
of host inputs (Python numbers, lists, NumPy arrays): a `jax.Array` is never read back. A failed
check raises ValueError "<entry point>: <argument> must be <what it expects>, got <what it got>".
"""
from __future__ import annotations

import functools
import math

import numpy as np
import jax
import jax.numpy as jnp


def arguments(owner: str, **values) -> None:
    """Checks each argument by its name's rule; the error names `owner`, the argument and the rule."""
    for name, value in values.items():
        ok, expected = _rules()[name]
        if not ok(value):
            raise ValueError(f"{owner}: {name} must be {expected}, got {_describe(value)}.")


@functools.cache
def _rules() -> dict:
    """name -> (predicate, what it expects). The options live beside their math."""
    from vdm_jax import diffusion, likelihood, losses, pixels, sampling, schedules
    options = {"kind": diffusion.PREDICTIONS, "prediction": diffusion.PREDICTIONS, "variance": losses.VARIANCES,
               "grid": pixels.GRIDS, "spacing": sampling.SPACINGS, "method": ("heun", "euler"), "order": (1, 2),
               "decoder": ("vdm", "gaussian"), "divergence": likelihood.DIVERGENCES, "probe": likelihood.PROBES,
               "solver": likelihood.SOLVERS, "loss_type": ("simple", "vlb", "hybrid")}
    rules = {n: (lambda v, c=c: _is(v, str, int) and v in c, "one of " + _listed(c)) for n, c in options.items()}
    rules |= {n: (lambda v, m=m: _is(v, int) and v >= m, f"an int >= {m}") for n, m in (
        ("T", 0), ("sample_steps", 1), ("num_probes", 1), ("max_steps", 1), ("num_draws", 1), ("hidden", 1))}
    rules |= {n: (lambda v, r=r: _is(v, int, float) and r[0] < v < r[1], f"a real number in ({r[0]}, {r[1]})")
              for n, r in (
        ("rtol", (0, math.inf)), ("atol", (0, math.inf)), ("beta_start", (0, 1)), ("beta_end", (0, 1)),
        ("max_beta", (0, 1)), ("gamma_min", (-math.inf, math.inf)), ("gamma_max", (-math.inf, math.inf)))}
    batch = lambda v, kind: _dtype_is(v, kind) and np.ndim(v) >= 1  # noqa: E731
    return rules | {
        "x": (lambda v: batch(v, jnp.floating), "a floating array [B, ...] with a leading batch axis"),
        "z": (lambda v: batch(v, jnp.floating), "a floating array [B, ...] with a leading batch axis"),
        "pixels": (lambda v: batch(v, jnp.integer) and _within(v, 0, 255), "an integer array [B, ...] in 0..255"),
        "shape": (lambda v: _is(v, tuple, list) and len(v) > 0 and all(_is(s, int) and s > 0 for s in v),
                  "a non-empty tuple of positive ints [B, ...]"),
        "clip_x": (lambda v: v is None or (_is(v, tuple, list) and len(v) == 2 and v[0] < v[1]),
                   "None or a pair (lo, hi) with lo < hi"),
        "times": (lambda v: np.ndim(v) == 1 and len(v) >= 2 and _dtype_is(v, jnp.floating) and _within(v, 0.0, 1.0)
                  and _decreasing(v), "a floating 1-D array of at least 2 strictly decreasing times in [0, 1]"),
        "eta": (lambda v: _within(v, 0.0, 1.0), "in [0, 1]"),
        "labels": (lambda v: _dtype_is(v, jnp.integer) and np.ndim(v) == 1 and _within(v, 0, math.inf),
                   "an integer array [B] of classes >= 0"),
        "null_label": (lambda v: _is(v, int) and v >= 0, "an int >= 0 (the network's 'no label' class)"),
        "weight": (lambda v: isinstance(v, jax.Array) and np.ndim(v) == 0 or _is(v, int, float) and math.isfinite(v),
                   "a finite real number"),
        "interval": (lambda v: v is None or (_is(v, tuple, list) and len(v) == 2 and all(_is(e, int, float) for e in v)
                                             and v[0] < v[1]), "None or a pair (lo, hi) of γ with lo < hi"),
        "schedule": (lambda v: isinstance(v, schedules.DiscreteSchedule), "a DiscreteSchedule (a continuous schedule "
                     "goes to vdm_elbo, vdm_sample, ddim_sample or the ODE samplers)"),
    }


def _describe(value) -> str:
    """A small host value as itself; an array (a device one always: it is not read back) by dtype and shape."""
    if hasattr(value, "shape") and (isinstance(value, jax.Array) or np.size(value) > 8):
        return f"{value.dtype} of shape {value.shape}"
    return f"{value.tolist() if hasattr(value, 'tolist') else value!r:.80}"


def _is(value, *types) -> bool:
    """isinstance for Python or NumPy scalars, bools excluded (True is not the int 1 here)."""
    numpy = {int: np.integer, float: np.floating}
    return not isinstance(value, (bool, np.bool_)) and isinstance(value, types + tuple(numpy[t] for t in types
                                                                                     if t in numpy))


def _dtype_is(value, kind) -> bool:
    return jnp.issubdtype(value.dtype if hasattr(value, "dtype") else np.asarray(value).dtype, kind)


def _decreasing(value) -> bool:
    v = host_value(value)
    return v is None or bool(np.all(np.diff(v) < 0))


def _within(value, lo, hi) -> bool:
    """Host values in [lo, hi] (a jax.Array passes: it is not read back)."""
    v = host_value(value)
    return v is None or not v.size or bool(np.all((v >= lo) & (v <= hi)))


def host_value(value) -> np.ndarray | None:
    """`value` as a NumPy array if it is on the host; None for a jax.Array (never read back)."""
    if any(isinstance(leaf, jax.Array) for leaf in jax.tree_util.tree_leaves(value)):
        return None
    return np.asarray(value)


def check_int(name: str, value, minimum: int) -> int:
    """Checks that `value` is a Python or NumPy int (not a bool) >= `minimum`; returns it as an int."""
    if not _is(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__}).")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")
    return int(value)


def one_of(name: str, value, choices) -> None:
    if not _is(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {_listed(choices)}, got {value!r}.")


def _listed(choices) -> str:
    return ", ".join(map(repr, choices[:-1])) + f" or {choices[-1]!r}"


def on_grid(owner: str, x, grid: str) -> None:
    """Host data x lies on the grid's pixel values (to 1e-3 of a bin; docs/math.md §5.9)."""
    v = host_value(x)
    scale, shift = (127.5, 0.0) if grid == "ddpm" else (128.0, 0.5)  # pixel k = (x + 1) scale - shift
    k = None if v is None else (v.astype(np.float64) + 1.0) * scale - shift
    if k is not None and np.any(bad := ~((np.abs(k - np.round(k)) < 1e-3) & (k > -0.5) & (k < 255.5))):
        i = tuple(int(j) for j in np.unravel_index(np.argmax(bad), bad.shape))
        raise ValueError(f"{owner}: x must be data on the {grid!r} pixel grid (pixels_to_data(pixels, grid={grid!r})), "
                         f"got x[{', '.join(map(str, i))}] = {v[i]}.")


def split_prediction(out, z_t, learned: bool):
    """pred_fn's output as (prediction, v): a pair with a learned variance, one array otherwise, of z_t's shape."""
    if learned != isinstance(out, (tuple, list)) or (learned and len(out) != 2):
        got = f"a {type(out).__name__} of {len(out)}" if isinstance(out, (tuple, list)) else "one array"
        raise ValueError(f"with variance='learned' pred_fn must return (prediction, v), got {got}." if learned else
                         f"pred_fn returned {got}, but without a learned variance it must return one array.")
    prediction, v = out if learned else (out, None)
    if jnp.shape(prediction) != z_t.shape:
        raise ValueError(f"pred_fn must return a prediction of z_t's shape {z_t.shape}, got {jnp.shape(prediction)}.")
    return prediction, v
