"""The benchmark suite: training, sampling and evaluation speed on the current device(s).

    python -m benchmarks.run [--model=tiny32] [--batch=32] [--dtype=float32|bfloat16] [--torch] [--out=PATH]

Measures, for one model and batch, on every local device (data parallel, as training runs):

- train: compile time of the train step; steady-state steps/s and images/s after warm-up (the
  median of `--repeats` timed runs of `--train_steps` steps, one host sync at the end of each);
  model FLOPs per image counted by XLA's cost analysis of the compiled step; MFU = achieved
  FLOP/s ÷ the devices' peak (table below; "unknown" for other devices, e.g. CPUs);
- sample: one DDPM ancestral chain of `--sample_steps` steps for `--sample_batch` images, the whole
  chain one compiled `lax.scan` (compile time and wall time);
- eval: the bits/dim bound (one t per image) on `--eval_batch` images: images/s;
- peak device memory where the backend reports it (GPU/TPU `memory_stats`).

With `--torch`, the same train step and sampling chain with diffusers' `UNet2DModel` of the same
parameter count, batch and optimiser (`benchmarks/torch_reference.py`), in the same process, and
the ratios torch time / vdm_jax time. Prints a table and writes JSON (device, versions, config).
"""
import platform
import time

from absl import app, flags

from benchmarks.common import median_time, write_result

flags.DEFINE_enum("model", "tiny32", ["tiny8", "tiny32", "ddpm_cifar10"],
                  "tiny8: the quickstart U-Net (8×8×1); tiny32: the same on 32×32×3; ddpm_cifar10: 35.7M.")
flags.DEFINE_integer("batch", 32, "Global training batch.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Activation dtype (parameters stay float32).")
flags.DEFINE_boolean("remat", False, "Rematerialise the U-Net's blocks in the backward pass (model.remat).")
flags.DEFINE_integer("train_steps", 10, "Timed training steps per repeat.")
flags.DEFINE_integer("repeats", 3, "Timed repeats (the median is reported).")
flags.DEFINE_integer("sample_batch", 16, "Images per sampling chain.")
flags.DEFINE_integer("sample_steps", 1000, "Steps of the sampling chain (T).")
flags.DEFINE_integer("eval_batch", 64, "Images per evaluation batch.")
flags.DEFINE_boolean("torch", False, "Also run the PyTorch (diffusers) reference and report the ratios.")
flags.DEFINE_enum("xla_options", "vdm_jax", ["vdm_jax", "none"],
                  "vdm_jax: XLA:CPU flags as the entry points set them (vdm_jax.set_cpu_xla_flags()); "
                  "none: XLA's defaults.")
flags.DEFINE_float("peak_tflops", None, "Peak FLOP/s of one device in TFLOP/s, for devices the table lacks (a CPU: "
                   "cores × GHz × FLOPs per cycle per core, e.g. 2 × 2.45 × 32 / 1000 for 2 AVX2 cores with 2 FMA units).")
flags.DEFINE_string("out", None, "JSON output (default benchmarks/results/run_<backend>_<model>_<dtype>.json).")
FLAGS = flags.FLAGS

# Dense peak FLOP/s per device (bf16 matmul; float32 runs are measured against the same peak).
PEAK_FLOPS = {
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "V100": 125e12, "A10G": 125e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
    "TPU v6e": 918e12, "TPU v3": 123e12, "TPU v2": 45e12,
}


def _peak(device_kind: str):
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in device_kind.lower():
            return flops
    return None


def _model_config(name: str, dtype: str):
    from vdm_jax.models import ddpm_cifar10, tiny

    # embedding_dim = base_channels, as in diffusers (its time MLP is 4× the first width).
    config = {"tiny8": lambda: tiny(image_size=8, in_channels=1, embedding_dim=24),
              "tiny32": lambda: tiny(embedding_dim=24),
              "ddpm_cifar10": ddpm_cifar10}[name]()
    return config.replace(dtype=dtype, dropout=0.0, remat=FLAGS.remat)


def _timed_compile(jitted, *args):
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


def _flops(compiled) -> float | None:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older JAX: one dict per program
        analysis = analysis[0] if analysis else None
    return float(analysis["flops"]) if analysis and "flops" in analysis else None


def _temp_bytes(compiled) -> int | None:
    """XLA's buffer assignment: the temporary (activation) memory one device's program needs."""
    try:
        return int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None


