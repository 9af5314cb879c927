"""The training configuration: one default, validated against itself.

`default_config()` is the whole schema. Experiment configs start from it and change a few fields;
`validate_config` rejects unknown keys, wrong types and impossible combinations with one clear
message each, before anything is built.
"""
from __future__ import annotations

import math

import jax
import ml_collections

from vdm_jax.models import UNetConfig, tiny
from vdm_jax.training.faults import ON_NONFINITE

FAMILIES = ("ddpm", "vdm")
DDPM_LOSSES = ("simple", "vlb", "hybrid")
VARIANCES = ("posterior", "beta", "learned")
SAMPLERS = ("ancestral", "ddim")
OPTIMIZERS = ("adam", "adamw")
# model.dtype = 'auto': bfloat16 activations on these backends (float32 parameters, loss and optimiser
# state either way), float32 elsewhere. XLA:CPU has no fast bfloat16 convolutions.
MIXED_PRECISION_BACKENDS = ("gpu", "cuda", "rocm", "tpu")


def compute_dtype(dtype: str, backend: str | None = None) -> str:
    """The U-Net's activation dtype for `model.dtype`: 'auto' is 'bfloat16' on GPU/TPU, else 'float32'.

    Any other value is returned as it is (UNetConfig checks it).
    """
    if dtype != "auto":
        return dtype
    return "bfloat16" if (backend or jax.default_backend()) in MIXED_PRECISION_BACKENDS else "float32"


