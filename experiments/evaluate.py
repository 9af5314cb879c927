"""Evaluate a trained run: bits/dim on a whole split, and samples at scale.

    python -m experiments.evaluate --workdir=DIR [--split=test] [--draws=1] [--full_vlb]
                                   [--num_samples=N] [--sampler=SAMPLER] [--sample_steps=K]
                                   [--labels=0,1,...|all] [--guidance=W] [--guidance_interval=LO,HI]

Reads the run's config and its latest (or `--step`) checkpoint and uses the EMA parameters.

- Bits/dim (unless only samples are asked for; `--bpd` for both): every example of the split
  exactly once (the count is printed), each term of the bound (prior, diffusion, reconstruction,
  total) with its mean and standard error over the examples.
  `--draws=K` averages K independent draws of (t, ε) per example; `--full_vlb` (DDPM) computes the
  whole discrete bound over all T steps instead of sampling t. A class-conditional run
  (model.num_classes > 0) reports the bound given each example's label and, as
  'bpd_unconditional', given the "no label" class. Writes
  `OUT/bpd_<split>_<how>.json` (with each term per t for --full_vlb) and the per-example values
  as `.npz`.
- ODE bits/dim (`--ode_bpd`): the exact likelihood of the uniformly dequantised pixels under the
  probability-flow ODE (diffrax's adaptive solver, Hutchinson's divergence; `--ode_draws`,
  `--ode_probes`, `--ode_tolerance`, `--ode_examples`), with its standard error and the network
  evaluations it took, next to the ELBO's; written as `OUT/bpd_<split>_ode_<how>.json`.
- Samples (`--num_samples=N`, 0 = none): N images from any sampler (ancestral, ddim, or an ODE
  solver in few steps: dpm_solver, heun, euler; e.g. `--sampler=dpm_solver --sample_steps=20`), in
  batches sharded over all devices, written as `OUT/samples_<sampler><steps>_seed<S>.npz` (uint8 'images' [N, H, W, C])
  and a PNG grid of the first 100. The same --seed gives the same images bitwise.
- Class-conditional samples (a run with model.num_classes K > 0): `--labels=0,3,7` (or `all`:
  0..K-1) draws --num_samples images of each class (N per class, N·len(labels) in all), with
  classifier-free guidance of weight `--guidance=w` ((1 + w)·cond − w·uncond; 0: the conditional
  model), optionally only where γ = -log SNR is in `--guidance_interval=lo,hi` (docs/math.md §6.9).
  The .npz also holds 'labels' [N·len(labels)]; the grid has one row per class (its first 16).
  Without --labels a conditional run samples unconditionally (the "no label" class).
- FID (`--fid --reference=stats.npz`, with --num_samples): the samples' FID, and their Inception
  Score, against the reference (statistics from `experiments.fid_stats`, or images: then KID too),
  with the FID Inception network (`--inception_weights`; see `experiments.fid`); written as
  `OUT/fid_<sampler><steps>_seed<S>.json`. The papers' CIFAR-10 protocol: --num_samples=50000
  against the training split's statistics (class-conditional: --labels=all --num_samples=5000).

OUT defaults to DIR/eval/step_<step>.
"""
import json
import os
import time

from absl import flags


flags.DEFINE_string("workdir", None, "The training run's work directory.")
flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the latest).", lower_bound=0)
flags.DEFINE_string("split", None, "Split to evaluate (default: the run's config.data.eval_split).")
flags.DEFINE_string("source", None, "Data spec to evaluate on (default: the run's config.data.source).")
flags.DEFINE_boolean("bpd", None, "Compute bits/dim (default: yes, unless only samples are asked for: "
                     "--num_samples without --full_vlb, --draws, --split, --source or --ode_bpd).")
flags.DEFINE_integer("batch_size", None, "Global evaluation batch (default: config.training.eval_batch_size).",
                     lower_bound=1)
