"""Seconds per training step: the loop's own compiled step (`loop.compiled_steps`) on one device.

    python -m benchmarks.step_time [--model=ddpm_cifar10] [--batch=8] [--steps=5]

Prints one JSON line: the median over 3 repeats of `steps` donated steps, after 2 warm-up steps.
Made to compare two versions of the training layer on one machine: run it in each checkout, in
turn, each in its own process (`PYTHONPATH=<checkout>` so that each imports its own vdm_jax).
"""
import json
import time

import numpy as np
from absl import app, flags

flags.DEFINE_enum("model", "ddpm_cifar10", ["tiny32", "ddpm_cifar10", "vdm_cifar10"], "The U-Net.")
flags.DEFINE_integer("batch", 8, "Training batch.", lower_bound=1)
flags.DEFINE_integer("steps", 5, "Timed steps per repeat.", lower_bound=1)
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from vdm_jax import set_cpu_xla_flags

    set_cpu_xla_flags()
    import jax

    from vdm_jax import models
    from vdm_jax.training import create_train_state, default_config, parallel, set_model, validate_config
    from vdm_jax.training.loop import compiled_steps

    config = default_config()
    set_model(config, {"tiny32": models.tiny, "ddpm_cifar10": models.ddpm_cifar10,
                       "vdm_cifar10": models.vdm_cifar10}[FLAGS.model](), dtype="float32")
    config.training.batch_size = FLAGS.batch
    mesh = parallel.make_mesh(jax.devices()[:1])
    state = parallel.replicate(create_train_state(config, validate_config(config), key=jax.random.key(0)), mesh)
    step, _ = compiled_steps(mesh)
    images = np.random.default_rng(0).integers(0, 256, (FLAGS.batch, 32, 32, 3), dtype=np.uint8)
    batch, key = parallel.global_batch({"image": images}, mesh), jax.random.key(1)
    for _ in range(2):
        state, metrics = step(state, batch, key)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(FLAGS.steps):
            state, metrics = step(state, batch, key)
        jax.block_until_ready(metrics)
        times.append((time.perf_counter() - start) / FLAGS.steps)
    print(json.dumps({"model": FLAGS.model, "batch": FLAGS.batch, "s_per_step": sorted(times)[1], "repeats": times,
                      "device": jax.devices()[0].device_kind, "jax": jax.__version__}))


if __name__ == "__main__":
    app.run(main)
