"""Train-step memory with and without rematerialisation, from XLA's buffer assignment (compile only).

    python -m benchmarks.memory [--model=ddpm_cifar10] [--batches=32,128] [--dtypes=float32,bfloat16]

For each batch size, activation dtype and `model.remat` setting, compiles the train step exactly
as training does (one device, state donated) from abstract shapes — nothing is allocated or run —
and reports what XLA's buffer assignment needs on the device: the temporary (activation) bytes,
the argument bytes (state and batch), and the model FLOPs (of the loss gradient;
rematerialisation adds a forward pass of each block). These are the figures that decide whether a batch fits on an accelerator;
the compiler's plan is the same whatever the device that runs it, up to its layouts and fusion.
Writes benchmarks/results/memory_<backend>_<model>.json (or `--out`).
"""
import platform
import time

from absl import app, flags

from benchmarks.common import write_result

flags.DEFINE_enum("model", "ddpm_cifar10", ["tiny32", "ddpm_cifar10", "vdm_cifar10"], "The U-Net.")
flags.DEFINE_list("batches", ["32", "128"], "Global batch sizes (one device).")
flags.DEFINE_list("dtypes", ["float32"], "Activation dtypes.")
flags.DEFINE_string("out", None, "JSON output path.")
FLAGS = flags.FLAGS


def _config(model: str, dtype: str, remat: bool, batch: int):
    from vdm_jax.models import ddpm_cifar10, tiny, vdm_cifar10
    from vdm_jax.training import default_config, set_model

    c = default_config()
    set_model(c, {"tiny32": tiny, "ddpm_cifar10": ddpm_cifar10, "vdm_cifar10": vdm_cifar10}[model]().replace(
        remat=remat), dtype=dtype)
    if model == "vdm_cifar10":
        c.diffusion.family, c.diffusion.timesteps, c.diffusion.schedule = "vdm", 0, "learned"
    c.training.batch_size = batch
    return c


def measure(model: str, dtype: str, remat: bool, batch: int) -> dict:
    import jax
    import numpy as np

    from vdm_jax.training import create_train_state, steps, validate_config

    config = _config(model, dtype, remat, batch)
    model_config = validate_config(config)
    state = jax.eval_shape(lambda k: create_train_state(config, model_config, key=k), jax.random.key(0))
    shape = (batch, model_config.image_size, model_config.image_size, model_config.in_channels)
    batch_spec = {"image": jax.ShapeDtypeStruct(shape, np.uint8)}
    step = jax.jit(steps.train_step, donate_argnums=0)
    start = time.perf_counter()
    compiled = step.lower(state, batch_spec, key=jax.random.key(1)).compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    # FLOPs of the loss gradient alone (the MFU convention; the optimiser's update is not model work).
    analysis = jax.jit(steps._grads).lower(state, batch_spec, jax.random.key(1)).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return {"model": model, "dtype": dtype, "remat": remat, "batch": batch, "compile_s": seconds,
            "temp_bytes": int(memory.temp_size_in_bytes), "argument_bytes": int(memory.argument_size_in_bytes),
            "flops": float(analysis["flops"]) if analysis and "flops" in analysis else None}


def main(argv):
    del argv
    from vdm_jax import set_cpu_xla_flags

    set_cpu_xla_flags()  # as the entry points do, before the first computation
    import jax

    rows = []
    for batch in map(int, FLAGS.batches):
        for dtype in FLAGS.dtypes:
            for remat in (False, True):
                row = measure(FLAGS.model, dtype, remat, batch)
                rows.append(row)
                print(f"{FLAGS.model} batch {batch:4d} {dtype:9} remat={str(remat):5}  temporary "
                      f"{row['temp_bytes'] / 2**30:7.2f} GiB  arguments {row['argument_bytes'] / 2**30:5.2f} GiB  "
                      f"{(row['flops'] or 0) / batch / 1e9:6.1f} GFLOP/image  (compiled in {row['compile_s']:.0f} s)",
                      flush=True)
    record = {"benchmark": "memory", "model": FLAGS.model, "rows": rows,
              "device": f"{jax.devices()[0].device_kind} ({jax.default_backend()})",
              "versions": {"python": platform.python_version(), "jax": jax.__version__}}
    write_result(record, FLAGS.out, f"memory_{jax.default_backend()}_{FLAGS.model}.json")


if __name__ == "__main__":
    app.run(main)