def default_config() -> ml_collections.ConfigDict:
    """Every key a run can set, with defaults for a small DDPM on 32×32×3 images."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.source = "tfds:cifar10"  # a `vdm_jax.data.load_source` spec
    c.data.train_split = "train"
    c.data.eval_split = "test"
    c.data.random_flip = True
    c.data.num_workers = 0  # grain worker processes
    c.data.prefetch = 2  # calls' batches read and put on the devices ahead, on a background thread (0: none)

    c.model = ml_collections.ConfigDict(tiny(dtype="float32").to_dict())
    c.model.dtype = "auto"  # activations: 'auto' (bfloat16 on GPU/TPU, float32 on CPU), 'float32', 'bfloat16'

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.family = "ddpm"  # 'ddpm' (discrete, β schedule) or 'vdm' (γ schedule, ELBO)
    c.diffusion.timesteps = 1000  # T; for 'vdm', 0 = continuous time
    c.diffusion.schedule = "linear"  # ddpm: 'linear' | 'cosine'; vdm: 'linear' | 'cosine' | 'learned'
    c.diffusion.beta_start = 1e-4
    c.diffusion.beta_end = 0.02
    c.diffusion.loss = "simple"  # ddpm: 'simple' | 'vlb' | 'hybrid' (vdm always trains its ELBO)
    c.diffusion.variance = "posterior"  # ddpm reverse variance: 'posterior' | 'beta' | 'learned'
    c.diffusion.hybrid_lambda = 0.001
    c.diffusion.gamma_min = -13.3
    c.diffusion.gamma_max = 5.0
    c.diffusion.schedule_hidden = 1024  # width of the learned schedule's MLP
    c.diffusion.variance_minimisation = True  # learned schedule: shape follows ∇E[L_diffusion²]

    c.optim = ml_collections.ConfigDict()
    c.optim.optimizer = "adam"
    c.optim.learning_rate = 2e-4
    c.optim.warmup_steps = 1000
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.0
    c.optim.grad_clip = 1.0  # global-norm clip; 0 disables
    c.optim.ema_decay = 0.9999

    c.training = ml_collections.ConfigDict()
    c.training.batch_size = 128  # global, over all devices and hosts
    c.training.num_steps = 10_000
    c.training.steps_per_call = 1  # micro-steps per compiled call (a lax.scan; unrolled on CPU)
    c.training.log_every = 100
    c.training.eval_every = 5_000  # full-test-set bpd with the EMA parameters; 0 = only at the end
    c.training.eval_batch_size = 256
    c.training.eval_at_start = False  # also evaluate the initial model (a baseline for the curve)
    c.training.sample_every = 5_000  # 0 = only at the end
    c.training.num_samples = 64
    c.training.sampler = "ancestral"  # 'ancestral' (DDPM / VDM) or 'ddim'
    c.training.sample_steps = 0  # 0 = T (or 1000 for continuous VDM)
    c.training.checkpoint_every = 1_000
    c.training.keep_checkpoints = 3  # keep the last N ...
    c.training.keep_every = 0  # ... and every K-th step (0 = none)
    c.training.distributed = False  # call jax.distributed.initialize() (multi-host)
    c.training.coordinator_address = ""  # host:port of process 0; "" = auto-detect (Cloud TPU, SLURM, MPI)
    c.training.num_processes = 0  # 0 = auto-detect
    c.training.process_id = -1  # -1 = auto-detect
    c.training.progress_bar = True
    c.training.on_nonfinite = "stop"  # a NaN/Inf loss or gradient: 'stop' (raise) or 'skip' the step
    c.training.max_consecutive_skips = 100  # with 'skip': raise after this many bad steps in a row (0 = never)
    return c


def set_model(config: ml_collections.ConfigDict, model: UNetConfig, *, dtype: str = "auto") -> None:
    """Sets `config.model` to `model`'s architecture, with activations in `dtype` (default 'auto':
    bfloat16 on GPU/TPU, float32 on CPU; see `compute_dtype`)."""
    config.model.update({**model.to_dict(), "dtype": dtype})


def _walk(config, reference, path=""):
    """Yields (dotted key, value, reference value); raises on keys the reference lacks."""
    for key in config.keys():
        name = f"{path}{key}"
        if key not in reference:
            known = ", ".join(sorted(reference.keys()))
            raise ValueError(f"unknown config key {name!r}; valid keys here are: {known}.")
        value, ref = config[key], reference[key]
        if isinstance(ref, ml_collections.ConfigDict):
            if not isinstance(value, (ml_collections.ConfigDict, dict)):
                raise TypeError(f"config key {name!r} must be a group of settings, got {value!r}.")
            yield from _walk(value, ref, name + ".")
        else:
            yield name, value, ref


def _check_type(name, value, ref):
    if isinstance(ref, bool):
        ok = isinstance(value, bool)
    elif isinstance(ref, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(ref, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(ref, str):
        ok = isinstance(value, str)
    elif isinstance(ref, (tuple, list)):
        ok = isinstance(value, (tuple, list))
    else:
        ok = True
    if not ok:
        raise TypeError(f"config key {name!r} must be of type {type(ref).__name__}, got {value!r} "
                        f"({type(value).__name__}).")
    if isinstance(ref, float) and not math.isfinite(value):
        raise ValueError(f"config key {name!r} must be a finite number, got {value!r}.")


def _one_of(name, value, options):
    if value not in options:
        raise ValueError(f"config key {name!r} must be one of {options}, got {value!r}.")


def check_sample_steps(sample_steps: int, *, family: str, timesteps: int, sampler: str,
                       name: str = "training.sample_steps") -> None:
    """Raises ValueError naming `name` unless the sampler can take `sample_steps` reverse steps.

    0 means all: T (1000 for a continuous-time VDM). DDPM's ancestral sampler always runs all T
    steps; DDIM on a DDPM takes 1..T of them; VDM's samplers take any number.
    """
    if sample_steps < 0:
        raise ValueError(f"{name} must be >= 0 (0 = all T steps), got {sample_steps}.")
    if family != "ddpm" or sample_steps in (0, timesteps):
        return
    if sampler == "ancestral":
        raise ValueError(f"{name}={sample_steps}: DDPM's ancestral sampler runs all T = {timesteps} steps; "
                         "use 0 (= T), or the 'ddim' sampler for fewer steps.")
    if sample_steps > timesteps:
        raise ValueError(f"{name}={sample_steps}: DDIM on a DDPM with T = {timesteps} takes at most T steps.")


def _check_values(config) -> None:
    """Values no single type check catches: ranges, and settings that only fit some families."""
    d, t, o = config.diffusion, config.training, config.optim
    for name, value, low in [("seed", config.seed, 0), ("data.num_workers", config.data.num_workers, 0),
                             ("data.prefetch", config.data.prefetch, 0),
                             ("diffusion.hybrid_lambda", d.hybrid_lambda, 0),
                             ("training.num_processes", t.num_processes, 0),
                             ("training.process_id", t.process_id, -1)]:
        if value < low:
            raise ValueError(f"config key {name!r} must be >= {low}, got {value}.")
    if d.family == "ddpm" and d.schedule == "linear" and not 0.0 < d.beta_start <= d.beta_end < 1.0:
        raise ValueError("config keys 'diffusion.beta_start' and 'diffusion.beta_end' must satisfy "
                         f"0 < beta_start <= beta_end < 1, got {d.beta_start} and {d.beta_end}.")
    if d.family == "vdm" and d.schedule == "learned" and d.schedule_hidden < 1:
        raise ValueError(f"config key 'diffusion.schedule_hidden' must be >= 1, got {d.schedule_hidden}.")
    for name, value in (("optim.b1", o.b1), ("optim.b2", o.b2)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"config key {name!r} must be in [0, 1), got {value}.")
    if not o.eps > 0:
        raise ValueError(f"config key 'optim.eps' must be > 0, got {o.eps}.")
    if t.num_processes > 0 and t.process_id >= t.num_processes:
        raise ValueError(f"config key 'training.process_id' must be < training.num_processes = "
                         f"{t.num_processes} (or -1 = auto-detect), got {t.process_id}.")
    check_sample_steps(t.sample_steps, family=d.family, timesteps=d.timesteps, sampler=t.sampler)


def validate_config(config: ml_collections.ConfigDict) -> UNetConfig:
    """Checks a config against `default_config()`; returns the validated model config.

    `model.dtype = 'auto'` is resolved for JAX's default backend (`compute_dtype`).

    Raises:
      ValueError: unknown keys, values out of range, impossible combinations.
      TypeError: values of the wrong type.
    """
    for name, value, ref in _walk(config, default_config()):
        _check_type(name, value, ref)
    try:
        fields = dict(config.model)
        fields["dtype"] = compute_dtype(fields.get("dtype", "float32"))
        model = UNetConfig.from_dict(fields)
    except (ValueError, TypeError) as e:
        raise type(e)(f"config.model: {e}") from None
    d, t, o = config.diffusion, config.training, config.optim
    _one_of("diffusion.family", d.family, FAMILIES)
    _one_of("training.sampler", t.sampler, SAMPLERS)
    _one_of("optim.optimizer", o.optimizer, OPTIMIZERS)
    _one_of("training.on_nonfinite", t.on_nonfinite, ON_NONFINITE)
    if d.family == "ddpm":
        _one_of("diffusion.schedule", d.schedule, ("linear", "cosine"))
        _one_of("diffusion.loss", d.loss, DDPM_LOSSES)
        _one_of("diffusion.variance", d.variance, VARIANCES)
        if d.timesteps < 1:
            raise ValueError(f"config key 'diffusion.timesteps' must be >= 1 for a DDPM, got {d.timesteps}.")
        learned = d.variance == "learned"
        if learned != model.learned_variance:
            raise ValueError(
                f"diffusion.variance={d.variance!r} needs model.learned_variance={learned}, got "
                f"{model.learned_variance}: a learned variance needs the model's extra output channels, "
                "and those channels are only trained with a learned variance.")
        if d.loss == "hybrid" and not learned:
            raise ValueError("diffusion.loss='hybrid' trains the learned variance: it needs "
                             "diffusion.variance='learned' (and model.learned_variance=True).")
        if learned and d.loss == "simple":
            raise ValueError("diffusion.loss='simple' cannot train a learned variance: use 'hybrid' or 'vlb'.")
    else:
        _one_of("diffusion.schedule", d.schedule, ("linear", "cosine", "learned"))
        if d.timesteps < 0:
            raise ValueError(f"config key 'diffusion.timesteps' must be >= 0 (0 = continuous), got {d.timesteps}.")
        if model.learned_variance:
            raise ValueError("model.learned_variance is a DDPM option; VDM's reverse variance is the posterior's.")
        if not d.gamma_min < d.gamma_max:
            raise ValueError(f"diffusion.gamma_min must be < diffusion.gamma_max, got {d.gamma_min}, {d.gamma_max}.")
    positive = {"training.batch_size": t.batch_size, "training.num_steps": t.num_steps,
                "training.steps_per_call": t.steps_per_call, "training.log_every": t.log_every,
                "training.eval_batch_size": t.eval_batch_size, "training.checkpoint_every": t.checkpoint_every,
                "training.keep_checkpoints": t.keep_checkpoints, "training.num_samples": t.num_samples,
                "optim.learning_rate": o.learning_rate}
    for name, value in positive.items():
        if not value > 0:
            raise ValueError(f"config key {name!r} must be > 0, got {value}.")
    if not 0.0 <= o.ema_decay < 1.0:
        raise ValueError(f"config key 'optim.ema_decay' must be in [0, 1), got {o.ema_decay}.")
    for name in ("optim.warmup_steps", "optim.grad_clip", "optim.weight_decay", "training.eval_every",
                 "training.sample_every", "training.keep_every", "training.sample_steps",
                 "training.max_consecutive_skips"):
        group, key = name.split(".")
        if config[group][key] < 0:
            raise ValueError(f"config key {name!r} must be >= 0, got {config[group][key]}.")
    _check_values(config)
    return model
