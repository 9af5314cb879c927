"""`analytic_checks`: the figures behind the analytic acceptance tests."""
import functools
import os
import sys

import numpy as np

from benchmarks.common import command, flag

TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")


@command(flag("--chunks", type=int, default=60, help="Chunks of 1e6 draws for the continuous ELBO."))
def analytic_checks(args):
    """Prints the figures behind the analytic acceptance tests (tests/test_elbo.py, test_variance.py).

VDM's continuous ELBO of x ~ N(0.5, 0.3²) with the Bayes-optimal ε̂ against the exact entropy (SE
from the chunks' means), and the discrete-time ELBO for T = 10, 100, 1000 on 1e7 of those draws;
the diffusion loss's variance before and after 150 steps of VDM's variance minimisation.
"""
    sys.path.insert(0, TESTS)
    elbo_figures(args.chunks)
    variance_figures()


def elbo_figures(chunks: int):
    import jax
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

    means = np.array([float(chunk(jax.random.key(i), 0)) for i in range(chunks)])
    se = means.std(ddof=1) / np.sqrt(len(means))
    print(f"continuous ELBO {means.mean():.5f} nats, entropy {ENTROPY:.5f}, SE {se:.2e}, "
          f"|diff|/SE {abs(means.mean() - ENTROPY) / se:.2f}")
    for T in (10, 100, 1000):
        print(f"  T={T}: {np.mean([float(chunk(jax.random.key(i), T)) for i in range(min(10, chunks))]):.4f} nats "
              f"(continuous on the same draws: {means[:min(10, chunks)].mean():.4f})")


def variance_figures():
    from test_variance import minimise_variance

    m0, v0, m1, v1 = minimise_variance()
    print(f"diffusion-loss estimator: mean {m0:.4f} -> {m1:.4f} nats, variance {v0:.2f} -> {v1:.2f} "
          f"({v1 / v0:.2f}x)")