flags.DEFINE_integer("draws", 1, "Independent draws of (t, ε) per example, averaged.", lower_bound=1)
flags.DEFINE_boolean("full_vlb", False, "DDPM: the whole discrete bound over all T steps (every t).")
flags.DEFINE_boolean("ode_bpd", False, "Also the bits/dim under the probability-flow ODE (an exact likelihood of "
                     "the uniformly dequantised pixels; docs/math.md §6.8).")
flags.DEFINE_integer("ode_draws", 1, "--ode_bpd: dequantisation draws per example (also importance weighted).",
                     lower_bound=1)
flags.DEFINE_integer("ode_probes", 1, "--ode_bpd: Hutchinson probes (Rademacher) of the divergence.", lower_bound=1)
flags.DEFINE_float("ode_tolerance", 1e-5, "--ode_bpd: the adaptive solver's rtol = atol.", lower_bound=0.0)
flags.DEFINE_integer("ode_examples", 0, "--ode_bpd: the split's first N examples only (0: all).", lower_bound=0)
flags.DEFINE_integer("num_samples", 0, "Images to sample (0: none).", lower_bound=0)
flags.DEFINE_enum("sampler", None, ["ancestral", "ddim", "dpm_solver", "heun", "euler"],
                  "Sampler (default: config.training.sampler); the last three solve the probability-flow ODE.")
flags.DEFINE_integer("sample_steps", None, "Reverse steps (default: config.training.sample_steps with its "
                     "sampler, else 0). 0: the sampler's default: ancestral T (a VDM: 1000), ddim 50, dpm_solver "
                     "20, heun 20, euler 50; a DDPM at most T.", lower_bound=0)
flags.DEFINE_integer("sample_batch_size", 256, "Images per compiled sampling call (a multiple of the devices).",
                     lower_bound=1)
flags.DEFINE_string("labels", None, "Class-conditional runs (model.num_classes K > 0): sample --num_samples "
                    "images of each of these classes, comma-separated (e.g. 0,1,2), or 'all' (0..K-1); the grid has "
                    "one row per class.")
flags.DEFINE_float("guidance", 0.0, "--labels: the classifier-free guidance weight w, (1 + w)·cond − w·uncond "
                   "(0: the conditional model).")
flags.DEFINE_string("guidance_interval", None, "--guidance: guide only where γ = -log SNR is in (lo, hi], given as "
                    "lo,hi (e.g. -2,5); elsewhere the conditional prediction (Kynkäänniemi et al. 2024).")
flags.DEFINE_boolean("fid", False, "The samples' FID (and Inception Score) against --reference (needs --num_samples).")
flags.DEFINE_string("reference", None, "--fid: the reference statistics (.npz mu/sigma, experiments.fid_stats) or "
                    "images (.npz uint8 'images').")
flags.DEFINE_string("inception_weights", None, "--fid: pytorch-fid's weights file (default: the cache, else download).")
flags.DEFINE_integer("fid_batch_size", 200, "--fid: images per compiled Inception call (a multiple of the devices).",
                     lower_bound=1)
flags.DEFINE_enum("dtype", None, ["auto", "float32", "bfloat16"],
                  "The U-Net's activation dtype (default: the run's model.dtype; 'auto' = bfloat16 on GPU/TPU).")
flags.DEFINE_integer("seed", 0, "Seed of the evaluation draws and of the samples.")
flags.DEFINE_string("out", None, "Output directory (default: WORKDIR/eval/step_<step>).")
flags.DEFINE_boolean("progress_bar", True, "Show progress bars.")
flags.mark_flags_as_required(["workdir"])


def _write(path: str, record: dict, arrays_path: str | None = None, arrays: dict | None = None) -> None:
    """Writes `record` as JSON to `path` (and `arrays` as .npz to `arrays_path`), each atomically."""
    from vdm_jax._files import atomic_write

    with atomic_write(path) as f:
        json.dump(record, f, indent=2)
    if arrays_path is not None:
        import numpy as np

        with atomic_write(arrays_path, "wb") as f:
            np.savez_compressed(f, **arrays)


