"""The training configuration: one default, validated against itself.

`default_config()` is the whole schema. Experiment configs start from it and change a few fields;
`validate_config` rejects unknown keys, wrong types and impossible combinations with one clear
message each, before anything is built.
"""
from __future__ import annotations

import difflib
import json
import math
import re

import jax
import ml_collections

from vdm_jax.models import UNetConfig, tiny
from vdm_jax.training.faults import ON_NONFINITE
from vdm_jax.families import SAMPLERS as _SAMPLER_REGISTRY
from vdm_jax.training.objective import FAMILIES, make_objective
from vdm_jax.training.state import DECAY_MASKS

SAMPLERS = tuple(_SAMPLER_REGISTRY)  # (the core registry's names: `vdm_jax.SAMPLERS`)


def compute_dtype(dtype: str, backend: str | None = None) -> str:
    """The U-Net's activation dtype for `model.dtype`: 'auto' is 'bfloat16' on GPU/TPU, else 'float32'
    (float32 parameters, loss and optimiser state either way; XLA:CPU has no fast bfloat16 convolutions).

    Any other value is returned as it is (UNetConfig checks it). backend: None is JAX's default one
    (asking for it starts it).
    """
    if dtype != "auto":
        return dtype
    return "bfloat16" if (backend or jax.default_backend()) in ("gpu", "cuda", "rocm", "tpu") else "float32"


