"""Seconds per training step: the loop's own compiled step (`loop.compiled_steps`) on one device.

    python -m benchmarks.step_time [--model=ddpm_cifar10] [--batch=8] [--steps=5] [--convolutions=xla]

Prints one JSON line: the median over 3 repeats of `steps` donated steps, after 2 warm-up steps.
Made to compare, on one machine, two versions of the training layer (run it in each checkout, in
turn, each in its own process, with `PYTHONPATH=<checkout>` so that each imports its own vdm_jax),
or XLA:CPU's two convolution paths for a model (`--convolutions=xla|ynnpack`, as
`vdm_jax.set_cpu_xla_flags(convolutions=...)` or $VDM_JAX_CPU_CONVOLUTIONS choose them).
"""
import json
import time

import numpy as np
from absl import app, flags

from benchmarks import measure

flags.DEFINE_enum("model", "ddpm_cifar10", list(measure.UNETS), "The U-Net: tiny8 is the quickstart's (8×8×1), "
                  "vdm32 VDM's no-downsampling layout at 32 channels (`measure.unet`).")
flags.DEFINE_enum("convolutions", "xla", ["xla", "ynnpack"], "XLA:CPU's convolution path.")
flags.DEFINE_integer("batch", 8, "Training batch.", lower_bound=1)
flags.DEFINE_integer("steps", 5, "Timed steps per repeat.", lower_bound=1)
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from vdm_jax import set_cpu_xla_flags

    model = measure.unet(FLAGS.model)
    set_cpu_xla_flags(convolutions=FLAGS.convolutions)
    import jax

    from vdm_jax.training import create_train_state, default_config, parallel, set_model, validate_config
    from vdm_jax.training.loop import compiled_steps

    config = default_config()
    set_model(config, model, dtype="float32")
    config.training.batch_size = FLAGS.batch
    mesh = parallel.make_mesh(jax.devices()[:1])
    state = parallel.replicate(create_train_state(config, validate_config(config), key=jax.random.key(0)), mesh)
    step, _ = compiled_steps(mesh)
    shape = (FLAGS.batch, model.image_size, model.image_size, model.in_channels)
    images = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
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
    import os

    print(json.dumps({"model": FLAGS.model, "batch": FLAGS.batch, "s_per_step": sorted(times)[1], "repeats": times,
                      "convolutions": FLAGS.convolutions, "xla_flags": os.environ.get("XLA_FLAGS", ""),
                      "device": jax.devices()[0].device_kind, "jax": jax.__version__}))


if __name__ == "__main__":
    app.run(main)
