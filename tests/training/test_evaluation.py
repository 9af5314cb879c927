"""Evaluation: bits/dim over a whole split, the core's ELBO on the same draws, samples at scale, the CLI."""
import glob
import json
import os
import re
import subprocess
import sys

import numpy as np
import jax
import pytest
from flax import nnx

from vdm_jax import ddpm_vlb, pixels_to_data, vdm_elbo
from vdm_jax.models import as_pred_fn
from vdm_jax.data.array_source import ArraySource
from vdm_jax.training import (RunNotFoundError, create_train_state, evaluate_bpd, generate_samples, load_checkpoint,
                              make_mesh, parallel, steps, validate_config)
from vdm_jax.training.evaluation import evaluate_ode_bpd
from vdm_jax.training.evaluation import TERMS, inception_features
from vdm_jax.fid import load_statistics, sample_quality, save_statistics
from vdm_jax.models import fid_inception

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _source(n, seed=0):
    images = np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)
    return ArraySource(images, np.zeros(n, np.int64), name="random")


def _state(config, mesh):
    state = create_train_state(config, validate_config(config), key=jax.random.key(0))
    # Make the EMA differ from the parameters, so that using the wrong ones would show.
    state = state.replace(ema_params=jax.tree.map(lambda p: p * 0.9, state.params))
    return parallel.replicate(state, mesh)


def _ema_model(state):
    return nnx.merge(state.graphdef, state.ema_params["model"])


@pytest.mark.parametrize("family", ["ddpm", "vdm"])
def test_bpd_equals_the_core_elbo_on_the_same_draws(micro, family):
    """Every example once; the terms add up; per example it is the core's ELBO with the same key."""
    config = micro(family=family, timesteps=0 if family == "vdm" else 20)
    mesh = make_mesh()
    state = _state(config, mesh)
    source, key = _source(41), jax.random.key(3)
    result = evaluate_bpd(state, source, mesh=mesh, batch_size=16, key=key, full_vlb=family == "ddpm")
    assert result["examples"] == 41
    per = result["per_example_nats"]
    for name in TERMS:
        assert per[name].shape == (41,) and np.all(np.isfinite(per[name]))
    np.testing.assert_allclose(per["total"], per["prior"] + per["diffusion"] + per["reconstruction"], rtol=1e-5)
    dims = 64 * np.log(2.0)
    assert result["bpd"]["total"]["mean"] == pytest.approx(per["total"].mean() / dims, rel=1e-9)
    assert result["bpd"]["total"]["se"] == pytest.approx(per["total"].std(ddof=1) / np.sqrt(41) / dims, rel=1e-9)

    # The core on batch 1 (examples 16..31), with the key the evaluator documents for it.
    model, objective = _ema_model(state), state.objective
    pixels = source.images[16:32]
    draw_key = jax.random.fold_in(jax.random.fold_in(key, 1), 0)
    if family == "ddpm":
        core = jax.jit(lambda p, k: ddpm_vlb(as_pred_fn(model), pixels_to_data(p, grid="ddpm"),
                                             objective.family.gamma_schedule(), key=k))(pixels, draw_key)
        assert len(result["per_t_bpd"]) == 20
        np.testing.assert_allclose(np.sum(result["per_t_bpd"]), result["bpd"]["diffusion"]["mean"]
                                   + result["bpd"]["reconstruction"]["mean"], rtol=1e-6)
    else:
        gamma_fn = objective.family.gamma_schedule()
        pred_fn = as_pred_fn(model, gamma_fn, gamma_min=config.diffusion.gamma_min,
                             gamma_max=config.diffusion.gamma_max)
        core = jax.jit(lambda p, k: vdm_elbo(pred_fn, pixels_to_data(p, grid="vdm"), gamma_fn, key=k))(
            pixels, draw_key)
    np.testing.assert_allclose(per["total"][16:32], core["total"], rtol=2e-5)
    np.testing.assert_allclose(per["prior"][16:32], core["prior"], rtol=2e-5)
    np.testing.assert_allclose(per["reconstruction"][16:32], core["reconstruction"], rtol=2e-5)


