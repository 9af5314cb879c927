"""Classifier-free guidance (Ho & Salimans 2022): a conditional network made into the `pred_fn(z_t, t)`
that every sampler, a family's `sample` and the probability-flow ODE take (docs/math.md §6.9).

    pred_fn = vdm_jax.guided(net, labels, 2.0, null_label=10)     # net(z_t, t, labels) -> prediction
    x = vdm.sample(pred_fn, (10, 32, 32, 3), key=key, sampler="dpm_solver")
"""
from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

from vdm_jax import _checks
from vdm_jax.diffusion import per_example


def guided(pred_fn: Callable, labels, weight, *, null_label: int,
           interval: tuple[float, float] | None = None, gamma_fn: Callable | None = None) -> Callable:
    """The guided prediction of a conditional network, as a `pred_fn(z_t, t)` (docs/math.md §6.9):

        guided = (1 + w) cond - w uncond = cond + w (cond - uncond),

    with cond = `pred_fn(z_t, t, labels)` and uncond = `pred_fn(z_t, t, null_label)`, computed in one
    call on the doubled batch ([z_t; z_t], [t; t], [labels; null]). The combination is the same
    whatever the prediction kind (ε, x, v or score: each is affine in another, and the weights sum
    to 1), so a network of any kind is guided as is. w = 0 is the conditional model, w = -1 the
    unconditional one. A learned variance's v (`pred_fn` returning (prediction, v)) is the
    conditional one's.

    Args:
      pred_fn: the conditional network, `pred_fn(z_t, t, labels) -> prediction` (or (prediction, v)),
        labels int [B]; `null_label` is its "no label" class (what it was trained on with labels dropped).
      labels: the class of each example, int [B] (B of the z_t the sampler passes).
      weight: the guidance weight w, a real number (or a traced scalar, e.g. to sweep w under one jit).
      null_label: the network's "no label" class.
      interval: optional (lo, hi) of γ = -log SNR: guidance only where lo < γ(t) <= hi, the
        conditional prediction elsewhere (Kynkäänniemi et al. 2024 apply it at middle noise levels).
      gamma_fn: the schedule t -> γ(t), which `interval` is read on (needed with an interval only).
    """
    _checks.arguments("guided", labels=labels, weight=weight, null_label=null_label, interval=interval)
    if interval is not None and gamma_fn is None:
        raise ValueError("guided: an interval of γ needs gamma_fn, the schedule t -> γ(t) it is read on.")
    labels = jnp.asarray(labels)

    def guided_pred_fn(z_t, t):
        if labels.shape != z_t.shape[:1]:
            raise ValueError(f"guided: labels must be [B] = [{z_t.shape[0]}] (z_t's batch), got shape {labels.shape}.")
        out = pred_fn(jnp.concatenate([z_t, z_t]), jnp.concatenate([t, t]),
                      jnp.concatenate([labels, jnp.full_like(labels, null_label)]))
        learned = isinstance(out, (tuple, list))
        cond, uncond = jnp.split(out[0] if learned else out, 2)
        w = jnp.asarray(weight, cond.dtype)
        if interval is not None:  # per example: w [B, 1, ..., 1]
            gamma = gamma_fn(t)
            w = per_example(jnp.where((gamma > interval[0]) & (gamma <= interval[1]), w, 0.0), cond)
        prediction = cond + w * (cond - uncond)
        return (prediction, jnp.split(out[1], 2)[0]) if learned else prediction

    return guided_pred_fn
