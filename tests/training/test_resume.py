"""Never lose a run: SIGTERM saves and exits cleanly; a run killed at any step and restarted ends
bitwise equal to the uninterrupted one; two processes train exactly like one; a data error saves first.

The runs are the real entry point (`python -m experiments.cifar10`) on the micro config
(`micro_config.get_config`: 12 steps on the digits, a metrics line every step, checkpoints every 3).
"""
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import jax
import pytest

from vdm_jax.training import generate_samples, load_checkpoint, make_mesh, train_and_evaluate
from vdm_jax.training.evaluation import read_config
from vdm_jax.training import loop as loop_module

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MICRO_CONFIG_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "micro_config.py")


def _env(devices: int = 8) -> dict:
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    return dict(os.environ, XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}".strip(),
                JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
                JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "",
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")


def _launch(workdir, *flags, devices: int = 8, family: str = "ddpm") -> subprocess.Popen:
    cmd = [sys.executable, "-m", "experiments.cifar10", f"--workdir={workdir}", f"--config={MICRO_CONFIG_FILE}:{family}",
           *flags]
    return subprocess.Popen(cmd, cwd=REPO, env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _logged_steps(workdir) -> list[int]:
    try:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            lines = f.readlines()
    except FileNotFoundError:
        return []
    steps = []
    for line in lines:
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:  # a line being written
            pass
    return steps


def _wait_for_step(proc: subprocess.Popen, workdir, step: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended before step {step}: {proc.communicate()[1][-3000:]}"
        if max(_logged_steps(workdir), default=0) >= step:
            return
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"no step {step} within {timeout} s")


def _finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _metrics(workdir) -> dict[int, dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r for r in records if "loss" in r}


def _final_arrays(workdir):
    _, state = load_checkpoint(str(workdir))
    return jax.device_get(state.checkpoint_tree())


@pytest.mark.slow(50)
@pytest.mark.parametrize("family", ["ddpm", "vdm"])  # vdm: a learned schedule and masked AdamW state too
def test_sigterm_then_sigkill_then_resume_is_bitwise_the_uninterrupted_run(tmp_path, uninterrupted, family):
    ref_dir, _ = uninterrupted(family)
    workdir = tmp_path / "interrupted"
    launch = functools.partial(_launch, family=family)

    # 1. SIGTERM mid-run: a last checkpoint, a message, exit status 0.
    run = launch(workdir)
    _wait_for_step(run, workdir, 2)
    run.send_signal(signal.SIGTERM)
    code, out, err = _finish(run)
    assert code == 0, err[-3000:]
    saved = int(re.search(r"SIGTERM received: checkpoint saved at step (\d+); rerun to resume\.", out).group(1))
    assert 2 <= saved < 12 and str(saved) in os.listdir(workdir / "checkpoints")
    assert ("SIGTERM: stopping after the current step and saving a checkpoint; a second Ctrl-C quits at once, "
            "without saving.") in err  # (printed as the signal came, before the step ended)

    # 2. Resume, then SIGKILL a few steps later: whatever it was doing (a step, a save) is lost.
    run = launch(workdir)
    _wait_for_step(run, workdir, saved + 4)
    run.kill()
    code, _, err = _finish(run)
    assert code == -signal.SIGKILL
    assert f"resuming from step {saved} in {workdir}" in err
    killed_at = max(_logged_steps(workdir))
    assert killed_at < 12, "the run finished before it was killed"

    # 3. Resume to the end.
    code, out, err = _finish(launch(workdir))
    assert code == 0, err[-3000:]
    resumed = int(re.search(r"resuming from step (\d+)", err).group(1))
    assert saved <= resumed <= killed_at  # == saved when the kill landed while step 6 was being saved
    assert "step 12: test bpd" in out
    assert not [d for d in os.listdir(workdir / "checkpoints") if "tmp" in d]  # killed saves cleaned up

    # Bitwise the uninterrupted run: step, parameters, EMA, optimiser state, fault record.
    ref, got = _final_arrays(ref_dir), _final_arrays(workdir)
    assert jax.tree.structure(ref) == jax.tree.structure(got)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
        np.testing.assert_array_equal(a, b)
    # Every step logged once (the killed run's extra lines were dropped), with the same losses.
    with open(workdir / "metrics.jsonl") as f:
        train_lines = [r["step"] for r in map(json.loads, f) if "loss" in r]
    assert train_lines == list(range(1, 13))
    ref_metrics, got_metrics = _metrics(ref_dir), _metrics(workdir)
    assert sorted(got_metrics) == sorted(ref_metrics) == list(range(1, 13))
    for step in ref_metrics:
        assert got_metrics[step]["loss"] == ref_metrics[step]["loss"]
        assert got_metrics[step]["grad_norm"] == ref_metrics[step]["grad_norm"]


@pytest.mark.slow(25)
def test_a_full_disk_stops_with_one_line_and_a_rerun_with_space_ends_bitwise_the_uninterrupted_run(
        tmp_path, reference, small_disk):
    """The work directory on a 1.3 MB disk, which holds two of the micro run's checkpoints: the
    third fails with one line naming the step, the directory and the last complete step, exit
    status 1; with the disk made larger the rerun resumes from that step and ends bitwise equal to
    the uninterrupted run."""
    workdir = small_disk("1300k") / "run"
    code, out, err = _finish(_launch(workdir))
    assert code == 1
    assert err.splitlines() == ["compiling the train step (its first call takes a while) ...",
                                f"error: could not save the checkpoint at step 9 in {workdir / 'checkpoints'}: no space "
                                "left on device. Training stopped; the last complete checkpoint is step 6; rerun to "
                                "resume from it once there is space (or with a --workdir on another disk)."], err[-3000:]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]

    small_disk.resize("8m")
    code, out, err = _finish(_launch(workdir))
    assert code == 0, err[-3000:]
    assert f"resuming from step 6 in {workdir}" in err and "step 12: test bpd" in out
    ref, got = _final_arrays(reference[0]), _final_arrays(workdir)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow(6)