def _peak_memory() -> int | None:
    import jax

    stats = [d.memory_stats() for d in jax.local_devices()]
    peaks = [s.get("peak_bytes_in_use") for s in stats if s]
    return max(peaks) if peaks and all(p is not None for p in peaks) else None


def bench_jax(model_config, batch: int) -> dict:
    import jax
    import numpy as np

    from vdm_jax.models import count_params
    from vdm_jax.training import create_train_state, default_config, parallel, steps, validate_config
    from vdm_jax.training.loop import compiled_steps

    c = default_config()
    c.model.update(model_config.to_dict())
    c.optim.warmup_steps = 0
    c.training.batch_size = batch
    model_config = validate_config(c)
    mesh = parallel.make_mesh()
    parallel.check_batch_size(batch, mesh, "--batch")
    rep = parallel.replicated(mesh)
    state = parallel.replicate(create_train_state(c, model_config, key=jax.random.key(0)), mesh)
    shape = (model_config.image_size, model_config.image_size, model_config.in_channels)
    images = np.random.default_rng(0).integers(0, 256, (batch, *shape), dtype=np.uint8)
    data = parallel.global_batch({"image": images}, mesh)
    key = jax.random.key(1)
    result = {"params": count_params(model_config), "devices": mesh.devices.size}

    # Train: the step as the loop compiles it (replicated state, sharded batch, state donated).
    train, _ = compiled_steps(mesh)
    compiled, result["train_compile_s"] = _timed_compile(train, state, data, key)
    # Model FLOPs (forward and backward: the MFU convention) from the compiled loss gradient alone.
    # The optimiser's elementwise update is not model work (and XLA's cost analysis of the whole step
    # counted the raveled update of vdm_jax 0.1 once per parameter array, ~90 GFLOP too many).
    flops = _flops(jax.jit(steps._grads, in_shardings=(rep, parallel.batch_sharding(mesh), rep))
                   .lower(state, data, key).compile())
    result["train_temp_bytes"] = _temp_bytes(compiled)
    for _ in range(2):  # warm-up
        state, metrics = compiled(state, data, key)
    jax.block_until_ready(metrics)

    def run_steps():
        nonlocal state
        for _ in range(FLAGS.train_steps):
            state, out = compiled(state, data, key)
        jax.block_until_ready(out)

    step_s = median_time(run_steps, FLAGS.repeats) / FLAGS.train_steps
    result.update(train_step_s=step_s, train_steps_per_s=1 / step_s, train_images_per_s=batch / step_s)
    if flops is not None:
        # cost_analysis counts one device's program: the whole batch's FLOPs are that × devices.
        total = flops * mesh.devices.size
        result["train_flops_per_image"] = total / batch
        result["train_flops_per_s"] = total / step_s
        peak = FLAGS.peak_tflops * 1e12 if FLAGS.peak_tflops else _peak(jax.devices()[0].device_kind)
        result["peak_flops_per_device"] = peak
        result["mfu"] = total / step_s / (peak * mesh.devices.size) if peak else "unknown (no peak for this device)"

    # Sample: one ancestral chain, the whole chain one compiled scan.
    n = FLAGS.sample_batch
    sample = jax.jit(lambda s, k: steps.sample_step(s, key=k, num=n, sampler="ancestral", sample_steps=0),
                        in_shardings=(rep, rep), out_shardings=rep)
    compiled_sample, result["sample_compile_s"] = _timed_compile(sample, state, key)
    result["sample_chain_s"] = median_time(lambda: jax.block_until_ready(compiled_sample(state, key)),
                                            max(1, FLAGS.repeats - 1))
    result["sample_ms_per_step"] = 1e3 * result["sample_chain_s"] / FLAGS.sample_steps

    # Evaluate: the one-t bound per image.
    eval_images = np.resize(images, (FLAGS.eval_batch, *shape))
    eval_data = parallel.global_batch({"image": eval_images}, mesh)
    evaluate = jax.jit(lambda s, b, k: steps.eval_step(s, b, key=k),
                       in_shardings=(rep, parallel.batch_sharding(mesh), rep), out_shardings=rep)
    compiled_eval, result["eval_compile_s"] = _timed_compile(evaluate, state, eval_data, key)
    jax.block_until_ready(compiled_eval(state, eval_data, key))
    eval_s = median_time(lambda: jax.block_until_ready(compiled_eval(state, eval_data, key)), FLAGS.repeats)
    result["eval_images_per_s"] = FLAGS.eval_batch / eval_s
    result["peak_memory_bytes"] = _peak_memory()
    return result


