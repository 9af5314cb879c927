"""Config validation: unknown keys, wrong types, impossible combinations."""
import pytest

from vdm_jax.training import checked_config, compute_dtype, default_config, validate_config

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
    ({"diffusion.variance": "learned", "diffusion.loss": "hybrid"}, "needs model.learned_variance=True"),
    ({"model.learned_variance": True}, "needs model.learned_variance=False"),
    ({"diffusion.loss": "hybrid"}, "needs diffusion.variance='learned'"),
    ({"diffusion.loss": "simple", "diffusion.variance": "learned", "model.learned_variance": True},
     "cannot train a learned variance"),
    ({"diffusion.family": "vdm", "model.learned_variance": True}, "DDPM option"),
    ({"diffusion.family": "vdm", "diffusion.gamma_min": 5.0}, "diffusion.gamma_min must be < gamma_max, got 5.0"),
    ({"diffusion.family": "diffusion"}, "'diffusion.family' must be one of"),
    ({"diffusion.schedule": "learned"}, "diffusion.family='ddpm': diffusion.schedule must be one of 'linear' "
                                        "or 'cosine', got 'learned'"),
    ({"training.batch_size": 0}, "'training.batch_size' must be > 0"),
    ({"optim.ema_decay": 1.0}, r"'optim.ema_decay' must be in \[0, 1\)"),
    ({"diffusion.timesteps": 0}, "diffusion.family='ddpm': diffusion.timesteps must be >= 1, got 0"),
    ({"model.image_size": 30}, "config.model"),
    ({"model.channel_mult": ()}, r"config.model: UNetConfig.channel_mult: expected a non-empty tuple"),
    ({"model.num_groups": 5}, r"config.model: UNetConfig.num_groups: expected a divisor of every channel count"),
    ({"model.attn_resolutions": (3,)}, r"config.model: UNetConfig.attn_resolutions: expected sizes among the "
                                       r"reachable resolutions"),
    ({"seed": -1}, "'seed' must be >= 0, got -1"),
    ({"data.num_workers": -1}, "'data.num_workers' must be >= 0, got -1"),
    ({"diffusion.beta_start": 0.05}, r"diffusion.beta_start must be <= beta_end, got diffusion.beta_start=0.05 and "
                                     r"diffusion.beta_end=0.02"),
    ({"diffusion.beta_end": 1.0}, r"diffusion.beta_end must be a real number in \(0, 1\), got 1.0"),
    ({"diffusion.hybrid_lambda": -0.001}, "'diffusion.hybrid_lambda' must be >= 0"),
    ({"diffusion.family": "vdm", "diffusion.timesteps": 0, "diffusion.schedule": "learned",
      "diffusion.schedule_hidden": 0}, "'diffusion.schedule_hidden' must be >= 1, got 0"),
    ({"diffusion.family": "vdm", "diffusion.gamma_max": float("inf")}, "'diffusion.gamma_max' must be a finite number"),
    ({"optim.grad_clip": float("nan")}, "'optim.grad_clip' must be a finite number, got nan"),
    ({"optim.b2": 1.0}, r"'optim.b2' must be in \[0, 1\), got 1.0"),
    ({"optim.eps": 0.0}, "'optim.eps' must be > 0"),
    ({"training.num_processes": 2, "training.process_id": 2}, "'training.process_id' must be < training.num_processes"),
    ({"training.sample_steps": 100}, r"training.sample_steps=100: DDPM's ancestral sampler runs all T = 1000 steps"),
    ({"training.sampler": "ddim", "training.sample_steps": 2000}, "ddim on a DDPM with T = 1000 takes at most T"),
])
def test_impossible_combinations(changes, message):
    c = default_config()
    for key, value in changes.items():
        group, _, name = key.rpartition(".")
        (c[group] if group else c)[name] = value
    with pytest.raises(ValueError, match=message):
        validate_config(c)


@pytest.mark.parametrize("changes", [
    {"training.sample_steps": 1000},  # ancestral: all T steps, said explicitly
    {"training.sampler": "ddim", "training.sample_steps": 1000},
    {"diffusion.family": "vdm", "diffusion.timesteps": 0, "training.sample_steps": 250},
])
def test_sample_steps_that_fit(changes):
    c = default_config()
    for key, value in changes.items():
        group, name = key.split(".")
        c[group][name] = value
    assert validate_config(c).image_size == 32