@pytest.mark.parametrize("delay", [0.3, 4.0])
def test_a_signal_during_start_up_stops_cleanly(tmp_path, delay):
    """SIGINT while the entry point imports, builds the state or compiles: it is honoured once the
    current step or compilation is done, with one line and exit status 0, no traceback or crash;
    a run stopped before its first step leaves no work directory behind."""
    workdir = tmp_path / "run"
    # Enough steps that the signal lands before the end however warm the compilation cache: the micro
    # config's 12 steps can finish within the 4 s, the signal then landing in the end-of-run evaluation.
    run = _launch(workdir, "--config.training.num_steps=200")
    time.sleep(delay)
    run.send_signal(signal.SIGINT)
    code, out, err = _finish(run)
    assert code == 0, err[-3000:]
    assert "Traceback" not in err and "Fatal" not in err, err[-3000:]
    assert err.count("SIGINT: stopping after the current step and saving a checkpoint") == 1, err[-3000:]
    if "SIGINT received before training started: stopped at step 0; nothing new was saved." in out:
        assert not os.path.exists(workdir)
    else:  # the first call had finished (a warm compilation cache): its steps are saved
        saved = int(re.search(r"SIGINT received: checkpoint saved at step (\d+); rerun to resume\.", out).group(1))
        assert 1 <= saved < 200 and str(saved) in os.listdir(workdir / "checkpoints")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch_processes(workdir, *flags, count: int = 2) -> list[subprocess.Popen]:
    """`count` processes of 4 CPU devices each, joined on a fresh localhost port, as docs/scaling.md
    says to run them on one machine (each its own supervisor and the run's process under it)."""
    address = f"localhost:{_free_port()}"
    return [_launch(workdir, "--config.training.distributed=True", f"--config.training.coordinator_address={address}",
                    f"--config.training.num_processes={count}", f"--config.training.process_id={i}", *flags,
                    devices=4)
            for i in range(count)]


@pytest.fixture(scope="session")
def two_processes(once_per_run):
    """(work directory, [(status, stdout, stderr)] of each process) of the micro ddpm run on two
    processes of 4 devices, uninterrupted, run once for the whole test run."""
    def make(directory):
        results = [_finish(p) for p in _launch_processes(directory / "run")]
        (directory / "results.json").write_text(json.dumps(results))

    directory = once_per_run("two_processes", make)
    return directory / "run", json.loads((directory / "results.json").read_text())


