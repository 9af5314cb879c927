"""experiments.import_checkpoint: a released checkpoint becomes a work directory that every tool reads as a
run's. The official VDM checkpoint is stood in for by the fixture of tests/models/test_vdm_weights.py
(google-research/vdm's own code, random parameters, saved as that code saves them; its docstring says how
it was made).

A trained model was checked once the same way, by hand (not part of the suite: it trains with the official
code, which stays outside the repository): the official VDM of the fixture's layout without attention
(64 channels, 1 layer, learnable_scalar), trained 800 steps on CPU by `experiment.py`'s loss and AdamW
(lr 1e-3, EMA 0.99, batch 64) on sklearn's 8×8 digits as RGB (1500 train, 297 test), saved as
`ckpt-1.flax`. Its own eval bpd (experiment_vdm.py's loss_fn, EMA, 16 draws per test image): 2.9903 ± 0.0314;
imported, `experiments.evaluate --draws=16`: 2.9694 ± 0.0345; per image, vdm_jax − official =
−0.021 ± 0.041 bits/dim (the two use independent draws of t and ε). Samples (ancestral, 1000 steps;
dpm_solver, 20) look like the digits.
"""
import json
import lzma
import os
import shutil
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from flax import nnx

from vdm_jax.models.vdm_weights import read_vdm_checkpoint
from vdm_jax.training import WorkdirError, load_checkpoint
from vdm_jax.training.checkpoint import saved_config
from vdm_jax.training.config import config_changes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "tests", "data")


def _official_checkpoint(directory) -> str:
    """The fixture where clu writes a checkpoint, `directory/checkpoints-0/ckpt-1.flax`; returns the folder."""
    folder = os.path.join(directory, "checkpoints-0")
    os.makedirs(folder)
    with lzma.open(os.path.join(DATA, "vdm_official_small.flax.xz")) as src, \
            open(os.path.join(folder, "ckpt-1.flax"), "wb") as dst:
        shutil.copyfileobj(src, dst)
    return folder


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
                JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "",
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=600)


def _close(ours, theirs, rtol=5e-6):  # (as tests/models/test_vdm_weights.py: float32, measured 1.3e-6)
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=0, atol=rtol * np.abs(theirs).max())


