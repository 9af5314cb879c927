"""The update's share of the train step, and the train step's share of the machine's peak.

    python -m benchmarks.update_cost [--model=ddpm_cifar10] [--batch=8] [--steps=3] [--repeats=3]

On one device, in one process, each program compiled as the loop compiles it (the state donated):

- step: the loop's train step (`loop.compiled_steps`);
- no_update: the same step without the update: the loss gradient alone (the gradients are its
  output; the state comes back unchanged);
- update: what the step does with the gradients, alone, on fixed gradients: the fault check and
  global norm (`faults.inspect`), clipping, Adam/AdamW, the EMA, and the guarantee that a
  non-finite step is not applied (`steps.apply_gradients`);
- matmul: a 4096² float32 matmul, the practical FLOP/s peak of this machine, measured here;
- stream: y ← a·x + y on arrays of the parameters' size, the practical memory bandwidth.

Reports the update's share, (step − no_update) / step; its memory bound, the bytes the update
must move (read the gradient for its norm, then gradient, parameter, both moments and EMA; write
all but the gradient: 40 bytes a float32 parameter) at the stream bandwidth; and the train step's FLOP/s (XLA's count of the
lowered loss gradient, forward and backward) over the matmul peak. Writes
benchmarks/results/update_cost_<backend>_<model>.json.
"""
import json
import statistics
import time

from absl import app, flags

from benchmarks import measure
from benchmarks.common import matmul_peak, median_time, write_result

flags.DEFINE_enum("model", "ddpm_cifar10", list(measure.UNETS), "The U-Net (`measure.unet`).")
flags.DEFINE_integer("batch", 8, "Training batch.", lower_bound=1)
flags.DEFINE_integer("steps", 3, "Timed calls per repeat.", lower_bound=1)
flags.DEFINE_integer("repeats", 3, "Timed repeats (the median is reported).", lower_bound=1)
flags.DEFINE_integer("rounds", 3, "Alternations of the step and the step without the update (medians reported).",
                     lower_bound=1)
flags.DEFINE_string("optimizer", None, "adam or adamw (default: the model's training recipe).")
flags.DEFINE_string("out", None, "JSON output (default benchmarks/results/update_cost_<backend>_<model>.json).")
FLAGS = flags.FLAGS

BYTES_PER_PARAM = 10 * 4  # read g (norm); read g, p, m, v, e; write p, m, v, e (float32)


