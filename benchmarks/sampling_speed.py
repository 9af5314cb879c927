"""The whole reverse chain in one compiled call against a Python loop of jitted single steps.

    python -m benchmarks.sampling_speed [--model=tiny8|ddpm_cifar10] [--batch=64] [--T=1000] [--repeats=3]

Both run the same DDPM ancestral chain (`vdm_jax.ddpm_sample`, whose `lax.scan` body is
`vdm_jax.ddpm_step`) with the same U-Net on one device and give the same samples (checked):

- scan: `jax.jit(ddpm_sample)`: one dispatch for all T steps;
- loop: `jax.jit(ddpm_step)` called T times from Python (asynchronous dispatch, one host sync at the end).

Prints and writes (`--out`, default benchmarks/results/sampling_speed_<backend>_<model>.json) the
compile times, the median wall time of a whole chain, images/s and the loop/scan ratio. The weights
are a fresh initialisation (speed does not depend on them).
"""
import statistics
import time

from absl import app, flags

from benchmarks.common import write_result

flags.DEFINE_enum("model", "tiny8", ["tiny8", "tiny32", "ddpm_cifar10"],
                  "tiny8: the quickstart U-Net on 8×8×1; tiny32: on 32×32×3; ddpm_cifar10: the 35.7M DDPM U-Net.")
flags.DEFINE_integer("batch", 64, "Images per chain.")
flags.DEFINE_integer("T", 1000, "Steps of the chain.")
flags.DEFINE_integer("repeats", 3, "Timed chains per variant (the median is reported).")
flags.DEFINE_string("out", None, "JSON output path.")
FLAGS = flags.FLAGS


def _model(name):
    import jax
    from flax import nnx

    from vdm_jax.models import UNet, ddpm_cifar10, tiny

    config = {"tiny8": lambda: tiny(image_size=8, in_channels=1, dropout=0.0),
              "tiny32": lambda: tiny(dropout=0.0),
              "ddpm_cifar10": lambda: ddpm_cifar10().replace(dropout=0.0)}[name]()
    graphdef, params = nnx.split(UNet(config, rngs=nnx.Rngs(params=jax.random.key(0))))
    return config, graphdef, params


def _timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        out.block_until_ready()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main(argv):
    del argv
    from vdm_jax import set_cpu_xla_flags

    set_cpu_xla_flags()  # as the entry points do, before the first computation
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import vdm_jax as vj
    from vdm_jax.models import as_pred_fn, count_params

    config, graphdef, params = _model(FLAGS.model)
    T = FLAGS.T
    sched = vj.DiscreteSchedule(vj.linear_betas(T))
    shape = (FLAGS.batch, config.image_size, config.image_size, config.in_channels)
    device = jax.devices()[0]

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

    start = time.perf_counter()
    scan.lower(params, key).compile()
    compile_scan = time.perf_counter() - start
    start = time.perf_counter()
    step.lower(params, z_T, jnp.int32(T)).compile()
    compile_step = time.perf_counter() - start
    scan(params, key).block_until_ready()  # warm-up (and the jit cache entry)
    step(params, z_T, jnp.int32(T)).block_until_ready()
    t_scan, out_scan = _timed(lambda: scan(params, key), FLAGS.repeats)
    t_loop, out_loop = _timed(loop, FLAGS.repeats)
    max_diff = float(jnp.max(jnp.abs(out_scan - out_loop)))
    result = {
        "benchmark": "sampling_speed", "model": FLAGS.model, "params": count_params(config),
        "batch": FLAGS.batch, "T": T, "image_shape": list(shape[1:]),
        "device": f"{device.device_kind} ({jax.default_backend()})",
        "jax": jax.__version__,
        "compile_s": {"scan": compile_scan, "step": compile_step},
        "chain_s": {"scan": t_scan, "loop": t_loop},
        "images_per_s": {"scan": FLAGS.batch / t_scan, "loop": FLAGS.batch / t_loop},
        "ms_per_step": {"scan": 1e3 * t_scan / T, "loop": 1e3 * t_loop / T},
        "loop_over_scan": t_loop / t_scan,
        "max_abs_diff": max_diff,
    }
    assert np.isfinite(max_diff) and max_diff < 1e-3, f"the two chains disagree: {max_diff}"
    print(f"{FLAGS.model} ({result['params']:,} params), batch {FLAGS.batch}, T = {T}, on {result['device']}")
    print(f"{'':10}{'compile s':>12}{'chain s':>12}{'ms/step':>10}{'images/s':>12}")
    for name, c in (("scan", compile_scan), ("loop", compile_step)):
        print(f"{name:10}{c:>12.2f}{result['chain_s'][name]:>12.3f}{result['ms_per_step'][name]:>10.3f}"
              f"{result['images_per_s'][name]:>12.1f}")
    print(f"one compiled scan is {result['loop_over_scan']:.2f}× faster than the Python loop of jitted steps "
          f"(max |difference| of the samples {max_diff:.1e})")
    write_result(result, FLAGS.out, f"sampling_speed_{jax.default_backend()}_{FLAGS.model}.json")


if __name__ == "__main__":
    app.run(main)
