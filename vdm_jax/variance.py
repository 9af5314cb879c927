"""VDM's variance minimisation of the diffusion-loss estimator (Kingma et al. 2021; docs/math.md §5.14).

In continuous time the expected diffusion loss depends on the schedule only through its end points
γ(0), γ(1); the schedule's shape in between changes only the variance of the one-sample estimate
½ γ'(t) ‖ε - ε̂‖². VDM therefore trains

- the model's parameters on the ELBO (the mean of the loss),
- the schedule's end points on the ELBO too (the prior and reconstruction terms depend on them),
- the rest of the schedule on the second moment E[L_diffusion²], which for a fixed mean is the
  variance: ∇_η E[L²] = E[2 L ∇_η L].

The official VDM code leaves the last one out.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp


def _default_is_endpoint(path) -> bool:
    return "endpoints" in jax.tree_util.keystr(path)


def variance_minimising_grads(loss_fn: Callable, params: Any, schedule_params: Any, *args,
                              is_endpoint: Callable = _default_is_endpoint, has_aux: bool = False):
    """Gradients for training a model and a learned schedule the VDM way.

    One forward pass; the backward pass is run for the two cotangents (mean of the loss; the
    variance of the diffusion term), which XLA fuses into one program.

    Args:
      loss_fn: `loss_fn(params, schedule_params, *args) -> (loss, diffusion)` (or
        `((loss, diffusion), aux)` with has_aux), both [B]: the per-example objective (e.g. the
        whole ELBO) and its diffusion term.
      params: the model's parameters (any pytree).
      schedule_params: the schedule's parameters (any pytree, e.g. the `nnx.State` of a
        `LearnedSchedule`).
      *args: passed on to loss_fn.
      is_endpoint: `is_endpoint(key_path) -> bool` picks the schedule leaves trained on the ELBO;
        by default those under `endpoints` (as in `LearnedSchedule`). The others are trained on
        E[diffusion²]. (A `LearnedLinearSchedule` is all end points, w and b, and has no shape to
        train this way: train it on the ELBO's gradient; docs/math.md §1.7.)
      has_aux: whether loss_fn returns auxiliary data.
    Returns:
      `(mean_loss, aux, grads, schedule_grads)`: mean_loss = mean(loss); grads = ∇_params mean(loss);
      schedule_grads = ∇ mean(loss) on end-point leaves, ∇ mean(diffusion²) on the rest. aux is
      None without has_aux.
    """
    f = lambda p, s: loss_fn(p, s, *args)  # noqa: E731
    if has_aux:
        (loss, diffusion), vjp_fn, aux = jax.vjp(f, params, schedule_params, has_aux=True)
    else:
        (loss, diffusion), vjp_fn = jax.vjp(f, params, schedule_params)
        aux = None
    if loss.ndim != 1 or diffusion.shape != loss.shape:
        raise ValueError(f"loss_fn must return per-example (loss, diffusion) of shape [B]; got "
                         f"{loss.shape} and {diffusion.shape}.")
    batch = loss.shape[0]
    mean_ct = (jnp.full_like(loss, 1.0 / batch), jnp.zeros_like(diffusion))
    var_ct = (jnp.zeros_like(loss), 2.0 * jax.lax.stop_gradient(diffusion) / batch)
    grads, sched_mean = vjp_fn(mean_ct)
    _, sched_var = vjp_fn(var_ct)
    sched = jax.tree_util.tree_map_with_path(
        lambda path, m, v: m if is_endpoint(path) else v, sched_mean, sched_var)
    return jnp.mean(loss), aux, grads, sched