def test_one_t_estimate_is_unbiased_for_the_full_bound(micro):
    """The one-t DDPM estimate (t ~ U{2..T} and L_0) averaged over draws equals the full T-term bound."""
    config = micro(timesteps=10)
    mesh = make_mesh()
    state = _state(config, mesh)
    source = _source(32)
    full = evaluate_bpd(state, source, mesh=mesh, batch_size=32, key=jax.random.key(0), full_vlb=True, draws=4)
    one_t = evaluate_bpd(state, source, mesh=mesh, batch_size=32, key=jax.random.key(1), draws=400)
    a, b = full["bpd"]["total"], one_t["bpd"]["total"]
    # Same examples: compare the per-example differences (their spread is the Monte Carlo noise).
    diff = (one_t["per_example_nats"]["total"] - full["per_example_nats"]["total"]) / (64 * np.log(2.0))
    se = diff.std(ddof=1) / np.sqrt(diff.shape[0])
    assert abs(diff.mean()) < 5 * se, (a, b, se)


def test_full_vlb_is_a_ddpm_bound(micro):
    config = micro(family="vdm", timesteps=0)
    mesh = make_mesh()
    with pytest.raises(ValueError, match="full_vlb needs a DDPM model"):
        evaluate_bpd(_state(config, mesh), _source(8), mesh=mesh, batch_size=8, key=jax.random.key(0), full_vlb=True)


def test_ode_bpd_of_every_example_is_the_step_s_on_its_batch(micro):
    """The ODE's bits/dim (a VDM: continuous time, t_min = 0): every example once, in the source's
    order; batch b is `steps.ode_bpd_step` with fold_in(key, b); the importance-weighted value is
    the lower (Jensen), and it costs some network evaluations per example."""
    config = micro(family="vdm", timesteps=0)
    mesh = make_mesh()
    state = _state(config, mesh)
    source, key = _source(12), jax.random.key(4)
    options = dict(rtol=1e-3, atol=1e-3)
    result = evaluate_ode_bpd(state, source, mesh=mesh, batch_size=8, key=key, num_draws=2, **options)
    per = result["per_example"]
    assert result["examples"] == 12 and per["bits_per_dim"].shape == (12,)
    assert np.all(np.isfinite(per["bits_per_dim"])) and np.all(per["bits_per_dim_iw"] <= per["bits_per_dim"] + 1e-9)
    assert result["bpd"]["total"]["mean"] == pytest.approx(per["bits_per_dim"].mean(), rel=1e-9)
    assert result["bpd"]["total"]["se"] == pytest.approx(per["bits_per_dim"].std(ddof=1) / np.sqrt(12), rel=1e-9)
    np.testing.assert_allclose(per["prior_bpd"] + per["flow_bpd"] + per["dequantization_bpd"], per["bits_per_dim"],
                               rtol=1e-6)  # the terms add up (float32 on the device)
    np.testing.assert_allclose(per["dequantization_bpd"], -np.log2(2 / 256), rtol=1e-6)  # the 'vdm' grid's bins
    assert result["nfe"]["mean"] >= 7 and result["nfe"]["max"] >= result["nfe"]["mean"]
    batch = {"image": source.images[8:12]}  # batch 1 (examples 8..11, padded to 8 with masked copies)
    direct = jax.jit(lambda s, b, k: steps.ode_bpd_step(s, b, key=k, num_draws=2, **options))(
        state, {"image": np.concatenate([batch["image"], batch["image"]])}, jax.random.fold_in(key, 1))
    np.testing.assert_allclose(per["bits_per_dim"][8:12], np.asarray(direct["bits_per_dim"])[:4], rtol=1e-4)


