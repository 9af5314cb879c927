"""What the experiment entry points share."""
import os
import sys


def run_or_explain(fn, *args):
    """Runs fn; bad input (config, data, work directory, checkpoint) exits with its one-line message.

    Set VDM_JAX_TRACEBACK=1 to see the full traceback instead.
    """
    from vdm_jax.data import DataNotFoundError
    from vdm_jax.training import CheckpointMismatchError, RunNotFoundError, WorkdirError

    try:
        return fn(*args)
    except (ValueError, TypeError, DataNotFoundError, WorkdirError, CheckpointMismatchError,
            RunNotFoundError) as e:
        if os.environ.get("VDM_JAX_TRACEBACK"):
            raise
        sys.exit(f"error: {e}")


def exit_with_flag_error(e: Exception):
    """Exits with absl's message about a bad flag value, in one line."""
    lines = str(e).strip().splitlines()
    sys.exit("error: " + (f"{lines[0]} {lines[-1].strip()}" if len(lines) > 1 else lines[0]))
