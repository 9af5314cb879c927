"""Prints the figures behind the analytic acceptance tests (tests/test_elbo.py, test_variance.py).

    python -m benchmarks.analytic_checks

1. VDM's continuous ELBO of x ~ N(0.5, 0.3²) with the Bayes-optimal ε̂ vs the exact entropy
   (6e7 draws; SE from independent chunk means), and the discrete-time ELBO for T = 10, 100, 1000
   on the first 1e7 of those draws.
2. The variance of the continuous diffusion-loss estimator before and after 150 Adam steps of
   VDM's variance minimisation on a learned schedule.
"""
import functools
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))


def elbo_figures():
    import jax
    import jax.numpy as jnp
    import vdm_jax as vj
    from test_elbo import ENTROPY, M, S, optimal_eps

    sched = vj.LinearSchedule(-13.3, 8.0)
    pred = optimal_eps(sched)
    B = 1_000_000

    @functools.partial(jax.jit, static_argnums=1)
    def chunk(key, T):
        kx, ke = jax.random.split(key)
        x = M + S * jax.random.normal(kx, (B, 1))
        return vj.vdm_elbo(pred, x, sched, key=ke, T=T, decoder="gaussian")["total"].mean()

    means = np.array([float(chunk(jax.random.key(i), 0)) for i in range(60)])
    se = means.std(ddof=1) / np.sqrt(len(means))
    print(f"continuous ELBO {means.mean():.5f} nats, entropy {ENTROPY:.5f}, SE {se:.2e}, "
          f"|diff|/SE {abs(means.mean() - ENTROPY) / se:.2f}")
    for T in (10, 100, 1000):
        print(f"  T={T}: {np.mean([float(chunk(jax.random.key(i), T)) for i in range(10)]):.4f} nats "
              f"(continuous on the same draws: {means[:10].mean():.4f})")


def variance_figures():
    from test_variance import minimise_variance

    m0, v0, m1, v1 = minimise_variance()
    print(f"diffusion-loss estimator: mean {m0:.4f} -> {m1:.4f} nats, variance {v0:.2f} -> {v1:.2f} "
          f"({v1 / v0:.2f}x)")


if __name__ == "__main__":
    elbo_figures()
    variance_figures()