@pytest.mark.slow(45)
def test_two_processes_of_four_devices_train_like_one_of_eight(reference, two_processes):
    ref_dir, ref_summary = reference
    workdir, results = two_processes
    for code, _, err in results:
        assert code == 0, err[-3000:]
    out = results[0][1]
    assert "over 297 images" in out
    bpd = float(re.search(r"test bpd ([0-9.]+)", out).group(1))
    assert bpd == pytest.approx(ref_summary["eval"]["eval/total_bpd"], rel=1e-4)

    ref_metrics, got_metrics = _metrics(ref_dir), _metrics(workdir)
    assert sorted(got_metrics) == list(range(1, 13))
    for step in ref_metrics:
        np.testing.assert_allclose(got_metrics[step]["loss"], ref_metrics[step]["loss"], rtol=1e-5)
    # The gradient all-reduce crosses processes (gloo) in another order than within one process,
    # so sums differ in the last bits; 12 Adam steps (each moving a weight by up to lr = 1e-3)
    # carry that to ~2e-5 at most (measured 1.7e-5). 5e-5 is 5% of one step.
    ref, got = _final_arrays(ref_dir), _final_arrays(workdir)
    np.testing.assert_array_equal(got["step"], ref["step"])
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5)


HEARTBEAT_TIMEOUT = 10  # s (the default is 100): a lost process is noticed within this


@pytest.mark.slow(70)
def test_a_lost_process_stops_the_other_in_bounded_time_and_a_restart_resumes_exactly(tmp_path, two_processes):
    """Process 1 killed with SIGKILL after the first checkpoint (its host gone): process 0 exits
    within the heartbeat timeout with one line naming the lost process and the intact checkpoint;
    both restarted on another port resume from it and end bitwise equal to the uninterrupted run of
    the same two processes."""
    ref_dir, _ = two_processes
    workdir = tmp_path / "lost"
    flags = (f"--config.training.heartbeat_timeout={HEARTBEAT_TIMEOUT}",  # (the final checkpoint is what counts)
             "--config.training.eval_at_end=False", "--config.training.sample_at_end=False")
    first, second = _launch_processes(workdir, *flags)
    _wait_for_step(first, workdir, 3)
    deadline = time.monotonic() + 120
    while not (workdir / "checkpoints" / "3").is_dir():  # (saved in the background)
        assert time.monotonic() < deadline and first.poll() is None, "no checkpoint at step 3"
        time.sleep(0.02)
    second.kill()  # the supervisor: the run's process under it dies with it
    killed = time.monotonic()
    code, _, err = _finish(first)
    waited = time.monotonic() - killed
    assert code == 75, f"{err[:3000]}\n...\n{err[-3000:]}"  # EXIT_LOST: start every process again
    assert waited < HEARTBEAT_TIMEOUT + 15, f"process 0 took {waited:.1f} s to stop"
    last = err.strip().splitlines()[-1]
    saved = int(re.match(rf"error: process 1 of 2 stopped sending heartbeats \(for {HEARTBEAT_TIMEOUT} s\), so process 0 stopped "
                         r"too\. The last checkpoint, step (\d+) in (\S+), is intact: start every process again", last,
                         ).group(1))
    assert saved >= 3 and "Fatal Python error" not in err and "Check failure" not in err
    os.remove(last.rsplit("JAX's report: ", 1)[1])  # (JAX's own account, kept in a temporary file)
    _finish(second)

    results = [_finish(p) for p in _launch_processes(workdir, *flags)]  # (another coordinator port)
    for code, _, err in results:
        assert code == 0, err[-3000:]
    err = results[0][2]
    assert f"resuming from step {saved} in {workdir}" in err and "the config differs" not in err
    ref, got = _final_arrays(ref_dir), _final_arrays(workdir)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
        np.testing.assert_array_equal(a, b)
    assert sorted(_metrics(workdir)) == list(range(1, 13))


class _FailingSource:
    """A source that fails from its `fail_at`-th read on (as if the files after it were damaged)."""

    def __init__(self, source, fail_at: int):
        self.source, self.fail_at, self.reads = source, fail_at, 0

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        self.reads += 1
        if self.reads >= self.fail_at:
            raise OSError(f"example {index}: the file is damaged")
        return self.source[index]


@pytest.mark.slow(10)
def test_a_data_error_saves_the_steps_done_before_failing(tmp_path, micro_run, monkeypatch, capsys):
    real = loop_module.load_source
    # Batches of 16: the 120th read falls in the 8th batch (after a few reads that check the source).
    monkeypatch.setattr(loop_module, "load_source",
                        lambda spec, split: _FailingSource(real(spec, split), 120) if split == "train"
                        else real(spec, split))
    with pytest.raises(OSError, match="the file is damaged"):
        train_and_evaluate(micro_run(), str(tmp_path))
    saved = max(int(d) for d in os.listdir(tmp_path / "checkpoints"))
    assert 0 < saved < 12 and saved % 3 != 0  # saved when the read failed, not at a checkpoint step
    # With the data mended, the run goes on from there; a changed setting is reported.
    monkeypatch.setattr(loop_module, "load_source", real)
    config = micro_run()
    config.training.log_every = 2
    capsys.readouterr()
    summary = train_and_evaluate(config, str(tmp_path))
    assert (summary["start_step"], summary["step"]) == (saved, 12)
    notices = capsys.readouterr().err  # the run's own notices, plainly, once
    assert f"resuming from step {saved} in {tmp_path}" in notices and "training.log_every: 1 -> 2" in notices


