"""`import_check`: a checkpoint trained by the other code, imported and evaluated end to end (issue 34's
"proof without the real files"): DDPM, a small diffusers `UNet2DModel`, or VDM, the official code's
model in small, each trained on CPU in a process of its own."""
import dataclasses
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable

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
# The official CIFAR-10 layout (configs/cifar10.py) in small: 64 channels, 2 blocks down and 3 up at 32×32.
VDM_CONFIG = {"vocab_size": 256, "sample_softmax": False, "antithetic_time_sampling": True,
              "with_fourier_features": True, "with_attention": False, "gamma_type": "learnable_scalar",
              "gamma_min": -13.3, "gamma_max": 5.0, "sm_n_timesteps": 0, "sm_n_embd": 64, "sm_n_layer": 2,
              "sm_pdrop": 0.1}
# cifar10.py's AdamW (b1, b2, eps, decay) with the learning rate, warm-up and EMA scaled to a short run.
VDM_OPTIMIZER = {"learning_rate": 5e-4, "warmup": 20, "ema_rate": 0.99,
                 "args": {"b1": 0.9, "b2": 0.99, "eps": 1e-8, "weight_decay": 0.01}}


@command(flag("--from", dest="source", default="ddpm", choices=["ddpm", "vdm"], help="The checkpoint's origin."),
         flag("--vdm_code", help="--from=vdm: a folder holding google-research/vdm's model_vdm.py and train_state.py."),
         flag("--steps", type=int, help="Training steps (default: ddpm 600, vdm 100)."),
         flag("--batch", type=int, help="Training batch (default: ddpm 32, vdm 16)."),
         flag("--data", default=os.path.normpath(DATA), help="The lossless CIFAR-10 subset (.npz)."),
         out_flag("import_check_<from>.json"))
def import_check(args):
    """Train with the other code on CPU, import, evaluate bits/dim and sample: the import end to end.

--from=ddpm: diffusers' `UNet2DModel` of DDPM's block types at 32/64/64 channels (attention at 16×16)
is trained in its own process (benchmarks/import_check_torch.py) with `DDPMScheduler` (linear β,
T = 1000) and the ε-loss on the subset's training images, saved with `save_pretrained`.
--from=vdm: google-research/vdm's own `model_vdm.py` and `train_state.py` (from --vdm_code, kept out
of this repository) train the official CIFAR-10 layout in small (64 channels, 2 blocks, attention
only in the middle) in its own process (benchmarks/import_check_vdm.py) on the official bits/dim
with the official AdamW and an EMA, and save the train state as clu does (checkpoints-0/ckpt-1.flax).
Then `experiments.import_checkpoint --from=<from>` writes a work directory, and `experiments.evaluate`
gives its bits/dim on the subset's 1,017 test images and 16 DDIM-50 samples (their grid beside the
JSON). The reference, which must agree to float32 rounding: ddpm, the ε-MSE of diffusers' model and of
the imported one on the same test images, steps and noise; vdm, the official bound of the EMA
parameters on 8 test images and vdm_jax's on the same images, t and noise.
"""
    if args.source == "vdm" and not args.vdm_code:
        raise SystemExit("import_check --from=vdm needs --vdm_code=DIR: a folder holding google-research/vdm's "
                         "model_vdm.py and train_state.py")
    source = SOURCES[args.source]
    args.steps, args.batch = args.steps or source.steps, args.batch or source.batch
    start, tmp = time.perf_counter(), tempfile.mkdtemp(prefix="import_check_")
    name = f"import_check_{args.source}.json"
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", name)
    try:
        result = _end_to_end(args, source, tmp, os.path.splitext(out)[0] + ".png")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["wall_s"] = time.perf_counter() - start
    write_result(result, out, name)


def _run(argv: list[str], cwd: str) -> tuple[str, float]:
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{run.stderr[-3000:]}")
    return run.stdout, time.perf_counter() - t0


