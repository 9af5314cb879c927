"""What the experiment entry points share."""
import os
import sys


def run_or_explain(fn, *args):
    """Runs fn; bad input (config, data, work directory, checkpoint) exits with its one-line message.

    Set VDM_JAX_TRACEBACK=1 to see the full traceback instead.
    """
    from vdm_jax.data import DataNotFoundError
    from vdm_jax.training import CheckpointMismatchError, WorkdirError

    try:
        return fn(*args)
    except (ValueError, TypeError, DataNotFoundError, WorkdirError, CheckpointMismatchError) as e:
        if os.environ.get("VDM_JAX_TRACEBACK"):
            raise
        sys.exit(f"error: {e}")
