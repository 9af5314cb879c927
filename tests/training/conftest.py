"""Small configs shared by the training tests."""
import pytest

from vdm_jax.models import tiny
from vdm_jax.training import default_config


def micro_config(image_size=8, channels=1, **diffusion):
    """A very small run: an 8×8×1 U-Net of ~30k parameters, batch 16, T = 50."""
    c = default_config()
    c.model.update(tiny(image_size=image_size, in_channels=channels, base_channels=8, num_groups=4,
                        embedding_dim=16).to_dict())
    c.diffusion.timesteps = 50
    c.diffusion.schedule_hidden = 16
    for k, v in diffusion.items():
        c.diffusion[k] = v
    c.training.batch_size = 16
    c.training.eval_batch_size = 16
    c.training.num_samples = 8
    c.training.sample_steps = 5
    c.training.sampler = "ddim"
    c.training.progress_bar = False
    return c


@pytest.fixture
def micro():
    return micro_config
