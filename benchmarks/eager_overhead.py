"""What the argument checks cost an eager call: the public function against its bare formula.

    python -m benchmarks.eager_overhead [--repeats=2000] [--batch=8] [--out=...]

Each public function (`eps_matching`, `q_sample`, `vdm_elbo` with a trivial pred_fn) and the same
formula written with plain `jax.numpy` (the same ops, no checks, no conversions) are called eagerly
on `jax.device_put` inputs [B, 32, 32, 3]; after a warm-up, the median wall time of `--repeats`
calls (each waiting for its result), in alternating rounds of the two. Writes benchmarks/results/eager_overhead_<backend>.json.
"""
import argparse
import inspect
import statistics

import jax
import jax.numpy as jnp

import vdm_jax as vj
from benchmarks.common import median_time, write_result


def _bare_eps_matching(eps_hat, eps, gamma_s, gamma_t):
    w = 0.5 * jnp.expm1(gamma_t - gamma_s)
    return w * jnp.sum(jnp.square(eps_hat - eps), axis=(1, 2, 3))


def _bare_alpha_sigma(gamma):
    return jnp.exp(-0.5 * jax.nn.softplus(gamma)), jnp.exp(-0.5 * jax.nn.softplus(-gamma))


def _bare_q_sample(x, eps, gamma_t):
    alpha, sigma = _bare_alpha_sigma(gamma_t.reshape(gamma_t.shape + (1,) * (x.ndim - gamma_t.ndim)))
    return alpha * x + sigma * eps


def _bare_vdm_elbo(pred_fn, x, gamma_min, gamma_max, key):
    """vdm_elbo's continuous-time terms with the Gaussian decoder and a linear γ: the library's
    formulas op for op (γ's NaN outside [0, 1], γ' by jax.jvp, the prior's series), no checks."""
    key_t, key_eps, key_0 = jax.random.split(key, 3)
    b, sum_ = x.shape[0], lambda v: jnp.sum(v, axis=(1, 2, 3))  # noqa: E731
    t = jnp.mod(jax.random.uniform(key_t, ()) + jnp.arange(b, dtype=x.dtype) / b, 1.0)

    def gamma(t):
        return jnp.where((t >= 0) & (t <= 1), gamma_min + (gamma_max - gamma_min) * t, jnp.nan)

    eps = jax.random.normal(key_eps, x.shape, x.dtype)
    z_t = _bare_q_sample(x, eps, gamma(t))
    eps_hat = pred_fn(z_t, t)
    g0, g1 = gamma(jnp.zeros((), x.dtype)), gamma(jnp.ones((), x.dtype))
    z_0 = _bare_q_sample(x, jax.random.normal(key_0, x.shape, x.dtype), g0)
    u = jax.nn.sigmoid(-g1)
    series = jnp.where(u < 0.1, sum(u ** k / k for k in range(2, 13)), -jnp.log1p(-u) - u)
    prior = sum_(0.5 * (u * jnp.square(x) + series))
    _, dgamma = jax.jvp(gamma, (t,), (jnp.ones_like(t),))
    diffusion = 0.5 * dgamma * sum_(jnp.square(eps - eps_hat))
    a0 = _bare_alpha_sigma(g0)[0]
    recon = sum_(0.5 * (jnp.log(2.0 * jnp.pi) + g0 + jnp.square(x - z_0 / a0) * jnp.exp(-g0)))
    return {"prior": prior, "diffusion": diffusion, "reconstruction": recon,
            "total": prior + diffusion + recon}


def _vdm_elbo(pred_fn, x, sched, key):
    # The same benchmark measures the revision before the calling convention (key positional).
    if inspect.signature(vj.vdm_elbo).parameters["key"].kind is inspect.Parameter.KEYWORD_ONLY:
        return vj.vdm_elbo(pred_fn, x, sched, key=key, decoder="gaussian")
    return vj.vdm_elbo(pred_fn, x, key, sched, decoder="gaussian")


def _time_pair(public, bare, repeats, rounds=10):
    """Medians of the two, measured in alternating rounds so that a busy machine's drift hits both."""
    for fn in (public, bare):
        for _ in range(20):
            jax.block_until_ready(fn())
    times = {"public": [], "bare": []}
    for _ in range(rounds):
        for name, fn in (("public", public), ("bare", bare)):
            times[name].append(median_time(lambda: jax.block_until_ready(fn()), max(1, repeats // rounds)))
    return statistics.median(times["public"]), statistics.median(times["bare"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    shape = (args.batch, 32, 32, 3)
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x = jax.device_put(jax.random.uniform(k1, shape, minval=-1, maxval=1))
    eps = jax.device_put(jax.random.normal(k2, shape))
    eps_hat = jax.device_put(jax.random.normal(k3, shape))
    gamma_s = jax.device_put(jnp.linspace(-5.0, 3.0, args.batch))
    gamma_t = gamma_s + 0.5
    sched = vj.LinearSchedule(-13.3, 5.0)
    pred_fn = lambda z, t: 0.1 * z  # noqa: E731
    key = jax.random.key(1)

    pairs = {
        "eps_matching": (lambda: vj.eps_matching(eps_hat, eps, gamma_s, gamma_t),
                         lambda: _bare_eps_matching(eps_hat, eps, gamma_s, gamma_t)),
        "q_sample": (lambda: vj.q_sample(x, eps, gamma_t), lambda: _bare_q_sample(x, eps, gamma_t)),
        "vdm_elbo": (lambda: _vdm_elbo(pred_fn, x, sched, key),
                     lambda: _bare_vdm_elbo(pred_fn, x, -13.3, 5.0, key)),
    }
    results = {}
    for name, (public, bare) in pairs.items():
        t_public, t_bare = _time_pair(public, bare, args.repeats)
        results[name] = {"public_ms": round(1e3 * t_public, 4), "bare_ms": round(1e3 * t_bare, 4),
                         "ratio": round(t_public / t_bare, 2)}
        print(f"{name:14s} public {1e3 * t_public:7.3f} ms   bare formula {1e3 * t_bare:7.3f} ms   "
              f"x{t_public / t_bare:.2f}")
    write_result({"backend": jax.default_backend(), "device": str(jax.devices()[0]), "shape": list(shape),
                  "repeats": args.repeats, "jax": jax.__version__, "results": results},
                 args.out, f"eager_overhead_{jax.default_backend()}.json")


if __name__ == "__main__":
    main()
