"""The `small` CIFAR-10 config on a CPU for a fixed wall-clock budget: does the loss fall and the
test bits/dim improve? (Issue 3, acceptance 4; a benchmark, not a test.)

    python -m benchmarks.cifar10_small_cpu --data=$VDM_JAX_DATA_DIR/cifar10_jpeg.zip --minutes=30 \\
        --out=benchmarks/results/cifar10_small_cpu.json

Trains `experiments/configs/cifar10.py:small` on the JPEG copy of CIFAR-10 (lossy: its bpd is not
comparable with published figures), evaluates the whole 10,000-image test split with the EMA
parameters at the start and every `--eval_every` steps, and stops at the budget (SIGTERM to
itself, which the training loop turns into a last checkpoint). Writes the curve as JSON and PNG.
"""
import json
import os
import platform
import signal
import threading
import time

from absl import app, flags, logging

_DATA_DIR = os.environ.get("VDM_JAX_DATA_DIR")  # a folder holding cifar10_jpeg.zip
flags.DEFINE_string("data", os.path.join(_DATA_DIR, "cifar10_jpeg.zip") if _DATA_DIR else None,
                    "Folder or zip of <split>/<class>/*.jpg; default $VDM_JAX_DATA_DIR/cifar10_jpeg.zip.")
flags.DEFINE_float("minutes", 30.0, "Wall-clock budget for training (evaluations included).")
flags.DEFINE_integer("eval_every", 400, "Steps between full test-set evaluations.")
flags.DEFINE_string("workdir", "/tmp/vdm_jax_bench_small", "Work directory (emptied first).")
flags.DEFINE_string("out", "benchmarks/results/cifar10_small_cpu.json", "Where the curve goes (.json and .png).")


def main(argv):
    del argv
    from vdm_jax import set_cpu_xla_flags

    set_cpu_xla_flags()  # as the entry points do, before the first computation
    import shutil

    import jax
    from experiments.configs.cifar10 import get_config
    from vdm_jax.training import train_and_evaluate

    logging.set_verbosity(logging.WARNING)
    FLAGS = flags.FLAGS
    if FLAGS.data is None:
        raise SystemExit("error: no CIFAR-10 data; set VDM_JAX_DATA_DIR (a folder holding cifar10_jpeg.zip) "
                         "or pass --data=PATH.")
    if not os.path.exists(FLAGS.data):
        raise SystemExit(f"error: no data at {FLAGS.data}; pass --data=PATH (a folder or zip of images).")
    shutil.rmtree(FLAGS.workdir, ignore_errors=True)
    config = get_config("small")
    config.data.source = f"images:{os.path.abspath(FLAGS.data)}"
    config.training.num_steps = 1_000_000
    config.training.eval_every = FLAGS.eval_every
    config.training.eval_at_start = True
    config.training.sample_every = 0
    config.training.checkpoint_every = 1000
    config.training.progress_bar = False

    start = time.time()
    timer = threading.Timer(FLAGS.minutes * 60, lambda: os.kill(os.getpid(), signal.SIGTERM))
    timer.start()
    summary = train_and_evaluate(config, FLAGS.workdir)
    timer.cancel()
    with open(os.path.join(FLAGS.workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval/total_bpd"]) for r in rows if "eval/total_bpd" in r]
    speed = [r["steps_per_sec"] for r in rows if "steps_per_sec" in r]
    result = {
        "command": "python -m benchmarks.cifar10_small_cpu " + " ".join(
            f"--{k}={getattr(FLAGS, k)}" for k in ("data", "minutes", "eval_every")),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {jax.devices()[0].platform}",
        "versions": {"jax": jax.__version__, "python": platform.python_version()},
        "wall_minutes": (time.time() - start) / 60, "steps": summary["step"],
        "median_steps_per_sec": sorted(speed)[len(speed) // 2] if speed else None,
        "train_loss": train, "test_bpd": evals,
        "note": "JPEG copy of CIFAR-10: bpd not comparable with published figures; full 10k test split, EMA params.",
    }
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, "w") as f:
        json.dump(result, f, indent=1)
    _plot(result, os.path.splitext(FLAGS.out)[0] + ".png")
    print(json.dumps({k: result[k] for k in ("steps", "wall_minutes", "median_steps_per_sec", "test_bpd")}))


def _plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    steps, loss = zip(*result["train_loss"])
    a.plot(steps, loss)
    a.set(xlabel="step", ylabel="L_simple per dimension", title="training loss", yscale="log")
    steps, bpd = zip(*result["test_bpd"])
    b.plot(steps, bpd, marker="o")
    b.set(xlabel="step", ylabel="bits/dim (VLB, EMA)", title="test bpd (10k JPEG test images)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    app.run(main)
