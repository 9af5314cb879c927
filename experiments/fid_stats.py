"""Reference statistics for FID: the FID Inception features' mean and covariance of a dataset split.

    python -m experiments.fid_stats --source=SPEC --split=train --out=stats.npz [--inception_weights=PATH]

SPEC is any `vdm_jax.data.load_source` spec (e.g. `tfds:cifar10`, `cifar10_tar:PATH`, `npz:PATH`,
`images:PATH`, `digits`). Writes pytorch-fid's statistics format (`mu` [2048], `sigma` [2048, 2048],
float64), accumulated exactly in float64 over batches; `--num` takes the split's first N images only.
For the papers' CIFAR-10 protocol: the 50,000 training images, against 50,000 samples
(`experiments.evaluate --fid --num_samples=50000 --reference=stats.npz`).
"""
import os
import time

from absl import flags


flags.DEFINE_string("source", None, "The data: a load_source spec (tfds:cifar10, cifar10_tar:PATH, npz:PATH, ...).")
flags.DEFINE_string("split", "train", "The split.")
flags.DEFINE_string("out", None, "The statistics file to write (.npz).")
flags.DEFINE_string("inception_weights", None, "pytorch-fid's weights file (default: the cache, else download).")
flags.DEFINE_integer("num", 0, "The split's first N images only (0: all).", lower_bound=0)
flags.DEFINE_integer("batch_size", 200, "Images per compiled call (a multiple of the devices).", lower_bound=1)
flags.DEFINE_boolean("progress_bar", True, "Show a progress bar.")
flags.mark_flags_as_required(["source", "out"])


def compute(FLAGS) -> dict:
    import jax
    import numpy as np

    from vdm_jax.data import FirstExamples, check_source, load_source
    from vdm_jax.fid import FeatureStatistics, save_statistics
    from vdm_jax.models import fid_inception
    from vdm_jax.training import make_mesh
    from vdm_jax.training.evaluation import inception_features
    from vdm_jax.training.metrics import progress_bar
    from vdm_jax.training.parallel import check_batch_size

    mesh = make_mesh()
    check_batch_size(FLAGS.batch_size, mesh, "--batch_size")
    out = os.path.abspath(os.path.expanduser(FLAGS.out))
    if os.path.isdir(out):
        raise IsADirectoryError(f"--out={FLAGS.out} is a directory: it must be the statistics file to write.")
    source = load_source(FLAGS.source, FLAGS.split)
    check_source(source)
    source = FirstExamples(source, FLAGS.num) if FLAGS.num else source
    network = fid_inception(FLAGS.inception_weights)  # before the work: a missing file costs nothing
    start, stats = time.perf_counter(), FeatureStatistics()
    chunk = FLAGS.batch_size * 10  # images read and featurised at a time
    bar = progress_bar(FLAGS.progress_bar, total=len(source), desc="features", unit="image")
    for lo in range(0, len(source), chunk):
        images = np.stack([source[i]["image"] for i in range(lo, min(lo + chunk, len(source)))])
        stats.update(inception_features(network, images, mesh=mesh, batch_size=FLAGS.batch_size)["pool"])
        bar.update(len(images))
    bar.close()
    mu, sigma = stats.mean_and_covariance()
    if jax.process_index() == 0:  # (every process holds the same statistics)
        save_statistics(out, mu, sigma)
    seconds = time.perf_counter() - start
    print(f"statistics of {stats.count} images of {FLAGS.source} '{FLAGS.split}' in {seconds:.1f} s: wrote {out}")
    return {"count": stats.count, "out": out, "seconds": seconds}


if __name__ == "__main__":
    from experiments.common import run_command

    run_command(compute)
