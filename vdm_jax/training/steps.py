"""Pure step functions: `train_step`, `train_steps` (several per call), `eval_step`, `sample_step`,
`ode_bpd_step`; `apply_gradients`, the part of a train step after the gradients.

Each is a function of pytrees only, with `key` keyword-only; the caller jits it with shardings
(`loop.compiled_steps`). Per-step randomness is `fold_in(key, state.step)`, so a run is
reproducible and does not depend on how many steps each call makes.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from vdm_jax.likelihood import dequantized_bits_per_dim
from vdm_jax.training import faults
from vdm_jax.training.state import TrainState
from vdm_jax.variance import variance_minimising_grads

_LN2 = math.log(2.0)


def _modules(state: TrainState, params):
    """The model and schedule modules with these parameters ({'model': ..., 'schedule': ...})."""
    schedule = None if state.schedule_graphdef is None else nnx.merge(state.schedule_graphdef, params["schedule"])
    return nnx.merge(state.graphdef, params["model"]), schedule


def _grads(state: TrainState, batch, key):
    """(mean loss, terms [B] each, gradients), the loss in nats per dimension."""
    dims = state.objective.dims

    def loss_fn(model_params, schedule_params):  # -> ((loss [B], diffusion [B]), terms)
        model, schedule_model = _modules(state, {"model": model_params, "schedule": schedule_params})
        loss, terms = state.objective.per_example_loss(model, schedule_model, batch, key=key)
        return (loss / dims, terms.get("diffusion", jnp.zeros_like(loss)) / dims), terms

    params = (state.params["model"], state.params["schedule"])
    if state.objective.minimise_variance:
        loss, terms, g_model, g_schedule = variance_minimising_grads(loss_fn, *params, has_aux=True)
    else:
        def mean_loss(m, s):
            (loss, _), terms = loss_fn(m, s)
            return loss.mean(), terms
        (loss, terms), (g_model, g_schedule) = jax.value_and_grad(mean_loss, argnums=(0, 1), has_aux=True)(*params)
    return loss, terms, {"model": g_model, "schedule": g_schedule}


def _term_metrics(values, dims):
    """The loss terms' batch means per dimension: bits for bound terms, nats for the rest."""
    bound = {"prior", "diffusion", "reconstruction", "total", "vlb_t"}
    return {f"terms/{name}" + ("_bpd" if name in bound else ""): value / (dims * (_LN2 if name in bound else 1.0))
            for name, value in values.items() if name != "loss"}


