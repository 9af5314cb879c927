"""The diffusion families, DDPM and VDM: what a model trains on, the bound it is evaluated on and how it
samples, for any network given as `pred_fn(z_t, t)` (docs/math.md §5, §6).

    ddpm = DDPM(timesteps=1000, schedule="linear")             # validated here, once
    loss, terms = ddpm.loss(pred_fn, x, key=key)               # [B] nats and {term: [B]}
    bound = ddpm.bound(pred_fn, x, key=key)                    # -ELBO: prior + diffusion + reconstruction
    x = ddpm.sample(pred_fn, (16, 32, 32, 3), key=key, sampler="dpm_solver", sample_steps=20)

A family is a frozen, hashable dataclass of its settings (static under `jax.jit`); its methods are
pure functions of `pred_fn`, the data and a key. `x` is data on the family's pixel grid
(`pixels_to_data(pixels, grid=family.grid)`), [B, ...]. A learned VDM schedule is an argument of
the methods (`gamma_fn=`), not part of the family: the family is the math, the schedule's
parameters are the model's.

`SAMPLERS` is the one registry of samplers: name -> `Sampler` (its function and its network
evaluations). Every tool and flag reads its names from it.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from vdm_jax import _checks, elbo, losses, sampling
from vdm_jax.diffusion import eps_and_x, prediction_target, q_sample
from vdm_jax.schedules import (CosineSchedule, DiscreteSchedule, LearnedLinearSchedule, LearnedSchedule, LinearSchedule,
                               cosine_betas, linear_betas)

__all__ = ["DDPM", "VDM", "Sampler", "SAMPLERS"]

Terms = dict[str, jax.Array]
LEARNED_SCHEDULES = {"learned": LearnedSchedule, "learned_linear": LearnedLinearSchedule}
"""VDM's learned schedules by `VDM.schedule` name: the module a family's methods then take as `gamma_fn`."""
_CLIP = (-1.0, 1.0)  # DDPM's samplers clip x̂ to the data's range


# --- the samplers ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sampler:
    """A sampler of the registry.

    run(family, pred_fn, gamma_fn, shape, *, key, steps): the data x [shape] after `steps` steps;
      `pred_fn` returns the prediction alone, but for samplers that take the reverse variance.
    evaluations(family, steps): the network evaluations it makes.
    variance: it takes the reverse variance (pred_fn returns (prediction, v) with a learned one).
    summary: what it is, and its section of docs/math.md.
    default_steps: its steps when none are asked for (`sample_steps=0`); 0: the family's own count
      (all T steps of a DDPM, 1000 for a continuous-time VDM). A DDPM takes at most T.
    """

    run: Callable
    evaluations: Callable[[object, int], int]
    variance: bool
    summary: str
    default_steps: int = 0


def _ancestral(family, pred_fn, gamma_fn, shape, *, key, steps):
    return family.ancestral(pred_fn, gamma_fn, shape, key=key, steps=steps)


def _ddim(family, pred_fn, gamma_fn, shape, *, key, steps):
    return sampling.ddim_sample(pred_fn, gamma_fn, family.ddim_times(steps), shape, key=key, kind=family.prediction,
                                clip_x=family.clip_x)


def _dpm_solver(family, pred_fn, gamma_fn, shape, *, key, steps):
    return sampling.dpm_solver_sample(pred_fn, gamma_fn, sampling.solver_times(gamma_fn, steps), shape, key=key,
                                      kind=family.prediction, clip_x=family.clip_x)


def _ode(method):
    def run(family, pred_fn, gamma_fn, shape, *, key, steps):
        return sampling.ode_sample(pred_fn, gamma_fn, sampling.solver_times(gamma_fn, steps), shape, key=key,
                                   method=method, kind=family.prediction, clip_x=family.clip_x)
    return run


def _steps(family, steps: int) -> int:
    return steps


def _heun_evaluations(family, steps: int) -> int:
    return 2 * steps - isinstance(family, DDPM)  # (a DDPM's last step lands on σ = 0: Euler's, one call)


SAMPLERS: dict[str, Sampler] = {
    "ancestral": Sampler(_ancestral, _steps, True, "DDPM's or VDM's ancestral sampler (docs/math.md §6.2, §6.3)"),
    "ddim": Sampler(_ddim, _steps, False, "DDIM with η = 0 (docs/math.md §6.4)", default_steps=50),
    "dpm_solver": Sampler(_dpm_solver, _steps, False, "DPM-Solver++(2M) (docs/math.md §6.6)", default_steps=20),
    "heun": Sampler(_ode("heun"), _heun_evaluations, False,
                    "the probability-flow ODE by Heun's method (docs/math.md §6.7)", default_steps=20),
    "euler": Sampler(_ode("euler"), _steps, False, "the probability-flow ODE by Euler's method (docs/math.md §6.7)",
                     default_steps=50),
}
"""Every sampler, by name. Adding one: its function in `vdm_jax.sampling`, an entry here, its
section in docs/math.md; the flags, the config's check and the docs' sampler table read this."""


class _Family:
    """What DDPM and VDM share: sampling through the registry, and its steps' checks."""

    prediction: str
    learned_variance = False
    clip_x = None  # (lo, hi): the samplers clip x̂ to it at every step

    def check_sampling(self, sampler: str, sample_steps: int, name: str = "sample_steps") -> int:
        """The steps `sampler` takes for `sample_steps` (0: `sampler_default_steps(sampler)`); raises
        ValueError naming `name` (and the sampler) if it cannot take them."""
        _checks.one_of(f"{type(self).__name__}: sampler", sampler, tuple(SAMPLERS))
        if isinstance(sample_steps, bool) or not isinstance(sample_steps, int) or sample_steps < 0:
            raise ValueError(f"{name} must be an int >= 0 (0: {self.sampler_default_steps(sampler)} for {sampler}), "
                             f"got {sample_steps!r}.")
        steps = sample_steps or self.sampler_default_steps(sampler)
        self._check_steps(sampler, steps, name)
        return steps

    def _check_steps(self, sampler: str, steps: int, name: str) -> None:
        pass

    def sampler_default_steps(self, sampler: str) -> int:
        """The steps `sampler` takes here when none are asked for: the registry's `default_steps`, or
        the family's own `default_steps` (0 there); a DDPM's at most T."""
        return SAMPLERS[sampler].default_steps or self.default_steps

    def sample(self, pred_fn: Callable, shape, *, key, sampler: str = "ancestral", sample_steps: int = 0,
               gamma_fn: Callable | None = None) -> jax.Array:
        """Data samples of `shape` [B, ...] by the registry's `sampler` (`SAMPLERS`) in
        `sample_steps` steps (0: the sampler's default, `sampler_default_steps`)."""
        steps = self.check_sampling(sampler, sample_steps)
        _checks.arguments(f"{type(self).__name__}.sample", shape=shape)
        schedule = self.gamma_schedule(gamma_fn)
        run_fn = pred_fn if SAMPLERS[sampler].variance else self._prediction_only(pred_fn)
        return SAMPLERS[sampler].run(self, run_fn, schedule, shape, key=key, steps=steps)

    def evaluations(self, sampler: str, sample_steps: int = 0) -> int:
        """The network evaluations of `sample(..., sampler=sampler, sample_steps=sample_steps)`."""
        return SAMPLERS[sampler].evaluations(self, self.check_sampling(sampler, sample_steps))

    def _prediction_only(self, pred_fn: Callable) -> Callable:
        """`pred_fn` without a learned variance's v."""
        return (lambda z_t, t: pred_fn(z_t, t)[0]) if self.learned_variance else pred_fn


