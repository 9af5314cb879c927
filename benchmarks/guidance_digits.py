"""`guidance_digits`: classifier-free guidance on labelled data (issue 35), judged by a classifier that
never saw the model: the conditional quickstart is trained, sampled per class at several guidance
weights, and an SVM trained on the digits' training split labels the samples."""
import os
import shutil
import tempfile
import time

import numpy as np

from benchmarks.common import command, csv, flag, out_flag, write_result


@command(flag("--steps", type=int, default=4000, help="Training steps of the conditional quickstart (default 4000)."),
         flag("--per_class", type=int, default=100, help="Samples of each class at each weight (default 100)."),
         flag("--weights", type=csv(float), default=[0.0, 1.0, 3.0], help="Guidance weights w (default 0,1,3)."),
         flag("--sampler", default="ddim", help="Sampler of the samples (default ddim, the quickstart's)."),
         flag("--sample_steps", type=int, default=50, help="Its steps (default 50)."),
         flag("--draws", type=int, default=8, help="Draws of (t, ε) per test image in the bits/dim (default 8)."),
         flag("--workdir", default=None, help="The run's work directory (default: a temporary one, removed after); "
              "an existing run there resumes, or is only evaluated if it has all --steps."),
         flag("--seed", type=int, default=0, help="Seed of the samples and of the bits/dim's draws."),
         out_flag("guidance_digits.json"))
def guidance_digits(args):
    """Classifier-free guidance on the digits: accuracy of guided samples per class, and bits/dim.

Trains the conditional quickstart (`experiments/configs/quickstart.py:conditional`: the tiny U-Net
with model.num_classes = 10, training.label_dropout = 0.1) for --steps, then:
- the bits/dim of the 297 test digits given their labels and given "no label" (--draws each), and
  the paired difference of each digit's two bounds on the same draws of (t, ε);
- --per_class samples of each digit at each guidance weight w (the same noise at every w), which
  an RBF SVM (scikit-learn's SVC on the 64 pixels), trained on the 1,500 training digits only,
  labels: its accuracy on each class's samples and their mean (its own accuracy on the test
  digits is reported too);
- a grid per w beside the JSON (a class a row, its first 20 samples).
"""
    start = time.perf_counter()
    workdir = args.workdir or tempfile.mkdtemp(prefix="guidance_digits_")
    try:
        result = _run(args, workdir)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    result["wall_s"] = time.perf_counter() - start
    out = write_result(result, args.out, "guidance_digits.json")
    _print_table(result)
    print(f"wrote the grids {', '.join(g['grid'] for g in result['guided'])} (in {os.path.dirname(out)})")


def _run(args, workdir: str) -> dict:
    import jax

    from experiments.configs.quickstart import get_config
    from vdm_jax.data import load_source
    from vdm_jax.training import make_mesh, train_and_evaluate
    from vdm_jax.training.evaluation import evaluate_bpd, load_checkpoint

    config = get_config("conditional")
    config.training.num_steps = args.steps
    config.training.eval_at_end = config.training.sample_at_end = False  # (measured below)
    t0 = time.perf_counter()
    train_and_evaluate(config, workdir)
    train_s = time.perf_counter() - t0
    mesh = make_mesh()
    _, state = load_checkpoint(workdir, mesh=mesh)
    train, test = load_source("digits", "train"), load_source("digits", "test")
    t0 = time.perf_counter()
    bpd = evaluate_bpd(state, test, mesh=mesh, batch_size=config.training.eval_batch_size,
                       key=jax.random.key(args.seed), draws=args.draws)
    bpd_s = time.perf_counter() - t0
    difference = _paired_difference(state, test, key=jax.random.key(args.seed + 1), draws=args.draws)
    classifier, classifier_accuracy = _classifier(train, test)
    out_base = os.path.splitext(args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                         "guidance_digits.json"))[0]
    guided = [_guided(args, state, mesh, classifier, w, out_base) for w in args.weights]
    return {"command": _command(args), "config": "experiments/configs/quickstart.py:conditional", "steps": int(state.step),
            "batch_size": config.training.batch_size, "label_dropout": config.training.label_dropout,
            "train_s": train_s, "sampler": args.sampler, "sample_steps": args.sample_steps,
            "per_class": args.per_class, "seed": args.seed,
            "bpd_test": {"draws": args.draws, "examples": bpd["examples"], "seconds": bpd_s,
                         "conditional": bpd["bpd"], "unconditional": bpd["bpd_unconditional"],
                         "unconditional_minus_conditional": difference},
            "classifier": {"model": "sklearn.svm.SVC() on pixels / 255, fit on the 1,500 training digits",
                           "test_accuracy": classifier_accuracy, "test_examples": len(test)},
            "guided": guided}


