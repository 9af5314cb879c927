"""The real training loop (`train_and_evaluate`) on the quickstart model: its own overhead
(`loop_throughput`), and bfloat16 against float32 (`mixed_precision`)."""
import itertools
import json
import os
import statistics
import tempfile

from benchmarks.common import command, flag, out_flag, write_result


def _config(steps: int, log_every: int, **changes):
    from experiments.configs.quickstart import get_config

    c = get_config(steps)
    c.training.log_every = log_every
    c.training.checkpoint_every = 10 * steps
    c.training.progress_bar = False
    for name, value in changes.items():
        section, field = name.split("__")
        c[section][field] = value
    return c


def _metrics(workdir: str, field: str) -> dict[int, float]:
    """{step: value} of one field of the loop's metrics.jsonl."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r[field] for r in map(json.loads, f) if field in r}


@command(flag("--steps", type=int, default=300, help="Training steps per variant."),
         flag("--batch", type=int, default=64, help="Global batch size."),
         flag("--source", default="digits", help="Data spec (vdm_jax.data.load_source); 32×32×3 sources train the "
              "small CIFAR-10 U-Net, e.g. images:$VDM_JAX_DATA_DIR/cifar10_jpeg.zip."),
         flag("--log_every", type=int, default=50, help="Steps between logged steps/s."),
         out_flag("loop_throughput_<backend>.json"))
def loop_throughput(args):
    """The training loop's own overhead: device prefetching and several steps per compiled call.

The quickstart model with `data.prefetch` 0 or 2 and `training.steps_per_call` 1 or 4: the
steady-state steps/s the loop logs (the first interval, with compilation, left out).
"""
    import jax

    from vdm_jax.models import tiny
    from vdm_jax.training import set_model, train_and_evaluate

    rows = []
    with tempfile.TemporaryDirectory() as root:
        for prefetch, per_call in itertools.product((0, 2), (1, 4)):
            c = _config(args.steps, args.log_every, data__source=args.source, data__prefetch=prefetch,
                        training__steps_per_call=per_call, training__batch_size=args.batch)
            if args.source != "digits":  # 32×32×3 images: the small CIFAR-10 network
                set_model(c, tiny(dropout=0.0))
                c.data.random_flip = True
            workdir = os.path.join(root, f"p{prefetch}_k{per_call}")
            train_and_evaluate(c, workdir)
            rate = statistics.median(list(_metrics(workdir, "steps_per_sec").values())[1:])  # past compilation
            rows.append({"prefetch": prefetch, "steps_per_call": per_call, "steps_per_sec": rate})
            print(f"prefetch={prefetch} steps_per_call={per_call}: {rate:.2f} steps/s", flush=True)
    for row in rows:
        row["speedup"] = row["steps_per_sec"] / rows[0]["steps_per_sec"]
    write_result({"benchmark": "loop_throughput", "steps": args.steps, "batch": args.batch, "source": args.source,
                  "rows": rows}, args.out, f"loop_throughput_{jax.default_backend()}.json")


DTYPES = ("float32", "bfloat16")


@command(flag("--steps", type=int, default=600, help="Training steps of each run."),
         flag("--log_every", type=int, default=50, help="Steps between logged losses (each the loss of one batch)."),
         flag("--draws", type=int, default=4, help="Draws of (t, ε) per test image in the final bound."),
         out_flag("mixed_precision_<backend>.json"))
def mixed_precision(args):
    """Mixed precision against float32: the same short run twice, its loss curve and test bits/dim.

The quickstart model twice from the same seed, float32 and bfloat16 activations (`model.dtype`),
each run's bound on the test digits evaluated in its own dtype and in float32 (agreement, not speed).
"""
    import jax
    import numpy as np

    from vdm_jax.data import load_source
    from vdm_jax.training import evaluate_bpd, load_checkpoint, make_mesh, train_and_evaluate

    def bpd(workdir, dtype):
        mesh = make_mesh()
        config, state = load_checkpoint(workdir, mesh=mesh, dtype=dtype)
        source = load_source(config.data.source, config.data.eval_split)
        return evaluate_bpd(state, source, mesh=mesh, batch_size=config.training.eval_batch_size,
                            key=jax.random.key(1), draws=args.draws)["bpd"]["total"]

    runs = {}
    with tempfile.TemporaryDirectory() as root:
        for dtype in DTYPES:
            workdir = os.path.join(root, dtype)
            summary = train_and_evaluate(_config(args.steps, args.log_every, model__dtype=dtype,
                                                 training__checkpoint_every=args.steps), workdir)
            runs[dtype] = {"losses": _metrics(workdir, "loss"), "steps_per_sec": summary["train"]["steps_per_sec"],
                           "bpd_own_dtype": bpd(workdir, dtype), "bpd_float32": bpd(workdir, "float32")}
    steps = sorted(runs["float32"]["losses"])
    l32, l16 = (np.array([runs[d]["losses"][s] for s in steps]) for d in DTYPES)
    half = len(steps) // 2  # the second half of the run, past the fast initial fall
    comparison = {
        "mean_loss_second_half": {"float32": float(l32[half:].mean()), "bfloat16": float(l16[half:].mean())},
        "max_relative_loss_difference_second_half": float(np.max(np.abs(l16[half:] - l32[half:]) / l32[half:])),
        "bpd_difference": runs["bfloat16"]["bpd_float32"]["mean"] - runs["float32"]["bpd_float32"]["mean"]}
    print(f"{'step':>6}{'float32':>12}{'bfloat16':>12}")
    for s, a, b in zip(steps, l32, l16):
        print(f"{s:>6}{a:>12.5f}{b:>12.5f}")
    for dtype in DTYPES:
        r = runs[dtype]
        print(f"{dtype} run: test bound {r['bpd_own_dtype']['mean']:.4f} ± {r['bpd_own_dtype']['se']:.4f} bits/dim "
              f"evaluated in {dtype}, {r['bpd_float32']['mean']:.4f} ± {r['bpd_float32']['se']:.4f} in float32; "
              f"{r['steps_per_sec']:.2f} steps/s")
    write_result({"benchmark": "mixed_precision", "steps": args.steps, "draws": args.draws, "runs": runs,
                  "comparison": comparison}, args.out, f"mixed_precision_{jax.default_backend()}.json")