def _class_flags(FLAGS) -> tuple[list[int] | str | None, tuple[float, float] | None]:
    """(--labels as a list of classes, 'all' or None; --guidance_interval as (lo, hi) or None), and
    the flags' combinations checked before the run is read."""
    import math

    labels, interval = None, None
    if FLAGS.labels is not None:
        labels = FLAGS.labels.strip()
        if labels != "all":
            try:
                labels = [int(v) for v in labels.split(",")]
            except ValueError:
                raise ValueError(f"--labels={FLAGS.labels}: give comma-separated classes (e.g. 0,1,2) or 'all' "
                                 "(every class of the run).") from None
        if not FLAGS.num_samples:
            raise ValueError("--labels chooses the classes of the samples, and none are asked for: give "
                             "--num_samples=N (per class) too.")
    if not math.isfinite(FLAGS.guidance):
        raise ValueError(f"--guidance must be a finite number, got {FLAGS.guidance}.")
    if FLAGS.guidance_interval is not None:
        try:
            lo, hi = (float(v) for v in FLAGS.guidance_interval.split(","))
        except ValueError:
            raise ValueError(f"--guidance_interval={FLAGS.guidance_interval}: give lo,hi, two values of "
                             "γ = -log SNR (e.g. -2,5).") from None
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"--guidance_interval={FLAGS.guidance_interval}: lo must be below hi (γ in (lo, hi]).")
        interval = (lo, hi)
        if not FLAGS.guidance:
            raise ValueError("--guidance_interval limits where the guidance applies: give --guidance=w too.")
    if FLAGS.guidance and labels is None:
        raise ValueError(f"--guidance={FLAGS.guidance:g} guides samples toward their classes: give --labels too "
                         "(e.g. --labels=all).")
    return labels, interval


def _classes(FLAGS, labels, config) -> list[int] | None:
    """The classes --labels names (None: unconditional samples), checked against the run's model.num_classes."""
    if labels is None:
        return None
    k = config.model.num_classes
    if not k:
        raise ValueError(f"--labels needs a class-conditional run, and {FLAGS.workdir}'s model.num_classes is 0 "
                         "(train one with --config.model.num_classes=K).")
    classes = list(range(k)) if labels == "all" else labels
    bad = next((c for c in classes if not 0 <= c < k), None)
    if bad is not None:
        raise ValueError(f"--labels={FLAGS.labels}: class {bad} is not one of the run's 0..{k - 1} "
                         f"(model.num_classes = {k}).")
    return classes


def _devices() -> str:
    import jax
    d = jax.devices()
    return f"{len(d)} × {d[0].device_kind} ({jax.default_backend()}, {jax.process_count()} process(es))"


def _sampling(FLAGS, config, objective) -> tuple[str, int]:
    """The sampler and its number of steps: the flags', else the run's (its steps only with its sampler);
    with --num_samples, the steps it will take (0 resolved to the sampler's default)."""
    sampler = FLAGS.sampler or config.training.sampler
    if FLAGS.sample_steps is not None:
        sample_steps, name = FLAGS.sample_steps, "--sample_steps"
    elif sampler == config.training.sampler:
        sample_steps, name = config.training.sample_steps, "the run's training.sample_steps"
    else:
        sample_steps, name = 0, "--sample_steps"
    if FLAGS.num_samples:
        sample_steps = objective.check_sample_steps(sample_steps, sampler, name=name)
    return sampler, sample_steps


