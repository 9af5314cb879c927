"""Data parallelism over every device of every host, written once.

A 1-D mesh with a 'data' axis spans all devices (`jax.make_mesh`); batches are sharded over it and
the state is replicated. Steps are compiled with `jax.jit` and these shardings — JAX's current
replacement for `pmap` — so the same code runs on one CPU, one GPU, a TPU host or a pod.
With several processes each host feeds its own share of the batch
(`jax.make_array_from_process_local_data`).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import jax
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices=None) -> jax.sharding.Mesh:
    """A 1-D ('data',) mesh over `devices` (default: all devices of all processes)."""
    # Auto axes: XLA propagates the batch sharding through the model (no explicit-sharding types).
    auto = (jax.sharding.AxisType.Auto,)
    if devices is None:
        return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=auto)
    return jax.sharding.Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=auto)


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh, leading_axes: int = 0) -> NamedSharding:
    """Shards the batch axis, after `leading_axes` unsharded ones (e.g. micro-steps)."""
    return NamedSharding(mesh, P(*([None] * leading_axes), DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh, name: str = "training.batch_size") -> None:
    """Raises ValueError naming `name` unless the batch splits evenly over devices and processes."""
    n = mesh.devices.size
    if not isinstance(global_batch_size, int) or global_batch_size < 1:
        raise ValueError(f"{name} must be a positive int, got {global_batch_size!r}.")
    if global_batch_size % n:
        raise ValueError(f"{name}={global_batch_size} must be divisible by the number of "
                         f"devices ({n}) so that every device gets the same share.")
    if global_batch_size % jax.process_count():
        raise ValueError(f"{name}={global_batch_size} must be divisible by the number of "
                         f"processes ({jax.process_count()}).")


def replicate(tree: Any, mesh) -> Any:
    """Copies a host pytree to every device as replicated global arrays (fresh buffers: the source
    is never aliased, so donating the result is safe). The value must be the same on every host."""
    def put(x):
        return jax.make_array_from_callback(np.shape(x), replicated(mesh), lambda index: np.asarray(x)[index])

    return jax.tree.map(put, jax.device_get(tree))


def global_batch(local_batch: dict[str, np.ndarray], mesh, leading_axes: int = 0) -> dict[str, jax.Array]:
    """Assembles each host's share of a batch into global arrays sharded over the data axis."""
    sharding = batch_sharding(mesh, leading_axes)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def replicated_like(tree: Any, mesh) -> Any:
    """`jax.ShapeDtypeStruct`s of `tree`'s arrays, replicated over `mesh` (a restore target)."""
    rep = replicated(mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), tree)
