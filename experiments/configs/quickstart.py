"""The quickstart's run (`python -m experiments.quickstart`), without its command-line flags, so that
other programs (the benchmarks) can import it; also usable as a config file:

    python -m experiments.cifar10 --workdir=DIR --config=experiments/configs/quickstart.py[:STEPS]
"""


def get_config(steps: int | str = 2500):
    """The quickstart's config for `steps` training steps (a config file's argument is a string)."""
    from vdm_jax.models import tiny
    from vdm_jax.training import default_config, set_model

    c = default_config()
    c.data.source = "digits"
    c.data.random_flip = False  # digits are not mirror-symmetric
    set_model(c, tiny(image_size=8, in_channels=1, dropout=0.0))
    c.diffusion.family = "ddpm"
    c.diffusion.timesteps = 1000
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 100
    c.optim.ema_decay = 0.995
    c.training.batch_size = 64
    c.training.num_steps = int(steps)
    c.training.log_every = 100
    c.training.eval_every = 0
    c.training.eval_batch_size = 304  # the 297 test images in one padded batch
    c.training.sample_every = 0
    c.training.num_samples = 64
    c.training.sampler = "ddim"
    c.training.sample_steps = 100
    c.training.checkpoint_every = 1000
    return c