def test_bad_batch_size(micro):
    mesh = make_mesh()
    state = _state(micro(), mesh)
    with pytest.raises(ValueError, match="batch_size=12 must be divisible by the number of devices"):
        evaluate_bpd(state, _source(8), mesh=mesh, batch_size=12, key=jax.random.key(0))
    with pytest.raises(ValueError, match="draws must be a positive int"):
        evaluate_bpd(state, _source(8), mesh=mesh, batch_size=8, key=jax.random.key(0), draws=0)
    wrong = ArraySource(np.zeros((8, 16, 16, 1), np.uint8), np.zeros(8, np.int64))
    with pytest.raises(ValueError, match=r"images have shape \(16, 16, 1\) but the model takes \(8, 8, 1\)"):
        evaluate_bpd(state, wrong, mesh=mesh, batch_size=8, key=jax.random.key(0))
    with pytest.raises(ValueError, match="sampler must be one of 'ancestral', 'ddim', 'dpm_solver', 'heun' "
                                         "or 'euler', got 'rk45'"):
        generate_samples(state, mesh=mesh, num=8, key=jax.random.key(0), batch_size=8, sampler="rk45")


def test_samples_are_sharded_deterministic_and_differ_across_seeds(micro):
    mesh = make_mesh()
    state = _state(micro(timesteps=20), mesh)
    sample = lambda seed: generate_samples(state, mesh=mesh, num=20, key=jax.random.key(seed), batch_size=16,
                                           sampler="ddim", sample_steps=4)
    a, b, c = sample(0), sample(0), sample(1)
    assert a.shape == (20, 8, 8, 1) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # Batches are independent draws (fold_in(key, b)), not copies.
    assert not np.array_equal(a[:4], a[16:20])
    # The chain runs sharded: each device computes 16 / 8 = 2 images.
    from vdm_jax.training.evaluation import _sample_fn
    hlo = _sample_fn(mesh, 16, "ddim", 4).lower(state, jax.random.key(0), None, np.float32(0)).compile().as_text()
    assert "f32[2,8,8," in hlo and "f32[16,8,8," not in hlo


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(RunNotFoundError, match="config.json does not exist"):
        load_checkpoint(str(tmp_path))


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
                JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "",
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")


