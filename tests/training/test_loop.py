"""End to end: the real entry point on tfds mock data, resume, and the bad inputs users hit."""
import glob
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import jax

from vdm_jax.training import (Checkpointer, CheckpointMismatchError, WorkdirError, create_train_state,
                              train_and_evaluate, validate_config)

CIFAR_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "configs", "cifar10.py")


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_MOCKED_MAIN = """
import sys
import tensorflow_datasets as tfds
from absl import app
with tfds.testing.mock_data(num_examples=40):
    from experiments import cifar10, common
    app.run(cifar10.main, flags_parser=common.parse_config_flags)
"""


def _cli(workdir, *overrides, mock=True):
    """Runs `python -m experiments.cifar10` (with TFDS mock data) in a subprocess; returns it."""
    argv = [f"--workdir={workdir}", f"--config={CIFAR_CONFIG}:small",
            "--config.model.base_channels=8", "--config.model.channel_mult=(1,)", "--config.model.attn_resolutions=()",
            "--config.model.mid_attention=False",
            "--config.model.num_groups=4", "--config.model.embedding_dim=16",
            "--config.diffusion.timesteps=20", "--config.training.batch_size=16",
            "--config.training.eval_batch_size=16", "--config.training.num_samples=8",
            "--config.training.sample_steps=4", "--config.training.log_every=2",
            "--config.training.checkpoint_every=2", "--config.training.eval_every=0",
            "--config.training.sample_every=0", "--config.training.progress_bar=False", *overrides]
    env = dict(os.environ, XLA_FLAGS=os.environ["XLA_FLAGS"], JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5", PYTHONPATH=REPO)
    cmd = [sys.executable, "-c", _MOCKED_MAIN] if mock else [sys.executable, "-m", "experiments.cifar10"]
    return subprocess.run([*cmd, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow(45)
def test_entry_point_trains_and_writes_its_outputs(tmp_path, fid_weights):
    """The real entry point on mock CIFAR-10: steps, checkpoints, logs, samples, the FID at step 2
    and at the end (random Inception weights), the config. (Resuming is `test_resume.py`'s, on
    the smaller digits run.)"""
    from vdm_jax.fid import save_statistics

    workdir = tmp_path / "run"
    rng = np.random.default_rng(0)
    features = rng.normal(size=(64, 2048))
    save_statistics(str(tmp_path / "stats.npz"), features.mean(0), np.cov(features, rowvar=False))
    first = _cli(workdir, "--config.training.num_steps=3", "--config.training.progress_bar=True",
                 "--config.training.fid_every=2", "--config.training.fid_samples=8",
                 f"--config.training.fid_reference={tmp_path / 'stats.npz'}",
                 f"--config.training.inception_weights={fid_weights[0]}")
    assert first.returncode == 0, first.stderr[-3000:]
    with open(workdir / "metrics.jsonl") as f:
        fids = [r for r in map(json.loads, f) if "fid/fid" in r]
    assert [r["step"] for r in fids] == [2, 3], fids
    assert all(np.isfinite(r["fid/fid"]) and r["fid/fid"] > 0 and r["fid/inception_score"] >= 1 for r in fids)
    assert re.search(r"step 3: test bpd [\d.]+ ± [\d.]+ over 40 images", first.stdout), first.stdout
    # Not a terminal: no bar's carriage returns, a plain line at each log step instead.
    assert "\r" not in first.stdout + first.stderr
    assert "compiling the train step" in first.stderr  # at once, before the first (compiling) call
    # The first log's time holds the compilation: no estimate of the time left from it; the next has one.
    assert re.search(r"^step 2/3: loss \d+\.\d+, [\d.]+ steps/s$", first.stdout, re.M), first.stdout
    assert re.search(r"^step 3/3: loss \d+\.\d+, [\d.]+ steps/s, about .* to go$", first.stdout, re.M), first.stdout
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "3"]
    assert glob.glob(str(workdir / "tensorboard" / "events.out.tfevents.*"))
    assert os.path.exists(workdir / "samples" / "step_00000003.png")
    assert os.path.exists(workdir / "config.json")


def test_bad_workdir(tmp_path, micro):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    config = micro()
    config.data.source = "digits"
    with pytest.raises(WorkdirError, match="is not writable"):
        train_and_evaluate(config, str(blocker / "run"))
    with pytest.raises(WorkdirError, match=f"the work directory {blocker} is a file, not a directory"):
        train_and_evaluate(config, str(blocker))
    with pytest.raises(WorkdirError, match="the work directory gs://bucket/run is a URL: .* mount the bucket"):
        train_and_evaluate(config, "gs://bucket/run")
    assert not os.path.exists("gs:")  # (not made as a local folder)


def test_a_failed_start_leaves_no_work_directory(tmp_path, micro):
    """Bad data (here a missing file) fails before the work directory is made."""
    config = micro()
    config.data.source = f"npz:{tmp_path / 'missing.npz'}"
    with pytest.raises(OSError):
        train_and_evaluate(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")
    # FID during training without its reference statistics: named before any training.
    config = micro()
    config.data.source = "digits"
    config.training.fid_every = 5
    with pytest.raises(ValueError, match="training.fid_every needs training.fid_reference"):
        train_and_evaluate(config, str(tmp_path / "run"))
    config.training.fid_reference = str(tmp_path / "missing_stats.npz")
    with pytest.raises(FileNotFoundError, match="training.fid_reference=.*missing_stats.npz does not exist"):
        train_and_evaluate(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


def test_batch_not_divisible_by_devices(tmp_path, micro):
    config = micro()
    config.data.source = "digits"
    config.training.batch_size = 12
    with pytest.raises(ValueError, match="batch_size=12 must be divisible by the number of devices \\(8\\)"):
        train_and_evaluate(config, str(tmp_path))


def test_images_of_the_wrong_shape(tmp_path, micro):
    config = micro(image_size=16)
    config.data.source = "digits"
    with pytest.raises(ValueError, match=r"images have shape \(8, 8, 1\) but the model takes \(16, 16, 1\) "
                       r"\(config.model.image_size, config.model.in_channels\)"):
        train_and_evaluate(config, str(tmp_path))


def test_unknown_config_key_on_the_command_line(tmp_path):
    out = _cli(tmp_path, "--config.training.bacth_size=3", mock=False)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1].startswith(
        "error: unknown config key 'training.bacth_size' (did you mean 'training.batch_size'?); valid keys here "
        "are: batch_size, checkpoint_every,")


@pytest.mark.parametrize("flag", ["--help", "-h", "--helpfull"])
def test_help_lists_every_config_key_and_exits_0(tmp_path, flag):
    """`--help` prints the flags and every config key with its value in the chosen config (the `small`
    variant here) and its meaning, from the schema."""
    from experiments.configs.cifar10 import get_config
    from vdm_jax.training import default_config
    from vdm_jax.training.config import _leaves

    out = _cli(tmp_path, flag, mock=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--workdir: Where checkpoints" in out.stdout
    small = get_config("small").training.num_steps
    assert small != default_config().training.num_steps  # (so that this tells the variant's value from the schema's)
    assert f"  --config.training.num_steps={small} " in out.stdout and "training steps" in out.stdout
    listed = [line.split("=")[0].strip() for line in out.stdout.splitlines() if line.startswith("  --config.")]
    assert listed == [f"--config.{name}" for name, _ in _leaves(default_config())]
    assert not os.path.exists(tmp_path / "config.json")  # nothing was run


def test_checkpoint_from_a_different_model(tmp_path, micro_run):
    """Resuming a work directory whose checkpoint another model wrote stops before training."""
    config = micro_run()
    ckpt = Checkpointer(str(tmp_path / "checkpoints"))
    ckpt.save(1, create_train_state(config, validate_config(config), key=jax.random.key(0)).checkpoint_tree(), {})
    ckpt.close()
    config.model.base_channels = 16
    with pytest.raises(CheckpointMismatchError, match="different model"):
        train_and_evaluate(config, str(tmp_path))
    assert os.listdir(tmp_path / "checkpoints") == ["1"]  # nothing moved: a mismatch is not damage
