"""Runs on several processes: JAX's distributed runtime started first, and a lost process ending the
run on every host in bounded time, with one line that says so.

- `initialize_distributed` calls `jax.distributed.initialize` with the run's heartbeat timeout. It
  must come before anything starts JAX's backend; vdm_jax's imports, config checks
  (`check_config`) and data checks start none, so the entry points call it right after them.
- JAX's coordination service notices a process that stops sending heartbeats (killed, preempted, its
  host gone) within `heartbeat_timeout` seconds and aborts every other process: a C++ fatal error,
  its stack and every Python thread's, with exit status 134. `supervise` runs the entry point again
  as a child process and turns that into one line (which process was lost, the last checkpoint,
  how to resume) and exit status `EXIT_LOST`. The child's output passes through unchanged
  otherwise; signals sent to the supervisor reach the child once; the child dies with it.

`supervise` imports nothing of JAX's, so the supervising process stays small.
"""
from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
import tempfile

SUPERVISED = "VDM_JAX_SUPERVISED"
"""The environment variable that marks the supervised child (so that it does not supervise again)."""

EXIT_LOST = 75
"""The exit status of a process stopped because another process of the run was lost (EX_TEMPFAIL:
start every process again to resume)."""

# The output of a failure: held back from its first line (an error or fatal line of XLA's C++ log, a
# C++ or Python crash, a Python traceback) to the child's end, then passed on, or summarised if it
# says another process was lost (JAX's coordination service, or the collectives' connection to it).
_HOLD = re.compile(rb"^(?:[EF]\d{4} [\d:.]+ +\d+ \S+:\d+\]|Traceback \(most recent call last\)|Fatal Python error"
                   rb"|terminate called)")
_FATAL = re.compile(rb"JAX distributed service detected fatal errors|tasks are unhealthy"
                    rb"|[Gg]loo.*(?:Connection reset|Connection closed|Read error|Write error|Socket closed)")
_UNHEALTHY = re.compile(rb"tasks are unhealthy[^:]*:\s*((?:\d+[\s,]*)+)")


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


def supervised() -> bool:
    """Whether this process is the child that `supervise` started."""
    return os.environ.get(SUPERVISED) == "1"


def supervise(*, process_id: int = -1, num_processes: int = 0, heartbeat_timeout: int = 100,
              checkpoints: str | None = None, command: list[str] | None = None) -> int:
    """Runs this program's command line again as a child process and returns the exit status to
    end with: the child's, or `EXIT_LOST` after one line on standard error if it was stopped
    because another process of the run was lost.

    Args:
      process_id, num_processes, heartbeat_timeout: the run's settings, for the line (-1 and 0:
        auto-detected, unknown here).
      checkpoints: the run's checkpoint directory, whose newest step the line names (None: the
        program writes no checkpoints).
      command: the child's command line (default: this program's own, `sys.orig_argv`).
    """
    command = command or [sys.executable, *sys.orig_argv[1:]]
    prctl = _parent_death_signal()
    child = subprocess.Popen(command, env={**os.environ, SUPERVISED: "1"}, stderr=subprocess.PIPE,
                             start_new_session=True,  # (a terminal's Ctrl-C reaches it once: forwarded by us)
                             preexec_fn=prctl)
    pending = [getattr(signal.getsignal(sig), "signum", None) for sig in (signal.SIGINT, signal.SIGTERM)]

    def forward(signum, frame):
        child.send_signal(signum)

    before = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        for signum in filter(None, pending):  # a signal during our own start-up (`experiments.common.hold_signals`)
            child.send_signal(signum)
        held, tail = [], collections.deque(maxlen=2000)  # (what is not shown yet; the last lines, for the verdict)
        for line in child.stderr:
            tail.append(line)
            if held or _HOLD.match(line):
                held.append(line)
            else:
                os.write(2, line)
        status = child.wait()
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    text = b"".join(tail)
    if status == 0 or not _FATAL.search(text):
        os.write(2, b"".join(held))
        return status if status >= 0 else 128 - status
    fd, report = tempfile.mkstemp(prefix="vdm_jax_lost_process_", suffix=".log")
    with os.fdopen(fd, "wb") as f:
        f.write(text)
    print(_lost_line(text, process_id, num_processes, heartbeat_timeout, checkpoints, report), file=sys.stderr,
          flush=True)
    return EXIT_LOST


def _lost_line(text: bytes, process_id: int, num_processes: int, heartbeat_timeout: int, checkpoints: str | None,
               report: str) -> str:
    """The one line that says which process was lost, what is saved, and how to resume."""
    of = f" of {num_processes}" if num_processes else ""
    me = f"process {process_id}" if process_id >= 0 else "this process"
    unhealthy = _UNHEALTHY.search(text)
    if unhealthy:
        lost = sorted({int(n) for n in re.findall(rb"\d+", unhealthy.group(1))})
        who = (f"process{'es' if len(lost) > 1 else ''} {', '.join(map(str, lost))}{of} stopped sending heartbeats "
               f"(for {heartbeat_timeout} s)")
    elif process_id != 0 and re.search(rb"PollForError|[Hh]eartbeat", text):
        who = f"process 0{of}, the coordinator, is gone"
    else:
        who = f"another process{of} stopped or was lost"
    if checkpoints is None:
        saved = "Nothing was left half-written: run the command again on every process"
    else:
        step = _latest_step(checkpoints)
        saved = (f"No checkpoint was saved in {checkpoints}" if step is None
                 else f"The last checkpoint, step {step} in {checkpoints}, is intact")
        saved += ": start every process again with the same command to resume (a new coordinator port is fine)"
    return f"error: {who}, so {me} stopped too. {saved}. JAX's report: {report}"


def _latest_step(checkpoints: str) -> int | None:
    """The newest complete step in an orbax checkpoint directory (a step being written has another name)."""
    try:
        from etils import epath  # (orbax's path library: local paths and gs:// alike)

        steps = [int(p.name) for p in epath.Path(checkpoints).iterdir() if p.name.isdigit()]
    except (OSError, ImportError):
        return None
    return max(steps, default=None)


def _parent_death_signal():
    """A `preexec_fn` that has Linux kill the child with SIGKILL when its parent dies (so killing the
    supervisor, as a preempted host would be, ends the run's process too); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl, parent = ctypes.CDLL(None, use_errno=True).prctl, os.getpid()  # (looked up before the fork)
    pr_set_pdeathsig = 1

    def set_signal():
        prctl(pr_set_pdeathsig, int(signal.SIGKILL))
        if os.getppid() != parent:  # the parent died before the signal was set
            os._exit(1)

    return set_signal
