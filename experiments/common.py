"""What the experiment entry points share: bad input ends the program with one line `error: ...`,
Ctrl-C or SIGTERM at any moment ends it cleanly, and a process of a run on several processes is
supervised, so that a lost process ends the others with one line (`supervise`)."""
import collections
import os
import re
import signal
import subprocess
import sys
import tempfile
import zipfile

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


def print_help(argv: list[str], config_keys: bool = False) -> None:
    """The entry point's docstring, its flags, and with `config_keys` every `--config.` key with its
    value in the config that `--config=FILE[:VARIANT]` in `argv` (or the flag's default) names, and
    its meaning (`vdm_jax.training.describe_config`, from the schema itself)."""
    from absl import flags

    main = sys.modules["__main__"]
    text = [(main.__doc__ or "").strip(), "", "flags:"]
    for help_text in (flags.FLAGS.main_module_help(), flags.FLAGS.module_help(__name__)):  # (this module's: shared)
        text += [line for line in help_text.splitlines() if line.startswith(" ")]  # (not the modules' names)
    if config_keys:
        from vdm_jax.training.config import describe_config

        spec = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")),
                    flags.FLAGS["config"].default_as_str.strip("'"))
        try:
            config, where = _config_file(spec), f"{spec}'s values"
        except Exception as e:  # noqa: BLE001 - the help still shows the schema
            config, where = None, f"the schema's defaults: {spec} did not load ({_one_line(e)})"
        text += ["", f"config keys ({where}; --config.KEY=VALUE overrides one):", describe_config(config)]
    print("\n".join(text))


def _config_file(spec: str):
    """get_config(VARIANT) of a config file named as `--config=FILE[:VARIANT]` names it."""
    import importlib.util

    path, _, variant = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_help_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variant) if variant else module.get_config()


def parse_flags(argv: list[str], *, config_keys: bool = False) -> list[str]:
    """absl's parser (for `app.run(main, flags_parser=parse_flags)`): a bad or unknown flag, an
    argument that is not a flag, or (with `config_keys`) a mistyped `--config.key` override exits
    with one line `error: ...`; `--help` (or -h, --helpfull) prints the help (`print_help`) and exits 0."""
    from absl import flags

    if any(arg in HELP_FLAGS for arg in argv[1:]):
        print_help(argv, config_keys)
        sys.exit(0)
    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        exit_with_flag_error(e)
    except (AttributeError, KeyError) as e:  # an error inside the config file, or an unknown --config.key
        if not config_keys:
            raise
        unknown_config_key(e)
    if len(rest) > 1:
        sys.exit(f"error: unexpected arguments (not --flags): {' '.join(rest[1:])}")
    return rest


def parse_config_flags(argv: list[str]) -> list[str]:
    """`parse_flags` of a training entry point (its `--config.key` overrides checked and listed in --help)."""
    return parse_flags(argv, config_keys=True)


def define_config_flags(config_file: str, workdir: str | None = None) -> None:
    """`--config=FILE[:VARIANT]` (default `config_file`) with its `--config.key=value` overrides, and
    `--workdir` (required unless given a default): the flags of the training entry points."""
    from absl import flags
    from ml_collections import config_flags

    try:  # ml_collections reads --config.x overrides from sys.argv already here
        config_flags.DEFINE_config_file("config", config_file, "Config file and variant (FILE:VARIANT).",
                                        lock_config=True)
    except (AttributeError, KeyError) as e:
        unknown_config_key(e)
    flags.DEFINE_string("workdir", workdir, "Where checkpoints, TensorBoard logs and samples go.")
    if workdir is None:
        flags.mark_flags_as_required(["workdir"])


def config_from_flags():
    """The config `--config` names, with its overrides applied; bad input exits with one line."""
    from absl import flags

    try:
        return run_or_explain(lambda: flags.FLAGS.config)  # overrides are applied here
    except (AttributeError, KeyError) as e:
        unknown_config_key(e)


