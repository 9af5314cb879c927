"""Config validation: unknown keys, wrong types, impossible combinations; the `vdm` config against
docs/training.md's table of the official recipe."""
import ast
import os
import re
from pathlib import Path

import pytest

from vdm_jax.training import checked_config, compute_dtype, default_config, validate_config

from experiments.configs import cifar10


@pytest.mark.parametrize("variant", cifar10.VARIANTS)
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
    ({"optim.weight_decay_mask": "all"}, r"config key 'optim.weight_decay_mask' must be one of \('official', "
                                         r"'kernels'\), got 'all'"),
    ({"diffusion.family": "vdm", "diffusion.timesteps": 0, "diffusion.schedule": "learned_lin"},
     "diffusion.family='vdm': diffusion.schedule must be one of 'linear', 'cosine', 'learned' or 'learned_linear', "
     "got 'learned_lin'"),
    ({"diffusion.schedule": "learned_linear"}, "diffusion.family='ddpm': diffusion.schedule must be one of 'linear' "
                                               "or 'cosine', got 'learned_linear'"),
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


@pytest.mark.parametrize("variant", cifar10.VARIANTS)
def test_experiment_configs_choose_the_dtype_by_backend(variant):
    """The named configs leave the activation dtype to the backend (here, a CPU, float32), but for
    `vdm` and `vdm_nnet`, the official runs, which are float32 everywhere."""
    config = cifar10.get_config(variant)
    assert config.model.dtype == ("float32" if variant.startswith("vdm") else "auto")
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


@pytest.mark.parametrize("variance_minimisation", [True, False])
def test_learned_linear_schedule_trains_on_the_bound(variance_minimisation):
    """diffusion.schedule='learned_linear' builds the official schedule (w = γ_max - γ_min, b = γ_min) and
    trains it on the bound's gradient whatever diffusion.variance_minimisation says: w and b are end
    points, the only parameters variance minimisation would not touch (docs/math.md §1.7). 'learned'
    minimises the variance of its shape when asked. The bound's gradient reaches both w and b (the
    family's loss with a stand-in network: nothing compiled but the loss)."""
    import jax
    import numpy as np
    from flax import nnx

    import vdm_jax as vj
    from vdm_jax.training import make_objective

    c = default_config()
    c.diffusion.update(family="vdm", timesteps=0, schedule="learned_linear", gamma_min=-10.0, gamma_max=6.0,
                       variance_minimisation=variance_minimisation)
    objective = make_objective(c, validate_config(c))
    assert objective.learned_schedule and not objective.minimise_variance and objective.schedule_hidden == 0
    schedule = objective.init_schedule(nnx.Rngs(0))
    assert isinstance(schedule, vj.LearnedLinearSchedule)
    assert (float(schedule.w[...]), float(schedule.b[...])) == (16.0, -10.0)
    c.diffusion.schedule = "learned"
    mlp = make_objective(c, validate_config(c))
    assert mlp.learned_schedule and mlp.minimise_variance == variance_minimisation
    assert isinstance(mlp.init_schedule(nnx.Rngs(0)), vj.LearnedSchedule)

    graphdef, state = nnx.split(schedule)
    x = vj.pixels_to_data(jax.random.randint(jax.random.key(1), (4, 2, 2, 1), 0, 256), grid="vdm")

    def mean_loss(state):
        pred_fn = lambda z, t: 0.5 * z  # noqa: E731  (a stand-in network)
        loss, _ = objective.family.loss(pred_fn, x, key=jax.random.key(2), gamma_fn=nnx.merge(graphdef, state))
        return loss.mean()

    grads = jax.jit(jax.grad(mean_loss))(state)
    for name in ("w", "b"):
        assert np.isfinite(grads[name][...]) and abs(float(grads[name][...])) > 0, name
    with pytest.raises(ValueError, match=r"schedule='learned_linear': pass the learned schedule as gamma_fn=.*"
                                         r"vdm_jax.LearnedLinearSchedule"):
        objective.family.gamma_schedule()


def test_vdm_config_is_the_official_recipe():
    """The settings of google-research/vdm's configs/cifar10.py in `vdm` (docs/training.md's table
    checks every row); `vdm_nnet` differs in the schedule, its variance minimisation and the mask only."""
    from vdm_jax.training.config import _leaves

    c = cifar10.get_config("vdm")
    assert (c.diffusion.family, c.diffusion.timesteps, c.diffusion.schedule) == ("vdm", 0, "learned_linear")
    assert (c.optim.optimizer, c.optim.weight_decay_mask, c.optim.weight_decay) == ("adamw", "official", 0.01)
    model = validate_config(c)
    assert (model.base_channels, model.num_res_blocks, model.dropout, model.fourier_features,
            model.attn_resolutions, model.mid_attention) == (128, 32, 0.1, (6, 7), (), True)
    nnet = dict(_leaves(cifar10.get_config("vdm_nnet")))
    changed = {k: v for k, v in _leaves(c) if nnet[k] != v}
    assert changed == {"diffusion.schedule": "learned_linear", "diffusion.variance_minimisation": False,
                       "optim.weight_decay_mask": "official"}
    assert (nnet["diffusion.schedule"], nnet["diffusion.variance_minimisation"], nnet["optim.weight_decay_mask"]) == (
        "learned", True, "kernels")


