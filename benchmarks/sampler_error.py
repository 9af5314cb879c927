"""Sampling error against network evaluations, for every sampler, on a Gaussian mixture whose
denoiser is exact (issue 17's table and plot).

    python -m benchmarks.sampler_error [--num=20000] [--out=benchmarks/results/sampler_error_mixture.json]

The data: a 2-D mixture of 8 Gaussians (std 0.1) on a circle of radius 0.7, and DDPM's schedule
(T = 1000 linear β, as on CIFAR-10). Its Bayes-optimal ε̂(z_t, t) is in closed form: with
responsibilities w_k ∝ π_k N(z; α μ_k, (α² s² + σ²) I), E[x | z_t] = Σ_k w_k (μ_k + α s² (z - α μ_k) /
(α² s² + σ²)). So each sampler's error is its discretisation error alone (and Monte Carlo error):
the distance of its samples to exact draws of the mixture, measured by the sliced Wasserstein-1
distance (128 random directions) and the errors of the mean and covariance, against the network
evaluations it made. The reference line is two independent exact draws (the Monte Carlo floor).
"""
from __future__ import annotations

import os

from absl import app, flags

from benchmarks.common import write_result

flags.DEFINE_integer("num", 20_000, "Samples per sampler and setting.")
flags.DEFINE_string("out", None, "JSON output path (default benchmarks/results/sampler_error_mixture.json).")
FLAGS = flags.FLAGS

MODES, RADIUS, STD = 8, 0.7, 0.1
STEPS = (5, 10, 20, 50, 100, 250)


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np

    import vdm_jax as vj

    angles = 2 * np.pi * np.arange(MODES) / MODES
    means = jnp.asarray(RADIUS * np.stack([np.cos(angles), np.sin(angles)], 1), jnp.float32)  # [K, 2]

    def pred_fn(z, t):  # the exact ε̂ of the mixture
        gamma = sched(t)
        alpha, sigma = (v[:, None] for v in vj.alpha_sigma(gamma))
        var = alpha ** 2 * STD ** 2 + sigma ** 2  # [B, 1]
        diff = z[:, None, :] - alpha[:, None] * means[None]  # [B, K, 2]
        logits = -0.5 * jnp.sum(diff ** 2, -1) / var  # equal weights and variances
        w = jax.nn.softmax(logits, -1)[..., None]
        x_hat = jnp.sum(w * (means[None] + (alpha * STD ** 2 / var)[:, None] * diff), 1)
        return (z - alpha * x_hat) / sigma

    sched = vj.DiscreteSchedule(vj.linear_betas(1000))
    key = jax.random.key(0)
    shape = (FLAGS.num, 2)

    def exact(k):
        k1, k2 = jax.random.split(k)
        mode = jax.random.randint(k1, (FLAGS.num,), 0, MODES)
        return np.asarray(means[mode] + STD * jax.random.normal(k2, shape))

    directions = np.random.default_rng(0).normal(size=(128, 2))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    reference = exact(jax.random.key(1))
    ref_sorted = np.sort(reference @ directions.T, axis=0)

    def errors(x):
        x = np.asarray(x, np.float64)
        sliced = float(np.mean(np.abs(np.sort(x @ directions.T, axis=0) - ref_sorted)))
        return {"sliced_w1": sliced, "mean_error": float(np.linalg.norm(x.mean(0) - np.asarray(means).mean(0))),
                "cov_error": float(np.linalg.norm(np.cov(x.T) - np.cov(reference.T)))}

    def run(name, fn, calls):
        x = jax.jit(fn)(key)
        row = {"sampler": name, "network_calls": calls, **errors(x)}
        print(f"{name:>24s} {calls:5d} calls: sliced W1 {row['sliced_w1']:.4f}, mean error {row['mean_error']:.4f}, "
              f"cov error {row['cov_error']:.4f}", flush=True)
        return row

    rows = [{"sampler": "exact (Monte Carlo floor)", "network_calls": 0, **errors(exact(jax.random.key(2)))}]
    rows.append(run("ancestral (DDPM)", lambda k: vj.ddpm_sample(pred_fn, sched, shape, key=k), 1000))
    for n in STEPS:
        rows.append(run("ddim", lambda k, n=n: vj.ddim_sample(pred_fn, sched, vj.strided_times(1000, n), shape, key=k),
                        n))
        times = vj.solver_times(sched, n)
        rows.append(run("dpm_solver", lambda k, t=times: vj.dpm_solver_sample(pred_fn, sched, t, shape, key=k), n))
        rows.append(run("heun", lambda k, t=times: vj.ode_sample(pred_fn, sched, t, shape, key=k), 2 * n - 1))
        rows.append(run("euler", lambda k, t=times: vj.ode_sample(pred_fn, sched, t, shape, key=k, method="euler"),
                        n))
    record = {"benchmark": "sampler_error", "data": f"{MODES} Gaussians (std {STD}) on a circle of radius {RADIUS}",
              "schedule": "DDPM linear betas, T = 1000", "num": FLAGS.num, "rows": rows,
              "command": "python -m benchmarks.sampler_error"}
    path = write_result(record, FLAGS.out, "sampler_error_mixture.json")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, marker in (("ddim", "o"), ("dpm_solver", "s"), ("heun", "^"), ("euler", "v")):
        pts = [(r["network_calls"], r["sliced_w1"]) for r in rows if r["sampler"] == name]
        ax.plot(*zip(*pts), marker=marker, label=name)
    anc = next(r for r in rows if r["sampler"].startswith("ancestral"))
    ax.scatter([anc["network_calls"]], [anc["sliced_w1"]], color="k", marker="*", s=80, label="ancestral (T = 1000)")
    ax.axhline(rows[0]["sliced_w1"], color="gray", ls="--", lw=0.8, label="two exact draws")
    ax.set(xscale="log", yscale="log", xlabel="network evaluations", ylabel="sliced Wasserstein-1 to exact samples",
           title="8-Gaussian mixture, exact denoiser, DDPM schedule")
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = os.path.splitext(path)[0] + ".png"
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


if __name__ == "__main__":
    app.run(main)