def _paired_difference(state, test, *, key, draws: int) -> dict:
    """The test digits' total bits/dim without their label minus with it, each example's two bounds on
    the same draws of (t, ε) (`steps.eval_step`), so that the draws' noise cancels: {'mean', 'se'}."""
    import functools

    import jax

    from vdm_jax.training import steps

    batch = {"image": test.images, "label": test.labels.astype(np.int32)}
    nats = {c: np.asarray(jax.jit(functools.partial(steps.eval_step, draws=draws, conditional=c))(
        state, batch, key=key)["total"], np.float64) for c in (True, False)}
    diff = (nats[False] - nats[True]) / (state.objective.dims * np.log(2.0))
    return {"mean": float(diff.mean()), "se": float(diff.std(ddof=1) / np.sqrt(len(diff)))}


def _command(args) -> str:
    """The command that reproduces this result (every flag but --workdir and --out spelled out)."""
    return (f"python -m benchmarks guidance_digits --steps={args.steps} --per_class={args.per_class} "
            f"--weights={','.join(f'{w:g}' for w in args.weights)} --sampler={args.sampler} "
            f"--sample_steps={args.sample_steps} --draws={args.draws} --seed={args.seed}")


def _classifier(train, test):
    """An RBF SVM fit on the training digits' pixels, and its accuracy on the test digits."""
    from sklearn.svm import SVC

    classifier = SVC().fit(_features(train.images), train.labels)
    return classifier, float((classifier.predict(_features(test.images)) == test.labels).mean())


def _features(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).astype(np.float64) / 255.0


def _guided(args, state, mesh, classifier, w: float, out_base: str) -> dict:
    """--per_class samples of each class at guidance w, classified; their grid written."""
    import jax

    from vdm_jax.training.evaluation import generate_samples
    from vdm_jax.training.metrics import image_grid, save_png

    k, n = state.objective.num_classes, args.per_class
    labels = np.repeat(np.arange(k), n)
    t0 = time.perf_counter()
    images = generate_samples(state, mesh=mesh, num=len(labels), key=jax.random.key(args.seed),
                              batch_size=-(-min(len(labels), 1000) // mesh.devices.size) * mesh.devices.size,
                              sampler=args.sampler, sample_steps=args.sample_steps, labels=labels, guidance=w)
    seconds = time.perf_counter() - t0
    correct = classifier.predict(_features(images)) == labels
    per_class = correct.reshape(k, n).mean(axis=1)
    columns = min(n, 20)
    grid = image_grid(images.reshape(k, n, *images.shape[1:])[:, :columns].reshape(-1, *images.shape[1:]), columns)
    path = f"{out_base}_w{w:g}.png"
    save_png(path, grid, scale=4)
    return {"guidance": w, "accuracy": float(correct.mean()), "accuracy_per_class": per_class.tolist(),
            "sample_s": seconds, "grid": os.path.basename(path)}


def _print_table(result: dict) -> None:
    print(f"conditional quickstart, {result['steps']} steps ({result['train_s']:.0f} s); classifier's own test "
          f"accuracy {result['classifier']['test_accuracy']:.3f}")
    b = result["bpd_test"]
    for name in ("conditional", "unconditional"):
        t = b[name]["total"]
        print(f"  test bits/dim, {name}: {t['mean']:.4f} ± {t['se']:.4f} ({b['draws']} draws)")
    d = b["unconditional_minus_conditional"]
    print(f"  unconditional − conditional, per example on the same draws: {d['mean']:.4f} ± {d['se']:.4f}")
    print(f"  {'w':>4}  {'mean':>6}  " + " ".join(f"{c:>5}" for c in range(len(result['guided'][0]['accuracy_per_class']))))
    for g in result["guided"]:
        print(f"  {g['guidance']:>4g}  {g['accuracy']:>6.3f}  " + " ".join(f"{a:>5.2f}" for a in g["accuracy_per_class"]))
