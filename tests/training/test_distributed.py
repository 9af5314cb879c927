"""Several processes: nothing before `jax.distributed.initialize` starts JAX's backend, and the
entry points' supervisor turns a lost process into one line (`experiments.common.supervise`).

The two-process runs themselves (train like one process; a process killed mid-run) are in
test_resume.py, with the other guarantees of long runs.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from experiments import common
from vdm_jax.training.config import PLACEMENT, config_changes, default_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A fresh interpreter takes every step a run could take before `jax.distributed.initialize` (imports,
# every shipped config checked, the data read and checked; not the training iterator, which needs
# this process's index), then the loop's own start: `train_and_evaluate` of the `vdm` config with training.distributed=True, stopped
# right after the initialisation. Any of them starting the backend fails the initialisation.
_START_UP = """
import socket, sys
import jax
import experiments.common, experiments.evaluate
from experiments.configs import cifar10, quickstart
from vdm_jax.data import load_source
from vdm_jax.training import check_config, train_and_evaluate, validate_config
from vdm_jax.training import loop
from vdm_jax.training.evaluation import check_images
sys.path.insert(0, "tests/training")
import micro_config

configs = [cifar10.get_config(v) for v in cifar10.VARIANTS] + [quickstart.get_config()]
configs += [micro_config.get_config(f) for f in ("ddpm", "vdm")]
dtypes = [c.model.dtype for c in configs]  # 'auto' but for the official VDM runs (float32)
assert dtypes == ["auto", "float32", "float32"] + ["auto"] * (len(configs) - 3), dtypes
for c in configs:
    check_config(c)
source = load_source("digits", "train")
check_images(source, (8, 8, 1), "digits")

class Initialised(Exception):
    pass

def initialise_then_stop(*args):
    real(*args)
    raise Initialised

real, loop.initialize_distributed = loop.initialize_distributed, initialise_then_stop
with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
config = cifar10.get_config("vdm")
config.training.update(distributed=True, coordinator_address=f"localhost:{port}", num_processes=1, process_id=0)
try:
    train_and_evaluate(config, sys.argv[1])
except Initialised:
    pass
assert jax.process_count() == 1 and jax.distributed.is_initialized()
print("dtypes", sorted({validate_config(c).dtype for c in configs}))
"""


@pytest.mark.slow(15)
def test_nothing_before_the_distributed_initialisation_starts_jax(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-c", _START_UP, str(tmp_path / "run")], cwd=REPO,
                          env=dict(env, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dtypes ['float32']" in proc.stdout  # 'auto' resolved once the backend started: a CPU's
    assert not (tmp_path / "run").exists()  # (stopped before the work directory was made)


def test_initialising_after_the_backend_started_names_the_fix():
    code = ("import jax; jax.devices()\n"
            "from vdm_jax.training import initialize_distributed\n"
            "initialize_distributed('localhost:1', 2, 1)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "call vdm_jax.training.initialize_distributed first" in proc.stderr.splitlines()[-1]


def test_where_a_run_executes_is_not_a_config_change():
    old = json.loads(json.dumps(default_config().to_dict(), default=list))  # (as config.json holds it)
    new = default_config()
    new.training.update(distributed=True, coordinator_address="host:1234", num_processes=4, process_id=3,
                        heartbeat_timeout=30)
    assert {name.rpartition(".")[2] for name in PLACEMENT} == {
        "distributed", "coordinator_address", "num_processes", "process_id", "heartbeat_timeout"}
    assert config_changes(old, new.to_dict()) == []
    new.training.batch_size = 64
    assert config_changes(old, new.to_dict()) == ["training.batch_size: 128 -> 64"]


# --- the supervisor, with children that play the part of a run's process ---------------------------

# What JAX printed when process 1 of 2 was killed (jax 0.10.2, process 0's standard error), then abort.
_JAX_ABORT = r'''
import os, sys
print("resuming from step 3", file=sys.stderr, flush=True)
print("step 4/12", flush=True)
sys.stderr.write("""E1207 13:33:42.077446    2729 coordination_service.cc:1549] [14729936790937123] Use error polling to propagate the following error to all tasks: UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):
1
The tasks have crashed. Check the task logs for an earlier error, or scheduler events (e.g. preemption, eviction) to debug further. [type.googleapis.com/tensorflow.CoordinationServiceError='']
F1207 13:33:42.078542    2740 client.h:80] Terminating process because the JAX distributed service detected fatal errors. This most likely indicates that another task died; see the other task logs for more details.
*** Check failure stack trace: ***
    @     0x7fcd95320634  absl::lts_20260107::log_internal::LogMessage::SendToLog()
Fatal Python error: Aborted

Thread 0x00007f0b (most recent call first):
  File "loop.py", line 380 in _train