@pytest.mark.slow(30)
def test_evaluate_on_two_processes_samples_as_one(tmp_path, reference):
    """`experiments.evaluate --distributed` (the evaluation commands' flags for several processes):
    both processes start JAX's distributed runtime first, process 0 alone writes the samples, and
    they are bitwise those of one process of 8 devices with the same seed and batch."""
    ref_dir, _ = reference
    address, out = f"localhost:{_free_port()}", tmp_path / "eval"
    procs = [subprocess.Popen([sys.executable, "-m", "experiments.evaluate", f"--workdir={ref_dir}", f"--out={out}",
                               "--num_samples=8", "--sample_batch_size=8", "--sampler=ddim", "--sample_steps=4",
                               "--noprogress_bar", "--distributed", f"--coordinator_address={address}",
                               "--num_processes=2", f"--process_id={i}"],
                              cwd=REPO, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for code, stdout, err in map(_finish, procs):
        assert code == 0, err[-3000:]
        assert "sampled 8 images (ddim, 4 steps" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["samples_ddim4_seed0.npz", "samples_ddim4_seed0.png"]
    mesh = make_mesh()
    _, state = load_checkpoint(str(ref_dir), mesh=mesh)
    expected = generate_samples(state, mesh=mesh, num=8, key=jax.random.key(0), batch_size=8, sampler="ddim",
                                sample_steps=4)
    np.testing.assert_array_equal(np.load(out / "samples_ddim4_seed0.npz")["images"], expected)


# A process killed while it writes config.json (`save_config`): half the JSON is on disk when it dies.
_KILLED_WHILE_WRITING_CONFIG = """
import json, os, signal, sys
from vdm_jax.training import checkpoint

def dump_half_then_die(obj, f, **kwargs):
    text = json.dumps(obj, **kwargs)
    f.write(text[:len(text) // 2])
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

checkpoint.json.dump = dump_half_then_die
checkpoint.save_config(sys.argv[1], {"seed": 1})
"""


@pytest.mark.slow(8)
@pytest.mark.parametrize("damage", ["killed while writing", "empty", "cut short"])
def test_a_run_resumes_past_a_damaged_config_json(tmp_path, reference, micro_run, capsys, damage):
    """config.json is written atomically, so a kill mid-write leaves the old one; one damaged anyway
    (e.g. by an older vdm_jax or by hand) is reported in one line and rewritten, and the run resumes."""
    ref_dir, _ = reference
    workdir = tmp_path / "run"
    shutil.copytree(ref_dir, workdir)
    path = workdir / "config.json"
    before = path.read_text()
    if damage == "killed while writing":
        proc = subprocess.run([sys.executable, "-c", _KILLED_WHILE_WRITING_CONFIG, str(workdir)], cwd=REPO,
                              env=_env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
        assert path.read_text() == before  # the old file, whole
        assert [p.name for p in workdir.glob(".config.json.*.tmp")]  # (the killed write's own file)
    else:
        path.write_text("" if damage == "empty" else before[:len(before) // 2])
        with pytest.raises(ValueError, match=f"{re.escape(str(path))} is damaged: "
                                             + ("empty" if damage == "empty" else "not JSON")):
            read_config(str(workdir))  # (what evaluate says, in one line)
    config = micro_run()
    config.training.update(eval_at_end=False, sample_at_end=False)
    capsys.readouterr()
    summary = train_and_evaluate(config, str(workdir))
    assert (summary["start_step"], summary["step"]) == (12, 12)
    notices = capsys.readouterr().err
    assert f"resuming from step 12 in {workdir}" in notices
    if damage == "killed while writing":
        assert "warning" not in notices  # the old config.json, read whole: the settings changed here are listed
        assert "training.eval_at_end: True -> False" in notices
    else:
        assert f"warning: {path} is damaged: " in notices and "it is rewritten from this run's config" in notices
    assert read_config(str(workdir)).to_dict() == config.to_dict()