def train_step(state: TrainState, batch, *, key) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser step on a batch {'image': uint8 [B, H, W, C]}.

    The model follows ∇ mean(loss); with a learned VDM schedule and variance minimisation, the
    schedule's shape follows ∇ mean(L_diffusion²) (`vdm_jax.variance_minimising_grads`). The EMA
    of all parameters is updated after the step, with decay min(ema_decay, (1 + step)/(10 + step)).
    The step's randomness is `fold_in(key, state.step)`: pass the same `key` at every step.
    A step whose loss, loss terms or gradients are not all finite is not applied: the state
    records it and, as `state.on_nonfinite` says, freezes or skips it (`vdm_jax.training.faults`).
    """
    rng = jax.random.fold_in(key, state.step)
    loss, terms, grads = _grads(state, batch, rng)
    report = faults.inspect(loss, terms, grads)
    new_state = apply_gradients(state, grads, report)
    metrics = {"loss": loss, "grad_norm": report["grad_norm"],
               "learning_rate": state.optimizer.schedule()(state.step),
               **_term_metrics(report["values"], state.objective.dims),
               "finite": report["ok"].astype(jnp.float32),
               "skipped_steps": new_state.faults["skipped"].astype(jnp.float32)}
    return new_state, metrics


def apply_gradients(state: TrainState, grads, report) -> TrainState:
    """The state after one step's gradients: the optimiser's update (clipping, Adam/AdamW), the EMA
    and the fault record. `report` is `faults.inspect` of the step: a step that is not finite (or,
    with on_nonfinite='stop', any step after one) leaves the parameters, EMA and optimiser state as
    they were.

    The EMA warms up: decay min(ema_decay, (1 + n)/(10 + n)) at step n keeps early averages from
    dwelling on the initial weights in short runs; long runs reach `ema_decay` after ~10/(1 - decay) steps.
    """
    record, apply, advance = faults.record(state.faults, report, state.step, state.on_nonfinite)

    def update(_):
        updates, opt_state = state.optimizer.transformation().update(grads, state.opt_state, state.params,
                                                                      grad_norm=report["grad_norm"])
        params = optax.apply_updates(state.params, updates)
        n = state.step.astype(jnp.float32)
        decay = jnp.minimum(state.ema_decay, (1.0 + n) / (10.0 + n))
        ema = jax.tree.map(lambda e, p: e + (1.0 - decay) * (p - e), state.ema_params, params)
        return params, ema, opt_state

    params, ema, opt_state = jax.lax.cond(apply, update, lambda _: (state.params, state.ema_params, state.opt_state),
                                          None)
    return state.replace(step=state.step + advance, params=params, ema_params=ema, opt_state=opt_state,
                         faults=record)


def train_steps(state: TrainState, batches, *, key, unroll: bool | None = None
                ) -> tuple[TrainState, dict[str, jax.Array]]:
    """`k` train steps in one call (a `lax.scan`); batches have a leading micro-step axis [k, B, ...].

    Metrics are averaged over the finite steps among the k (NaN if none was finite); `finite` is
    the fraction of finite steps and `skipped_steps` the count after the last. Same result as k
    calls of `train_step`.

    unroll: unroll the k steps instead of looping over one compiled step (more compile time).
    None (default): unroll when JAX's default backend is the CPU, whose gradient convolutions
    inside a loop body miss XLA:CPU's fast kernels (jax-ml/jax#12868).
    """
    unroll = jax.default_backend() == "cpu" if unroll is None else bool(unroll)
    state, metrics = jax.lax.scan(lambda s, b: train_step(s, b, key=key), state, batches, unroll=unroll)
    finite, skipped = metrics.pop("finite"), metrics.pop("skipped_steps")
    count = jnp.sum(finite)
    out = jax.tree.map(lambda m: jnp.where(count > 0, jnp.sum(jnp.where(finite > 0, m, 0.0), axis=0) / count,
                                           jnp.nan), metrics)
    return state, {**out, "finite": jnp.mean(finite), "skipped_steps": skipped[-1]}


def eval_step(state: TrainState, batch, *, key, draws: int = 1, full_vlb: bool = False,
              conditional: bool = True) -> dict[str, jax.Array]:
    """The bound −ELBO of each example (nats) and its terms, with the EMA parameters.

    batch: {'image': uint8 [B, H, W, C], ...}; a class-conditional model's bound is given the
    batch's 'label' [B], or with `conditional=False` no label. Returns the average of `draws` independent
    estimates, draw d using `fold_in(key, d)`: each the objective's `per_example_bound`, or with
    `full_vlb` (DDPM only) its `per_example_full_vlb`, the whole discrete bound with 'per_t' [B, T].
    Padding examples are evaluated like the others; the caller masks them out.
    """
    model, schedule_model = _modules(state, state.ema_params)  # evaluation and sampling use the EMA
    if not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be a positive int, got {draws!r}.")

    def one(d):
        k = jax.random.fold_in(key, d)
        if full_vlb:
            return state.objective.per_example_full_vlb(model, batch, key=k)
        return state.objective.per_example_bound(model, schedule_model, batch, key=k, conditional=conditional)

    if draws == 1:
        return one(0)
    return jax.tree.map(lambda v: jnp.mean(v, axis=0), jax.lax.map(one, jnp.arange(draws)))


def sample_step(state: TrainState, *, key, num: int, sampler: str = "ancestral", sample_steps: int = 0,
                labels=None, guidance=0.0, guidance_interval=None):
    """`num` samples as uint8 [num, H, W, C] from the EMA parameters.

    sampler: 'ancestral' (DDPM or VDM), 'ddim', 'dpm_solver', 'heun' or 'euler'; sample_steps: its
    steps (0: the sampler's default, `family.sampler_default_steps`). A class-conditional model:
    `labels` int [num] with guidance weight `guidance` (`Objective.sample`), or None: unconditional.
    """
    model, schedule_model = _modules(state, state.ema_params)  # evaluation and sampling use the EMA
    return state.objective.sample(model, schedule_model, key=key, num=num, sampler=sampler,
                                  sample_steps=sample_steps, labels=labels, guidance=guidance,
                                  guidance_interval=guidance_interval)


def ode_bpd_step(state: TrainState, batch, *, key, num_draws: int = 1, **ode_kwargs) -> dict[str, jax.Array]:
    """Bits/dim of each example under the probability-flow ODE, with the EMA parameters.

    batch: {'image': uint8 [B, H, W, C], ...}. The pixels are dequantised uniformly on the
    objective's grid and their log-likelihood integrated by `vdm_jax.dequantized_bits_per_dim`
    (`num_draws` dequantisation draws), from the objective's `flow` (t_min = 1/T for a DDPM, 0 for
    a VDM); `ode_kwargs` are `vdm_jax.ode_log_likelihood`'s options (divergence, num_probes, rtol, ...).
    Returns its [B] values: 'bits_per_dim', 'bits_per_dim_iw', 'log_jacobian', 'nfe' and the
    terms 'prior_bpd', 'flow_bpd', 'dequantization_bpd'.
    """
    model, schedule_model = _modules(state, state.ema_params)
    pred_fn, gamma_fn, t_min = state.objective.flow(model, schedule_model)
    return dequantized_bits_per_dim(pred_fn, gamma_fn, batch["image"], key=key, grid=state.objective.grid,
                                    num_draws=num_draws, kind=state.objective.prediction, t_min=t_min, **ode_kwargs)