# Every setting but the model's: (default, meaning[, allowed values: a tuple of choices or a range of
# `_RANGES`]). The one source of `default_config()`, of the entry points' `--help` (`describe_config`)
# and of `validate_config`'s checks of single settings; the model's settings are `UNetConfig`'s fields.
SETTINGS = {
    "seed": (0, "the run's seed: initialisation, data order, every random draw", ">= 0"),
    "data.source": ("tfds:cifar10", "a vdm_jax.data.load_source spec: tfds:NAME[@DIR], cifar10_tar:PATH, "
                                    "npz:PATH, images:PATH, digits"),
    "data.train_split": ("train", "the split to train on"),
    "data.eval_split": ("test", "the split the bound is evaluated on"),
    "data.random_flip": (True, "flip training images left-right at random"),
    "data.num_workers": (0, "grain worker processes reading the training data (0: in the main process)", ">= 0"),
    "data.prefetch": (2, "calls' batches read and put on the devices ahead, on a background thread (0: none)", ">= 0"),
    "diffusion.family": ("ddpm", "'ddpm' (discrete, β schedule) or 'vdm' (γ schedule, its ELBO)", tuple(FAMILIES)),
    "diffusion.timesteps": (1000, "T, the number of diffusion steps; for 'vdm', 0 = continuous time"),
    "diffusion.schedule": ("linear", "ddpm: 'linear' | 'cosine'; vdm: 'linear' | 'cosine' (fixed) | 'learned' "
                                    "(monotone MLP) | 'learned_linear' (b + |w|·t, the official VDM CIFAR-10 one)"),
    "diffusion.beta_start": (1e-4, "ddpm, linear schedule: β_1"),
    "diffusion.beta_end": (0.02, "ddpm, linear schedule: β_T"),
    "diffusion.loss": ("simple", "ddpm: 'simple' | 'vlb' | 'hybrid' (vdm always trains its ELBO)"),
    "diffusion.variance": ("posterior", "ddpm's reverse variance: 'posterior' | 'beta' | 'learned'"),
    "diffusion.hybrid_lambda": (0.001, "ddpm, 'hybrid' loss: the weight λ of its VLB term", ">= 0"),
    "diffusion.gamma_min": (-13.3, "vdm: γ(0) = -log SNR at t = 0 (the learned schedule's start)"),
    "diffusion.gamma_max": (5.0, "vdm: γ(1) = -log SNR at t = 1 (the learned schedule's end)"),
    "diffusion.schedule_hidden": (1024, "vdm, 'learned' schedule: the width of its monotone MLP"),
    "diffusion.variance_minimisation": (True, "vdm, 'learned' schedule: its shape follows ∇E[L_diffusion²] (no "
                                              "effect on 'learned_linear': w, b are end points, trained on the bound)"),
    "optim.optimizer": ("adam", "'adam' or 'adamw' (decoupled weight decay)", ("adam", "adamw")),
    "optim.learning_rate": (2e-4, "the learning rate after warm-up", "> 0"),
    "optim.warmup_steps": (1000, "linear warm-up from 0: lr·min(1, step/warmup_steps) (0: none)", ">= 0"),
    "optim.b1": (0.9, "Adam's β1", "in [0, 1)"),
    "optim.b2": (0.999, "Adam's β2", "in [0, 1)"),
    "optim.eps": (1e-8, "Adam's ε", "> 0"),
    "optim.weight_decay": (0.0, "adamw: decoupled weight decay", ">= 0"),
    "optim.weight_decay_mask": ("kernels", "adamw: what is decayed: 'official' (google-research/vdm's: all but "
                                           "biases, so GroupNorm scales and the schedule too) or 'kernels' (the "
                                           "U-Net's kernels only; docs/training.md)", DECAY_MASKS),
    "optim.grad_clip": (1.0, "clip the gradients' global norm to this (0: no clipping)", ">= 0"),
    "optim.ema_decay": (0.9999, "decay of the parameters' EMA, which evaluation and sampling use", "in [0, 1)"),
    "training.batch_size": (128, "global batch, over all devices and hosts", "> 0"),
    "training.num_steps": (10_000, "training steps", "> 0"),
    "training.steps_per_call": (1, "steps per compiled call (a lax.scan; unrolled on CPU)", "> 0"),
    "training.log_every": (100, "log the training metrics every this many steps", "> 0"),
    "training.eval_every": (5_000, "the eval split's bound every this many steps (0: none during training)", ">= 0"),
    "training.eval_at_start": (False, "also evaluate the initial model (a baseline for the curve)"),
    "training.eval_at_end": (True, "evaluate the whole eval split when training ends"),
    "training.eval_batch_size": (256, "global evaluation batch", "> 0"),
    "training.label_dropout": (0.1, "class-conditional models (model.num_classes K > 0): the probability that a "
                                    "training example's label is replaced by 'no label' (class K), so that the model "
                                    "also learns the unconditional prediction guidance needs", "in [0, 1)"),
    "training.guidance": (0.0, "class-conditional models: the guidance weight w of the periodic samples, one class per "
                               "row (0: the conditional model; docs/math.md §6.9)"),
    "training.sample_every": (5_000, "a sample grid every this many steps (0: none during training)", ">= 0"),
    "training.sample_at_end": (True, "a sample grid when training ends"),
    "training.num_samples": (64, "images in each sample grid", "> 0"),
    "training.sampler": ("ancestral", "'ancestral' (DDPM's or VDM's), 'ddim', or an ODE solver: 'dpm_solver' "
                                      "(DPM-Solver++(2M)), 'heun', 'euler' (docs/math.md §6)", SAMPLERS),
    "training.sample_steps": (0, "the sampler's steps (0: its default: " + ", ".join(
        f"{n} {s.default_steps or 'T (VDM: 1000)'}" for n, s in _SAMPLER_REGISTRY.items()) + "; a DDPM at most T)"),
    "training.fid_every": (0, "the samples' FID and Inception Score every this many steps and at the end (0: "
                              "never; needs training.fid_reference)", ">= 0"),
    "training.fid_samples": (1000, "samples for each FID during training (the papers' protocol, 50,000: "
                                   "experiments.evaluate --fid)", "> 0"),
    "training.fid_reference": ("", "the FID reference statistics, .npz (experiments.fid_stats)"),
    "training.inception_weights": ("", "pytorch-fid's Inception weights file ('': the cache, else download)"),
    "training.checkpoint_every": (1_000, "save a checkpoint every this many steps", "> 0"),
    "training.keep_checkpoints": (3, "keep the last this many checkpoints ...", "> 0"),
    "training.keep_every": (0, "... and every this-many-th step's (0: none)", ">= 0"),
    "training.distributed": (False, "call jax.distributed.initialize() (several hosts)"),
    "training.coordinator_address": ("", "host:port of process 0 ('': auto-detect on Cloud TPU, SLURM, MPI)"),
    "training.num_processes": (0, "processes in the run (0: auto-detect)", ">= 0"),
    "training.process_id": (-1, "this process's index (-1: auto-detect)", ">= -1"),
    "training.heartbeat_timeout": (100, "several processes: seconds without a heartbeat after which a process counts "
                                        "as lost and the others stop (docs/scaling.md)", "> 0"),
    "training.progress_bar": (True, "a progress bar on a terminal (a plain line at each log otherwise)"),
    "training.on_nonfinite": ("stop", "a NaN/Inf loss or gradient: 'stop' (raise) or 'skip' the step", ON_NONFINITE),
    "training.max_consecutive_skips": (100, "with 'skip': raise after this many bad steps in a row (0: never)", ">= 0"),
}
# The settings that say where a run executes, not what it computes: a run restarted with other values
# (a new coordinator port, another process count) is the same run (`config_changes`).
PLACEMENT = ("training.distributed", "training.coordinator_address", "training.num_processes", "training.process_id",
             "training.heartbeat_timeout")
