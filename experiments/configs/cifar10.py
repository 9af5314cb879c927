"""CIFAR-10 configs: `--config=experiments/configs/cifar10.py:VARIANT`, VARIANT in ddpm | vdm | vdm_nnet | small.

Every variant starts from `vdm_jax.training.default_config()` and changes a few fields.

ddpm — Ho et al. 2020's CIFAR-10 recipe: the 35.7M U-Net, T = 1000 linear β, L_simple on ε,
  Adam 2e-4 with 5000 warmup steps, batch 128, clip 1.0, EMA 0.9999, dropout 0.1, flips, 800k steps.
    python -m experiments.cifar10 --workdir=runs/ddpm --config=experiments/configs/cifar10.py:ddpm
  Cost: ~10.6 days on a TPU v3-8 in the paper; needs an accelerator. Should reach FID ~3.2 and
  ≤ 3.75 bits/dim on the test set (the paper's L_simple model, VLB evaluation).

vdm — google-research/vdm's configs/cifar10.py, the run behind the paper's 2.65 bits/dim, setting by
  setting (docs/training.md puts each beside the official file and line): the 31M no-downsampling
  U-Net with Fourier features and no attention but the middle's, dropout 0.1; continuous time
  (T = 0); the learned linear schedule γ(t) = b + |w| t (the official `learnable_scalar`) from
  γ ∈ [-13.3, 5], trained on the bound (no variance minimisation); antithetic time sampling;
  AdamW 2e-4 (b1 0.9, b2 0.99, eps 1e-8, weight decay 0.01 with the official mask: everything but
  biases, so GroupNorm scales and the schedule's w, b too), 100 warm-up steps, no clipping;
  batch 128, EMA 0.9999, no flips, float32 activations, 10M steps.
    python -m experiments.cifar10 --workdir=runs/vdm --config=experiments/configs/cifar10.py:vdm
  Cost: the paper trained 10M steps on TPU v3-8 pods (weeks); needs accelerators. Should reach
  ~2.65 bits/dim on the test set (the released checkpoint evaluates to 2.637).

vdm_nnet — vdm with the learned monotone-MLP schedule (the official `learnable_nnet`) whose shape
  follows VDM's variance minimisation, and weight decay on the U-Net's kernels only
  (optim.weight_decay_mask='kernels': decay would pull the schedule's end points and the
  GroupNorm scales toward 0). vdm_jax's `vdm` config before it followed the official one.
    python -m experiments.cifar10 --workdir=runs/vdm_nnet --config=experiments/configs/cifar10.py:vdm_nnet
  Cost: as vdm. Not a published run: no bits/dim to expect beyond the paper's ~2.65 for its schedule.

small — fits a 2-core CPU: the tiny U-Net (0.42M params) on 32×32×3, DDPM with L_simple,
  batch 32, Adam 3e-4.
    python -m experiments.cifar10 --workdir=runs/small --config=experiments/configs/cifar10.py:small
  Its speed, and the loss and test bound it reaches in 30 minutes on 2 CPU cores:
  benchmarks/results/cifar10_small_cpu.json (measured at commit 9828861 with
  `python -m benchmarks.cifar10_small_cpu`, since removed; docs/benchmarks.md); samples
  are still blobs at this size and budget.

Offline data: add --config.data.source=images:$VDM_JAX_DATA_DIR/cifar10_jpeg.zip (or
cifar10_tar:PATH, npz:PATH); see `vdm_jax.data.load_source`.
"""
from vdm_jax.models import ddpm_cifar10, tiny, vdm_cifar10
from vdm_jax.training import default_config, set_model

VARIANTS = ("ddpm", "vdm", "vdm_nnet", "small")


def get_config(variant: str = "small"):
    if variant not in VARIANTS:
        raise ValueError(f"unknown CIFAR-10 config variant {variant!r}; choose one of {VARIANTS}.")
    return {"ddpm": ddpm, "vdm": vdm, "vdm_nnet": vdm_nnet, "small": small}[variant]()


def ddpm():
    c = default_config()
    set_model(c, ddpm_cifar10())
    c.diffusion.family = "ddpm"
    c.diffusion.timesteps = 1000
    c.diffusion.schedule = "linear"
    c.diffusion.loss = "simple"
    c.diffusion.variance = "beta"
    c.optim.learning_rate = 2e-4
    c.optim.warmup_steps = 5000
    c.training.batch_size = 128
    c.training.num_steps = 800_000
    c.training.eval_every = 50_000
    c.training.sample_every = 50_000
    c.training.checkpoint_every = 10_000
    c.training.keep_every = 100_000
    return c


def vdm():
    """google-research/vdm configs/cifar10.py; each setting's official file and line: docs/training.md."""
    c = default_config()
    set_model(c, vdm_cifar10(), dtype="float32")  # sm_n_embd 128, sm_n_layer 32, sm_pdrop 0.1, Fourier features,
    # no attention; float32 activations as officially (the other configs leave the dtype to the backend)
    c.data.random_flip = False  # (dataset 'cifar10', not 'cifar10_aug')
    c.diffusion.family = "vdm"
    c.diffusion.timesteps = 0
    c.diffusion.schedule = "learned_linear"
    c.diffusion.gamma_min = -13.3
    c.diffusion.gamma_max = 5.0
    c.diffusion.variance_minimisation = False  # (w, b are end points: trained on the bound, as officially)
    c.optim.optimizer = "adamw"
    c.optim.learning_rate = 2e-4
    c.optim.warmup_steps = 100
    c.optim.b1 = 0.9
    c.optim.b2 = 0.99
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.01
    c.optim.weight_decay_mask = "official"
    c.optim.grad_clip = 0.0
    c.optim.ema_decay = 0.9999
    c.training.batch_size = 128
    c.training.num_steps = 10_000_000
    c.training.log_every = 1_000
    c.training.eval_every = 10_000
    c.training.eval_batch_size = 128
    c.training.sample_every = 100_000
    c.training.sample_steps = 1000
    c.training.checkpoint_every = 10_000
    c.training.keep_checkpoints = 5
    c.training.keep_every = 500_000
    return c


def vdm_nnet():
    """`vdm` with the monotone-MLP schedule (official `learnable_nnet`), variance minimisation, and
    weight decay on the U-Net's kernels only."""
    c = vdm()
    c.diffusion.schedule = "learned"
    c.diffusion.variance_minimisation = True
    c.optim.weight_decay_mask = "kernels"
    return c


def small():
    c = default_config()
    set_model(c, tiny())
    c.diffusion.family = "ddpm"
    c.optim.learning_rate = 3e-4
    c.optim.warmup_steps = 200
    c.optim.ema_decay = 0.999
    c.training.batch_size = 32
    c.training.num_steps = 2_000
    c.training.log_every = 50
    c.training.eval_every = 500
    c.training.eval_batch_size = 200
    c.training.sample_every = 1_000
    c.training.num_samples = 36
    c.training.sampler = "ddim"
    c.training.sample_steps = 100
    c.training.checkpoint_every = 250
    return c