def main(argv):
    del argv
    import jax

    from vdm_jax import set_cpu_xla_flags

    if FLAGS.xla_options == "vdm_jax":
        set_cpu_xla_flags()  # before the first computation
    model_config = _model_config(FLAGS.model, FLAGS.dtype)
    timesteps = 1000
    if FLAGS.sample_steps != timesteps:
        raise app.UsageError("--sample_steps must be 1000 (the DDPM chain of the training config).")
    device = jax.devices()[0]
    record = {
        "benchmark": "run", "model": FLAGS.model, "dtype": FLAGS.dtype, "batch": FLAGS.batch,
        "sample_batch": FLAGS.sample_batch, "sample_steps": FLAGS.sample_steps, "eval_batch": FLAGS.eval_batch,
        "train_steps": FLAGS.train_steps, "repeats": FLAGS.repeats, "model_config": model_config.to_dict(),
        "xla_options": FLAGS.xla_options, "remat": FLAGS.remat,
        "device": f"{jax.device_count()} × {device.device_kind} ({jax.default_backend()})",
        "versions": {"python": platform.python_version(), "jax": jax.__version__},
    }
    record["vdm_jax"] = bench_jax(model_config, FLAGS.batch)
    if FLAGS.torch:
        from benchmarks import torch_reference

        record["torch"] = torch_reference.bench(model_config, FLAGS.batch, FLAGS.sample_batch, FLAGS.sample_steps,
                                                FLAGS.train_steps, FLAGS.repeats)
        record["versions"].update(torch_reference.versions())
        ours, theirs = record["vdm_jax"], record["torch"]
        record["torch_over_vdm_jax"] = {"train_step": theirs["train_step_s"] / ours["train_step_s"],
                                        "sample_chain": theirs["sample_chain_s"] / ours["sample_chain_s"]}
    _print(record)
    suffix = "_remat" if FLAGS.remat else ""
    write_result(record, FLAGS.out, f"run_{jax.default_backend()}_{FLAGS.model}_{FLAGS.dtype}{suffix}.json")


def _print(record: dict) -> None:
    ours = record["vdm_jax"]
    print(f"{record['model']} ({ours['params']:,} params, {record['dtype']}) on {record['device']}, "
          f"batch {record['batch']}")
    rows = [("train step", "train_step_s", "s"), ("train images/s", "train_images_per_s", ""),
            ("train compile", "train_compile_s", "s"),
            (f"sample {record['sample_batch']}×{record['sample_steps']}", "sample_chain_s", "s"),
            ("sample compile", "sample_compile_s", "s"), ("eval images/s", "eval_images_per_s", "")]
    theirs = record.get("torch", {})
    print(f"{'':24}{'vdm_jax':>14}" + (f"{'torch':>14}" if theirs else ""))
    for label, key, unit in rows:
        line = f"{label:24}{ours[key]:>13.4g}{unit or ' '}"
        if theirs.get(key) is not None:
            line += f"{theirs[key]:>13.4g}{unit or ' '}"
        print(line)
    if "train_flops_per_image" in ours:
        mfu = ours["mfu"]
        print(f"train: {ours['train_flops_per_image'] / 1e9:.3g} GFLOP per image, "
              f"{ours['train_flops_per_s'] / 1e12:.3g} TFLOP/s, MFU " + (f"{mfu:.1%}" if isinstance(mfu, float) else mfu))
    if ours.get("train_temp_bytes"):
        print(f"train step temporary memory (XLA buffer assignment, per device): "
              f"{ours['train_temp_bytes'] / 2**30:.2f} GiB")
    if ours.get("peak_memory_bytes"):
        print(f"peak device memory: {ours['peak_memory_bytes'] / 2**30:.2f} GiB")
    if "torch_over_vdm_jax" in record:
        r = record["torch_over_vdm_jax"]
        print(f"torch time / vdm_jax time: train step {r['train_step']:.2f}×, sampling chain {r['sample_chain']:.2f}×")


if __name__ == "__main__":
    app.run(main)
