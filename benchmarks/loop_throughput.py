"""The training loop's own overhead: device prefetching and several steps per compiled call.

    python -m benchmarks.loop_throughput [--steps=300] [--batch=64] [--source=digits]

Runs the real loop (`train_and_evaluate`) on the quickstart model with
each combination of `data.prefetch` (0: read and copy the batch between dispatches; 2: a
background thread prepares two calls ahead) and `training.steps_per_call` (1, 4), and reports the
steady-state steps/s the loop logs (the first logging interval, which includes compilation, is
left out; so is the evaluation and sampling at the end). The quickstart model's step is short (tens of milliseconds on a CPU), so the host's
share of each step — what these two options remove — is as large as it gets on this machine.
Writes benchmarks/results/loop_throughput_<backend>.json (or `--out`).
"""
import itertools
import json
import os
import platform
import statistics
import tempfile

from absl import app, flags, logging

from benchmarks.common import write_result

flags.DEFINE_integer("steps", 300, "Training steps per variant.")
flags.DEFINE_integer("batch", 64, "Global batch size.")
flags.DEFINE_string("source", "digits", "Data spec (vdm_jax.data.load_source); 32×32×3 sources train the small "
                    "CIFAR-10 U-Net, e.g. images:$VDM_JAX_DATA_DIR/cifar10_jpeg.zip (evaluated on its whole test split).")
flags.DEFINE_integer("log_every", 50, "Steps between logged steps/s.")
flags.DEFINE_string("out", None, "JSON output path.")
FLAGS = flags.FLAGS


def _config(prefetch: int, steps_per_call: int):
    from experiments.configs.quickstart import get_config
    from vdm_jax.models import tiny
    from vdm_jax.training import set_model

    c = get_config(FLAGS.steps)
    c.data.source = FLAGS.source
    if FLAGS.source != "digits":  # 32×32×3 images: the small CIFAR-10 network
        set_model(c, tiny(dropout=0.0))
        c.data.random_flip = True
    c.data.prefetch = prefetch
    c.training.steps_per_call = steps_per_call
    c.training.batch_size = FLAGS.batch
    c.training.log_every = FLAGS.log_every
    c.training.checkpoint_every = 10 * FLAGS.steps
    c.training.progress_bar = False
    return c


def _steady_steps_per_sec(workdir: str) -> float:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rates = [json.loads(line)["steps_per_sec"] for line in f if "steps_per_sec" in line]
    return statistics.median(rates[1:])  # the first interval includes compilation


def main(argv):
    del argv
    from vdm_jax import set_cpu_xla_flags

    set_cpu_xla_flags()  # as the entry points do, before the first computation
    logging.set_verbosity(logging.WARNING)
    import jax

    from vdm_jax.training import train_and_evaluate

    rows = []
    with tempfile.TemporaryDirectory() as root:
        for prefetch, per_call in itertools.product((0, 2), (1, 4)):
            workdir = os.path.join(root, f"p{prefetch}_k{per_call}")
            train_and_evaluate(_config(prefetch, per_call), workdir)
            rate = _steady_steps_per_sec(workdir)
            rows.append({"prefetch": prefetch, "steps_per_call": per_call, "steps_per_sec": rate})
            print(f"prefetch={prefetch} steps_per_call={per_call}: {rate:.2f} steps/s", flush=True)
    base = rows[0]["steps_per_sec"]
    for row in rows:
        row["speedup"] = row["steps_per_sec"] / base
    record = {"benchmark": "loop_throughput", "steps": FLAGS.steps, "batch": FLAGS.batch, "source": FLAGS.source,
              "device": f"{jax.device_count()} × {jax.devices()[0].device_kind} ({jax.default_backend()})",
              "versions": {"python": platform.python_version(), "jax": jax.__version__}, "rows": rows}
    write_result(record, FLAGS.out, f"loop_throughput_{jax.default_backend()}.json")


if __name__ == "__main__":
    app.run(main)
