"""`import_check`: a checkpoint trained by the other code, imported and evaluated end to end (issue 34's
"proof without the real files"): today DDPM, a small diffusers `UNet2DModel` trained on CPU."""
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks.common import command, flag, out_flag, write_result

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data",
                    "cifar10_lossless_subset.npz")
# DDPM's block types (google/ddpm-cifar10-32's config.json), small: three levels, attention at 16×16.
CONFIG = {"act_fn": "silu", "attention_head_dim": None, "block_out_channels": [32, 64, 64],
          "center_input_sample": False, "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
          "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3,
          "layers_per_block": 1, "mid_block_scale_factor": 1, "norm_eps": 1e-6, "norm_num_groups": 8,
          "out_channels": 3, "sample_size": 32, "time_embedding_type": "positional",
          "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]}
EVAL_STEPS = [0, 9, 49, 99, 249, 499, 749, 998]  # diffusers' 0-based steps of the ε-MSE reference


@command(flag("--from", dest="source", default="ddpm", choices=["ddpm"], help="The checkpoint's origin (ddpm)."),
         flag("--steps", type=int, default=600, help="Training steps in PyTorch (default 600)."),
         flag("--batch", type=int, default=32, help="Training batch (default 32)."),
         flag("--data", default=os.path.normpath(DATA), help="The lossless CIFAR-10 subset (.npz)."),
         out_flag("import_check_<from>.json"))
def import_check(args):
    """Train with the other code on CPU, import, evaluate bits/dim and sample: the import end to end.

--from=ddpm: diffusers' `UNet2DModel` of DDPM's block types at 32/64/64 channels (attention at 16×16)
is trained in its own process (benchmarks/import_check_torch.py) with `DDPMScheduler` (linear β,
T = 1000) and the ε-loss on the subset's training images, saved with `save_pretrained`, then
`experiments.import_checkpoint --from=ddpm` writes a work directory, and `experiments.evaluate` gives
its bits/dim on the subset's 1,017 test images and 16 DDIM-50 samples (their grid beside the JSON).
The reference: the ε-MSE of diffusers' model and of the imported one on the same test images, steps
and noise (they must agree to float32 rounding).
"""
    start, tmp = time.perf_counter(), tempfile.mkdtemp(prefix="import_check_")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "import_check_ddpm.json")
    try:
        result = _ddpm(args, tmp, os.path.splitext(out)[0] + ".png")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["wall_s"] = time.perf_counter() - start
    write_result(result, out, "import_check_ddpm.json")


def _run(argv: list[str], cwd: str) -> tuple[str, float]:
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{run.stderr[-3000:]}")
    return run.stdout, time.perf_counter() - t0


def _ddpm(args, tmp: str, png: str) -> dict:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = {"config": CONFIG, "data": args.data, "steps": args.steps, "batch": args.batch, "lr": 1e-3, "seed": 0,
            "threads": os.cpu_count(), "eval_images": len(EVAL_STEPS), "eval_timesteps": EVAL_STEPS}
    with open(os.path.join(tmp, "spec.json"), "w") as f:
        json.dump(spec, f)
    commands, walls = [], {}
    for name, argv in [
            ("train_torch", ["-m", "benchmarks.import_check_torch", f"{tmp}/spec.json", tmp]),
            ("import", ["-m", "experiments.import_checkpoint", "--from=ddpm", f"--checkpoint={tmp}/model",
                        f"--workdir={tmp}/work", f"--data=npz:{args.data}"]),
            ("evaluate", ["-m", "experiments.evaluate", f"--workdir={tmp}/work", f"--source=npz:{args.data}",
                          "--split=test", "--bpd", "--num_samples=16", "--sampler=ddim", "--sample_steps=50",
                          "--progress_bar=false", f"--out={tmp}/eval"])]:
        commands.append("python " + " ".join(argv))
        stdout, walls[name] = _run(argv, repo)
    with open(os.path.join(tmp, "train.json")) as f:
        train = json.load(f)
    with open(glob.glob(f"{tmp}/eval/bpd_test_*.json")[0]) as f:
        bpd = json.load(f)
    samples = np.load(glob.glob(f"{tmp}/eval/samples_*.npz")[0])["images"]
    shutil.copyfile(glob.glob(f"{tmp}/eval/samples_*.png")[0], png)
    eps = _jax_eps(f"{tmp}/work", np.load(f"{tmp}/eps.npz"))
    losses = train["losses"]
    return {"from": "ddpm", "command": f"python -m benchmarks import_check --from=ddpm --steps={args.steps} "
            f"--batch={args.batch}", "commands": commands, "wall_s_per_command": walls,
            "model": {"diffusers_config": CONFIG, "parameters": train["parameters"], "torch": train["torch"],
                      "diffusers": train["diffusers"]},
            "training": {"steps": args.steps, "batch": args.batch, "optimizer": "Adam 1e-3, clip 1, no EMA",
                         "train_s": train["train_s"], "loss_first_10": float(np.mean(losses[:10])),
                         "loss_last_50": float(np.mean(losses[-50:])), "data": args.data},
            "bpd_test": {"examples": bpd.get("examples"), "total": bpd["bpd"]["total"], "terms": bpd["bpd"]},
            "samples": {"sampler": "ddim", "steps": 50, "num": int(len(samples)),
                        "pixel_mean": float(samples.mean()), "pixel_std": float(samples.std()),
                        "grid": os.path.basename(png)},
            "eps_mse_reference": eps | {"diffusers": train["eps_mse"]}}


def _jax_eps(workdir: str, io) -> dict:
    """The imported model's ε-MSE on the torch side's images, steps and noise: z from vdm_jax's own DDPM
    schedule at step i = k + 1 (t = i/T), against diffusers' z and ε̂."""
    import jax.numpy as jnp

    from vdm_jax.diffusion import q_sample
    from vdm_jax.pixels import pixels_to_data
    from vdm_jax.training import steps
    from vdm_jax.training.evaluation import load_checkpoint

    _, state = load_checkpoint(workdir)
    model, _ = steps._modules(state, state.ema_params)
    family = state.objective.family
    step = jnp.asarray(io["timesteps"] + 1)
    eps = jnp.asarray(io["eps"].transpose(0, 2, 3, 1))
    z = q_sample(pixels_to_data(io["x"], grid=family.grid), eps, family.gamma_schedule().gamma_step(step))
    t = np.asarray(io["timesteps"] + 1, np.float32) / np.float32(family.timesteps)  # (NumPy's exact division)
    assert np.all(np.float32(1000) * np.asarray(t) - 1 == io["timesteps"])  # the same embedded step exactly
    eps_hat = np.asarray(state.objective.pred_fn(model)(z, jnp.asarray(t)))
    torch_hat = io["eps_hat"].transpose(0, 2, 3, 1)
    return {"vdm_jax": float(np.mean((eps_hat - np.asarray(eps)) ** 2)), "images": int(len(step)),
            "timesteps_0_based": io["timesteps"].tolist(),
            "max_abs_z_difference": float(np.max(np.abs(np.asarray(z) - io["z"].transpose(0, 2, 3, 1)))),
            "max_abs_eps_hat_difference": float(np.max(np.abs(eps_hat - torch_hat))),
            "eps_hat_finite": bool(np.isfinite(eps_hat).all())}