def _evaluate(*args):
    out = subprocess.run([sys.executable, "-m", "experiments.evaluate", "--noprogress_bar", *args], cwd=REPO,
                         env=_env(), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow(60)
def test_evaluate_cli_on_a_quickstart_checkpoint(tmp_path, fid_weights):
    """Acceptance 1 and 2: the bpd table over every test image; same seed, same samples across
    processes; --fid of the samples (random Inception weights) is the library's on those samples."""
    workdir = str(tmp_path / "quickstart")
    run = subprocess.run([sys.executable, "-m", "experiments.quickstart", f"--workdir={workdir}", "--steps=2",
                          "--config.training.eval_at_end=False", "--config.training.sample_at_end=False"],
                         cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)  # (evaluate's work only)
    assert run.returncode == 0, run.stderr[-3000:]
    first = _evaluate(f"--workdir={workdir}", "--bpd", "--num_samples=10", "--sample_batch_size=8", "--sampler=ddim",
                      "--sample_steps=3", "--draws=2", "--ode_bpd", "--ode_examples=8", "--ode_tolerance=1e-3")
    assert "297 examples, each exactly once" in first
    assert "EMA parameters at step 2" in first
    for name in TERMS:
        assert any(line.startswith(name) for line in first.splitlines()), first
    out_dir = os.path.join(workdir, "eval", "step_2")
    with open(os.path.join(out_dir, "bpd_test_onet_draws2_seed0.json")) as f:
        record = json.load(f)
    assert record["examples"] == 297 and record["draws"] == 2 and record["step"] == 2
    total = record["bpd"]["total"]["mean"]
    assert np.isfinite(total) and total == pytest.approx(
        sum(record["bpd"][k]["mean"] for k in ("prior", "diffusion", "reconstruction")), rel=1e-6)
    per_example = np.load(os.path.join(out_dir, "bpd_test_onet_draws2_seed0_per_example.npz"))
    assert per_example["total"].shape == (297,)
    assert os.path.exists(os.path.join(out_dir, "samples_ddim3_seed0.png"))
    # --ode_bpd: the ODE's bits/dim of the first 8 test images, next to the ELBO's (a DDPM: t_min = 1/T).
    assert re.search(r"ODE bits/dim of digits 'test': [0-9.]+ ± [0-9.]+ over 8 examples", first), first
    with open(os.path.join(out_dir, "bpd_test_ode_draws1_probes1_tol0.001_seed0.json")) as f:
        ode = json.load(f)
    assert ode["examples"] == 8 and np.isfinite(ode["bpd"]["total"]["mean"]) and ode["nfe"]["mean"] > 0
    assert set(ode["bpd"]) == {"prior", "flow", "dequantization", "total", "total_iw"}

    # Samples only (no bound), another seed: other images; and their FID against statistics.
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(64, 2048))
    save_statistics(str(tmp_path / "stats.npz"), reference.mean(0), np.cov(reference, rowvar=False))
    sampled = _evaluate(f"--workdir={workdir}", "--num_samples=10", "--sample_batch_size=8", "--sampler=ddim",
                        "--sample_steps=3", "--seed=1", f"--out={tmp_path / 'seed1'}", "--fid",
                        f"--reference={tmp_path / 'stats.npz'}", f"--inception_weights={fid_weights[0]}",
                        "--fid_batch_size=8")
    assert "bits/dim" not in sampled and not glob.glob(str(tmp_path / "seed1" / "bpd_*"))
    with open(tmp_path / "seed1" / "fid_ddim3_seed1.json") as f:
        fid_record = json.load(f)
    assert sampled.strip().splitlines()[-1] == f"FID {fid_record['fid']:.4f}"
    a = np.load(os.path.join(out_dir, "samples_ddim3_seed0.npz"))["images"]
    c = np.load(tmp_path / "seed1" / "samples_ddim3_seed1.npz")["images"]
    assert a.shape == (10, 8, 8, 1) and a.dtype == np.uint8
    assert not np.array_equal(a, c)
    network = fid_inception(fid_weights[0], cache_dir=str(tmp_path / "cache"))
    expected = sample_quality(inception_features(network, c, mesh=make_mesh(), batch_size=8),
                              load_statistics(str(tmp_path / "stats.npz")))
    assert fid_record["num_images"] == 10 and fid_record["fid"] == pytest.approx(expected["fid"], rel=1e-6)
    assert fid_record["inception_score"] == pytest.approx(expected["inception_score"], rel=1e-6)
    # The same seed gives the same images in any process: the CLI's are generate_samples' with
    # key(seed) and the same batch size, computed here.
    mesh = make_mesh()
    _, state = load_checkpoint(workdir, mesh=mesh)
    b = generate_samples(state, mesh=mesh, num=10, key=jax.random.key(0), batch_size=8, sampler="ddim", sample_steps=3)
    np.testing.assert_array_equal(a, b)

    # The same samples with bfloat16 activations (load_checkpoint's dtype, what --dtype sets): the
    # same deterministic DDIM chain from the same noise, within bfloat16's rounding (after 2 training
    # steps most pixels are clipped to 0 or 255, so they may well be equal).
    _, state16 = load_checkpoint(workdir, dtype="bfloat16")
    assert nnx.merge(state16.graphdef, state16.ema_params["model"]).conv_in.dtype == "bfloat16"
    a16 = generate_samples(state16, mesh=mesh, num=10, key=jax.random.key(0), batch_size=8, sampler="ddim",
                           sample_steps=3)
    assert a16.shape == a.shape and a16.dtype == np.uint8
    assert np.abs(a16.astype(int) - a.astype(int)).mean() < 2.0  # pixel levels of 0..255


