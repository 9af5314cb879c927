"""Time to evaluate bits/dim on the 10,000 CIFAR-10 test images and to sample 10,000 images.

    python -m benchmarks.eval_at_scale [--model=small|ddpm] [--source=images:$VDM_JAX_DATA_DIR/cifar10_jpeg.zip]
                                       [--bpd_images=10000] [--sample_batches=1]

Uses the library's own evaluation (`evaluate_bpd`: every image once, sharded over all devices,
one t per image) and sampler (`generate_samples`: fixed-size batches, the whole chain one compiled
`lax.scan`) on a freshly initialised model of the CIFAR-10 config `--model` (speed does not depend
on the weights). bits/dim runs on the first `--bpd_images` test images (all 10,000 by default);
sampling runs `--sample_batches` batches of `--sample_batch` and the time for `--num_samples` is
that per batch × the number of batches needed — said so in the output, which gives both the
measured and the projected figures, and the projection for a 1000-step chain (every step of either
sampler is one network call). Compilation is timed separately (the first call).
Writes benchmarks/results/eval_at_scale_<backend>_<model>.json (or `--out`).
"""
import math
import os
import platform
import time

from absl import app, flags, logging

from benchmarks.common import write_result

flags.DEFINE_enum("model", "small", ["small", "ddpm", "vdm"], "experiments/configs/cifar10.py variant.")
_DATA_DIR = os.environ.get("VDM_JAX_DATA_DIR")  # a folder holding cifar10_jpeg.zip
flags.DEFINE_string("source", f"images:{os.path.join(_DATA_DIR, 'cifar10_jpeg.zip')}" if _DATA_DIR else None,
                    "Data spec of CIFAR-10 (its 'test' split); default images:$VDM_JAX_DATA_DIR/cifar10_jpeg.zip.")
flags.DEFINE_integer("bpd_images", 10_000, "Test images to evaluate (the first N).")
flags.DEFINE_integer("batch_size", 200, "Evaluation batch.")
flags.DEFINE_integer("num_samples", 10_000, "Samples the projection is for.")
flags.DEFINE_integer("sample_batch", 256, "Images per sampling call.")
flags.DEFINE_integer("sample_batches", 1, "Sampling calls actually run (after one to compile).")
flags.DEFINE_enum("sampler", "ancestral", ["ancestral", "ddim", "dpm_solver", "heun", "euler"], "Sampler.")
flags.DEFINE_integer("sample_steps", 0, "Reverse steps (0: T = 1000).")
flags.DEFINE_string("out", None, "JSON output path.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    if FLAGS.source is None:
        raise SystemExit("error: no CIFAR-10 data; set VDM_JAX_DATA_DIR (a folder holding cifar10_jpeg.zip) "
                         "or pass --source=SPEC.")
    from vdm_jax import set_cpu_xla_flags

    set_cpu_xla_flags()  # as the entry points do, before the first computation
    logging.set_verbosity(logging.WARNING)
    import jax

    from experiments.configs.cifar10 import get_config
    from vdm_jax.data import FirstExamples, load_source
    from vdm_jax.models import count_params
    from vdm_jax.training import (create_train_state, evaluate_bpd, generate_samples, make_mesh, parallel,
                                  validate_config)

    config = get_config(FLAGS.model)
    model_config = validate_config(config)
    mesh = make_mesh()
    state = parallel.replicate(create_train_state(config, model_config, key=jax.random.key(0)), mesh)
    source = FirstExamples(load_source(FLAGS.source, "test"), FLAGS.bpd_images)
    record = {"benchmark": "eval_at_scale", "model": FLAGS.model, "params": count_params(model_config),
              "source": FLAGS.source,
              "dtype": model_config.dtype,
              "device": f"{jax.device_count()} × {jax.devices()[0].device_kind} ({jax.default_backend()})",
              "versions": {"python": platform.python_version(), "jax": jax.__version__}}

    key = jax.random.key(1)
    start = time.perf_counter()  # one batch: compile + run
    evaluate_bpd(state, FirstExamples(source, FLAGS.batch_size), mesh=mesh, batch_size=FLAGS.batch_size, key=key)
    first = time.perf_counter() - start
    start = time.perf_counter()
    result = evaluate_bpd(state, source, mesh=mesh, batch_size=FLAGS.batch_size, key=key, progress=True)
    seconds = time.perf_counter() - start
    record["bpd"] = {"images": len(source), "seconds": seconds, "images_per_s": len(source) / seconds,
                     "first_batch_with_compile_s": first, "total_bpd_of_untrained_model": result["bpd"]["total"]}
    print(f"bits/dim on {len(source)} test images: {seconds:.1f} s ({len(source) / seconds:.1f} images/s); "
          f"10,000 images: {10_000 / (len(source) / seconds) / 60:.1f} min")

    def sample(b):
        return generate_samples(state, mesh=mesh, num=FLAGS.sample_batch, batch_size=FLAGS.sample_batch,
                                key=jax.random.fold_in(key, b), sampler=FLAGS.sampler,
                                sample_steps=FLAGS.sample_steps)

    start = time.perf_counter()
    sample(0)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for b in range(FLAGS.sample_batches):
        sample(b + 1)
    per_batch = (time.perf_counter() - start) / FLAGS.sample_batches
    batches = math.ceil(FLAGS.num_samples / FLAGS.sample_batch)
    steps = FLAGS.sample_steps or 1000
    calls = 2 * steps - 1 if FLAGS.sampler == "heun" else steps  # (the DDPM models: Heun's last step is Euler's)
    record["samples"] = {"sampler": FLAGS.sampler, "steps": steps, "network_calls": calls, "batch": FLAGS.sample_batch,
                         "batches_run": FLAGS.sample_batches, "seconds_per_batch": per_batch,
                         "first_batch_with_compile_s": first, "projected_num": FLAGS.num_samples,
                         "projected_seconds": per_batch * batches,
                         # Every network call is one forward pass on the batch.
                         "projected_seconds_1000_steps": per_batch * batches * 1000 / calls}
    print(f"sampling ({FLAGS.sampler}, {steps} steps): {per_batch:.1f} s per batch of {FLAGS.sample_batch} "
          f"(measured over {FLAGS.sample_batches}); {FLAGS.num_samples:,} images = {batches} batches: "
          f"{per_batch * batches / 3600:.2f} h projected; with 1000 steps (a DDPM ancestral chain): "
          f"{per_batch * batches * 1000 / calls / 3600:.1f} h")
    write_result(record, FLAGS.out, f"eval_at_scale_{jax.default_backend()}_{FLAGS.model}.json")


if __name__ == "__main__":
    app.run(main)
