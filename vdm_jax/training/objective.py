"""What a run trains: the diffusion family, its schedule, its loss, and how the model is called.

`Objective` is a small frozen (hashable) description built from the config. It is static under
`jax.jit`, and its methods are pure functions of the parameters and the batch: the per-example
training loss, the per-example bound used for evaluation, and the samplers' prediction function.
All the math is the core's (`vdm_jax.losses`, `vdm_jax.elbo`, `vdm_jax.sampling`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vdm_jax import elbo, losses, sampling
from vdm_jax.diffusion import eps_and_x, prediction_target, q_sample
from vdm_jax.models import as_pred_fn
from vdm_jax.pixels import data_to_pixels, pixels_to_data
from vdm_jax.schedules import (CosineSchedule, DiscreteSchedule, LearnedSchedule, LinearSchedule, cosine_betas,
                               linear_betas)


@dataclasses.dataclass(frozen=True)
class Objective:
    """A hashable description of the diffusion model being trained (see `from_config`)."""

    family: str  # 'ddpm' | 'vdm'
    prediction: str  # 'eps' | 'x' | 'v' | 'score'
    timesteps: int  # T (0: continuous-time VDM)
    schedule: str
    beta_start: float = 1e-4
    beta_end: float = 0.02
    loss: str = "simple"
    variance: str = "posterior"
    hybrid_lambda: float = 0.001
    gamma_min: float = -13.3
    gamma_max: float = 5.0
    variance_minimisation: bool = True
    image_shape: tuple[int, ...] = (32, 32, 3)

    @classmethod
    def from_config(cls, config, model_config) -> "Objective":
        d = config.diffusion
        return cls(family=d.family, prediction=model_config.prediction, timesteps=d.timesteps,
                   schedule=d.schedule, beta_start=d.beta_start, beta_end=d.beta_end, loss=d.loss,
                   variance=d.variance, hybrid_lambda=d.hybrid_lambda, gamma_min=d.gamma_min,
                   gamma_max=d.gamma_max, variance_minimisation=d.variance_minimisation,
                   image_shape=(model_config.image_size, model_config.image_size, model_config.in_channels))

    @property
    def dims(self) -> int:
        return math.prod(self.image_shape)

    @property
    def grid(self) -> str:
        return "ddpm" if self.family == "ddpm" else "vdm"

    @property
    def learned_schedule(self) -> bool:
        return self.family == "vdm" and self.schedule == "learned"

    # --- schedules ---------------------------------------------------------------------------

    def discrete_schedule(self) -> DiscreteSchedule:
        betas = (linear_betas(self.timesteps, self.beta_start, self.beta_end) if self.schedule == "linear"
                 else cosine_betas(self.timesteps))
        return DiscreteSchedule(betas)

    def gamma_fn(self, schedule_model: LearnedSchedule | None = None):
        """The continuous schedule t -> γ(t) of a VDM run."""
        if self.learned_schedule:
            return schedule_model
        cls = LinearSchedule if self.schedule == "linear" else CosineSchedule
        return cls(self.gamma_min, self.gamma_max)

    def make_schedule_model(self, hidden: int, rngs: nnx.Rngs) -> LearnedSchedule | None:
        if not self.learned_schedule:
            return None
        return LearnedSchedule(self.gamma_min, self.gamma_max, hidden=hidden, rngs=rngs)

    # --- the network as a prediction function --------------------------------------------------

    def pred_fn(self, model, schedule_model: LearnedSchedule | None = None, *, key=None):
        """`pred_fn(z_t, t)` (float t in [0, 1]) for the core's losses and samplers
        (`vdm_jax.models.as_pred_fn`).

        DDPM: the network is conditioned on t = step/T. VDM: on γ(t) mapped to [0, 1] by the
        configured end points, so it sees the noise level even when the schedule is learned.
        `key` is the dropout key (None: no dropout).
        """
        if self.family == "ddpm":
            return as_pred_fn(model, key=key)
        return as_pred_fn(model, self.gamma_fn(schedule_model), gamma_min=self.gamma_min,
                          gamma_max=self.gamma_max, key=key)

    # --- losses --------------------------------------------------------------------------------

    def per_example_loss(self, model, schedule_model, batch, *, key) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The training loss per example [B] in nats, and its terms (each [B]).

        DDPM: 'simple' = ‖prediction - target‖² of the model's own parameterisation; 'vlb' =
        L_prior + T·L_{t-1}, an unbiased one-t estimate of the whole bound; 'hybrid' = L_simple +
        λ T L_{t-1} with the mean under stop_gradient (Nichol & Dhariwal). VDM: its ELBO
        (prior + diffusion + reconstruction), whose 'diffusion' term is returned for the
        variance-minimising schedule update.
        """
        x = pixels_to_data(batch["image"], grid=self.grid)
        key_model, key_loss = jax.random.split(key)
        if self.family == "vdm":
            terms = elbo.vdm_elbo(self.pred_fn(model, schedule_model, key=key_model), x,
                                  self.gamma_fn(schedule_model), key=key_loss, T=self.timesteps,
                                  kind=self.prediction)
            return terms["total"], terms
        return self._ddpm_loss(model, x, key_model, key_loss)

    def _ddpm_draw(self, model, x, key, key_model=None, step_min: int = 1):
        """One draw of a step i ~ U{step_min..T} and ε per example, z_i, and the network's output there."""
        key_step, key_eps = jax.random.split(key)
        step = jax.random.randint(key_step, (x.shape[0],), step_min, self.timesteps + 1)
        return self._ddpm_at(model, x, step, key_eps, key_model)

    def _ddpm_at(self, model, x, step, key_eps, key_model=None):
        """ε, γ_i, z_i and the network's output at integer steps i [B] (t = i/T)."""
        sched = self.discrete_schedule()
        eps = jax.random.normal(key_eps, x.shape, x.dtype)
        gamma_t = sched.gamma_step(step)
        z = q_sample(x, eps, gamma_t)
        out = self.pred_fn(model, key=key_model)(z, step.astype(x.dtype) / self.timesteps)
        pred, v = out if self.variance == "learned" else (out, None)
        return sched, step, eps, gamma_t, z, pred, v

    def _ddpm_vlb_term(self, sched, step, gamma_t, x, z, pred, v):
        """L_{i-1} of DDPM's bound (the decoder at i = 1) for the drawn steps i, per example."""
        _, x_hat = eps_and_x(pred, z, gamma_t, kind=self.prediction)
        log_var = elbo.ddpm_log_variance(sched, step, variance=self.variance, v=v)
        return losses.vlb_term(x_hat, x, z, sched.gamma_step(step - 1), gamma_t, log_var)

    def _ddpm_loss(self, model, x, key_model, key):
        sched, step, eps, gamma_t, z, pred, v = self._ddpm_draw(model, x, key, key_model)
        terms = {}
        if self.loss in ("simple", "hybrid"):
            target = prediction_target(x, eps, gamma_t, kind=self.prediction)
            terms["simple"] = losses.simple_loss(pred, target)
        if self.loss in ("vlb", "hybrid"):
            mean_pred = jax.lax.stop_gradient(pred) if self.loss == "hybrid" else pred
            terms["vlb_t"] = self._ddpm_vlb_term(sched, step, gamma_t, x, z, mean_pred, v)
        if self.loss == "simple":
            loss = terms["simple"]
        elif self.loss == "hybrid":
            loss = terms["simple"] + self.hybrid_lambda * self.timesteps * terms["vlb_t"]
        else:
            terms["prior"] = losses.prior_loss(x, sched.gamma_step(self.timesteps))
            loss = terms["prior"] + self.timesteps * terms["vlb_t"]
        return loss, terms

    def per_example_bound(self, model, schedule_model, batch, *, key) -> dict[str, jax.Array]:
        """An unbiased estimate of -ELBO per example, in nats, with its terms.

        DDPM: prior + (T-1)·L_{i-1} for one step i ~ U{2..T} + the reconstruction term L_0
        (always computed: it is a large part of the bound, and sampling it with probability 1/T
        would multiply it by T and make the estimate very noisy). Two network calls per example.
        VDM: its ELBO (one t, plus its reconstruction term).
        """
        x = pixels_to_data(batch["image"], grid=self.grid)
        if self.family == "vdm":
            return elbo.vdm_elbo(self.pred_fn(model, schedule_model), x, self.gamma_fn(schedule_model), key=key,
                                 T=self.timesteps, kind=self.prediction)
        key_diffusion, key_recon = jax.random.split(key)
        ones = jnp.ones((x.shape[0],), jnp.int32)
        sched, step, _, gamma_t, z, pred, v = self._ddpm_at(model, x, ones, key_recon)
        reconstruction = self._ddpm_vlb_term(sched, step, gamma_t, x, z, pred, v)
        if self.timesteps > 1:
            sched, step, _, gamma_t, z, pred, v = self._ddpm_draw(model, x, key_diffusion, step_min=2)
            diffusion = (self.timesteps - 1) * self._ddpm_vlb_term(sched, step, gamma_t, x, z, pred, v)
        else:
            diffusion = jnp.zeros_like(reconstruction)
        prior = losses.prior_loss(x, sched.gamma_step(self.timesteps))
        return {"prior": prior, "diffusion": diffusion, "reconstruction": reconstruction,
                "total": prior + diffusion + reconstruction}

    def per_example_full_vlb(self, model, batch, *, key) -> dict[str, jax.Array]:
        """DDPM's whole discrete bound per example, every step i = 1..T (`vdm_jax.ddpm_vlb`), in nats.

        Returns 'prior', 'diffusion' (Σ_{i=2..T} L_{i-1}), 'reconstruction', 'total' ([B] each)
        and 'per_t' [B, T]: L_{i-1} for i = 1..T, the reconstruction first.
        """
        if self.family != "ddpm":
            raise ValueError(f"the full discrete VLB is a DDPM bound; this model is a {self.family!r}.")
        x = pixels_to_data(batch["image"], grid=self.grid)
        out = elbo.ddpm_vlb(self.pred_fn(model), x, self.discrete_schedule(), key=key, kind=self.prediction,
                            variance=self.variance)
        per_t = jnp.concatenate([out["reconstruction"][:, None], out["denoising"]], axis=1)
        return {"prior": out["prior"], "diffusion": out["denoising"].sum(axis=1),
                "reconstruction": out["reconstruction"], "total": out["total"], "per_t": per_t}

    # --- sampling ------------------------------------------------------------------------------

    def sample(self, model, schedule_model, *, key, num: int, sampler: str = "ancestral", sample_steps: int = 0):
        """Draws `num` images as uint8 [num, H, W, C] (one lax.scan over the chain).

        sample_steps: the sampler's steps (0: T, or 1000 for a continuous-time VDM).
        """
        shape = (num, *self.image_shape)
        pred_fn = self.pred_fn(model, schedule_model)
        if self.family == "ddpm":
            sched = self.discrete_schedule()
            if sampler == "ddim":
                if self.variance == "learned":  # DDIM takes no reverse variance: the prediction channels only
                    pred_fn = _prediction_only(pred_fn)
                times = sampling.strided_times(self.timesteps, sample_steps or self.timesteps)
                x = sampling.ddim_sample(pred_fn, sched, times, shape, key=key, kind=self.prediction,
                                         clip_x=(-1.0, 1.0))
            else:
                x = sampling.ddpm_sample(pred_fn, sched, shape, key=key, kind=self.prediction,
                                         variance=self.variance, clip_x=(-1.0, 1.0))
        else:
            gamma_fn = self.gamma_fn(schedule_model)
            n = sample_steps or self.timesteps or 1000
            if sampler == "ddim":
                x = sampling.ddim_sample(pred_fn, gamma_fn, jnp.linspace(1.0, 0.0, n + 1), shape, key=key,
                                         kind=self.prediction)
            else:
                x = sampling.vdm_sample(pred_fn, gamma_fn, shape, key=key, sample_steps=n, kind=self.prediction)
        return data_to_pixels(x, grid=self.grid).astype(jnp.uint8)


def _prediction_only(pred_fn):
    """A learned-variance `pred_fn` (returning (prediction, v)) without its v."""
    return lambda z_t, t: pred_fn(z_t, t)[0]


def model_and_schedule(graphdef: Any, params: Any, schedule_graphdef: Any, schedule_params: Any):
    """Merges the pure states back into modules (inside traced functions)."""
    model = nnx.merge(graphdef, params)
    schedule_model = None if schedule_graphdef is None else nnx.merge(schedule_graphdef, schedule_params)
    return model, schedule_model