@pytest.mark.slow(25)
def test_evaluate_cli_on_a_conditional_run(tmp_path, uninterrupted):
    """A class-conditional micro run (the one tests/training/test_conditional.py trains): the bound
    given each label and given none; --labels=0,7 --num_samples=3 --guidance=2 --guidance_interval:
    3 guided samples of each class (the labels in the .npz), a grid row per class. (--fid reads the
    samples as the unconditional test's --fid does.)"""
    workdir, _ = uninterrupted("conditional")
    out_dir = str(tmp_path / "eval")  # (the shared run's directory is only read)
    out = _evaluate(f"--workdir={workdir}", "--bpd", "--labels=0,7", "--num_samples=3", "--guidance=2",
                    "--guidance_interval=-5,5", "--sample_batch_size=8", "--sampler=ddim", "--sample_steps=3",
                    f"--out={out_dir}")
    assert "given each example's label:" in out and "unconditional (the 'no label' class):" in out, out
    with open(os.path.join(out_dir, "bpd_test_onet_draws1_seed0.json")) as f:
        record = json.load(f)
    assert set(record["bpd_unconditional"]) == set(TERMS) and np.isfinite(record["bpd_unconditional"]["total"]["mean"])
    assert record["bpd_unconditional"]["total"]["mean"] != record["bpd"]["total"]["mean"]
    stem = os.path.join(out_dir, "samples_ddim3_labels0-7_w2_gamma-5to5_seed0")
    assert "6 images (ddim, 3 steps, float32 activations; 3 of each of the classes 0,7, guidance w = 2 where γ " \
           "is in (-5, 5]) in" in out
    samples = np.load(stem + ".npz")
    np.testing.assert_array_equal(samples["labels"], [0, 0, 0, 7, 7, 7])
    from PIL import Image
    with Image.open(stem + ".png") as grid:  # 2 rows (classes) of 3 columns, 9 pixels each and a margin
        scale = 512 // (2 * 9 + 1)
        assert grid.size == ((3 * 9 + 1) * scale, (2 * 9 + 1) * scale)


