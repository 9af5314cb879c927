"""Argument checks shared by the public functions.

Shapes and dtypes are static under `jax.jit`, so they are checked at trace time and raise a plain
`ValueError`/`TypeError` naming the argument. Values are checked only when they are concrete.
"""
from __future__ import annotations

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
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}.")
    return x


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