# --- docs/training.md's table of the official VDM recipe against `vdm` ---------------------------

_TRAINING_MD = Path(__file__).resolve().parents[2] / "docs" / "training.md"
_SPAN = re.compile(r"`([^`]+)`")
_SOURCE = re.compile(r"^`(?P<file>[\w/]+\.py):L(?P<line>\d+)`$")


def recipe_rows(text: str) -> list[dict]:
    """The rows of the table under '## The official VDM recipe': setting, official, source, ours, key."""
    section = text.split("## The official VDM recipe", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if line.startswith("| ") and cells[0] != "Setting":
            rows.append(dict(zip(("setting", "official", "source", "ours", "key"), cells), cells=len(cells)))
    return rows


def recipe_problems(text: str, config: dict, defaults: dict) -> list[str]:
    """What in the table disagrees with the config's values (`config`, dotted key -> value): a row's
    first code span under 'vdm_jax' (a Python literal) where it names a key, a key that does not
    exist, a source not written `file.py:Ln`, and a key the config changes from `defaults` without a row."""
    problems, keys = [], set()
    for row in recipe_rows(text):
        where = f"row {row['setting']!r}"
        if row["cells"] != 5:
            problems.append(f"{where}: {row['cells']} cells, not 5 (a '|' inside a cell?)")
            continue
        if not _SOURCE.match(row["source"]):
            problems.append(f"{where}: the official source must read `file.py:Ln`, got {row['source']!r}")
        if row["key"] == "—":
            continue
        key = row["key"].strip("`")
        keys.add(key)
        if key not in config:
            problems.append(f"{where}: no config key {key!r}")
            continue
        spans = _SPAN.findall(row["ours"])
        try:
            ours = ast.literal_eval(spans[0]) if spans else None
        except (ValueError, SyntaxError):
            ours = spans[0]
        if not spans or ours != config[key]:
            problems.append(f"{where}: the table says {spans[:1]} for {key}, the config has {config[key]!r}")
    problems += [f"{key} = {config[key]!r} differs from the default {defaults[key]!r} but has no row"
                 for key in config if config[key] != defaults[key] and key not in keys]
    return problems


def _values(config) -> dict:
    from vdm_jax.training.config import _leaves

    return dict(_leaves(config))


def test_the_official_recipe_table_is_the_vdm_config():
    text = _TRAINING_MD.read_text(encoding="utf-8")
    rows = recipe_rows(text)
    assert len(rows) >= 50 and "dc27b98a554f65cdc654b800da5aa1846545d41b" in text
    problems = recipe_problems(text, _values(cifar10.get_config("vdm")), _values(default_config()))
    assert not problems, "\n".join(problems)


def test_the_recipe_check_catches_drift():
    """The check itself: a changed value, a row lost, a mistyped key and a bad source are each caught."""
    text = _TRAINING_MD.read_text(encoding="utf-8")
    config, defaults = _values(cifar10.get_config("vdm")), _values(default_config())
    config_b2 = dict(config, **{"optim.b2": 0.999})
    assert any("optim.b2" in p for p in recipe_problems(text, config_b2, defaults))
    no_row = "\n".join(line for line in text.splitlines() if "`optim.weight_decay_mask`" not in line)
    assert any("optim.weight_decay_mask = 'official' differs" in p for p in recipe_problems(no_row, config, defaults))
    typo = text.replace("| `optim.eps` |", "| `optim.epsilon` |")
    assert any("no config key 'optim.epsilon'" in p for p in recipe_problems(typo, config, defaults))
    source = text.replace("`configs/cifar10.py:L73`", "`configs/cifar10.py line 73`")
    assert any("must read `file.py:Ln`" in p for p in recipe_problems(source, config, defaults))
    pipe = text.replace("| `b2=0.99` |", "| `b2=0.99` | 0.99 |")
    assert any("row 'β2': 6 cells" in p for p in recipe_problems(pipe, config, defaults))


@pytest.mark.skipif(not os.environ.get("VDM_OFFICIAL_SOURCE"), reason="VDM_OFFICIAL_SOURCE (a checkout of "
                    "google-research/vdm at the table's commit) is not set")
def test_the_official_column_is_the_official_code():
    """With google-research/vdm's files at $VDM_OFFICIAL_SOURCE: each row's first official code span
    is on the line its source names."""
    root = Path(os.environ["VDM_OFFICIAL_SOURCE"])
    for row in recipe_rows(_TRAINING_MD.read_text(encoding="utf-8")):
        m = _SOURCE.match(row["source"])
        line = (root / m["file"]).read_text(encoding="utf-8").splitlines()[int(m["line"]) - 1]
        assert _SPAN.findall(row["official"])[0] in line, (row["setting"], line)