def test_evaluate_cli_bad_input(tmp_path):
    out = subprocess.run([sys.executable, "-m", "experiments.evaluate", f"--workdir={tmp_path}"], cwd=REPO,
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "config.json does not exist" in out.stderr


# ---------------------------------------------------------------------------------------------
# FID: the whole pipeline (features sharded over the devices, statistics, distance) against
# pytorch-fid's, and the commands. Random weights in pytorch-fid's file format stand in for the
# published ones (the `fid_weights` fixture); every program here has the shapes [8, 32, 32, 3].


def _image_sets():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    b = np.clip(rng.normal(100, 40, (24, 32, 32, 3)), 0, 255).astype(np.uint8)  # another distribution
    return a, b


@pytest.fixture(scope="session")
def fid_features(fid_weights, once_per_run):
    """(a, b, features of a, features of b): two image sets through `inception_features` (computed
    once for the whole test run)."""
    a, b = _image_sets()

    def make(directory):
        network = fid_inception(fid_weights[0], cache_dir=str(directory / "cache"))
        mesh = make_mesh()
        for name, images in (("a", a), ("b", b)):
            np.savez(directory / f"{name}.npz", **inception_features(network, images, mesh=mesh, batch_size=8))

    directory = once_per_run("fid_features", make)
    return a, b, *(dict(np.load(directory / f"{name}.npz")) for name in ("a", "b"))


def _pytorch_fid_features(torch_model, images):
    import torch
    with torch.no_grad():  # pytorch-fid's own preprocessing: [0, 1] NCHW, resized and scaled inside
        x = torch.from_numpy(images.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
        return torch_model(x)[0].flatten(1).numpy().astype(np.float64)


@pytest.mark.slow(25)
def test_fid_pipeline_matches_pytorch_fid(fid_weights, fid_features, tmp_path):
    """Features sharded over 8 devices, statistics, distance: the FID of pytorch-fid's features
    and statistics (`np.mean`, `np.cov`, as its `calculate_activation_statistics`). The distance
    itself equals pytorch-fid's `calculate_frechet_distance` in tests/test_fid.py (whose scipy
    `sqrtm` takes 25 s at 2048 dimensions on 2 cores, so it is not run again here)."""
    from vdm_jax.fid import frechet_distance

    a, b, fa, fb = fid_features
    assert fa["pool"].shape == (16, 2048) and fb["logits_unbiased"].shape == (24, 1008)
    ours = sample_quality(fa, fb, kid_subset_size=16)
    ra, rb = _pytorch_fid_features(fid_weights[1], a), _pytorch_fid_features(fid_weights[1], b)
    np.testing.assert_allclose(fa["pool"], ra, rtol=0, atol=1e-4 * np.abs(ra).max())
    reference = frechet_distance(ra.mean(0), np.cov(ra, rowvar=False), rb.mean(0), np.cov(rb, rowvar=False))
    assert ours["fid"] == pytest.approx(reference, rel=1e-3)
    assert ours["fid"] > 1.0 and ours["kid"] > 0 and ours["num_reference"] == 24
    # A last batch that is padded (13 = 8 + 5) changes nothing.
    network = fid_inception(fid_weights[0], cache_dir=str(tmp_path))
    f13 = inception_features(network, a[:13], mesh=make_mesh(), batch_size=8)["pool"]
    np.testing.assert_allclose(f13, fa["pool"][:13], rtol=1e-5, atol=1e-5)


@pytest.mark.slow(55)
def test_fid_command_and_fid_stats(fid_weights, fid_features, tmp_path):
    """experiments.fid on two image sets prints the pipeline's FID; experiments.fid_stats writes
    a dataset's statistics, which experiments.fid reads as the reference; no weights: one line."""
    path, _ = fid_weights
    a, b, fa, fb = fid_features
    np.savez(tmp_path / "a.npz", images=a)
    np.savez(tmp_path / "b.npz", images=b)
    np.savez(tmp_path / "b_source.npz", x_train=b, y_train=np.zeros(len(b), np.int64))

    def run(module, *args, env=None):
        return subprocess.run([sys.executable, "-m", module, "--noprogress_bar", "--batch_size=8", *args], cwd=REPO,
                              env=env or _env(), capture_output=True, text=True, timeout=900)

    out = run("experiments.fid", f"--images={tmp_path / 'a.npz'}", f"--reference={tmp_path / 'b.npz'}",
              f"--inception_weights={path}")
    assert out.returncode == 0, out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"FID \d+\.\d{4}", last), out.stdout
    with open(tmp_path / "a_fid.json") as f:
        record = json.load(f)
    expected = sample_quality(fa, fb)
    for key in ("fid", "kid", "kid_std", "inception_score", "inception_score_std"):
        assert record[key] == pytest.approx(expected[key], rel=1e-4), key
    assert float(last.split()[1]) == pytest.approx(expected["fid"], abs=1e-4, rel=1e-4)

    stats = tmp_path / "stats.npz"
    out = run("experiments.fid_stats", f"--source=npz:{tmp_path / 'b_source.npz'}", "--split=train",
              f"--out={stats}", f"--inception_weights={path}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "statistics of 24 images" in out.stdout
    mu, sigma = load_statistics(str(stats))
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
    out = run("experiments.fid", f"--images={tmp_path / 'a.npz'}", f"--reference={stats}",
              f"--inception_weights={path}", f"--out={tmp_path / 'against_stats.json'}")
    assert out.returncode == 0, out.stderr[-3000:]
    with open(tmp_path / "against_stats.json") as f:
        against_stats = json.load(f)
    assert against_stats["fid"] == pytest.approx(expected["fid"], rel=1e-6) and against_stats["kid"] is None

    # No weights file and no network: one clear line naming what to download and where.
    offline = dict(_env(), VDM_JAX_CACHE=str(tmp_path / "empty_cache"))
    out = run("experiments.fid", f"--images={tmp_path / 'a.npz'}", f"--reference={tmp_path / 'b.npz'}", env=offline)
    assert out.returncode == 1
    error = out.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and "pt_inception-2015-12-05-6726825d.pth" in error
    assert "--inception_weights=PATH" in error and "Traceback" not in out.stderr