def stream_bandwidth(size: int, repeats: int = 5) -> float:
    """Bytes/s of y ← 2x + y on float32 arrays of `size` elements (12 bytes an element), y donated
    (the median of `repeats`)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((size,), jnp.float32)
    y = jnp.zeros((size,), jnp.float32)
    f = jax.jit(lambda x, y: 2.0 * x + y, donate_argnums=1)
    y = jax.block_until_ready(f(x, y))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        y = jax.block_until_ready(f(x, y))
        times.append(time.perf_counter() - start)
    return 12 * size / statistics.median(times)


def measure_update(model_name: str, batch: int, steps: int, repeats: int, optimizer: str | None = None,
                   rounds: int = 3) -> dict:
    import jax

    from vdm_jax.models import count_params
    from vdm_jax.training import default_config, parallel, set_model
    from vdm_jax.training import faults, steps as steps_lib
    from vdm_jax.training.loop import compiled_steps

    model = measure.unet(model_name)
    config = default_config()
    set_model(config, model, dtype="float32")
    config.training.batch_size = batch
    config.optim.warmup_steps = 0
    if optimizer:
        config.optim.optimizer = optimizer
    mesh = parallel.make_mesh(jax.devices()[:1])
    rep, data_sharding = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    _, state, data, key = measure.setup(config, mesh)

    step, _ = compiled_steps(mesh)

    def no_update(state, batch, key):  # the loss gradient alone: the step without the fault check and update
        loss, _, grads = steps_lib._grads(state, batch, jax.random.fold_in(key, state.step))
        return state, (loss, grads)

    def update(state, grads, terms):  # what the step adds to the gradient: the fault check and the update
        return steps_lib.apply_gradients(state, grads, faults.inspect(terms["loss"], terms["terms"], grads))

    def grads_of(state, batch, key):
        loss, terms, grads = steps_lib._grads(state, batch, key)
        return grads, {"loss": loss, "terms": terms}

    no_update = jax.jit(no_update, in_shardings=(rep, data_sharding, rep), out_shardings=(rep, rep),
                        donate_argnums=0)
    update = jax.jit(update, in_shardings=(rep, rep, rep), out_shardings=rep, donate_argnums=0)
    grads, terms = jax.jit(grads_of, in_shardings=(rep, data_sharding, rep), out_shardings=rep)(state, data, key)
    flops = measure.flops(jax.jit(steps_lib._grads, in_shardings=(rep, data_sharding, rep)).lower(state, data, key))

    def timed(call):  # call(state) -> state; median seconds per call over `repeats` runs of `steps`
        nonlocal state
        for _ in range(2):
            state = call(state)
        jax.block_until_ready(state)

        def run():
            nonlocal state
            for _ in range(steps):
                state = call(state)
            jax.block_until_ready(state)

        return median_time(run, repeats) / steps

    result = {"params": count_params(model), "optimizer": config.optim.optimizer,
              "grad_clip": config.optim.grad_clip}
    # Alternate the step and the step without the update, so that drift on a shared machine hits both.
    step_s, no_update_s = [], []
    for _ in range(rounds):
        step_s.append(timed(lambda s: step(s, data, key)[0]))
        no_update_s.append(timed(lambda s: no_update(s, data, key)[0]))
    result["step_s"], result["no_update_s"] = statistics.median(step_s), statistics.median(no_update_s)
    result["step_rounds_s"], result["no_update_rounds_s"] = step_s, no_update_s
    result["update_s"] = timed(lambda s: update(s, grads, terms))
    result["update_share"] = (result["step_s"] - result["no_update_s"]) / result["step_s"]
    result["update_alone_share"] = result["update_s"] / result["step_s"]
    bandwidth = stream_bandwidth(result["params"])
    peak = matmul_peak()
    result["update_bytes"] = BYTES_PER_PARAM * result["params"]
    result["stream_bytes_per_s"] = bandwidth
    result["update_memory_bound_s"] = result["update_bytes"] / bandwidth
    result["update_over_memory_bound"] = result["update_s"] / result["update_memory_bound_s"]
    result["matmul_peak_flops_per_s"] = peak
    result["grad_flops"] = flops
    result["step_flops_per_s"] = flops / result["step_s"]
    result["step_share_of_peak"] = flops / result["step_s"] / peak
    result["no_update_share_of_peak"] = flops / result["no_update_s"] / peak
    return result


def main(argv):
    del argv
    from vdm_jax import set_cpu_xla_flags

    set_cpu_xla_flags()
    import jax

    result = measure_update(FLAGS.model, FLAGS.batch, FLAGS.steps, FLAGS.repeats, FLAGS.optimizer, FLAGS.rounds)
    device = jax.devices()[0]
    record = {"benchmark": "update_cost", "model": FLAGS.model, "batch": FLAGS.batch, "steps": FLAGS.steps,
              "repeats": FLAGS.repeats, "device": f"1 × {device.device_kind} ({jax.default_backend()})",
              "versions": {"jax": jax.__version__}, **result}
    print(json.dumps({k: v for k, v in record.items() if not isinstance(v, dict)}, indent=1))
    print(f"update: {result['update_share']:.1%} of the step (step {result['step_s']:.3f} s, without the update "
          f"{result['no_update_s']:.3f} s); alone {result['update_s'] * 1e3:.0f} ms, "
          f"{result['update_over_memory_bound']:.1f}× its memory bound ({result['update_memory_bound_s'] * 1e3:.0f} ms "
          f"at {result['stream_bytes_per_s'] / 1e9:.1f} GB/s); train step at {result['step_share_of_peak']:.0%} of "
          f"the {result['matmul_peak_flops_per_s'] / 1e9:.0f} GFLOP/s matmul peak")
    write_result(record, FLAGS.out, f"update_cost_{jax.default_backend()}_{FLAGS.model}.json")


if __name__ == "__main__":
    app.run(main)
