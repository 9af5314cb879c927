"""Sampling: one compiled chain against a Python loop of steps (`sampling_speed`), and every
sampler's error against its network evaluations on an exact denoiser (`sampler_error`)."""
import os

from benchmarks import common
from benchmarks.common import command, flag, model_flag, out_flag, write_result


@command(model_flag("tiny8", ("tiny8", "tiny32", "ddpm_cifar10")),
         flag("--batch", type=int, default=64, help="Images per chain."),
         flag("--T", type=int, default=1000, help="Steps of the chain."),
         flag("--repeats", type=int, default=3, help="Timed chains per variant (the median is reported)."),
         out_flag("sampling_speed_<backend>_<model>.json"))
def sampling_speed(args):
    """The whole reverse chain in one compiled call against a Python loop of jitted single steps.

The same DDPM ancestral chain, U-Net and samples (checked) on one device: scan is
`jax.jit(vdm_jax.ddpm_sample)`, one dispatch; loop is `jax.jit(vdm_jax.ddpm_step)` called T times.
"""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import vdm_jax as vj
    from vdm_jax.models import UNet, as_pred_fn, count_params

    config = common.unet(args.model, dropout=0.0)
    graphdef, params = nnx.split(UNet(config, rngs=nnx.Rngs(params=jax.random.key(0))))
    T = args.T
    sched = vj.DiscreteSchedule(vj.linear_betas(T))
    shape = (args.batch, config.image_size, config.image_size, config.in_channels)

    def pred_fn(params):  # DDPM: the network sees t = step/T
        return as_pred_fn(nnx.merge(graphdef, params))

    key = jax.random.key(0)
    key_init, key_steps = jax.random.split(key)
    scan = jax.jit(lambda p, k: vj.ddpm_sample(pred_fn(p), sched, shape, key=k, clip_x=(-1.0, 1.0)))
    step = jax.jit(lambda p, z, i: vj.ddpm_step(pred_fn(p), sched, z, i, key=key_steps, clip_x=(-1.0, 1.0)))
    z_T = jax.random.normal(key_init, shape)

    def loop():
        z = z_T
        for i in range(T, 0, -1):
            z = step(params, z, jnp.int32(i))
        return z

    compile_s = {"scan": common.timed_compile(scan, params, key)[1],
                 "step": common.timed_compile(step, params, z_T, jnp.int32(T))[1]}
    out = {"scan": scan(params, key).block_until_ready(), "loop": None}  # warm-up (and the jit cache entries)
    step(params, z_T, jnp.int32(T)).block_until_ready()
    chain_s = {}
    for name, fn in (("scan", lambda: scan(params, key)), ("loop", loop)):
        def call(name=name, fn=fn):
            out[name] = fn().block_until_ready()
        chain_s[name] = common.median_time(call, args.repeats)
    max_diff = float(jnp.max(jnp.abs(out["scan"] - out["loop"])))
    result = {"benchmark": "sampling_speed", "model": args.model, "params": count_params(config), "batch": args.batch,
              "T": T, "image_shape": list(shape[1:]), "device": common.device(1), "compile_s": compile_s,
              "chain_s": chain_s, "images_per_s": {k: args.batch / v for k, v in chain_s.items()},
              "ms_per_step": {k: 1e3 * v / T for k, v in chain_s.items()},
              "loop_over_scan": chain_s["loop"] / chain_s["scan"], "max_abs_diff": max_diff}
    assert np.isfinite(max_diff) and max_diff < 1e-3, f"the two chains disagree: {max_diff}"
    print(f"{args.model} ({result['params']:,} params), batch {args.batch}, T = {T}, on {result['device']}: "
          + "; ".join(f"{name} compiled in {compile_s[c]:.2f} s, {result['ms_per_step'][name]:.3f} ms a step, "
                      f"{result['images_per_s'][name]:.1f} images/s" for name, c in (("scan",) * 2, ("loop", "step"))))
    print(f"one compiled scan is {result['loop_over_scan']:.2f}× faster than the Python loop of jitted steps "
          f"(max |difference| of the samples {max_diff:.1e})")
    write_result(result, args.out, f"sampling_speed_{jax.default_backend()}_{args.model}.json")


MODES, RADIUS, STD = 8, 0.7, 0.1


@command(flag("--num", type=int, default=20_000, help="Samples per sampler and setting."),
         flag("--steps", type=common.csv(int), default=(5, 10, 20, 50, 100, 250),
              help="Comma-separated step counts."),
         out_flag("sampler_error_mixture.json, and its .png"))
