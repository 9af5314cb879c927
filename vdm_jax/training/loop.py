"""`train_and_evaluate(config, workdir)`: the whole training run.

Builds the data, the state and the compiled steps, resumes from the work directory's newest
intact checkpoint if there is one, trains with periodic logging, checkpoints, full-test-set
evaluation (EMA parameters) and sample grids.

Never losing a run (docs/long_jobs.md lists the tests):
- A restarted run continues exactly: the checkpoint holds the data iterator's position, all
  randomness is `fold_in(key, step)`, and multi-step calls start at multiples of `steps_per_call`.
- SIGTERM/SIGINT save a checkpoint and return (processes agree at the next log/checkpoint step).
- Damaged checkpoints are skipped and set aside (`Checkpointer.restore_latest`).
- A checkpoint that can't be written (a full disk) stops the run with `CheckpointWriteError`,
  naming the last complete step, which the rerun resumes from.
- A non-finite step is never applied or saved (`faults`); the host checks at log, checkpoint,
  evaluation and sample steps only, so the loop does not wait on the device in between (but for
  an interactive progress bar, which counts each call's steps when they are done, one call behind).
- A data error saves the steps done before it is raised (one process).
- With several processes, `jax.distributed.initialize` comes before anything starts JAX's backend,
  only process 0 writes the work directory's files (each atomically), and a lost process stops the
  others within `training.heartbeat_timeout` (`distributed`).
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from vdm_jax.data import load_source, train_iterator
from vdm_jax.training import faults, parallel, steps
from vdm_jax.training.checkpoint import Checkpointer, save_config, saved_config
from vdm_jax.training.config import check_config, config_changes, validate_config
from vdm_jax.training.distributed import initialize_distributed
from vdm_jax.fid import load_statistics, sample_quality
from vdm_jax.models.inception_weights import fid_inception
from vdm_jax.training.evaluation import (check_images, check_labels, evaluate_bpd, generate_samples,
                                         inception_features)
from vdm_jax.training.metrics import MetricWriter, image_grid, progress_bar, save_png
from vdm_jax.training.prefetch import DevicePrefetcher, call_sizes
from vdm_jax.training.state import TrainState, create_train_state

log = logging.getLogger("vdm_jax")


def _say(message: str) -> None:
    """A notice of the run's own, once, plainly, on standard error (process 0 only)."""
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


class WorkdirError(OSError):
    """The work directory can't be created or written."""


def _prepare_workdir(workdir: str) -> tuple[str, bool]:
    """(the absolute work directory, created and test-written; whether this run created it)."""
    if "://" in workdir:  # os.path.abspath would make gs://b/run a local folder ./gs:/b/run
        raise WorkdirError(f"the work directory {workdir} is a URL: the run writes through the file system; mount "
                           "the bucket (e.g. gcsfuse BUCKET /mnt/BUCKET) and give its path.")
    workdir = os.path.abspath(os.path.expanduser(workdir))
    created = not os.path.exists(workdir)
    if not created and not os.path.isdir(workdir):
        raise WorkdirError(f"the work directory {workdir} is a file, not a directory.")
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir):
            pass
    except OSError as e:
        raise WorkdirError(f"the work directory {workdir} is not writable: {e.strerror or e}.") from None
    return workdir, created


def stopping_notice(signum: int) -> str:
    """The line a first SIGINT/SIGTERM prints at once (the loop then stops at the next step it can)."""
    return (f"{signal.Signals(signum).name}: stopping after the current step and saving a checkpoint; a second "
            "Ctrl-C quits at once, without saving.")


