"""Runs on several processes: JAX's distributed runtime started first, with a bound on how long the
others run on when one is lost.

`initialize_distributed` calls `jax.distributed.initialize` with the run's heartbeat timeout. It must
come before anything starts JAX's backend; vdm_jax's imports, config checks (`check_config`) and data
checks start none, so the entry points call it right after them. JAX's coordination service notices
a process that stops sending heartbeats (killed, preempted, its host gone) within `heartbeat_timeout`
seconds and aborts every other process (a C++ fatal error, exit status 134); the entry points run
under a supervising process that turns that into one line (`experiments.common.supervise`).
"""
from __future__ import annotations


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
                           heartbeat_timeout: int = 100) -> None:
    """`jax.distributed.initialize` with vdm_jax's settings ('' / 0 / -1: auto-detect on Cloud TPU,
    SLURM and Open MPI); nothing if it has been called already (e.g. by the user's own script).

    `heartbeat_timeout` (seconds) bounds how long the others run on after a process is lost; it is
    also the shutdown barrier's wait for processes that end later than this one.
    """
    import jax

    if jax.distributed.is_initialized():
        return
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address or None,
                                   num_processes=num_processes or None,
                                   process_id=None if process_id < 0 else process_id,
                                   heartbeat_timeout_seconds=heartbeat_timeout,
                                   shutdown_timeout_seconds=heartbeat_timeout)
    except RuntimeError as e:
        if "must be called before" not in str(e):
            raise
        raise RuntimeError("jax.distributed.initialize must come before anything that starts JAX's backend, and "
                           "something here started it (a computation, jax.devices(), jax.default_backend(), ...). In "
                           "your own script, call vdm_jax.training.initialize_distributed first.") from None