def sampler_error(args):
    """Sampling error against network evaluations, every sampler, on a mixture whose denoiser is exact.

8 Gaussians (std 0.1) on a circle of radius 0.7, DDPM's schedule (T = 1000): the Bayes-optimal
ε̂(z_t, t) is in closed form (E[x | z_t] = Σ_k w_k (μ_k + α s² (z − α μ_k) / (α² s² + σ²))), so the
error is the sampler's own: the sliced Wasserstein-1 distance of its samples to exact draws.
"""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import vdm_jax as vj

    angles = 2 * np.pi * np.arange(MODES) / MODES
    means = jnp.asarray(RADIUS * np.stack([np.cos(angles), np.sin(angles)], 1), jnp.float32)  # [K, 2]
    sched = vj.DiscreteSchedule(vj.linear_betas(1000))

    def pred_fn(z, t):  # the exact ε̂ of the mixture
        alpha, sigma = (v[:, None] for v in vj.alpha_sigma(sched(t)))
        var = alpha ** 2 * STD ** 2 + sigma ** 2  # [B, 1]
        diff = z[:, None, :] - alpha[:, None] * means[None]  # [B, K, 2]
        w = jax.nn.softmax(-0.5 * jnp.sum(diff ** 2, -1) / var, -1)[..., None]  # equal weights and variances
        x_hat = jnp.sum(w * (means[None] + (alpha * STD ** 2 / var)[:, None] * diff), 1)
        return (z - alpha * x_hat) / sigma

    key, shape = jax.random.key(0), (args.num, 2)

    def exact(k):
        k1, k2 = jax.random.split(k)
        return np.asarray(means[jax.random.randint(k1, (args.num,), 0, MODES)] + STD * jax.random.normal(k2, shape))

    directions = np.random.default_rng(0).normal(size=(128, 2))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    reference = exact(jax.random.key(1))
    ref_sorted = np.sort(reference @ directions.T, axis=0)

    def errors(x):
        x = np.asarray(x, np.float64)
        return {"sliced_w1": float(np.mean(np.abs(np.sort(x @ directions.T, axis=0) - ref_sorted))),
                "mean_error": float(np.linalg.norm(x.mean(0) - np.asarray(means).mean(0))),
                "cov_error": float(np.linalg.norm(np.cov(x.T) - np.cov(reference.T)))}

    def run(name, fn, calls):
        row = {"sampler": name, "network_calls": calls, **errors(jax.jit(fn)(key))}
        print(f"{name:>24s} {calls:5d} calls: sliced W1 {row['sliced_w1']:.4f}, mean error {row['mean_error']:.4f}, "
              f"cov error {row['cov_error']:.4f}", flush=True)
        return row

    rows = [{"sampler": "exact (Monte Carlo floor)", "network_calls": 0, **errors(exact(jax.random.key(2)))},
            run("ancestral (DDPM)", lambda k: vj.ddpm_sample(pred_fn, sched, shape, key=k), 1000)]
    for n in args.steps:
        times = vj.solver_times(sched, n)
        rows += [run("ddim", lambda k: vj.ddim_sample(pred_fn, sched, vj.strided_times(1000, n), shape, key=k), n),
                 run("dpm_solver", lambda k: vj.dpm_solver_sample(pred_fn, sched, times, shape, key=k), n),
                 run("heun", lambda k: vj.ode_sample(pred_fn, sched, times, shape, key=k), 2 * n - 1),
                 run("euler", lambda k: vj.ode_sample(pred_fn, sched, times, shape, key=k, method="euler"), n)]
    record = {"benchmark": "sampler_error", "data": f"{MODES} Gaussians (std {STD}) on a circle of radius {RADIUS}",
              "schedule": "DDPM linear betas, T = 1000", "num": args.num, "rows": rows,
              "command": "python -m benchmarks sampler_error"}
    path = write_result(record, args.out, "sampler_error_mixture.json")
    _plot(rows, os.path.splitext(path)[0] + ".png")


def _plot(rows, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, marker in (("ddim", "o"), ("dpm_solver", "s"), ("heun", "^"), ("euler", "v")):
        ax.plot(*zip(*[(r["network_calls"], r["sliced_w1"]) for r in rows if r["sampler"] == name]), marker=marker,
                label=name)
    anc = next(r for r in rows if r["sampler"].startswith("ancestral"))
    ax.scatter([anc["network_calls"]], [anc["sliced_w1"]], color="k", marker="*", s=80, label="ancestral (T = 1000)")
    ax.axhline(rows[0]["sliced_w1"], color="gray", ls="--", lw=0.8, label="two exact draws")
    ax.set(xscale="log", yscale="log", xlabel="network evaluations", ylabel="sliced Wasserstein-1 to exact samples",
           title="8-Gaussian mixture, exact denoiser, DDPM schedule")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")
