"""What the experiment entry points share: bad input ends the program with one line `error: ...`,
and Ctrl-C or SIGTERM at any moment ends it cleanly."""
import os
import signal
import sys

# absl is imported inside the functions: the training entry points import this module first thing
# for `hold_signals`, and until it is installed a Ctrl-C is Python's default (a traceback).


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in str(text).strip().splitlines() if line.strip())


def start_jax() -> None:
    """What an entry point's `main` does before JAX's first computation: vdm_jax's XLA:CPU flags
    into XLA_FLAGS (`vdm_jax.set_cpu_xla_flags`; XLA reads them when its backends start)."""
    from vdm_jax import set_cpu_xla_flags

    set_cpu_xla_flags()


def run_or_explain(fn, *args):
    """Runs fn; bad input (config, data, files, work directory, checkpoint) exits with one line.

    Set VDM_JAX_TRACEBACK=1 to see the full traceback instead.
    """
    try:
        return fn(*args)
    # The project's own errors subclass these: DataNotFoundError, RunNotFoundError and WorkdirError
    # are OSErrors, CheckpointMismatchError a ValueError. Other OSErrors (a missing config file, an
    # output path that is a file, a full disk) are the environment's, not bugs: one line too.
    # A run that stopped on a non-finite step, or whose checkpoints are all damaged, says so too.
    except Exception as e:  # noqa: BLE001 - re-raised below unless it is one of those
        import pickle

        from vdm_jax.training import CorruptCheckpointError, NonFiniteError

        # (UnpicklingError: a weights file that is not a torch state dict, or one naming other code.)
        explained = (ValueError, TypeError, OSError, NonFiniteError, CorruptCheckpointError, pickle.UnpicklingError)
        if not isinstance(e, explained) or os.environ.get("VDM_JAX_TRACEBACK"):
            raise
        sys.exit(f"error: {_one_line(e)}")


def exit_with_flag_error(e: Exception):
    """Exits with absl's message about a bad flag value, in one line."""
    lines = str(e).strip().splitlines()
    sys.exit("error: " + (f"{lines[0]} {lines[-1].strip()}" if len(lines) > 1 else lines[0]))


HELP_FLAGS = ("-h", "-?", "--help", "--helpshort", "--helpfull", "--help=true")


def print_help(config_keys: bool = False) -> None:
    """The entry point's docstring, its flags, and with `config_keys` every `--config.` key with its
    default and meaning (`vdm_jax.training.describe_config`, from the schema itself)."""
    from absl import flags

    main = sys.modules["__main__"]
    text = [(main.__doc__ or "").strip(), "", "flags:"]
    text += [line for line in flags.FLAGS.main_module_help().splitlines()[1:]
             if line.strip() and not line.startswith("Try --helpfull")]
    if config_keys:
        from vdm_jax.training.config import describe_config

        text += ["", "config keys (the schema's defaults; the config file's variant changes some):", describe_config()]
    print("\n".join(text))


def parse_flags(argv: list[str], *, config_keys: bool = False) -> list[str]:
    """absl's parser (for `app.run(main, flags_parser=parse_flags)`): a bad or unknown flag, or an
    argument that is not a flag, exits with one line `error: ...`; `--help` (or -h, --helpfull)
    prints the help (`print_help`) and exits 0."""
    from absl import flags

    if any(arg in HELP_FLAGS for arg in argv[1:]):
        print_help(config_keys)
        sys.exit(0)
    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        exit_with_flag_error(e)
    if len(rest) > 1:
        sys.exit(f"error: unexpected arguments (not --flags): {' '.join(rest[1:])}")
    return rest


class _HeldSignal:
    """A SIGINT/SIGTERM handler that records the first signal (the training loop takes the record
    over and stops at the next step it can: `vdm_jax.training.train_and_evaluate`); a second one
    interrupts at once."""

    signum = None

    def __call__(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum


def hold_signals() -> None:
    """Installs `_HeldSignal` for SIGINT and SIGTERM: the first thing a training entry point does,
    so that a signal during its imports, start-up or compilation is honoured, not lost or fatal."""
    handler = _HeldSignal()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


def run_app(main, flags_parser) -> None:
    """`app.run(main, flags_parser=...)`, ending a KeyboardInterrupt with one line and exit status 130
    (at once: no interpreter teardown under the data and checkpoint threads)."""
    from absl import app

    try:
        app.run(main, flags_parser=flags_parser)
    except KeyboardInterrupt:
        print("interrupted.", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(130)


def supervise(*, process_id: int, num_processes: int, heartbeat_timeout: int, checkpoints: str | None) -> None:
    """With several processes, the first thing an entry point does once its flags are read: unless this
    is already the supervised child, run this command again as one
    (`vdm_jax.training.distributed.supervise`: a lost process is one line, not an abort) and exit
    with its status."""
    from vdm_jax.training import distributed

    if not distributed.supervised():
        sys.exit(distributed.supervise(process_id=process_id, num_processes=num_processes,
                                       heartbeat_timeout=heartbeat_timeout, checkpoints=checkpoints))


def _define_distributed_flags() -> None:
    """The evaluation commands' flags for running as one of several processes (as training's
    `training.distributed`, `coordinator_address`, `num_processes`, `process_id`, `heartbeat_timeout`)."""
    from absl import flags

    main = {"module_name": sys.argv[0]}  # (listed with the command's own flags by --help)
    flags.DEFINE_boolean("distributed", False, "Run as one of several processes (jax.distributed.initialize; "
                         "docs/scaling.md): the same command on every host.", **main)
    flags.DEFINE_string("coordinator_address", "", "--distributed: host:port of process 0 ('': auto-detect on Cloud "
                        "TPU, SLURM, MPI).", **main)
    flags.DEFINE_integer("num_processes", 0, "--distributed: processes (0: auto-detect).", lower_bound=0, **main)
    flags.DEFINE_integer("process_id", -1, "--distributed: this process's index (-1: auto-detect).", lower_bound=-1,
                         **main)
    flags.DEFINE_integer("heartbeat_timeout", 100, "--distributed: seconds without a heartbeat after which a process "
                         "counts as lost and the others stop.", lower_bound=1, **main)


def run_command(fn) -> None:
    """The whole `__main__` of an evaluation command (evaluate, fid, fid_stats): its flags parsed
    (`parse_flags`; with `--distributed` and the other flags of several processes), absl's logs at
    WARNING, vdm_jax's XLA flags (`start_jax`), JAX's distributed runtime with --distributed, then
    `fn(FLAGS)` with bad input explained in one line (`run_or_explain`) and Ctrl-C ending it (`run_app`)."""
    from absl import flags, logging

    _define_distributed_flags()

    def main(argv):
        del argv  # parse_flags has rejected anything but flags
        logging.set_verbosity(logging.WARNING)
        start_jax()
        f = flags.FLAGS
        if f.distributed:
            from vdm_jax.training import initialize_distributed

            supervise(process_id=f.process_id, num_processes=f.num_processes, heartbeat_timeout=f.heartbeat_timeout,
                      checkpoints=None)
            run_or_explain(initialize_distributed, f.coordinator_address, f.num_processes, f.process_id,
                           f.heartbeat_timeout)
        run_or_explain(fn, f)

    run_app(main, parse_flags)
