"""Config validation: unknown keys, wrong types, impossible combinations."""
import pytest

from vdm_jax.training import default_config, validate_config

from experiments.configs import cifar10


@pytest.mark.parametrize("variant", ["ddpm", "vdm", "small"])
def test_experiment_configs_validate(variant):
    model = validate_config(cifar10.get_config(variant))
    assert model.image_size == 32


def test_unknown_variant():
    with pytest.raises(ValueError, match="unknown CIFAR-10 config variant 'big'"):
        cifar10.get_config("big")


def test_unknown_key():
    c = default_config()
    with c.unlocked():
        c.training.bacth_size = 3
    with pytest.raises(ValueError, match="unknown config key 'training.bacth_size'"):
        validate_config(c)


def test_unknown_model_key():
    c = default_config()
    with c.unlocked():
        c.model.width = 3
    with pytest.raises(ValueError, match=r"unknown config key 'model.width'"):
        validate_config(c)


def test_wrong_type():
    c = default_config()
    c.training.batch_size = 3
    with c.ignore_type():
        c.training.batch_size = "128"
    with pytest.raises(TypeError, match="'training.batch_size' must be of type int"):
        validate_config(c)


@pytest.mark.parametrize("changes,message", [
    ({"diffusion.variance": "learned"}, "needs model.learned_variance=True"),
    ({"model.learned_variance": True}, "needs model.learned_variance=False"),
    ({"diffusion.loss": "hybrid"}, "needs diffusion.variance='learned'"),
    ({"diffusion.loss": "simple", "diffusion.variance": "learned", "model.learned_variance": True},
     "cannot train a learned variance"),
    ({"diffusion.family": "vdm", "model.learned_variance": True}, "DDPM option"),
    ({"diffusion.family": "vdm", "diffusion.gamma_min": 5.0}, "gamma_min must be < diffusion.gamma_max"),
    ({"diffusion.family": "diffusion"}, "'diffusion.family' must be one of"),
    ({"diffusion.schedule": "learned"}, "'diffusion.schedule' must be one of"),
    ({"training.batch_size": 0}, "'training.batch_size' must be > 0"),
    ({"optim.ema_decay": 1.0}, r"'optim.ema_decay' must be in \[0, 1\)"),
    ({"diffusion.timesteps": 0}, "must be >= 1 for a DDPM"),
    ({"model.image_size": 30}, "config.model"),
])
def test_impossible_combinations(changes, message):
    c = default_config()
    for key, value in changes.items():
        group, name = key.split(".")
        c[group][name] = value
    with pytest.raises(ValueError, match=message):
        validate_config(c)
