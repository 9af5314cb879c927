"""FID, KID and Inception Score of a set of images against a reference, with the FID Inception network.

    python -m experiments.fid --images=A.npz --reference=B.npz [--inception_weights=PATH] [--out=A_fid.json]

Each `.npz` holds uint8 `images` [N, H, W, C] (C = 1 or 3; the format `experiments.evaluate`
writes samples in) or is a statistics file in pytorch-fid's format (`mu`, `sigma`, e.g. from
`experiments.fid_stats`). Against images: FID, KID (unbiased, polynomial kernel, 100 subsets of
min(1000, N)) and the Inception Score of --images; against statistics: FID and the Inception Score
(KID needs the reference's features). Prints a table and, as its last line, `FID <value>`; writes
the numbers as JSON (default: next to --images, `<stem>_fid.json`).

The network is pytorch-fid's port of TensorFlow's 2015 FID Inception graph (`vdm_jax.models.FIDInception`);
its weights are read from pytorch-fid's file `pt_inception-2015-12-05-6726825d.pth` (--inception_weights,
else the cache directory $VDM_JAX_CACHE or ~/.cache/vdm_jax, else downloaded from pytorch-fid's release).
"""
import json
import os
import time

from absl import flags


flags.DEFINE_string("images", None, "The images (.npz with uint8 'images') or their statistics (.npz, mu/sigma).")
flags.DEFINE_string("reference", None, "The reference: images or statistics, as --images.")
flags.DEFINE_string("inception_weights", None, "pytorch-fid's weights file (default: the cache, else download).")
flags.DEFINE_integer("batch_size", 200, "Images per compiled call (a multiple of the devices).", lower_bound=1)
flags.DEFINE_integer("kid_subsets", 100, "KID's random subsets.", lower_bound=1)
flags.DEFINE_integer("kid_subset_size", 1000, "KID's subset size (capped at the smaller set's size).",
                     lower_bound=2)
flags.DEFINE_integer("is_splits", 10, "The Inception Score's splits.", lower_bound=1)
flags.DEFINE_string("out", None, "The JSON output (default: <--images stem>_fid.json).")
flags.DEFINE_boolean("progress_bar", True, "Show progress bars.")
flags.mark_flags_as_required(["images", "reference"])


def compute(FLAGS) -> dict:
    import jax

    from experiments.common import format_quality, read_images_or_statistics
    from vdm_jax._files import atomic_write
    from vdm_jax.fid import frechet_distance, sample_quality
    from vdm_jax.training import make_mesh
    from vdm_jax.training.parallel import check_batch_size

    images_kind, images = read_images_or_statistics(FLAGS.images, "--images")
    ref_kind, reference = read_images_or_statistics(FLAGS.reference, "--reference")
    out = FLAGS.out or os.path.splitext(os.path.expanduser(FLAGS.images))[0] + "_fid.json"
    start = time.perf_counter()
    if images_kind == ref_kind == "statistics":  # no network needed
        result = {"fid": frechet_distance(*images, *reference), "kid": None, "kid_std": None,
                  "inception_score": None, "inception_score_std": None}
    else:
        from vdm_jax.models import fid_inception
        from vdm_jax.training.evaluation import inception_features

        mesh = make_mesh()
        check_batch_size(FLAGS.batch_size, mesh, "--batch_size")
        network = fid_inception(FLAGS.inception_weights)

        def features(images):
            return inception_features(network, images, mesh=mesh, batch_size=FLAGS.batch_size,
                                      progress=FLAGS.progress_bar)

        if images_kind == "statistics":  # FID is symmetric; the Inception Score is of the set of images
            (images_kind, images), (ref_kind, reference) = (ref_kind, reference), (images_kind, images)
        result = sample_quality(features(images), reference if ref_kind == "statistics" else features(reference),
                                kid_subsets=FLAGS.kid_subsets, kid_subset_size=FLAGS.kid_subset_size,
                                is_splits=FLAGS.is_splits)
    result.update(images=os.path.abspath(FLAGS.images), reference=os.path.abspath(FLAGS.reference),
                  seconds=time.perf_counter() - start)
    if jax.process_index() == 0:
        with atomic_write(out) as f:
            json.dump(result, f, indent=2)
    print(format_quality(result))
    print(f"wrote {out}")
    print(f"FID {result['fid']:.4f}")
    return result


if __name__ == "__main__":
    from experiments.common import run_command

    run_command(compute)