@pytest.mark.slow(30)
def test_an_official_vdm_checkpoint_becomes_a_work_directory_that_evaluate_reads(tmp_path):
    """Import, then the work directory restored (the official parameters and EMA, the schedule's w and b,
    the step, a fresh optimiser state: the network gives the official outputs), then experiments.evaluate:
    bits/dim on a small split of 8×8 images and a few samples; an existing work directory is refused."""
    folder = _official_checkpoint(str(tmp_path))
    rng = np.random.default_rng(0)
    images = {f"x_{s}": rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8) for s in ("train", "test")}
    np.savez(tmp_path / "images.npz", **images, y_train=np.zeros(16, np.int64), y_test=np.zeros(16, np.int64))
    workdir = str(tmp_path / "imported")
    run = _run("experiments.import_checkpoint", "--from=vdm", f"--checkpoint={folder}", f"--workdir={workdir}",
               "--image_size=8", f"--data=npz:{tmp_path / 'images.npz'}")
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"imported google-research/vdm's checkpoint {folder} (step 1234, " in run.stdout

    config, state = load_checkpoint(workdir)
    # The official recipe (experiments/configs/cifar10.py:vdm), but for the network's size and the data.
    from experiments.configs.cifar10 import vdm as recipe
    changed = {line.split(":")[0] for line in config_changes(saved_config(workdir), recipe().to_dict())}
    assert changed == {"data.source", "model.base_channels", "model.embedding_dim", "model.image_size",
                       "model.num_res_blocks", "model.attn_resolutions"}, changed
    assert (config.diffusion.family, config.diffusion.schedule, config.diffusion.timesteps) == ("vdm", "learned_linear", 0)
    assert int(state.step) == 1234 and config.model.base_channels == 64
    official = read_vdm_checkpoint(folder, image_size=8)
    for name, schedule in (("params", official.schedule), ("ema_params", official.ema_schedule)):
        restored = getattr(state, name)
        assert {k: float(restored["schedule"][k][...]) for k in "wb"} == schedule
        for ours, theirs in zip(jax.tree.leaves(restored["model"]), jax.tree.leaves(getattr(official, name))):
            np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    assert all(not np.asarray(x).any() for x in jax.tree.leaves(state.opt_state))  # fresh: zero moments, count 0
    with np.load(os.path.join(DATA, "vdm_official_small.npz")) as f:
        z, g_t, eps_hat_ema = f["z"], f["g_t"], f["eps_hat_ema"]
    model = nnx.merge(state.graphdef, state.ema_params["model"])
    _close(model(z, (g_t - np.float32(-13.3)) / np.float32(5.0 + 13.3)), eps_hat_ema)

    evaluated = _run("experiments.evaluate", f"--workdir={workdir}", "--noprogress_bar", "--bpd", "--batch_size=8",
                     "--num_samples=8", "--sample_batch_size=8", "--sampler=ddim", "--sample_steps=2")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "16 examples, each exactly once" in evaluated.stdout and "EMA parameters at step 1234" in evaluated.stdout
    out_dir = os.path.join(workdir, "eval", "step_1234")
    with open(os.path.join(out_dir, "bpd_test_onet_draws1_seed0.json")) as f:
        bpd = json.load(f)["bpd"]
    assert np.isfinite(bpd["total"]["mean"]) and any(line.startswith("total") for line in evaluated.stdout.splitlines())
    assert np.load(os.path.join(out_dir, "samples_ddim2_seed0.npz"))["images"].shape == (8, 8, 8, 3)

    again = _run("experiments.import_checkpoint", "--from=vdm", f"--checkpoint={folder}", f"--workdir={workdir}")
    assert again.returncode != 0 and again.stderr.strip().splitlines() == [
        f"error: --workdir={workdir} exists and is not an empty directory: an import writes a new work directory; "
        "give another path."]


def test_bad_checkpoints_and_work_directories_are_one_line(tmp_path):
    from experiments.import_checkpoint import import_checkpoint

    (tmp_path / "notes.flax").write_text("not a checkpoint")
    flags = dict(image_size=32, gamma_min=-13.3, gamma_max=5.0, timesteps=0, data=None)
    flags["from"] = "vdm"
    with pytest.raises(ValueError, match="notes.flax is not a Flax msgpack checkpoint"):
        import_checkpoint(types.SimpleNamespace(**flags, checkpoint=str(tmp_path / "notes.flax"),
                                                workdir=str(tmp_path / "new")))
    assert not (tmp_path / "new").exists()  # (nothing written before the checkpoint is read)
    for workdir in (str(tmp_path / "notes.flax"), "gs://bucket/run"):
        with pytest.raises(WorkdirError, match="--workdir="):
            import_checkpoint(types.SimpleNamespace(**flags, checkpoint=str(tmp_path), workdir=workdir))


@pytest.mark.slow(10)
def test_a_failed_import_leaves_no_work_directory(tmp_path, monkeypatch):
    """Writing fails after the checkpoint was saved (here: config.json): the work directory is removed (an
    empty one given is emptied again), so that nothing half-written reads as a run."""
    from experiments.import_checkpoint import import_checkpoint
    from vdm_jax.training import checkpoint

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_config", fail)
    folder = _official_checkpoint(str(tmp_path))
    flags = dict(checkpoint=folder, image_size=8, gamma_min=-13.3, gamma_max=5.0, timesteps=0, data=None)
    flags["from"] = "vdm"
    for workdir, existed in ((tmp_path / "new", False), (tmp_path / "empty", True)):
        if existed:
            workdir.mkdir()
        with pytest.raises(OSError, match="disk full"):
            import_checkpoint(types.SimpleNamespace(**flags, workdir=str(workdir)))
        assert workdir.exists() == existed and not (existed and any(workdir.iterdir()))
