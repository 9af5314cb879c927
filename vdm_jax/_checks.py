"""Argument checks shared by the public functions.

Shapes and dtypes are static under `jax.jit`, so they are checked at trace time and raise a plain
`ValueError`/`TypeError` naming the argument. Values are checked only when they are concrete.
"""
from __future__ import annotations

import numbers

import numpy as np
import jax
import jax.numpy as jnp


def concrete_or_none(x) -> np.ndarray | None:
    """Returns `x` as a NumPy array if its value is known now, else None (inside jit)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def check_float(name: str, x) -> jax.Array:
    """Checks that `x` is a floating-point array and returns it as one."""
    try:
        x = jnp.asarray(x)
    except (TypeError, ValueError):  # None, strings, ragged lists, ...
        raise TypeError(f"{name} must be a floating-point array, got {type(x).__name__} {x!r:.60}.") from None
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}.")
    return x


def check_batched(name: str, x) -> None:
    """Checks that `x` has a leading batch axis, [B, ...] (not a scalar)."""
    if jnp.ndim(x) < 1:
        raise ValueError(f"{name} must have shape [B, ...] with a leading batch axis, got shape {jnp.shape(x)}.")


def check_int(name: str, value, minimum: int) -> int:
    """Checks that `value` is a Python or NumPy int (not a bool) >= `minimum`; returns it as an int."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__}).")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")
    return int(value)


def check_instance(name: str, value, cls: type, hint: str = "") -> None:
    """Checks that `value` is a `cls`; `hint` (e.g. what to use instead) ends the message."""
    if not isinstance(value, cls):
        raise TypeError(f"{name} must be a {cls.__name__}, got {type(value).__name__}{hint}.")


def check_real(name: str, value) -> None:
    """Checks that `value` is a real number: a Python/NumPy scalar or a 0-d numeric array."""
    scalar = isinstance(value, numbers.Real) or (
        getattr(value, "shape", None) == () and jnp.issubdtype(getattr(value, "dtype", object), jnp.number))
    if not scalar or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__}).")


def check_less(s_name: str, s, t_name: str, t) -> None:
    """Raises ValueError if concrete `s` and `t` (broadcast together) have s >= t anywhere (or NaN)."""
    s_value, t_value = concrete_or_none(s), concrete_or_none(t)
    if s_value is None or t_value is None:
        return
    try:
        s_value, t_value = np.broadcast_arrays(s_value, t_value)
    except ValueError:
        raise ValueError(f"{s_name} and {t_name} must broadcast together, got shapes {s_value.shape} and "
                         f"{t_value.shape}.") from None
    bad = ~(s_value < t_value)
    if np.any(bad):
        i = np.unravel_index(np.argmax(bad), bad.shape)
        where = f" at index {tuple(int(k) for k in i)}" if bad.ndim else ""
        raise ValueError(f"{s_name} must be < {t_name} (s < t: the noise level grows with time); got "
                         f"{s_name}={s_value[i]} and {t_name}={t_value[i]}{where}.")


def check_same_shape(**arrays) -> None:
    """Checks that all arrays have one shape, naming them when they don't."""
    shapes = {name: jnp.shape(a) for name, a in arrays.items()}
    if len(set(shapes.values())) > 1:
        desc = ", ".join(f"{n} {s}" for n, s in shapes.items())
        raise ValueError(f"expected arrays of the same shape, got {desc}.")


def per_example(name: str, value, x, x_name: str = "x") -> jax.Array:
    """Broadcasts a per-example quantity ([B] or scalar) against `x` [B, ...].

    Returns `value` reshaped to [B, 1, ..., 1] (or a scalar), so that it multiplies `x` per example.
    Raises ValueError if `value` is neither a scalar nor of shape [B] with B = x.shape[0].
    """
    value = jnp.asarray(value)
    x_shape = jnp.shape(x)
    if value.ndim == 0:
        return value
    if value.ndim != 1 or len(x_shape) == 0 or value.shape[0] != x_shape[0]:
        raise ValueError(
                f"{name} must be a scalar or have shape [B] = [{x_shape[0] if x_shape else '?'}] "
                f"matching {x_name}'s leading (batch) axis; got {name} shape {value.shape} and "
                f"{x_name} shape {x_shape}.")
    return value.reshape(value.shape + (1,) * (len(x_shape) - 1))


def sum_per_example(x: jax.Array) -> jax.Array:
    """Sums over every axis but the first: [B, ...] -> [B]."""
    return jnp.sum(x, axis=tuple(range(1, x.ndim)))


def check_in_range(name: str, t, lo, hi, what: str) -> None:
    """Raises ValueError if a concrete `t` has values outside [lo, hi]."""
    value = concrete_or_none(t)
    if value is None:
        return
    if value.size and (np.any(np.isnan(value)) or np.min(value) < lo or np.max(value) > hi):
        raise ValueError(f"{name} must lie in {what}; got values in "
                         f"[{np.min(value)}, {np.max(value)}].")


def split_prediction(out, learned: bool, who: str = "pred_fn"):
    """A prediction function's output as (prediction, v): a pair with a learned variance, else (out, None)."""
    if learned:
        if not (isinstance(out, tuple) and len(out) == 2):
            got = f"an array of shape {out.shape}" if hasattr(out, "shape") else type(out).__name__
            raise ValueError(f"with variance='learned' {who} must return (prediction, v), got {got}.")
        return out
    if isinstance(out, (tuple, list)):
        raise ValueError(f"{who} returned a {type(out).__name__} of {len(out)}, but without a learned variance it "
                         "must return one array (variance='learned' expects (prediction, v)).")
    return out, None
