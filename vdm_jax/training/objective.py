"""What a run trains: one objective per diffusion family, chosen once from the config.

`make_objective(config, model_config)` returns a `DDPMObjective` (Ho et al.'s discrete model) or a
`VDMObjective` (Kingma et al.'s, continuous or discrete time). Each is a frozen, hashable dataclass
whose fields are the config's `diffusion` settings of that family, taken by name; it is static
under `jax.jit`, and its methods are pure functions of the modules and the batch. Both follow the
protocol `Objective` writes down. All the math is the core's (`vdm_jax.losses`, `vdm_jax.elbo`,
`vdm_jax.sampling`).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from vdm_jax import elbo, losses, sampling
from vdm_jax.diffusion import eps_and_x, prediction_target, q_sample
from vdm_jax.models import UNetConfig, as_pred_fn
from vdm_jax.pixels import data_to_pixels, pixels_to_data
from vdm_jax.schedules import (CosineSchedule, DiscreteSchedule, LearnedSchedule, LinearSchedule, cosine_betas,
                               linear_betas)

Terms = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Objective:
    """What the training steps need of a diffusion family; every method is traceable.

    Losses and bounds are per example ([B], nats per image); `batch` is {'image': uint8
    [B, H, W, C]}; `schedule_model` is the learned schedule's module (None unless learned).

    - `per_example_loss(model, schedule_model, batch, *, key) -> (loss, terms)`: the training
      loss and its terms, named by `terms`.
    - `per_example_bound(model, schedule_model, batch, *, key) -> terms`: an unbiased estimate of
      −ELBO, 'prior' + 'diffusion' + 'reconstruction' = 'total'.
    - `sample(model, schedule_model, *, key, num, sampler, sample_steps)`: uint8 [num, H, W, C]
      from the reverse chain (one `lax.scan`).
    - `flow(model, schedule_model) -> (pred_fn, gamma_fn, t_min)`: what the probability-flow ODE
      takes (its samplers, `vdm_jax.ode_log_likelihood`): the prediction alone, the schedule, and the
      least noisy time it is solved from.
    - `timesteps`: T (0: continuous time).
    """

    prediction: str  # what the network predicts: 'eps' | 'x' | 'v' | 'score'
    image_shape: tuple[int, int, int]

    learned_variance = False  # the network also outputs the reverse variance's interpolation v
    minimise_variance = False  # the schedule follows ∇E[L_diffusion²] (`vdm_jax.variance_minimising_grads`)

    def init_schedule(self, rngs: nnx.Rngs) -> LearnedSchedule | None:
        return None

    def check_sample_steps(self, sample_steps: int, sampler: str, name: str = "training.sample_steps") -> None:
        """Raises ValueError naming `name` unless `sampler` can take `sample_steps` steps (0: all)."""
        if sample_steps < 0:
            raise ValueError(f"{name} must be >= 0 (0 = all T steps), got {sample_steps}.")

    @property
    def dims(self) -> int:
        return math.prod(self.image_shape)


def _one_of(field: str, value, options) -> None:
    if value not in options:
        raise ValueError(f"config key 'diffusion.{field}' must be one of {options}, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class DDPMObjective(Objective):
    """Ho et al. 2020: T discrete steps of a β schedule; the loss L_simple, the VLB or their hybrid.

    loss: 'simple' = ‖prediction − target‖² in the model's own parameterisation; 'vlb' = L_prior +
    T·L_{i−1} at one step i, an unbiased estimate of the whole bound; 'hybrid' = L_simple +
    λ·T·L_{i−1} with the mean under stop_gradient, which trains a learned variance (Nichol &
    Dhariwal). variance: the reverse variance, 'posterior' (β̃), 'beta' (β) or 'learned'.
    """

    timesteps: int  # (no defaults here: `default_config()` is the one source of them)
    schedule: str  # 'linear' | 'cosine'
    beta_start: float
    beta_end: float
    loss: str
    variance: str
    hybrid_lambda: float

    grid = "ddpm"  # pixel grid of `vdm_jax.pixels`

    def __post_init__(self):
        _one_of("schedule", self.schedule, ("linear", "cosine"))
        _one_of("loss", self.loss, ("simple", "vlb", "hybrid"))
        _one_of("variance", self.variance, losses.VARIANCES)
        if self.timesteps < 1:
            raise ValueError(f"config key 'diffusion.timesteps' must be >= 1 for a DDPM, got {self.timesteps}.")
        if self.schedule == "linear" and not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise ValueError("config keys 'diffusion.beta_start' and 'diffusion.beta_end' must satisfy "
                             f"0 < beta_start <= beta_end < 1, got {self.beta_start} and {self.beta_end}.")
        if self.loss == "hybrid" and not self.learned_variance:
            raise ValueError("diffusion.loss='hybrid' trains the learned variance: it needs "
                             "diffusion.variance='learned' (and model.learned_variance=True).")
        if self.learned_variance and self.loss == "simple":
            raise ValueError("diffusion.loss='simple' cannot train a learned variance: use 'hybrid' or 'vlb'.")

    @property
    def learned_variance(self) -> bool:
        return self.variance == "learned"

    @property
    def terms(self) -> tuple[str, ...]:
        return {"simple": ("simple",), "hybrid": ("simple", "vlb_t"), "vlb": ("prior", "vlb_t")}[self.loss]

    def discrete_schedule(self) -> DiscreteSchedule:
        betas = (linear_betas(self.timesteps, self.beta_start, self.beta_end) if self.schedule == "linear"
                 else cosine_betas(self.timesteps))
        return DiscreteSchedule(betas)

    def pred_fn(self, model, schedule_model=None, *, key=None):
        """`pred_fn(z_t, t)` for the core (t = i/T); `key` is the dropout key (None: no dropout)."""
        return as_pred_fn(model, key=key)

    def flow(self, model, schedule_model=None):
        """The prediction alone (a learned variance's v dropped), the schedule, and t_min = 1/T: the
        network was trained at the steps i/T, and γ(0) = -∞."""
        pred_fn = self.pred_fn(model)
        if self.learned_variance:  # the ODE takes no reverse variance: the prediction channels only
            pred_fn = lambda z_t, t, with_v=pred_fn: with_v(z_t, t)[0]  # noqa: E731
        return pred_fn, self.discrete_schedule(), 1.0 / self.timesteps

    # --- losses --------------------------------------------------------------------------------

    def _at(self, model, x, step, *, key, key_model=None) -> _Noised:
        """z_i = q_sample(x, ε, γ_i) at integer steps i [B] (ε from `key`), and the network there."""
        eps = jax.random.normal(key, x.shape, x.dtype)
        z = q_sample(x, eps, self.discrete_schedule().gamma_step(step))
        out = self.pred_fn(model, key=key_model)(z, step.astype(x.dtype) / self.timesteps)
        pred, v = out if self.learned_variance else (out, None)
        return _Noised(step, eps, z, pred, v)

    def _drawn(self, model, x, *, key, key_model=None, first: int = 1) -> _Noised:
        """`_at` one step i ~ U{first..T} per example."""
        key_step, key_eps = jax.random.split(key)
        step = jax.random.randint(key_step, (x.shape[0],), first, self.timesteps + 1)
        return self._at(model, x, step, key=key_eps, key_model=key_model)

    def _vlb_term(self, x, at: _Noised, pred) -> jax.Array:
        """L_{i−1} of the bound at the drawn steps (the decoder's term at i = 1), per example."""
        sched = self.discrete_schedule()
        gamma_t = sched.gamma_step(at.step)
        _, x_hat = eps_and_x(pred, at.z, gamma_t, kind=self.prediction)
        log_var = elbo.ddpm_log_variance(sched, at.step, variance=self.variance, v=at.v)
        return losses.vlb_term(x_hat, x, at.z, sched.gamma_step(at.step - 1), gamma_t, log_var)

    def per_example_loss(self, model, schedule_model, batch, *, key) -> tuple[jax.Array, Terms]:
        x = pixels_to_data(batch["image"], grid=self.grid)
        key_model, key_draw = jax.random.split(key)
        at = self._drawn(model, x, key=key_draw, key_model=key_model)
        terms = {}
        if self.loss in ("simple", "hybrid"):
            target = prediction_target(x, at.eps, self.discrete_schedule().gamma_step(at.step), kind=self.prediction)
            terms["simple"] = losses.simple_loss(at.pred, target)
        if self.loss == "simple":
            return terms["simple"], terms
        # The hybrid loss trains only the variance through L_{i−1}: its mean is L_simple's.
        terms["vlb_t"] = self._vlb_term(x, at, jax.lax.stop_gradient(at.pred) if self.loss == "hybrid" else at.pred)
        if self.loss == "hybrid":
            return terms["simple"] + self.hybrid_lambda * self.timesteps * terms["vlb_t"], terms
        terms["prior"] = losses.prior_loss(x, self.discrete_schedule().gamma_step(self.timesteps))
        return terms["prior"] + self.timesteps * terms["vlb_t"], terms

    def per_example_bound(self, model, schedule_model, batch, *, key) -> Terms:
        """prior + (T−1)·L_{i−1} at one step i ~ U{2..T} + the reconstruction term L_0.

        L_0 is always computed (two network calls per example): it is a large part of the bound,
        and drawing it with probability 1/T would multiply it by T and make the estimate noisy.
        """
        x = pixels_to_data(batch["image"], grid=self.grid)
        key_diffusion, key_recon = jax.random.split(key)
        first = self._at(model, x, jnp.ones((x.shape[0],), jnp.int32), key=key_recon)
        reconstruction = self._vlb_term(x, first, first.pred)
        diffusion = jnp.zeros_like(reconstruction)
        if self.timesteps > 1:
            at = self._drawn(model, x, key=key_diffusion, first=2)
            diffusion = (self.timesteps - 1) * self._vlb_term(x, at, at.pred)
        prior = losses.prior_loss(x, self.discrete_schedule().gamma_step(self.timesteps))
        return {"prior": prior, "diffusion": diffusion, "reconstruction": reconstruction,
                "total": prior + diffusion + reconstruction}

    def per_example_full_vlb(self, model, batch, *, key) -> Terms:
        """The whole discrete bound, every step i = 1..T (`vdm_jax.ddpm_vlb`).

        Returns 'prior', 'diffusion' (Σ_{i=2..T} L_{i−1}), 'reconstruction', 'total' ([B] each)
        and 'per_t' [B, T]: L_{i−1} for i = 1..T, the reconstruction first.
        """
        x = pixels_to_data(batch["image"], grid=self.grid)
        out = elbo.ddpm_vlb(self.pred_fn(model), x, self.discrete_schedule(), key=key, kind=self.prediction,
                            variance=self.variance)
        per_t = jnp.concatenate([out["reconstruction"][:, None], out["denoising"]], axis=1)
        return {"prior": out["prior"], "diffusion": out["denoising"].sum(axis=1),
                "reconstruction": out["reconstruction"], "total": out["total"], "per_t": per_t}

    # --- sampling ------------------------------------------------------------------------------

    def check_sample_steps(self, sample_steps: int, sampler: str, name: str = "training.sample_steps") -> None:
        """The ancestral sampler runs all T steps; DDIM takes 1..T of them (0 = T)."""
        super().check_sample_steps(sample_steps, sampler, name)
        if sample_steps in (0, self.timesteps):
            return
        if sampler == "ancestral":
            raise ValueError(f"{name}={sample_steps}: DDPM's ancestral sampler runs all T = {self.timesteps} "
                             "steps; use 0 (= T), or 'ddim', 'dpm_solver', 'heun' or 'euler' for fewer steps.")
        if sample_steps > self.timesteps:
            raise ValueError(f"{name}={sample_steps}: {'DDIM' if sampler == 'ddim' else sampler} on a DDPM with "
                             f"T = {self.timesteps} takes at most T steps.")

    def sample(self, model, schedule_model, *, key, num: int, sampler: str = "ancestral", sample_steps: int = 0):
        shape = (num, *self.image_shape)
        sched = self.discrete_schedule()
        pred_fn = self.pred_fn(model) if sampler == "ancestral" else self.flow(model)[0]  # (no variance but DDPM's)
        if sampler == "ddim":
            times = sampling.strided_times(self.timesteps, sample_steps or self.timesteps)
            x = sampling.ddim_sample(pred_fn, sched, times, shape, key=key, kind=self.prediction, clip_x=(-1.0, 1.0))
        elif sampler != "ancestral":
            x = _ode_sample(sampler, pred_fn, sched, sample_steps or self.timesteps, shape, key=key,
                            kind=self.prediction, clip_x=(-1.0, 1.0))
        else:
            x = sampling.ddpm_sample(pred_fn, sched, shape, key=key, kind=self.prediction, variance=self.variance,
                                     clip_x=(-1.0, 1.0))
        return data_to_pixels(x, grid=self.grid).astype(jnp.uint8)


@dataclasses.dataclass(frozen=True)
class VDMObjective(Objective):
    """Kingma et al. 2021: a γ schedule (fixed, or learned and monotone), trained on its ELBO.

    timesteps: 0 for continuous time, else T discrete steps of the same γ. With a learned schedule
    and `variance_minimisation`, the schedule's shape follows ∇E[L_diffusion²] and its end points
    the ELBO (`vdm_jax.variance_minimising_grads`).
    """

    timesteps: int  # 0: continuous time (no defaults here: `default_config()` is the one source of them)
    schedule: str  # 'linear' | 'cosine' | 'learned'
    gamma_min: float
    gamma_max: float
    schedule_hidden: int
    variance_minimisation: bool

    grid = "vdm"
    terms = ("diffusion", "prior", "reconstruction", "total")

    def __post_init__(self):
        _one_of("schedule", self.schedule, ("linear", "cosine", "learned"))
        if self.timesteps < 0:
            raise ValueError(f"config key 'diffusion.timesteps' must be >= 0 (0 = continuous), got {self.timesteps}.")
        if not self.gamma_min < self.gamma_max:
            raise ValueError(f"diffusion.gamma_min must be < diffusion.gamma_max, got {self.gamma_min}, "
                             f"{self.gamma_max}.")
        if self.learned_schedule and self.schedule_hidden < 1:
            raise ValueError(f"config key 'diffusion.schedule_hidden' must be >= 1, got {self.schedule_hidden}.")

    @property
    def learned_schedule(self) -> bool:
        return self.schedule == "learned"

    @property
    def minimise_variance(self) -> bool:
        return self.learned_schedule and self.variance_minimisation

    def init_schedule(self, rngs: nnx.Rngs) -> LearnedSchedule | None:
        if not self.learned_schedule:
            return None
        return LearnedSchedule(self.gamma_min, self.gamma_max, hidden=self.schedule_hidden, rngs=rngs)

    def gamma_fn(self, schedule_model: LearnedSchedule | None = None):
        """The continuous schedule t -> γ(t)."""
        if self.learned_schedule:
            return schedule_model
        return (LinearSchedule if self.schedule == "linear" else CosineSchedule)(self.gamma_min, self.gamma_max)

    def pred_fn(self, model, schedule_model=None, *, key=None):
        """`pred_fn(z_t, t)` for the core: the network sees γ(t) mapped to [0, 1] by the configured
        end points, so it knows the noise level even when the schedule is learned."""
        return as_pred_fn(model, self.gamma_fn(schedule_model), gamma_min=self.gamma_min,
                          gamma_max=self.gamma_max, key=key)

    def per_example_bound(self, model, schedule_model, batch, *, key, key_model=None) -> Terms:
        """The ELBO at one t per example, plus its reconstruction and prior terms."""
        x = pixels_to_data(batch["image"], grid=self.grid)
        return elbo.vdm_elbo(self.pred_fn(model, schedule_model, key=key_model), x, self.gamma_fn(schedule_model),
                             key=key, T=self.timesteps, kind=self.prediction)

    def per_example_loss(self, model, schedule_model, batch, *, key) -> tuple[jax.Array, Terms]:
        """The ELBO (with dropout); its 'diffusion' term drives the variance-minimising schedule update."""
        key_model, key_loss = jax.random.split(key)
        terms = self.per_example_bound(model, schedule_model, batch, key=key_loss, key_model=key_model)
        return terms["total"], terms

    def flow(self, model, schedule_model=None):
        """The prediction, the (learned) schedule, and t_min = 0 (γ(0) = γ_min is finite)."""
        return self.pred_fn(model, schedule_model), self.gamma_fn(schedule_model), 0.0

    def per_example_full_vlb(self, model, batch, *, key) -> Terms:
        raise ValueError("full_vlb needs a DDPM model (a discrete bound over all T steps); for a VDM use "
                         "more draws of its continuous-time ELBO.")

    def sample(self, model, schedule_model, *, key, num: int, sampler: str = "ancestral", sample_steps: int = 0):
        shape = (num, *self.image_shape)
        pred_fn, gamma_fn = self.pred_fn(model, schedule_model), self.gamma_fn(schedule_model)
        n = sample_steps or self.timesteps or 1000
        if sampler == "ddim":
            x = sampling.ddim_sample(pred_fn, gamma_fn, jnp.linspace(1.0, 0.0, n + 1), shape, key=key,
                                     kind=self.prediction)
        elif sampler != "ancestral":
            x = _ode_sample(sampler, pred_fn, gamma_fn, n, shape, key=key, kind=self.prediction)
        else:
            x = sampling.vdm_sample(pred_fn, gamma_fn, shape, key=key, sample_steps=n, kind=self.prediction)
        return data_to_pixels(x, grid=self.grid).astype(jnp.uint8)


def _ode_sample(sampler: str, pred_fn, gamma_fn, steps: int, shape, *, key, kind: str, clip_x=None):
    """'dpm_solver' (DPM-Solver++(2M)), 'heun' or 'euler' in `steps` steps evenly spaced in log-SNR."""
    times = sampling.solver_times(gamma_fn, steps)
    if sampler == "dpm_solver":
        return sampling.dpm_solver_sample(pred_fn, gamma_fn, times, shape, key=key, kind=kind, clip_x=clip_x)
    return sampling.ode_sample(pred_fn, gamma_fn, times, shape, key=key, method=sampler, kind=kind, clip_x=clip_x)


@dataclasses.dataclass(frozen=True)
class _Noised:
    """A DDPM draw: steps i [B], the noise ε, z_i, and the network's prediction (and v) there."""

    step: jax.Array
    eps: jax.Array
    z: jax.Array
    pred: jax.Array
    v: jax.Array | None


OBJECTIVES = {"ddpm": DDPMObjective, "vdm": VDMObjective}


def make_objective(config, model_config: UNetConfig) -> DDPMObjective | VDMObjective:
    """The objective of `config.diffusion.family`, from the `diffusion` settings its fields name.

    Raises ValueError naming the setting for values the family can't take, or a model that
    does not fit it (a learned variance needs the network's extra output channels).
    """
    cls = OBJECTIVES[config.diffusion.family]
    settings = {f.name: config.diffusion[f.name] for f in dataclasses.fields(cls) if f.name in config.diffusion}
    objective = cls(prediction=model_config.prediction,
                    image_shape=(model_config.image_size, model_config.image_size, model_config.in_channels),
                    **settings)
    if objective.learned_variance != model_config.learned_variance:
        raise ValueError(
            f"diffusion.family={config.diffusion.family!r} with diffusion.variance={config.diffusion.variance!r} "
            f"needs model.learned_variance={objective.learned_variance}, got {model_config.learned_variance}: a "
            "learned variance (a DDPM option) needs the model's extra output channels, and those channels are "
            "only trained with a learned variance.")
    return objective