class _StopSignal:
    """Turns SIGTERM/SIGINT into a flag the loop checks, so it can save before exiting."""

    def __init__(self):
        self.signum, self._old = None, {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                continue
            # A handler before this one that held a signal back (`experiments.common.hold_signals`,
            # during start-up): its signal is this run's.
            self.signum = self.signum or getattr(self._old[sig], "signum", None)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum
        print(stopping_notice(signum), file=sys.stderr, flush=True)  # at once: the step may take a while

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class _Run:
    """The pieces of one run, opened by `train_and_evaluate`; its methods do the run's work."""

    def __init__(self, config, model_config, *, workdir: str, mesh, train_iter, eval_source, ckpt: Checkpointer,
                 stop: _StopSignal, fid):
        self.config, self.model_config, self.workdir, self.mesh = config, model_config, workdir, mesh
        self.train_iter, self.eval_source, self.ckpt, self.stop = train_iter, eval_source, ckpt, stop
        self.fid_network, self.fid_reference = fid  # with training.fid_every (`_prepare_fid`)
        self.is_main = jax.process_index() == 0
        self.key_init, self.key_train, self.key_eval, self.key_sample = jax.random.split(jax.random.key(config.seed), 4)
        self.key_fid = jax.random.fold_in(jax.random.key(config.seed), 0xF1D)  # (leaves the other keys as they were)
        # Made once the state is restored: the logs (`initial_state`), the batches and the progress bar
        # (a disabled one where there is no terminal, `_train`).
        self.writer: MetricWriter | None = None
        self.batches: DevicePrefetcher | None = None
        self.progress = None
        # The skipped steps reported so far; whether a training call has run (its logs stay, even with
        # no checkpoint); (step, time) of the last log; whether there was one (the first one's time holds
        # the compilation: no estimate of the time left from it).
        self.skipped_seen, self.trained, self.logged, self.timed = 0, False, (0, 0.0), False

    # --- state and checkpoints ----------------------------------------------------------------

    def initial_state(self) -> TrainState:
        """A new state, or the newest intact checkpoint's (with the data iterator's position)."""
        state = create_train_state(self.config, self.model_config, key=self.key_init)
        restored = self.ckpt.restore_latest(parallel.replicated_like(state.checkpoint_tree(), self.mesh))
        resume_step, changes = None, []
        if restored is not None:
            resume_step, tree, data = restored
            state = state.replace(**tree)
            if data.get("iterator"):
                self.train_iter.set_state(data["iterator"])
            self.skipped_seen = int(jax.device_get(state.faults["skipped"]))
            _say(f"resuming from step {resume_step} in {self.workdir}")
        if self.is_main:  # (config.json is process 0's: the others neither read nor write it)
            try:
                changes = config_changes(saved_config(self.workdir), self.config.to_dict()) if restored else []
            except ValueError as e:  # a damaged config.json: the checkpoint is what counts
                _say(f"warning: {e}; it is rewritten from this run's config")
            if changes:
                _say(f"the config differs from the one saved in {self.workdir}/config.json:\n  " + "\n  ".join(changes))
            save_config(self.workdir, self.config.to_dict())
        self.writer = MetricWriter(os.path.join(self.workdir, "tensorboard"), enabled=self.is_main,
                                   jsonl_path=os.path.join(self.workdir, "metrics.jsonl"), resume_step=resume_step)
        return parallel.replicate(state, self.mesh)

    def check_faults(self, state: TrainState) -> None:
        """Reports newly skipped steps; raises NonFiniteError if training must stop (`faults.check`)."""
        record = jax.device_get(state.faults)
        if int(record["skipped"]) > self.skipped_seen:
            self.skipped_seen = int(record["skipped"])
            log.warning("%d training steps with non-finite values skipped so far; the last: %s", self.skipped_seen,
                        faults.describe(record, state.params))
        try:
            faults.check(record, state.params, state.on_nonfinite, self.config.training.max_consecutive_skips)
        except faults.NonFiniteError as e:
            self.ckpt.wait()
            latest = self.ckpt.latest_step()
            last = "No checkpoint was saved" if latest is None else f"The last checkpoint is step {latest}"
            raise faults.NonFiniteError(f"{e} {last} in {self.ckpt.directory}.") from None

    def save(self, state: TrainState, *, force: bool = False, position: dict | None = None) -> None:
        """Saves `state` with the data iterator's `position` (default: after the last batches trained
        on, however far the prefetcher has read ahead)."""
        self.check_faults(state)  # never save a state that stopped on a non-finite step
        data = {"iterator": self.batches.position if position is None else position, "seed": self.config.seed}
        self.ckpt.save(int(state.step), state.checkpoint_tree(), data, force=force)

    def save_before_failing(self, state: TrainState, error: Exception) -> None:
        """After a data error: saves the (good) state with the iterator's position before the failed
        read, so fixing the data and rerunning loses no steps. One process only (saving is collective);
        nothing when no step was trained (a fresh run leaves no work directory then)."""
        if jax.process_count() > 1 or not self.trained or self.ckpt.latest_step() == int(state.step):
            return
        try:
            self.save(state, force=True, position=self.batches.read_position)
            self.ckpt.wait()
            log.warning("reading the training data failed (%s): saved a checkpoint at step %d first",
                        error, int(state.step))
        except Exception as e:  # noqa: BLE001 - the data error is the one to report
            log.warning("reading the training data failed, and saving a checkpoint then failed too: %s", e)

    def close(self) -> None:
        """Stops the prefetcher, waits for checkpoints being written, closes the checkpointer and the logs."""
        try:
            if self.batches is not None:
                self.batches.close()
            self.ckpt.wait()
        finally:
            self.ckpt.close()
            if self.writer is not None:
                self.writer.close()

    # --- work ---------------------------------------------------------------------------------

    def log(self, state: TrainState, metrics) -> dict[str, float]:
        """The last training call's metrics, with the steps and images per second since the last log:
        to the logs, the progress bar, and as a plain line where there is no bar."""
        t, step = self.config.training, int(state.step)
        values = {name: float(v) for name, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        values["steps_per_sec"] = (step - self.logged[0]) / (now - self.logged[1])
        values["images_per_sec"] = values["steps_per_sec"] * t.batch_size
        self.logged = (step, now)
        self.writer.scalars(step, values)
        self.progress.set_postfix(loss=f"{values['loss']:.4f}")
        if t.progress_bar and self.progress.disable and self.is_main:
            left = (t.num_steps - step) / max(values["steps_per_sec"], 1e-9)
            eta = f", about {self.progress.format_interval(left)} to go" if self.timed else ""
            print(f"step {step}/{t.num_steps}: loss {values['loss']:.4f}, {values['steps_per_sec']:.1f} steps/s{eta}",
                  flush=True)
        self.timed = True
        return values

    def evaluate(self, state: TrainState, metrics=None) -> dict[str, float]:
        """The bound on the whole eval split, every example once, with the EMA parameters (logged;
        returned with its 'step')."""
        result = evaluate_bpd(state, self.eval_source, mesh=self.mesh,
                              batch_size=self.config.training.eval_batch_size, key=self.key_eval)
        out = {f"eval/{name}_bpd": r["mean"] for name, r in result["bpd"].items()}
        out.update({"eval/total_bpd_se": result["bpd"]["total"]["se"], "eval/examples": float(result["examples"])})
        if "bpd_unconditional" in result:  # a class-conditional model's bound given no label
            out.update({f"eval/unconditional_{name}_bpd": r["mean"] for name, r in result["bpd_unconditional"].items()})
        self.writer.scalars(int(state.step), out)
        return {**out, "step": int(state.step)}

    def _samples(self, state: TrainState, num: int, batch: int, key, labels=None):
        """`num` samples by the sample grids' sampler, `batch` (rounded up to the devices) at a time; a
        class-conditional model's of `labels` (default: the classes in turn) with training.guidance."""
        t, n, k = self.config.training, self.mesh.devices.size, state.objective.num_classes
        if k and labels is None:
            labels = np.arange(num) % k
        return generate_samples(state, mesh=self.mesh, num=num, batch_size=-(-batch // n) * n, sampler=t.sampler,
                                key=jax.random.fold_in(key, int(state.step)), sample_steps=t.sample_steps,
                                labels=labels, guidance=t.guidance)

    def fid(self, state: TrainState, metrics=None) -> dict[str, float]:
        """FID and Inception Score of training.fid_samples samples (the sampler of the sample grids), logged."""
        t, n = self.config.training, self.mesh.devices.size
        batch = -(-min(t.fid_samples, t.eval_batch_size) // n) * n
        images = self._samples(state, t.fid_samples, batch, self.key_fid)
        features = inception_features(self.fid_network, images, mesh=self.mesh, batch_size=batch)
        result = sample_quality(features, self.fid_reference)
        out = {"fid/fid": result["fid"], "fid/inception_score": result["inception_score"]}
        self.writer.scalars(int(state.step), out)
        return out

    def sample(self, state: TrainState, metrics=None) -> str:
        """A grid of training.num_samples samples, as a PNG in samples/ and in the logs; returns its path.
        A class-conditional model's grid has a row per class (training.num_samples rounded up to a
        multiple of the classes)."""
        num, k = self.config.training.num_samples, state.objective.num_classes
        if not k:
            picture = image_grid(self._samples(state, num, num, self.key_sample))
        else:
            per_class = -(-num // k)
            labels = np.repeat(np.arange(k), per_class)
            picture = image_grid(self._samples(state, len(labels), len(labels), self.key_sample, labels), per_class)
        path = os.path.join(self.workdir, "samples", f"step_{int(state.step):08d}.png")
        if self.is_main:
            save_png(path, picture, scale=max(1, 512 // picture.shape[0]))
            self.writer.image(int(state.step), "samples", picture)
        return path


def compiled_steps(mesh):
    """(train_step, train_steps) jitted as the loop runs them: state replicated and donated, batch sharded.

    Both are called positionally, `(state, batch, key)` (jit's in_shardings cover positional
    arguments only; the steps themselves take `key` keyword-only).
    """
    rep = parallel.replicated(mesh)

    def train_step(state, batch, key):
        return steps.train_step(state, batch, key=key)

    def train_steps(state, batches, key):  # (unrolled on a CPU backend: `steps.train_steps`)
        return steps.train_steps(state, batches, key=key)

    return tuple(jax.jit(fn, in_shardings=(rep, parallel.batch_sharding(mesh, leading_axes), rep),
                         out_shardings=(rep, rep), donate_argnums=0)
                 for fn, leading_axes in ((train_step, 0), (train_steps, 1)))


def _count_finished(progress, in_flight) -> None:
    """Advances the bar by a call's steps once its results are ready (`in_flight`: (steps, metrics))."""
    if in_flight is not None:
        jax.block_until_ready(in_flight[1])
        progress.update(in_flight[0])


def _crossed(prev: int, now: int, every: int) -> bool:
    return every > 0 and now // every > prev // every


def _stop_requested(stop: _StopSignal, sync: bool) -> bool:
    """Whether to stop for a signal. With several processes they agree, at sync points only."""
    if jax.process_count() == 1:
        return stop.signum is not None
    if not sync:
        return False
    signum = int(np.max(multihost_utils.process_allgather(np.asarray(stop.signum or 0, np.int32))))
    if signum and stop.signum is None:
        log.warning("another process received %s: stopping too", signal.Signals(signum).name)
        stop.signum = signum
    return signum != 0


def _prepare_fid(t) -> tuple[Any, Any]:
    """With training.fid_every: (the Inception network, the reference statistics), read before the
    run starts (a missing file fails it before any work, not at the first FID); else (None, None)."""
    if not t.fid_every:
        return None, None
    if not t.fid_reference:
        raise ValueError("training.fid_every needs training.fid_reference: the reference statistics "
                         "(python -m experiments.fid_stats --source=... --out=stats.npz).")
    if not os.path.isfile(os.path.expanduser(t.fid_reference)):
        raise FileNotFoundError(f"training.fid_reference={t.fid_reference} does not exist: it must be a statistics "
                                "file (python -m experiments.fid_stats writes one).")
    return fid_inception(t.inception_weights or None), load_statistics(t.fid_reference)


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
    """Trains (or resumes) a diffusion model as `config` says, writing everything to `workdir`.

    Returns a summary: the final step, the last training metrics, the last full evaluation and
    the path of the last sample grid. SIGTERM or SIGINT at any moment, start-up included, stops
    the run once the current step or compilation is done: it saves a checkpoint and returns with
    'interrupted' set (a run stopped before its first step leaves no work directory it made).

    Raises:
      NonFiniteError: a NaN/Inf loss or gradient (`training.on_nonfinite`); nothing from that
        step on was saved.
      CorruptCheckpointError: the work directory has checkpoints but none can be restored.
      CheckpointMismatchError: its checkpoints belong to another model.
    """
    with _StopSignal() as stop:
        if stop.signum is not None:  # a signal during start-up, before anything was done (and before JAX starts)
            return _stopped_before_training(stop, 0)
        check_config(config)  # (starts no JAX backend: jax.distributed.initialize comes first)
        t = config.training
        if t.distributed:
            initialize_distributed(t.coordinator_address, t.num_processes, t.process_id, t.heartbeat_timeout)
        model_config = validate_config(config)
        mesh = parallel.make_mesh()
        parallel.check_batch_size(t.batch_size, mesh)
        parallel.check_batch_size(t.eval_batch_size, mesh, "training.eval_batch_size")
        train_source = load_source(config.data.source, config.data.train_split)
        eval_source = load_source(config.data.source, config.data.eval_split)
        image_shape = (model_config.image_size, model_config.image_size, model_config.in_channels)
        for source, split in ((train_source, config.data.train_split), (eval_source, config.data.eval_split)):
            check_images(source, image_shape, f"{config.data.source} {split}")
            check_labels(source, model_config.num_classes, f"{config.data.source} {split}")
        train_iter = train_iterator(train_source, global_batch_size=t.batch_size, seed=config.seed,
                                    random_flip=config.data.random_flip, num_workers=config.data.num_workers)
        fid = _prepare_fid(t)
        workdir, created = _prepare_workdir(workdir)  # (after the data: a bad source leaves no directory)
        ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=t.keep_checkpoints, keep_every=t.keep_every)
        run = _Run(config, model_config, workdir=workdir, mesh=mesh, train_iter=train_iter,
                   eval_source=eval_source, ckpt=ckpt, stop=stop, fid=fid)
        try:
            return _train(run)
        finally:
            run.close()
            if created and run.is_main and not run.trained:  # (so it saved no checkpoint either)
                shutil.rmtree(workdir, ignore_errors=True)  # a run that never trained leaves nothing


def _stopped_before_training(stop: _StopSignal, step: int) -> dict[str, Any]:
    print(f"{signal.Signals(stop.signum).name} received before training started: stopped at step {step}; "
          "nothing new was saved.", flush=True)  # (on standard output, like the notice of a stop in training)
    return {"start_step": step, "step": step, "interrupted": True}


def _periodic(run: _Run) -> dict[str, tuple[int, bool, Any]]:
    """The loop's periodic work, by the summary entry it fills: name -> (every, at_end, action).

    `action(state, metrics)` runs whenever training crosses a multiple of `every` steps (0: never),
    and with `at_end` once more when training ends uninterrupted (then not at the last step itself,
    so that it never runs twice there). Checkpoints are not in the table: they are saved at every
    training.checkpoint_every steps and when the run ends, interrupted or not.
    """
    t = run.config.training
    return {"train": (t.log_every, True, run.log), "eval": (t.eval_every, t.eval_at_end, run.evaluate),
            "samples": (t.sample_every, t.sample_at_end, run.sample), "fid": (t.fid_every, t.fid_every > 0, run.fid)}


def _train(run: _Run) -> dict[str, Any]:
    t, stop = run.config.training, run.stop
    if _stop_requested(stop, True):
        return _stopped_before_training(stop, 0)
    state = run.initial_state()
    start = step = int(state.step)
    if _stop_requested(stop, True):  # a signal during start-up: nothing trained, nothing to save
        return _stopped_before_training(stop, start)
    summary, work, metrics = {"start_step": start}, _periodic(run), None
    one, many = compiled_steps(run.mesh)
    sizes = call_sizes(start, t.num_steps, t.steps_per_call)
    keys = ("image", "label") if state.objective.num_classes else ("image",)
    batches = run.batches = DevicePrefetcher(run.train_iter, run.mesh, sizes, depth=run.config.data.prefetch, keys=keys)
    interactive = t.progress_bar and sys.stderr.isatty()
    run.progress = progress_bar(interactive, total=t.num_steps, initial=start, desc="train", unit="step")
    in_flight = None  # (steps, metrics) of the call before, counted once its results are ready
    if t.eval_at_start and start == 0:
        run.evaluate(state)
    run.logged = (start, time.perf_counter())
    if sizes and not interactive:  # (a terminal has the bar)
        _say("compiling the train step (its first call takes a while) ...")
    for k in sizes:
        prev = step
        try:
            batch = next(batches)
        except Exception as e:
            run.save_before_failing(state, e)
            raise
        state, metrics = (many if k > 1 else one)(state, batch, run.key_train)
        step, run.trained = prev + k, True
        if interactive:  # the bar counts finished steps: the call before this one's (which runs meanwhile)
            _count_finished(run.progress, in_flight)
            in_flight = (k, metrics)
        due = [name for name, (every, at_end, _) in work.items()
               if _crossed(prev, step, every) and not (at_end and step == t.num_steps)]
        save_now = _crossed(prev, step, t.checkpoint_every)
        if due or save_now:  # the host reads the state only here (no sync inside the loop otherwise)
            run.check_faults(state)
        if save_now:
            run.save(state)
        summary.update({name: work[name][2](state, metrics) for name in due})
        if _stop_requested(stop, bool(due or save_now)):
            break
    _count_finished(run.progress, in_flight)
    interrupted = _stop_requested(stop, True)
    if not interrupted and metrics is not None:  # the last log before the save, whose time is not training's
        summary["train"] = run.log(state, metrics)  # (a finished run restarted trains no step: nothing to log)
    if run.ckpt.latest_step() != int(state.step):
        run.save(state, force=True)
    run.ckpt.wait()
    if interrupted:
        print(f"{signal.Signals(stop.signum).name} received: checkpoint saved at step {int(state.step)}; rerun to "
              "resume.", flush=True)
    else:
        summary.update({name: action(state, metrics) for name, (_, at_end, action) in work.items()
                        if at_end and name != "train"})
    run.progress.close()
    return {**summary, "step": int(state.step), "interrupted": interrupted}