""")
sys.stderr.flush()
os.abort()
'''

# Process 1's view when process 0 (the coordinator) was killed.
_COORDINATOR_GONE = r'''
import os, sys
sys.stderr.write("""E1207 13:34:17.044408    2826 coordination_service_agent.cc:289] Polled an error from coordination service (this can be an error from this or another task).
F1207 13:34:17.044464    2826 client.h:80] Terminating process because the JAX distributed service detected fatal errors. This most likely indicates that another task died; see the other task logs for more details.
Additional GRPC error information from remote target coordination_service while calling /xla.coordination.CoordinationService/PollForError:
:UNKNOWN:Error received from peer  {grpc_message:"Socket closed", grpc_status:14}
""")
sys.stderr.flush()
os.abort()
'''

# A collective's connection to the lost process broken first (gloo, on CPUs), before JAX's verdict.
_GLOO_CRASH = r'''
import os, sys
sys.stderr.write("""terminate called after throwing an instance of 'gloo::IoException'
  what():  [external/gloo/gloo/transport/tcp/pair.cc:598] Connection closed by peer [127.0.0.1]:4321
""")
sys.stderr.flush()
os.abort()
'''

# A failure of the program itself: its traceback is passed on whole, with its exit status.
_OWN_ERROR = r'''
import sys
print("a warning", file=sys.stderr)
raise ValueError("a bug of its own")
'''


def _supervise(tmp_path, capfd, child: str, **kwargs):
    """`run_supervised` over `child` (Python source), here; (status, stdout, stderr)."""
    (tmp_path / "child.py").write_text(child)
    checkpoints = tmp_path / "checkpoints"
    for step in ("3", "6.orbax-checkpoint-tmp-12"):  # a finished step and one being written
        (checkpoints / step).mkdir(parents=True, exist_ok=True)
    capfd.readouterr()
    status = common.run_supervised(command=[sys.executable, str(tmp_path / "child.py")], checkpoints=str(checkpoints),
                                   **kwargs)
    out, err = capfd.readouterr()
    return status, out, err


@pytest.mark.parametrize("child, kwargs, line", [
    (_JAX_ABORT, dict(process_id=0, num_processes=2, heartbeat_timeout=10),
     "error: process 1 of 2 stopped sending heartbeats (for 10 s), so process 0 stopped too. The last checkpoint, "
     "step 3 in {checkpoints}, is intact: start every process again with the same command to resume (a new "
     "coordinator port is fine). JAX's report: "),
    (_COORDINATOR_GONE, dict(process_id=1, num_processes=2),
     "error: process 0 of 2, the coordinator, is gone, so process 1 stopped too. The last checkpoint, step 3 in "
     "{checkpoints}, is intact"),
    (_JAX_ABORT, dict(),  # auto-detected process index and count
     "error: process 1 stopped sending heartbeats (for 100 s), so this process stopped too."),
    (_GLOO_CRASH, dict(process_id=0, num_processes=2),
     "error: another process of 2 stopped or was lost, so process 0 stopped too. The last checkpoint, step 3"),
])
def test_a_lost_process_is_one_line(tmp_path, capfd, child, kwargs, line):
    status, out, err = _supervise(tmp_path, capfd, child, **kwargs)
    assert status == common.EXIT_LOST
    assert out == ("step 4/12\n" if child is _JAX_ABORT else "")  # standard output untouched
    lines = err.splitlines()
    assert lines[0] == "resuming from step 3" or child is not _JAX_ABORT  # what came before, as it came
    last = lines[-1]
    assert last.startswith(line.format(checkpoints=tmp_path / "checkpoints")), last
    assert len(lines) == (2 if child is _JAX_ABORT else 1)  # JAX's abort and the threads' stacks: not shown...
    report = last.rsplit("JAX's report: ", 1)[1]
    with open(report) as f:  # ... but kept
        assert child.split('"""')[1].splitlines()[0] in f.read()
    os.remove(report)


def test_the_childs_own_failure_passes_through(tmp_path, capfd):
    handlers = [signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)]
    status, out, err = _supervise(tmp_path, capfd, _OWN_ERROR)
    assert [signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)] == handlers
    assert status == 1
    assert err.startswith("a warning\nTraceback (most recent call last):")
    assert err.rstrip().endswith("ValueError: a bug of its own")


_SLEEPER = r'''
import signal, sys, time
def handle(signum, frame):
    print(f"got {signal.Signals(signum).name}", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, handle)
print("ready", flush=True)
time.sleep(60)
'''


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_signals_reach_the_child_once_and_it_dies_with_the_supervisor(tmp_path, how):
    """SIGTERM to the supervisor (a scheduler's preemption notice) reaches the child once; SIGKILL
    of the supervisor (its host gone) kills the child too."""
    (tmp_path / "child.py").write_text(_SLEEPER)
    code = ("import sys\nfrom experiments import common\n"
            f"sys.exit(common.run_supervised(command=[sys.executable, {str(tmp_path / 'child.py')!r}]))")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) == 1
    proc.send_signal(getattr(signal, how))
    out, _ = proc.communicate(timeout=60)
    if how == "SIGTERM":
        assert (proc.returncode, out) == (0, "got SIGTERM\n")
    else:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(children[0]):
            time.sleep(0.05)
        assert not _alive(children[0]), "the child outlived its supervisor"


def _alive(pid: str) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # (a zombie has died)
    except FileNotFoundError:
        return False