@dataclasses.dataclass(frozen=True)
class DDPM(_Family):
    """Ho et al. 2020: T discrete steps of a β schedule (docs/math.md §2.2, §5.7).

    Attributes:
      timesteps: T >= 1.
      schedule: 'linear' (β from beta_start to beta_end) or 'cosine' (Nichol & Dhariwal).
      beta_start, beta_end: the linear schedule's β_1 and β_T, 0 < beta_start <= beta_end < 1.
      prediction: what pred_fn predicts: 'eps', 'x', 'score' or 'v'.
      loss_type: 'simple' (‖prediction − target‖² in the prediction's own parameterisation),
        'vlb' (L_prior + T·L_{i−1} at one step i: an unbiased estimate of the whole bound) or
        'hybrid' (L_simple + λ·T·L_{i−1} with the mean under stop_gradient: trains a learned
        variance; Nichol & Dhariwal).
      variance: the reverse variance: 'posterior' (β̃), 'beta' (β) or 'learned' (then pred_fn
        returns (prediction, v)).
      hybrid_lambda: λ of the hybrid loss, >= 0.
    """

    timesteps: int = 1000
    schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction: str = "eps"
    loss_type: str = "simple"
    variance: str = "posterior"
    hybrid_lambda: float = 0.001

    grid = "ddpm"  # the pixel grid of `vdm_jax.pixels`
    clip_x = _CLIP  # (Ho et al.'s clip_denoised)

    def __post_init__(self):
        _checks.check_int("DDPM: timesteps", self.timesteps, 1)
        _checks.one_of("DDPM: schedule", self.schedule, ("linear", "cosine"))
        _checks.arguments("DDPM", prediction=self.prediction, loss_type=self.loss_type, variance=self.variance,
                          beta_start=self.beta_start, beta_end=self.beta_end)
        if self.beta_start > self.beta_end:
            raise ValueError(f"DDPM: beta_start must be <= beta_end, got beta_start={self.beta_start} and "
                             f"beta_end={self.beta_end}.")
        if not self.hybrid_lambda >= 0.0:
            raise ValueError(f"DDPM: hybrid_lambda must be >= 0, got {self.hybrid_lambda}.")
        if self.loss_type == "hybrid" and not self.learned_variance:
            raise ValueError("DDPM: loss_type='hybrid' trains the learned variance: it needs variance='learned'.")
        if self.learned_variance and self.loss_type == "simple":
            raise ValueError("DDPM: loss_type='simple' cannot train a learned variance: use 'hybrid' or 'vlb'.")

    @property
    def learned_variance(self) -> bool:
        return self.variance == "learned"

    @property
    def default_steps(self) -> int:
        return self.timesteps

    @property
    def terms(self) -> tuple[str, ...]:
        """The names of `loss`'s terms."""
        return {"simple": ("simple",), "hybrid": ("simple", "vlb_t"), "vlb": ("prior", "vlb_t")}[self.loss_type]

    def gamma_schedule(self, gamma_fn: Callable | None = None) -> DiscreteSchedule:
        """The schedule: a `DiscreteSchedule` of the β's (a DDPM's schedule is never learned)."""
        if gamma_fn is not None:
            raise ValueError("DDPM: a DDPM's schedule is fixed by its settings; gamma_fn must be None.")
        betas = (linear_betas(self.timesteps, self.beta_start, self.beta_end) if self.schedule == "linear"
                 else cosine_betas(self.timesteps))
        return DiscreteSchedule(betas)

    # --- training and the bound ---------------------------------------------------------------

    def _at(self, pred_fn, x, step, key):
        """(ε, z_i, prediction, v) at integer steps i [B]: z_i = q_sample(x, ε, γ_i), ε from `key`."""
        eps = jax.random.normal(key, x.shape, x.dtype)
        z = q_sample(x, eps, self.gamma_schedule().gamma_step(step))
        out = pred_fn(z, step.astype(x.dtype) / self.timesteps)
        pred, v = out if self.learned_variance else (out, None)
        return eps, z, pred, v

    def _step_term(self, x, step, z, pred, v) -> jax.Array:
        """L_{i−1} at steps i [B] (the decoder's term at i = 1), per example (docs/math.md §5.7)."""
        schedule = self.gamma_schedule()
        gamma_t = schedule.gamma_step(step)
        _, x_hat = eps_and_x(pred, z, gamma_t, kind=self.prediction)
        log_var = elbo.ddpm_log_variance(schedule, step, variance=self.variance, v=v)
        return losses.vlb_term(x_hat, x, z, schedule.gamma_step(step - 1), gamma_t, log_var)

    def loss(self, pred_fn: Callable, x, *, key) -> tuple[jax.Array, Terms]:
        """The training loss of each example ([B] nats) and its terms (`terms`), at one step
        i ~ U{1..T} per example: `loss_type`'s loss (the class docstring)."""
        _checks.arguments("DDPM.loss", x=x)
        x = jnp.asarray(x)
        key_step, key_eps = jax.random.split(key)
        step = jax.random.randint(key_step, x.shape[:1], 1, self.timesteps + 1)
        eps, z, pred, v = self._at(pred_fn, x, step, key_eps)
        terms = {}
        if self.loss_type in ("simple", "hybrid"):
            target = prediction_target(x, eps, self.gamma_schedule().gamma_step(step), kind=self.prediction)
            terms["simple"] = losses.simple_loss(pred, target)
        if self.loss_type == "simple":
            return terms["simple"], terms
        # The hybrid loss trains only the variance through L_{i−1}: its mean is L_simple's.
        terms["vlb_t"] = self._step_term(x, step, z, jax.lax.stop_gradient(pred) if self.loss_type == "hybrid"
                                         else pred, v)
        if self.loss_type == "hybrid":
            return terms["simple"] + self.hybrid_lambda * self.timesteps * terms["vlb_t"], terms
        terms["prior"] = losses.prior_loss(x, self.gamma_schedule().gamma_step(self.timesteps))
        return terms["prior"] + self.timesteps * terms["vlb_t"], terms

    def bound(self, pred_fn: Callable, x, *, key) -> Terms:
        """An unbiased one-draw estimate of −ELBO per example (nats): 'prior' + 'diffusion'
        ((T−1)·L_{i−1} at one step i ~ U{2..T}) + 'reconstruction' (L_0) = 'total' (docs/math.md §5.7).

        L_0 is always computed (two network calls per example): it is a large part of the bound,
        and drawing it with probability 1/T would multiply it by T and make the estimate noisy.
        """
        _checks.arguments("DDPM.bound", x=x)
        x = jnp.asarray(x)
        key_diffusion, key_recon = jax.random.split(key)
        ones = jnp.ones(x.shape[:1], jnp.int32)
        reconstruction = self._step_term(x, ones, *self._at(pred_fn, x, ones, key_recon)[1:])
        diffusion = jnp.zeros_like(reconstruction)
        if self.timesteps > 1:
            key_step, key_eps = jax.random.split(key_diffusion)
            step = jax.random.randint(key_step, x.shape[:1], 2, self.timesteps + 1)
            diffusion = (self.timesteps - 1) * self._step_term(x, step, *self._at(pred_fn, x, step, key_eps)[1:])
        prior = losses.prior_loss(x, self.gamma_schedule().gamma_step(self.timesteps))
        return {"prior": prior, "diffusion": diffusion, "reconstruction": reconstruction,
                "total": prior + diffusion + reconstruction}

    def full_bound(self, pred_fn: Callable, x, *, key) -> Terms:
        """The whole discrete bound, every step i = 1..T (`vdm_jax.ddpm_vlb`): 'prior', 'diffusion'
        (Σ_{i=2..T} L_{i−1}), 'reconstruction', 'total' ([B] each) and 'per_t' [B, T] (L_{i−1} for
        i = 1..T, the reconstruction first)."""
        out = elbo.ddpm_vlb(pred_fn, x, self.gamma_schedule(), key=key, kind=self.prediction,
                            variance=self.variance)
        per_t = jnp.concatenate([out["reconstruction"][:, None], out["denoising"]], axis=1)
        return {"prior": out["prior"], "diffusion": out["denoising"].sum(axis=1),
                "reconstruction": out["reconstruction"], "total": out["total"], "per_t": per_t}

    # --- sampling and the ODE -------------------------------------------------------------------

    def flow(self, pred_fn: Callable, gamma_fn: Callable | None = None) -> tuple[Callable, DiscreteSchedule, float]:
        """What the probability-flow ODE takes (its samplers, `vdm_jax.ode_log_likelihood`): the
        prediction alone (a learned variance's v dropped), the schedule, and t_min = 1/T (the
        network was trained at the steps i/T, and γ(0) = −∞)."""
        return self._prediction_only(pred_fn), self.gamma_schedule(gamma_fn), 1.0 / self.timesteps

    def _check_steps(self, sampler: str, steps: int, name: str) -> None:
        if sampler == "ancestral" and steps != self.timesteps:
            raise ValueError(f"{name}={steps}: DDPM's ancestral sampler runs all T = {self.timesteps} steps; use 0 "
                             "(= T), or 'ddim', 'dpm_solver', 'heun' or 'euler' for fewer steps.")
        if steps > self.timesteps:
            raise ValueError(f"{name}={steps}: {sampler} on a DDPM with T = {self.timesteps} takes at most T steps.")

    def sampler_default_steps(self, sampler: str) -> int:
        return min(super().sampler_default_steps(sampler), self.timesteps)  # (a DDPM takes at most T steps)

    def ancestral(self, pred_fn, gamma_fn, shape, *, key, steps):
        return sampling.ddpm_sample(pred_fn, gamma_fn, shape, key=key, kind=self.prediction, variance=self.variance,
                                    clip_x=self.clip_x)

    def ddim_times(self, steps: int):
        return sampling.strided_times(self.timesteps, steps)