_RANGES = {"> 0": lambda v: v > 0, ">= 0": lambda v: v >= 0, ">= -1": lambda v: v >= -1,
           "in [0, 1)": lambda v: 0.0 <= v < 1.0}


def default_config() -> ml_collections.ConfigDict:
    """Every key a run can set (`SETTINGS` and the model's `UNetConfig` fields), with defaults for a
    small DDPM on 32×32×3 images, as a locked ConfigDict."""
    tree = {"model": {**tiny(dtype="float32").to_dict(), "dtype": "auto"}}
    for name, (value, *_) in SETTINGS.items():
        group, _, key = name.rpartition(".")
        (tree.setdefault(group, {}) if group else tree)[key] = value
    return ml_collections.ConfigDict(tree).lock()


def describe_config(config: ml_collections.ConfigDict | None = None) -> str:
    """Every config key with its value in `config` (default: `default_config()`) and its meaning."""
    meanings = {**_field_docs(UNetConfig, "model."), **{name: meaning for name, (_, meaning, *_) in SETTINGS.items()},
                "model.dtype": "activations: 'auto' (bfloat16 on GPU/TPU, float32 on CPU), 'float32' or 'bfloat16'"}
    return "\n".join(f"  --config.{name}={value!r}".ljust(48) + f" {meanings.get(name, '')}".rstrip()
                     for name, value in _leaves(default_config() if config is None else config))


def _field_docs(cls, prefix: str) -> dict[str, str]:
    """{prefix + field: the first sentence of its entry} of a dataclass's 'Attributes:' docstring
    (an entry: a line `      name: text`, then lines indented further)."""
    text = (cls.__doc__ or "").split("Attributes:", 1)[-1]
    entries = re.findall(r"^ {6}(\w+): (.*?)(?=\n {0,7}\S|\Z)", text, re.M | re.S)
    return {prefix + name: " ".join(entry.split()).split(". ")[0].rstrip(".") for name, entry in entries}


def set_model(config: ml_collections.ConfigDict, model: UNetConfig, *, dtype: str = "auto") -> None:
    """Sets `config.model` to `model`'s architecture, with activations in `dtype` (default 'auto':
    bfloat16 on GPU/TPU, float32 on CPU; see `compute_dtype`)."""
    config.model.update({**model.to_dict(), "dtype": dtype})


def checked_config(values) -> ml_collections.ConfigDict:
    """`values` (a ConfigDict, or the dict of a saved config.json) read into `default_config()`.

    The result is a locked ConfigDict with the schema's types (ml_collections casts ints to floats
    and lists to tuples, and refuses other types). Raises ValueError for a key the schema lacks
    (naming it with its group, the valid keys and the closest one) and TypeError for a value of
    the wrong type.
    """
    config = default_config()
    for name, value in _leaves(values):
        parent, key = _group_of(config, name)
        ref = parent[key]
        try:
            if isinstance(value, bool) is not isinstance(ref, bool) or isinstance(ref, ml_collections.ConfigDict):
                raise TypeError  # (ConfigDict would cast a bool to a number)
            parent[key] = value
        except TypeError:
            want = ("a group of settings" if isinstance(ref, ml_collections.ConfigDict)
                    else f"of type {type(ref).__name__}")
            raise TypeError(f"config key {name!r} must be {want}, got {value!r} ({type(value).__name__}).") from None
        if isinstance(ref, float) and not math.isfinite(parent[key]):
            raise ValueError(f"config key {name!r} must be a finite number, got {value!r}.")
    return config