def _end_to_end(args, source: "Source", tmp: str, png: str) -> dict:
    """Train (in the source's process), import, evaluate, and the record: the shared parts and the source's."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(tmp, "spec.json"), "w") as f:
        json.dump({"data": args.data, "steps": args.steps, "batch": args.batch} | source.spec(args), f)
    commands, walls = [], {}
    for name, argv in [
            (f"train_{source.side}", ["-m", f"benchmarks.import_check_{source.side}", f"{tmp}/spec.json", tmp]),
            ("import", ["-m", "experiments.import_checkpoint", f"--from={args.source}",
                        f"--checkpoint={tmp}/{source.checkpoint}", f"--workdir={tmp}/work", f"--data=npz:{args.data}"]),
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
    model, training, reference = source.record(tmp, train)
    losses = train["losses"]
    code = f" --vdm_code={args.vdm_code}" if args.source == "vdm" else ""
    return {"from": args.source, "command": f"python -m benchmarks import_check --from={args.source}{code} "
            f"--steps={args.steps} --batch={args.batch}", "commands": commands, "wall_s_per_command": walls,
            "model": model,
            "training": {"steps": args.steps, "batch": args.batch, "optimizer": training.pop("optimizer"),
                         "train_s": train["train_s"], "loss_first_10": float(np.mean(losses[:10])),
                         "loss_last_50": float(np.mean(losses[-50:])), "data": args.data} | training,
            "bpd_test": {"examples": bpd.get("examples"), "total": bpd["bpd"]["total"], "terms": bpd["bpd"]},
            "samples": {"sampler": "ddim", "steps": 50, "num": int(len(samples)),
                        "pixel_mean": float(samples.mean()), "pixel_std": float(samples.std()),
                        "grid": os.path.basename(png)}} | reference


@dataclasses.dataclass(frozen=True)
class Source:
    """One --from: its default steps and batch, its training process (benchmarks/import_check_<side>.py)
    and spec, what that process writes for the import, and its part of the record (model, training extras
    with the optimizer, the reference): `record(tmp, train.json) -> (dict, dict, {key: reference})`."""

    steps: int
    batch: int
    side: str
    spec: Callable
    checkpoint: str
    record: Callable


def _ddpm_record(tmp: str, train: dict):
    return ({"diffusers_config": CONFIG, "parameters": train["parameters"], "torch": train["torch"],
             "diffusers": train["diffusers"]}, {"optimizer": "Adam 1e-3, clip 1, no EMA"},
            {"eps_mse_reference": _jax_eps(f"{tmp}/work", np.load(f"{tmp}/eps.npz")) | {"diffusers": train["eps_mse"]}})


def _vdm_record(tmp: str, train: dict):
    return ({"vdm_config": VDM_CONFIG, "parameters": train["parameters"],
             "code": "google-research/vdm's model_vdm.py and train_state.py, unmodified", **train["versions"]},
            {"optimizer": {"official": "experiment.py's optax.adamw with its weight-decay mask, linear warm-up "
                                       "(lr_decay=False), EMA"} | VDM_OPTIMIZER,
             "loss": "experiment_vdm.py's bits/dim (recon + klz + diff), train mode",
             "compile_and_first_step_s": train["first_step_s"], "ema_gamma": train["gamma"]},
            {"bound_reference": _jax_bound(f"{tmp}/work", np.load(f"{tmp}/reference.npz"))})


SOURCES = {
    "ddpm": Source(600, 32, "torch", lambda args: {"config": CONFIG, "lr": 1e-3, "seed": 0, "threads": os.cpu_count(),
                                                   "eval_images": len(EVAL_STEPS), "eval_timesteps": EVAL_STEPS},
                   "model", _ddpm_record),
    "vdm": Source(100, 16, "vdm", lambda args: {"vdm_code": os.path.abspath(args.vdm_code), "config": VDM_CONFIG,
                                                "optimizer": VDM_OPTIMIZER, "seed": 1, "eval_images": 8},
                  "checkpoints-0", _vdm_record)}


def _imported(workdir: str):
    """The imported work directory's train state and its model and schedule modules with the EMA parameters."""
    from vdm_jax.training import steps
    from vdm_jax.training.evaluation import load_checkpoint

    _, state = load_checkpoint(workdir)
    return (state, *steps._modules(state, state.ema_params))


def _jax_bound(workdir: str, ref) -> dict:
    """vdm_jax's bound of the imported EMA parameters at the official process's images and draws (ε_0, t, ε),
    term by term, against the official `VDM.__call__`'s, in bits/dim; and both networks' ε̂ at the official z_t."""
    import jax.numpy as jnp

    from vdm_jax.diffusion import q_sample
    from vdm_jax.losses import diffusion_loss, prior_loss, vdm_decoder_nll
    from vdm_jax.pixels import pixels_to_data

    state, model, schedule = _imported(workdir)
    gamma, pred_fn = state.objective.family.gamma_schedule(schedule), state.objective.pred_fn(model, schedule)
    x, t, eps = pixels_to_data(ref["images"], grid="vdm"), jnp.asarray(ref["t"]), jnp.asarray(ref["eps"])
    gamma_0, gamma_1 = gamma(jnp.zeros(())), gamma(jnp.ones(()))
    ours = {"loss_klz": prior_loss(x, gamma_1),
            "loss_recon": vdm_decoder_nll(q_sample(x, jnp.asarray(ref["eps_0"]), gamma_0), x, gamma_0),
            "loss_diff": diffusion_loss(pred_fn(q_sample(x, eps, gamma(t)), t), eps, t, gamma)}
    to_bpd = 1.0 / (np.prod(x.shape[1:]) * np.log(2.0))  # experiment_vdm.py's rescale_to_bpd
    official = {k: np.asarray(ref[k], np.float64) * to_bpd for k in ours}
    ours = {k: np.asarray(v, np.float64) * to_bpd for k, v in ours.items()}
    eps_hat = np.asarray(pred_fn(jnp.asarray(ref["z_t"]), t))
    return {"images": len(x), "t": ref["t"].tolist(), "official_bpd": float(sum(official.values()).mean()),
            "vdm_jax_bpd": float(sum(ours.values()).mean()),
            "terms_bpd": {k: {"official": float(official[k].mean()), "vdm_jax": float(ours[k].mean())} for k in ours},
            "max_abs_bpd_difference_per_image": float(np.abs(sum(official.values()) - sum(ours.values())).max()),
            "max_abs_eps_hat_difference": float(np.abs(eps_hat - ref["eps_hat"]).max()),
            "eps_hat_scale": float(np.abs(ref["eps_hat"]).max())}


def _jax_eps(workdir: str, io) -> dict:
    """The imported model's ε-MSE on the torch side's images, steps and noise: z from vdm_jax's own DDPM
    schedule at step i = k + 1 (t = i/T), against diffusers' z and ε̂."""
    import jax.numpy as jnp

    from vdm_jax.diffusion import q_sample
    from vdm_jax.pixels import pixels_to_data

    state, model, _ = _imported(workdir)
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
