"""A very small run for the training tests, usable as a config file on the command line:

    python -m experiments.cifar10 --workdir=DIR --config=tests/training/micro_config.py[:ddpm|vdm|conditional]

An 8×8×1 U-Net of ~15k parameters, one level of ResBlocks and no attention: the architecture is not
what these tests test (tests/models does), and its train step compiles in 60% of the time of the
two-level tiny net with attention; `get_config` trains it on scikit-learn's digits (offline).
"""
from vdm_jax.models import tiny
from vdm_jax.training import default_config, set_model


def micro_config(image_size=8, channels=1, **diffusion):
    """An 8×8×1 U-Net of ~15k parameters (`model.dtype='auto'`), batch 16, T = 50 (any diffusion.* key
    may be changed)."""
    c = default_config()
    # As the shipped configs set their model: model.dtype = 'auto' (float32 on a CPU).
    set_model(c, tiny(image_size=image_size, in_channels=channels, base_channels=8, channel_mult=(1,),
                      attn_resolutions=(), mid_attention=False, num_groups=4, embedding_dim=16))
    c.diffusion.timesteps = 50
    c.diffusion.schedule_hidden = 16
    for k, v in diffusion.items():
        c.diffusion[k] = v
    c.optim.warmup_steps = 0  # (warm-up starts at lr 0: the first step would change nothing)
    c.training.batch_size = 16
    c.training.eval_batch_size = 16
    c.training.num_samples = 8
    c.training.sample_steps = 5
    c.training.sampler = "ddim"
    c.training.progress_bar = False
    return c


def get_config(family: str = "ddpm"):
    """`micro_config` on the digits: 12 steps, a log line and a metrics record every step,
    checkpoints every 3 steps, evaluation and samples only at the end. 'vdm' is the `vdm_nnet` CIFAR-10
    recipe in small: continuous time, a learned schedule with variance minimisation, AdamW with
    masked weight decay, warmed up over 4 steps. 'conditional' is 'ddpm' class-conditional on the
    digits' 10 classes (label dropout 0.2), its samples guided with w = 1, 2 per class."""
    conditional = family == "conditional"
    family = "ddpm" if conditional else family
    c = micro_config(family=family, timesteps=20 if family == "ddpm" else 0)
    c.data.source = "digits"
    c.data.random_flip = False
    c.optim.warmup_steps = 0
    c.optim.learning_rate = 1e-3
    if family == "vdm":
        c.diffusion.schedule = "learned"
        c.optim.update(optimizer="adamw", b2=0.99, weight_decay=0.01, grad_clip=0.0, warmup_steps=4)
    c.training.num_steps = 12
    c.training.log_every = 1
    c.training.checkpoint_every = 3
    c.training.eval_every = 0
    c.training.sample_every = 0
    c.training.eval_batch_size = 304
    c.training.num_samples = 8
    c.training.sample_steps = 4
    if conditional:
        c.model.num_classes = 10
        c.training.update(label_dropout=0.2, guidance=1.0, num_samples=20)
    return c