@pytest.mark.parametrize("backend, expected", [("cpu", "float32"), ("gpu", "bfloat16"), ("cuda", "bfloat16"),
                                               ("rocm", "bfloat16"), ("tpu", "bfloat16"), ("METAL", "float32")])
def test_auto_dtype_is_bfloat16_on_accelerators_only(backend, expected):
    assert compute_dtype("auto", backend) == expected
    assert compute_dtype("float32", backend) == "float32"
    assert compute_dtype("bfloat16", backend) == "bfloat16"


@pytest.mark.parametrize("variant", ["ddpm", "vdm", "small"])
def test_experiment_configs_choose_the_dtype_by_backend(variant):
    """The named configs leave the activation dtype to the backend; here (CPU) that is float32."""
    config = cifar10.get_config(variant)
    assert config.model.dtype == "auto"
    assert validate_config(config).dtype == "float32"
    config.model.dtype = "bfloat16"
    assert validate_config(config).dtype == "bfloat16"


def test_bad_dtype_is_named():
    c = default_config()
    c.model.dtype = "half-ish"
    with pytest.raises(ValueError, match=r"config.model: UNetConfig.dtype: expected a floating dtype"):
        validate_config(c)


def test_default_config_is_locked():
    """A typo in a config file fails where it is made, not at validation."""
    c = default_config()
    with pytest.raises((AttributeError, KeyError), match="bacth_size"):
        c.training.bacth_size = 3


@pytest.mark.parametrize("values, error, message", [
    ({"training": {"bacth_size": 3}}, ValueError,
     r"unknown config key 'training.bacth_size' \(did you mean 'training.batch_size'\?\); valid keys here "
     r"are: batch_size,"),
    ({"trainin": {"batch_size": 3}}, ValueError, r"unknown config key 'trainin' \(did you mean 'training'\?\)"),
    ({"training": {"batch_size": True}}, TypeError, r"'training.batch_size' must be of type int, got True \(bool\)"),
    ({"training": {"batch_size": 3.0}}, TypeError, r"'training.batch_size' must be of type int, got 3.0 \(float\)"),
    ({"training": {"progress_bar": 1}}, TypeError, r"'training.progress_bar' must be of type bool, got 1 \(int\)"),
    ({"optim": {"learning_rate": "fast"}}, TypeError, r"'optim.learning_rate' must be of type float"),
    ({"training": 3}, TypeError, r"config key 'training' must be a group of settings, got 3 \(int\)"),
    ({"seed": {"value": 1}}, TypeError, r"config key 'seed' is a setting, not a group of settings"),
    ({"optim": {"eps": float("inf")}}, ValueError, r"'optim.eps' must be a finite number, got inf"),
])
def test_checked_config_names_the_key(values, error, message):
    with pytest.raises(error, match=message):
        checked_config(values)


def test_checked_config_reads_a_saved_config_back():
    """config.json's plain values (lists for tuples, ints for floats) come back with the schema's types."""
    import json

    c = cifar10.get_config("vdm")
    saved = json.loads(json.dumps(c.to_dict(), default=list))
    saved["optim"]["learning_rate"] = 1  # an int where the schema has a float
    back = checked_config(saved)
    assert back.model.channel_mult == tuple(c.model.channel_mult) and isinstance(back.model.channel_mult, tuple)
    assert back.optim.learning_rate == 1.0 and isinstance(back.optim.learning_rate, float)
    assert back.diffusion.to_dict() == c.diffusion.to_dict() and back.is_locked
    assert validate_config(back) == validate_config(c)


def test_read_config_names_the_file(tmp_path):
    import json

    from vdm_jax.training.evaluation import read_config

    saved = default_config().to_dict()
    saved["training"]["num_stepz"] = 5
    (tmp_path / "config.json").write_text(json.dumps(saved, default=list))
    with pytest.raises(ValueError, match=r"config.json: unknown config key 'training.num_stepz' \(did you mean "
                                         r"'training.num_steps'\?\)"):
        read_config(str(tmp_path))


def test_every_key_has_a_meaning():
    """`--help`'s table: every key of the schema with its default and a meaning (the model's from
    UNetConfig's docstring), nothing else."""
    from vdm_jax.training.config import _leaves, describe_config

    lines = describe_config().splitlines()
    settings = list(_leaves(default_config()))
    assert len(lines) == len(settings)
    for line, (name, value) in zip(lines, settings):
        head = f"  --config.{name}={value!r}"
        assert line.startswith(head) and len(line[len(head):].strip()) >= 5, line  # a meaning follows