def _ode_bpd(FLAGS, config, state, mesh, source, spec: str, split: str, out_dir: str, summary: dict) -> dict:
    """--ode_bpd: the ODE's bits/dim on the split (or its first --ode_examples), printed and written."""
    import jax

    from vdm_jax.data import FirstExamples
    from vdm_jax.training.evaluation import evaluate_ode_bpd, format_bpd_table

    source = FirstExamples(source, FLAGS.ode_examples) if FLAGS.ode_examples else source
    devices = mesh.devices.size  # (a batch no larger than the examples need, padded to the devices)
    batch_size = min(FLAGS.batch_size or config.training.eval_batch_size, -(-len(source) // devices) * devices)
    start = time.perf_counter()
    result = evaluate_ode_bpd(state, source, mesh=mesh, batch_size=batch_size, key=jax.random.key(FLAGS.seed),
                              num_draws=FLAGS.ode_draws, num_probes=FLAGS.ode_probes, rtol=FLAGS.ode_tolerance,
                              atol=FLAGS.ode_tolerance, progress=FLAGS.progress_bar)
    seconds = time.perf_counter() - start
    per_example = result.pop("per_example")
    tag = f"ode_draws{FLAGS.ode_draws}_probes{FLAGS.ode_probes}_tol{FLAGS.ode_tolerance:g}_seed{FLAGS.seed}"
    record = {**summary, "source": spec, "split": split, "batch_size": batch_size, "seed": FLAGS.seed,
              "seconds": seconds, **result}
    path = os.path.join(out_dir, f"bpd_{split}_{tag}.json")
    if jax.process_index() == 0:
        _write(path, record, os.path.join(out_dir, f"bpd_{split}_{tag}_per_example.npz"), per_example)
    b, iw = result["bpd"]["total"], result["bpd"]["total_iw"]
    print(f"ODE bits/dim of {spec} '{split}': {b['mean']:.5f} ± {b['se']:.5f} over {result['examples']} examples "
          f"(uniform dequantisation, {FLAGS.ode_draws} draw(s); importance weighted {iw['mean']:.5f}), "
          f"{result['nfe']['mean']:.0f} network evaluations per example on average; {seconds:.1f} s")
    print(format_bpd_table(result))
    print(f"wrote {path}")
    return record


def _samples(FLAGS, state, mesh, sampler: str, sample_steps: int, classes: list[int] | None,
             interval: tuple[float, float] | None, out_dir: str, summary: dict) -> dict:
    """--num_samples: the images (N of each of `classes`, guided, or N unconditional), written as .npz
    (with their labels) and a PNG grid (one row per class); {'path', 'seconds', 'num', 'images', and
    with classes 'labels' (the classes), 'guidance', 'guidance_interval'}."""
    import jax
    import numpy as np

    from vdm_jax.training.evaluation import generate_samples, save_samples
    from vdm_jax.training.metrics import image_grid, save_png

    n, name = FLAGS.num_samples, f"{sampler}{sample_steps}"
    labels = None if classes is None else np.repeat(np.asarray(classes, np.int32), n)  # class by class
    if classes is not None:
        name += f"_labels{'all' if FLAGS.labels.strip() == 'all' else '-'.join(map(str, classes))}"
        name += f"_w{FLAGS.guidance:g}" + (f"_gamma{interval[0]:g}to{interval[1]:g}" if interval else "")
    start = time.perf_counter()
    images = generate_samples(state, mesh=mesh, num=n if labels is None else len(labels),
                              key=jax.random.key(FLAGS.seed), batch_size=FLAGS.sample_batch_size, sampler=sampler,
                              sample_steps=sample_steps, progress=FLAGS.progress_bar, labels=labels,
                              guidance=FLAGS.guidance, guidance_interval=interval)
    seconds = time.perf_counter() - start
    stem = os.path.join(out_dir, f"samples_{name}_seed{FLAGS.seed}")
    if classes is None:
        picture = image_grid(images[:100])
    else:  # one row per class: its first (at most) 16
        columns = min(n, 16)
        picture = image_grid(images.reshape(len(classes), n, *images.shape[1:])[:, :columns]
                             .reshape(-1, *images.shape[1:]), columns=columns)
    if jax.process_index() == 0:
        save_samples(stem + ".npz", images, labels)
        save_png(stem + ".png", picture, scale=max(1, 512 // picture.shape[0]))
    how = "" if classes is None else (f"; {n} of each of the classes {','.join(map(str, classes))}, guidance "
                                      f"w = {FLAGS.guidance:g}" + (f" where γ is in ({interval[0]:g}, "
                                                                   f"{interval[1]:g}]" if interval else ""))
    print(f"sampled {images.shape[0]} images ({sampler}, {sample_steps} steps, {summary['dtype']} "
          f"activations{how}) in {seconds:.1f} s: {stem}.npz, {stem}.png")
    record = {"path": stem + ".npz", "seconds": seconds, "num": int(images.shape[0]), "images": images}
    if classes is not None:
        record |= {"labels": classes, "guidance": FLAGS.guidance, "guidance_interval": interval}
    return record


def _fid(FLAGS, mesh, network, images, stem: str, summary: dict) -> dict:
    """--fid: the samples' FID and Inception Score (and KID against images), printed and written."""
    import jax

    from experiments.common import format_quality, read_images_or_statistics
    from vdm_jax.fid import sample_quality
    from vdm_jax.training.evaluation import inception_features

    kind, reference = read_images_or_statistics(FLAGS.reference, "--reference")
    start = time.perf_counter()

    def features(x):
        return inception_features(network, x, mesh=mesh, batch_size=FLAGS.fid_batch_size, progress=FLAGS.progress_bar)

    result = sample_quality(features(images), reference if kind == "statistics" else features(reference))
    record = {**summary, "samples": stem + ".npz", "reference": os.path.abspath(FLAGS.reference),
              "seconds": time.perf_counter() - start, **result}
    path = os.path.join(os.path.dirname(stem), "fid_" + os.path.basename(stem)[len("samples_"):] + ".json")
    if jax.process_index() == 0:
        _write(path, record)
    print(f"FID of {result['num_images']} samples against {FLAGS.reference}:")
    print(format_quality(result))
    print(f"wrote {path}")
    print(f"FID {result['fid']:.4f}")
    return record


def evaluate(FLAGS) -> dict:
    import jax

    from vdm_jax.data import load_source
    from vdm_jax.training import compute_dtype, make_mesh
    from vdm_jax.training.evaluation import evaluate_bpd, format_bpd_table, load_checkpoint, read_config
    from vdm_jax.training.parallel import check_batch_size

    mesh = make_mesh()
    asked = FLAGS.full_vlb or FLAGS.draws > 1 or FLAGS.split or FLAGS.source or FLAGS.ode_bpd  # ask for the bound
    if FLAGS.ode_tolerance <= 0:
        raise ValueError(f"--ode_tolerance must be > 0, got {FLAGS.ode_tolerance}.")
    bpd = FLAGS.bpd if FLAGS.bpd is not None else bool(asked or not FLAGS.num_samples)  # only what was asked
    if bpd and FLAGS.batch_size is not None:
        check_batch_size(FLAGS.batch_size, mesh, "--batch_size")
    if FLAGS.num_samples:
        check_batch_size(FLAGS.sample_batch_size, mesh, "--sample_batch_size")
    elif FLAGS.sampler is not None or FLAGS.sample_steps is not None:
        raise ValueError("--sampler and --sample_steps choose how samples are drawn, and none are asked for: give "
                         "--num_samples=N too.")
    if FLAGS.out is not None and os.path.exists(FLAGS.out) and not os.path.isdir(FLAGS.out):
        raise ValueError(f"--out={FLAGS.out} is a file; --out names the directory the outputs go to.")
    labels, interval = _class_flags(FLAGS)
    if FLAGS.fid:
        if not FLAGS.num_samples or not FLAGS.reference:
            raise ValueError("--fid needs samples and a reference: give --num_samples=N and --reference=stats.npz "
                             "(experiments.fid_stats writes one).")
        check_batch_size(FLAGS.fid_batch_size, mesh, "--fid_batch_size")
        if not os.path.isfile(os.path.expanduser(FLAGS.reference)):  # before any work
            raise FileNotFoundError(f"--reference={FLAGS.reference} does not exist.")
    classes = _classes(FLAGS, labels, read_config(FLAGS.workdir)) if labels is not None else None
    if FLAGS.fid:
        from vdm_jax.models import fid_inception

        inception = fid_inception(FLAGS.inception_weights)  # (its weights found, or downloaded, before any work)
    config, state = load_checkpoint(FLAGS.workdir, step=FLAGS.step, mesh=mesh, dtype=FLAGS.dtype)
    step = int(state.step)
    sampler, sample_steps = _sampling(FLAGS, config, state.objective)
    out_dir = FLAGS.out or os.path.join(os.path.abspath(FLAGS.workdir), "eval", f"step_{step}")
    main = jax.process_index() == 0
    if main:  # before any work, so that a bad --out loses nothing
        os.makedirs(out_dir, exist_ok=True)
    summary = {"workdir": os.path.abspath(FLAGS.workdir), "step": step, "devices": _devices(),
               "jax": jax.__version__, "dtype": compute_dtype(config.model.dtype)}
    if bpd or FLAGS.ode_bpd:  # the split, read once for both
        spec, split = FLAGS.source or config.data.source, FLAGS.split or config.data.eval_split
        source = load_source(spec, split)
    if bpd:
        batch_size = FLAGS.batch_size or config.training.eval_batch_size
        start = time.perf_counter()
        result = evaluate_bpd(state, source, mesh=mesh, batch_size=batch_size, key=jax.random.key(FLAGS.seed),
                              draws=FLAGS.draws, full_vlb=FLAGS.full_vlb, progress=FLAGS.progress_bar)
        seconds = time.perf_counter() - start
        how = (f"the full discrete bound (all {state.objective.timesteps} steps)" if FLAGS.full_vlb else "")
        how = ", ".join(filter(None, [how, f"{FLAGS.draws} draw{'s' if FLAGS.draws > 1 else ''} of "
                                           f"{'ε' if FLAGS.full_vlb else '(t, ε)'} per example"]))
        per_example = result.pop("per_example_nats")
        tag = ("fullvlb" if FLAGS.full_vlb else "onet") + f"_draws{FLAGS.draws}_seed{FLAGS.seed}"
        record = {**summary, "source": spec, "split": split, "batch_size": batch_size, "seed": FLAGS.seed,
                  "seconds": seconds, **result}
        path = os.path.join(out_dir, f"bpd_{split}_{tag}.json")
        if main:
            _write(path, record, os.path.join(out_dir, f"bpd_{split}_{tag}_per_example.npz"), per_example)
        conditional = "bpd_unconditional" in result
        print(f"bits/dim of {spec} '{split}': {result['examples']} examples, each exactly once; {how}; "
              f"EMA parameters at step {step}, {summary['dtype']} activations; {seconds:.1f} s on "
              f"{summary['devices']}")
        if conditional:
            print("given each example's label:")
        print(format_bpd_table(result))
        if conditional:
            print("unconditional (the 'no label' class):")
            print(format_bpd_table({"bpd": result["bpd_unconditional"]}))
        print(f"wrote {path}")
        summary["bpd"] = record
    if FLAGS.ode_bpd:
        summary["ode_bpd"] = _ode_bpd(FLAGS, config, state, mesh, source, spec, split, out_dir, summary)
    if FLAGS.num_samples:
        summary["samples"] = _samples(FLAGS, state, mesh, sampler, sample_steps, classes, interval, out_dir, summary)
        if FLAGS.fid:
            summary["fid"] = _fid(FLAGS, mesh, inception, summary["samples"].pop("images"),
                                  summary["samples"]["path"][:-len(".npz")],
                                  {k: summary[k] for k in ("workdir", "step", "devices")}
                                  | {k: summary["samples"][k] for k in ("labels", "guidance", "guidance_interval")
                                     if k in summary["samples"]})
        summary["samples"].pop("images", None)
    return summary


if __name__ == "__main__":
    from experiments.common import run_command

    run_command(evaluate)
