"""The quickstart's run (`python -m experiments.quickstart`), without its command-line flags, so that
other programs (the benchmarks) can import it; also usable as a config file:

    python -m experiments.cifar10 --workdir=DIR --config=experiments/configs/quickstart.py[:STEPS]
    python -m experiments.cifar10 --workdir=DIR --config=experiments/configs/quickstart.py:conditional

`conditional` (also `python -m experiments.quickstart --conditional`): the same model made
class-conditional on the digits' labels 0..9 (model.num_classes = 10, class 10 is "no label"),
trained with the label dropped 10% of the time (training.label_dropout), so that it also learns
the unconditional model that classifier-free guidance needs; its sample grids have one class a row.
`python -m benchmarks guidance_digits` trains it and measures its guided samples (docs/benchmarks.md).
"""


def get_config(variant: int | str = 2500):
    """The quickstart's config for `variant` training steps (a config file's argument is a string),
    or `'conditional'` (`conditional(get_config())`)."""
    if variant == "conditional":
        return conditional(get_config())
    steps = variant
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


def conditional(c):
    """`c` made class-conditional on the digits' 10 labels (changed in place and returned)."""
    c.model.num_classes = 10
    c.training.label_dropout = 0.1
    c.training.num_samples = 100  # 10 of each class, a class a row
    return c