def unknown_config_key(e):
    """Exits with one line naming a mistyped --config.key override: its dotted key and the closest."""
    from vdm_jax.training.config import check_key

    for arg in sys.argv[1:]:
        if arg.startswith("--config."):
            try:
                check_key(arg[len("--config."):].split("=", 1)[0])
            except (ValueError, TypeError) as err:
                sys.exit(f"error: {err}")
    text = str(e.args[0] if e.args else e).replace("\\'", "").replace("'", "")  # (not an override: as it came)
    sys.exit(f"error: unknown config key {' '.join(text.split())}")


class _HeldSignal:
    """A SIGINT/SIGTERM handler that records the first signal (the training loop takes the record
    over and stops at the next step it can: `vdm_jax.training.train_and_evaluate`); a second one
    interrupts at once."""

    signum = None

    def __call__(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        name = signal.Signals(signum).name  # (vdm_jax.training.loop.stopping_notice's line: not imported yet)
        print(f"{name}: stopping after the current step and saving a checkpoint; a second Ctrl-C quits at once, "
              "without saving.", file=sys.stderr, flush=True)


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


def read_images_or_statistics(path: str, name: str):
    """('images', uint8 [N, H, W, C]) or ('statistics', (mu, sigma)) from a .npz (no pickles)."""
    import numpy as np

    from vdm_jax.fid import load_statistics

    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name}={path} does not exist.")
    try:
        with np.load(path, allow_pickle=False) as f:  # (never unpickles)
            keys = sorted(f)
            images = f["images"] if "images" in keys else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        why = "it holds pickled Python objects, which are never loaded" if "pickle" in str(e) else _one_line(e)
        raise ValueError(f"{name}={path} is not a readable .npz ({why}): expected uint8 'images' or statistics "
                         "'mu' and 'sigma'.") from None
    if images is not None:
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"{name}={path}: 'images' must be uint8 [N, H, W, 1 or 3], "
                             f"got {images.dtype} {images.shape}.")
        return "images", images
    if "mu" in keys and "sigma" in keys:
        return "statistics", load_statistics(path)
    raise ValueError(f"{name}={path} holds {keys}: expected uint8 'images' or statistics 'mu' and 'sigma'.")


def format_quality(result: dict) -> str:
    """The metrics as a small table (KID's row only where it was computed)."""
    rows = [("FID", f"{result['fid']:.4f}", "")]
    if result.get("kid") is not None:
        rows.append(("KID", f"{result['kid']:.6f}", f"± {result['kid_std']:.6f} (std over subsets)"))
    if result.get("inception_score") is not None:
        rows.append(("Inception Score", f"{result['inception_score']:.4f}",
                     f"± {result['inception_score_std']:.4f} (std over splits)"))
    return "\n".join(f"  {a:<16}{b:>12}  {c}" for a, b, c in rows)


# --- the supervisor of a run on several processes ----------------------------------------------------
# JAX's coordination service aborts every other process when one is lost (a C++ fatal error, its stack
# and every Python thread's, exit status 134). The entry point runs again as a child process of a
# supervisor, which turns that into one line (which process was lost, the last checkpoint, how to
# resume) and exit status `EXIT_LOST`. The child's output passes through unchanged otherwise; signals
# sent to the supervisor reach the child once; the child dies with it. Nothing here imports JAX, so
# the supervising process stays small.

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


def supervise(*, process_id: int, num_processes: int, heartbeat_timeout: int, checkpoints: str | None) -> None:
    """With several processes, the first thing an entry point does once its flags are read: unless this
    is already the supervised child, run this command again as one (`run_supervised`: a lost process
    is one line, not an abort) and exit with its status."""
    if os.environ.get(SUPERVISED) != "1":
        sys.exit(run_supervised(process_id=process_id, num_processes=num_processes,
                                heartbeat_timeout=heartbeat_timeout, checkpoints=checkpoints))


def run_supervised(*, process_id: int = -1, num_processes: int = 0, heartbeat_timeout: int = 100,
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