def check_key(name: str) -> None:
    """Raises ValueError naming the dotted key `name`, its closest valid one and the valid keys of
    its group, unless the schema has it."""
    _group_of(default_config(), name)


def _group_of(config, name: str):
    """(the group holding the dotted key `name`, its last part); raises naming an unknown key."""
    parts = name.split(".")
    group = config
    for i, part in enumerate(parts):
        if not isinstance(group, ml_collections.ConfigDict):
            raise TypeError(f"config key {'.'.join(parts[:i])!r} is a setting, not a group of settings.")
        if part not in group:
            hint = difflib.get_close_matches(part, list(group.keys()), n=1)
            raise ValueError(f"unknown config key {'.'.join(parts[:i + 1])!r}"
                             + (f" (did you mean {'.'.join([*parts[:i], hint[0]])!r}?)" if hint else "")
                             + f"; valid keys here are: {', '.join(sorted(group.keys()))}.")
        if i < len(parts) - 1:
            group = group[part]
    return group, parts[-1]


def config_changes(old: dict | None, new: dict) -> list[str]:
    """'key: old -> new' for each setting that differs between two config dicts (old: None = none saved),
    but those of `PLACEMENT`: where a run executes is not part of what it is."""
    if old is None:
        return []
    a, b = dict(_leaves(old)), dict(_leaves(json.loads(json.dumps(new, default=list))))  # tuples as JSON lists
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and k not in PLACEMENT]


def _leaves(values, prefix=""):
    """(dotted key, value) for every setting of a nested config or dict (groups are walked into)."""
    for key, value in values.items():
        if isinstance(value, (dict, ml_collections.ConfigDict)):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def check_config(config: ml_collections.ConfigDict) -> None:
    """Every check of `validate_config`, without starting JAX's backend (`model.dtype='auto'` is
    resolved for a CPU: no other rule depends on it): what a run on several processes calls before
    `jax.distributed.initialize`.

    Raises:
      ValueError: unknown keys, values out of range, impossible combinations.
      TypeError: values of the wrong type.
    """
    validate_config(config, backend="cpu")


def validate_config(config: ml_collections.ConfigDict, *, backend: str | None = None) -> UNetConfig:
    """Checks a config against `default_config()` (`checked_config`) and the rules between its
    settings; returns the model's config, with `model.dtype = 'auto'` resolved for `backend`
    (`compute_dtype`; None: JAX's default backend, which starts it: with several processes,
    `check_config` first, then `jax.distributed.initialize`
    (`vdm_jax.training.initialize_distributed`), then this).

    Raises:
      ValueError: unknown keys, values out of range, impossible combinations.
      TypeError: values of the wrong type.
    """
    config = checked_config(config)
    value = dict(_leaves(config))  # dotted key -> setting
    for name, (_, _, *allowed) in SETTINGS.items():
        for rule in allowed:  # (none, or one)
            choices = isinstance(rule, tuple)
            if not (value[name] in rule if choices else _RANGES[rule](value[name])):
                raise ValueError(f"config key {name!r} must be {f'one of {rule}' if choices else rule}, "
                                 f"got {value[name]!r}.")
    try:
        model = UNetConfig.from_dict({**config.model, "dtype": compute_dtype(config.model.dtype, backend)})
    except (ValueError, TypeError) as e:
        raise type(e)(f"config.model: {e}") from None
    t = config.training
    if t.num_processes > 0 and t.process_id >= t.num_processes:
        raise ValueError(f"config key 'training.process_id' must be < training.num_processes = "
                         f"{t.num_processes} (or -1 = auto-detect), got {t.process_id}.")
    make_objective(config, model).check_sample_steps(t.sample_steps, t.sampler)  # and the family's own rules
    return model
