"""Initialising the networks' parameters: flax's layers and initialisers, one random draw per network.

The U-Net and the Inception network are made of flax's layers (`nnx.Conv`, `nnx.Linear`,
`nnx.GroupNorm`, `nnx.BatchNorm`) with flax's initialisers: `variance_scaling` (lecun- or
He-normal kernels) and `constant` (zeros, ones) below are flax's own outside a `OneDrawModule`.
A `OneDrawModule` (the U-Net, its blocks, the Inception network) changes only how the values are
made: its layers are built first with their parameters pending, then every kernel is cut from
one truncated-normal vector drawn with one key from the constructor's `rngs`, and the other
parameters are filled. Eagerly this is one compiled random draw, cut and filled on the host;
under `jax.jit`, `nnx.eval_shape` or another trace, the same operations in the caller's program
(the values are the same).

Why not flax's usual per-layer drawing: on XLA:CPU every random draw compiles a kernel of its own,
eagerly or inside one `nnx.jit`-ed construction, and every update of an `nnx.Rngs` under a trace
costs time proportional to the program traced so far (docs/benchmarks.md, "Building a U-Net and
its first call", has the figures).
"""
from __future__ import annotations

import contextvars
import dataclasses
import functools
import inspect
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# The standard deviation of a standard normal truncated to [-2, 2], as in flax's variance_scaling.
_TRUNCATED_STD = 0.87962566103423978

_BUILDING: contextvars.ContextVar[bool] = contextvars.ContextVar("vdm_jax_models_building", default=False)


@dataclasses.dataclass(frozen=True)
class _Pending:
    """A parameter made when its `OneDrawModule` is built: `std` times its cut of the draw (a
    kernel), or filled with `fill`."""
    shape: tuple[int, ...]
    dtype: Any
    std: float | None = None
    fill: float = 0.0


def variance_scaling(scale: float) -> Callable[..., jax.Array]:
    """flax's `variance_scaling(scale, 'fan_in', 'truncated_normal')`: lecun-normal (scale 1) or
    He-normal (scale 2) kernels, a normal truncated to ±2 standard deviations with variance
    scale / fan_in (fan_in: the product of all axes but the last). In a `OneDrawModule` the values
    are cut from its one draw."""
    flax_init = nnx.initializers.variance_scaling(scale, "fan_in", "truncated_normal")

    def init(key: jax.Array, shape, dtype=jnp.float32):
        if not _BUILDING.get():
            return flax_init(key, shape, dtype)
        shape = tuple(shape)
        return _Pending(shape, dtype, std=math.sqrt(scale / math.prod(shape[:-1])) / _TRUNCATED_STD)

    return init


def constant(fill: float) -> Callable[..., jax.Array]:
    """flax's `constant(fill)` (zeros, ones); in a `OneDrawModule` filled with the draw's kernels."""
    flax_init = nnx.initializers.constant(fill)

    def init(key: jax.Array, shape, dtype=jnp.float32):
        return _Pending(tuple(shape), dtype, fill=fill) if _BUILDING.get() else flax_init(key, shape, dtype)

    return init


class _OneDrawMeta(type(nnx.Module)):
    """The metaclass of `OneDrawModule`: builds the module with its parameters pending, then makes
    them (`_made`). The layers get a throw-away `nnx.Rngs` outside any trace (their initialisers
    take no key here); the caller's `rngs` gives the one key of the draw."""

    def __init__(cls, name, bases, namespace, **kwargs):
        super().__init__(name, bases, namespace, **kwargs)
        # inspect.signature(cls) would otherwise read this metaclass's __call__: (*args, **kwargs).
        init = inspect.signature(cls.__init__)
        cls.__signature__ = init.replace(parameters=list(init.parameters.values())[1:])  # (without self)

    def __call__(cls, *args, **kwargs):
        rngs = kwargs.get("rngs")
        if _BUILDING.get() or not isinstance(rngs, nnx.Rngs):
            return super().__call__(*args, **kwargs)  # a part of a construction under way
        token = _BUILDING.set(True)
        try:
            with jax.ensure_compile_time_eval():
                module = super().__call__(*args, **{**kwargs, "rngs": nnx.Rngs(0)})
        finally:
            _BUILDING.reset(token)
        for path, param in nnx.to_flat_state(nnx.state(module, nnx.Param)):
            if not isinstance(param.get_value(), _Pending):  # drawn from the throw-away Rngs(0)
                raise TypeError(f"{cls.__name__}: parameter {'.'.join(map(str, path))} is not initialised "
                                f"by vdm_jax.models._init's variance_scaling or constant")
        graphdef, state = nnx.split(module)
        return nnx.merge(graphdef, _made(state, rngs.params()))


def _made(state: nnx.State, key: jax.Array) -> nnx.State:
    """`state` with its `_Pending` leaves made: the kernels cut, in order, from one truncated
    normal drawn with `key`. Eagerly the vector is cut on the host (an XLA kernel per parameter
    would compile for longer than the network's forward pass); under a trace, in jnp."""
    leaves, treedef = jax.tree.flatten(state)
    sizes = [math.prod(p.shape) for p in leaves if isinstance(p, _Pending) and p.std is not None]
    normal = _truncated_normal(key, sum(sizes))
    try:
        normal, xp = np.asarray(normal), np
    except jax.errors.TracerArrayConversionError:
        xp = jnp
    cuts = iter(xp.split(normal, np.cumsum(sizes)[:-1]))

    def made(p):
        if not isinstance(p, _Pending):
            return p
        dtype = jnp.dtype(p.dtype)  # also a NumPy dtype, bfloat16 included
        if p.std is None:
            return xp.full(p.shape, p.fill, dtype)
        return (next(cuts).reshape(p.shape) * np.float32(p.std)).astype(dtype)

    values = [made(p) for p in leaves]
    return jax.tree.unflatten(treedef, values if xp is jnp else jax.device_put(values))


@functools.partial(jax.jit, static_argnums=1)
def _truncated_normal(key: jax.Array, n: int) -> jax.Array:
    return jax.random.truncated_normal(key, -2.0, 2.0, (n,), jnp.float32)


class OneDrawModule(nnx.Module, metaclass=_OneDrawMeta):
    """An `nnx.Module` whose `variance_scaling` kernels are cut from one draw per construction
    (see the module docstring). Its constructor takes `rngs` as a keyword argument."""
