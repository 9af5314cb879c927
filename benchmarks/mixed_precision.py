"""Mixed precision against float32: the same short run twice, its loss curve and test bits/dim.

    python -m benchmarks.mixed_precision [--steps=600] [--out=PATH]

Trains the quickstart model (the tiny U-Net on the 8×8 digits, DDPM, L_simple) twice from the
same seed on the same batches: once with float32 activations, once with bfloat16 activations
(`model.dtype`; parameters, loss, gradients and optimiser state stay float32 in both). Then
evaluates each run's bound on the 297 test digits, with `--draws` draws of (t, ε) per image, in
its own dtype and in float32. Prints the loss curves side by side and writes them with the bits/dim
to JSON (default benchmarks/results/mixed_precision_<backend>.json).

On a CPU the bfloat16 run is slower (XLA:CPU computes bfloat16 convolutions by converting to
float32); this measures agreement, not speed. On GPU/TPU `model.dtype='auto'` is bfloat16.
"""
import json
import os
import platform
import tempfile

from absl import app, flags, logging

from benchmarks.common import write_result

flags.DEFINE_integer("steps", 600, "Training steps of each run.")
flags.DEFINE_integer("log_every", 50, "Steps between logged losses (each the loss of one batch).")
flags.DEFINE_integer("draws", 4, "Draws of (t, ε) per test image in the final bound.")
flags.DEFINE_string("out", None, "JSON output path.")
FLAGS = flags.FLAGS

DTYPES = ("float32", "bfloat16")


def _config(dtype: str):
    from experiments.configs.quickstart import get_config

    c = get_config(FLAGS.steps)
    c.model.dtype = dtype
    c.training.log_every = FLAGS.log_every
    c.training.checkpoint_every = FLAGS.steps
    c.training.progress_bar = False
    return c


def _losses(workdir: str) -> dict[int, float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _bpd(workdir: str, dtype: str) -> dict:
    import jax

    from vdm_jax.data import load_source
    from vdm_jax.training import evaluate_bpd, load_checkpoint, make_mesh

    mesh = make_mesh()
    config, state = load_checkpoint(workdir, mesh=mesh, dtype=dtype)
    source = load_source(config.data.source, config.data.eval_split)
    result = evaluate_bpd(state, source, mesh=mesh, batch_size=config.training.eval_batch_size,
                          key=jax.random.key(1), draws=FLAGS.draws)
    return result["bpd"]["total"]


def main(argv):
    del argv
    from vdm_jax import set_cpu_xla_flags

    set_cpu_xla_flags()  # as the entry points do, before the first computation
    logging.set_verbosity(logging.WARNING)
    import jax
    import numpy as np

    from vdm_jax.training import train_and_evaluate

    record = {"benchmark": "mixed_precision", "steps": FLAGS.steps, "draws": FLAGS.draws,
              "device": f"{jax.device_count()} × {jax.devices()[0].device_kind} ({jax.default_backend()})",
              "versions": {"python": platform.python_version(), "jax": jax.__version__}, "runs": {}}
    with tempfile.TemporaryDirectory() as root:
        for dtype in DTYPES:
            workdir = os.path.join(root, dtype)
            summary = train_and_evaluate(_config(dtype), workdir)
            record["runs"][dtype] = {
                "losses": _losses(workdir), "steps_per_sec": summary["train"]["steps_per_sec"],
                "bpd_own_dtype": _bpd(workdir, dtype), "bpd_float32": _bpd(workdir, "float32")}
    runs = record["runs"]
    steps = sorted(runs["float32"]["losses"])
    l32 = np.array([runs["float32"]["losses"][s] for s in steps])
    l16 = np.array([runs["bfloat16"]["losses"][s] for s in steps])
    half = len(steps) // 2  # the second half of the run, past the fast initial fall
    record["comparison"] = {
        "mean_loss_second_half": {"float32": float(l32[half:].mean()), "bfloat16": float(l16[half:].mean())},
        "max_relative_loss_difference_second_half": float(np.max(np.abs(l16[half:] - l32[half:]) / l32[half:])),
        "bpd_difference": runs["bfloat16"]["bpd_float32"]["mean"] - runs["float32"]["bpd_float32"]["mean"],
    }
    print(f"{'step':>6}{'float32':>12}{'bfloat16':>12}")
    for s, a, b in zip(steps, l32, l16):
        print(f"{s:>6}{a:>12.5f}{b:>12.5f}")
    for dtype in DTYPES:
        r = runs[dtype]
        print(f"{dtype} run: test bound {r['bpd_own_dtype']['mean']:.4f} ± {r['bpd_own_dtype']['se']:.4f} bits/dim "
              f"evaluated in {dtype}, {r['bpd_float32']['mean']:.4f} ± {r['bpd_float32']['se']:.4f} in float32; "
              f"{r['steps_per_sec']:.2f} steps/s")
    write_result(record, FLAGS.out, f"mixed_precision_{jax.default_backend()}.json")


if __name__ == "__main__":
    app.run(main)