@dataclasses.dataclass(frozen=True)
class VDM(_Family):
    """Kingma et al. 2021: a γ schedule, continuous or discrete time, trained on its ELBO (docs/math.md §5.13).

    Attributes:
      timesteps: 0 for continuous time, else T discrete steps of the same γ.
      schedule: 'linear' or 'cosine' (fixed, from gamma_min to gamma_max), or a learned one (the
        methods then take it as `gamma_fn`): 'learned' (a `vdm_jax.LearnedSchedule`, monotone MLP) or
        'learned_linear' (a `vdm_jax.LearnedLinearSchedule`, the official `learnable_scalar`).
      gamma_min, gamma_max: γ(0) and γ(1) of a fixed schedule, a learned one's initial end points and
        the range the network's noise-level input is mapped from (gamma_min < gamma_max).
      prediction: what pred_fn predicts: 'eps', 'x', 'score' or 'v'.
    """

    timesteps: int = 0
    schedule: str = "linear"
    gamma_min: float = -13.3
    gamma_max: float = 5.0
    prediction: str = "eps"

    grid = "vdm"
    terms = ("diffusion", "prior", "reconstruction", "total")  # `loss`'s terms: the ELBO's

    def __post_init__(self):
        _checks.check_int("VDM: timesteps", self.timesteps, 0)
        _checks.one_of("VDM: schedule", self.schedule, ("linear", "cosine", *LEARNED_SCHEDULES))
        _checks.arguments("VDM", prediction=self.prediction, gamma_min=self.gamma_min, gamma_max=self.gamma_max)
        if not self.gamma_min < self.gamma_max:
            raise ValueError(f"VDM: gamma_min must be < gamma_max, got {self.gamma_min} and {self.gamma_max}.")

    @property
    def default_steps(self) -> int:
        return self.timesteps or 1000

    def gamma_schedule(self, gamma_fn: Callable | None = None) -> Callable:
        """The schedule t -> γ(t): the fixed one, or with a learned schedule the given `gamma_fn`."""
        if self.schedule in LEARNED_SCHEDULES:
            if gamma_fn is None:
                raise ValueError(f"VDM: schedule={self.schedule!r}: pass the learned schedule as gamma_fn=... "
                                 f"(e.g. a vdm_jax.{LEARNED_SCHEDULES[self.schedule].__name__}).")
            return gamma_fn
        if gamma_fn is not None:
            raise ValueError(f"VDM: schedule={self.schedule!r} is fixed by its settings; gamma_fn must be None "
                             "(or schedule='learned' or 'learned_linear').")
        return (LinearSchedule if self.schedule == "linear" else CosineSchedule)(self.gamma_min, self.gamma_max)

    def bound(self, pred_fn: Callable, x, *, key, gamma_fn: Callable | None = None) -> Terms:
        """VDM's ELBO at one (t, ε) per example (`vdm_jax.vdm_elbo`): 'prior', 'diffusion',
        'reconstruction' and 'total' [B] nats."""
        return elbo.vdm_elbo(pred_fn, x, self.gamma_schedule(gamma_fn), key=key, T=self.timesteps,
                             kind=self.prediction)

    def loss(self, pred_fn: Callable, x, *, key, gamma_fn: Callable | None = None) -> tuple[jax.Array, Terms]:
        """The ELBO, what a VDM trains on: ('total' [B], the bound's terms). Its 'diffusion' term is
        what a variance-minimising schedule update follows (`vdm_jax.variance_minimising_grads`)."""
        terms = self.bound(pred_fn, x, key=key, gamma_fn=gamma_fn)
        return terms["total"], terms

    def flow(self, pred_fn: Callable, gamma_fn: Callable | None = None) -> tuple[Callable, Callable, float]:
        """The prediction, the schedule, and t_min = 0 (γ(0) = gamma_min is finite)."""
        return pred_fn, self.gamma_schedule(gamma_fn), 0.0

    def ancestral(self, pred_fn, gamma_fn, shape, *, key, steps):
        return sampling.vdm_sample(pred_fn, gamma_fn, shape, key=key, sample_steps=steps, kind=self.prediction)

    def ddim_times(self, steps: int):
        return jnp.linspace(1.0, 0.0, steps + 1)
