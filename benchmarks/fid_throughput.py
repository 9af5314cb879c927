"""Throughput of the FID Inception network's feature extraction, and the time for 50,000 images.

    python -m benchmarks.fid_throughput [--batch_size=100] [--images=400] [--torch]

Runs `vdm_jax.training.inception_features` (the network jit-compiled, batches sharded over all
devices) on random uint8 32×32×3 images (CIFAR-10's size; every image is resized to 299×299, so
the cost does not depend on the input size much) with random weights (speed does not depend on
them). Reports compilation, images/s, the projected time for 50,000 images (the papers' FID
protocol: 50,000 samples, plus the reference statistics once), and the achieved GFLOP/s from XLA's
cost analysis against the float32 matmul peak measured in the same process. `--torch` runs
pytorch-fid's network on the same batch in its own process (never beside JAX's threads).
Writes benchmarks/results/fid_throughput_<backend>.json (or `--out`).
"""
import json
import os
import subprocess
import sys
import time

from absl import app, flags

from benchmarks.common import median_time, write_result

flags.DEFINE_integer("batch_size", 100, "Images per compiled call (a multiple of the devices).")
flags.DEFINE_integer("images", 400, "Images per timed pass (a multiple of --batch_size).")
flags.DEFINE_integer("repeats", 3, "Timed passes (the median is reported).")
flags.DEFINE_boolean("torch", False, "Also time pytorch-fid's network, in its own process.")
flags.DEFINE_string("out", None, "Output JSON (default benchmarks/results/fid_throughput_<backend>.json).")
FLAGS = flags.FLAGS

_TORCH = """
import importlib.util, json, sys, time
import numpy as np
spec = importlib.util.spec_from_file_location("torch_peers", sys.argv[1]); peers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(peers)
import torch
inception = peers.import_peer("pytorch_fid.inception")
state = peers.random_fid_state_dict()
inception.load_state_dict_from_url = lambda *a, **k: state
model = inception.InceptionV3([3]).eval()
batch, images = int(sys.argv[2]), int(sys.argv[3])
x = torch.from_numpy(np.random.default_rng(0).random((batch, 3, 32, 32), dtype=np.float32))
with torch.no_grad():
    model(x)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(images // batch):
            model(x)
        times.append(time.perf_counter() - start)
print(json.dumps({"images_per_s": images / sorted(times)[1], "torch": torch.__version__,
                  "threads": torch.get_num_threads()}))
"""


def _matmul_peak_gflops() -> float:
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (4096, 4096), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best = float("inf")  # the peak: the best of several
    for _ in range(8):
        start = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * 4096 ** 3 / best / 1e9


def main(argv):
    del argv
    from vdm_jax import set_cpu_xla_flags

    set_cpu_xla_flags()
    import jax
    import numpy as np
    from flax import nnx

    from vdm_jax.models import FIDInception
    from vdm_jax.training import inception_features, make_mesh
    from vdm_jax.training.evaluation import _features_fn

    mesh = make_mesh()
    network = FIDInception(rngs=nnx.Rngs(0))
    images = np.random.default_rng(0).integers(0, 256, (FLAGS.images, 32, 32, 3), dtype=np.uint8)
    start = time.perf_counter()
    inception_features(network, images[:FLAGS.batch_size], mesh=mesh, batch_size=FLAGS.batch_size)
    first_call = time.perf_counter() - start
    seconds = median_time(lambda: inception_features(network, images, mesh=mesh, batch_size=FLAGS.batch_size),
                          FLAGS.repeats)
    rate = FLAGS.images / seconds
    graphdef, weights = nnx.split(network)
    batch = jax.ShapeDtypeStruct((FLAGS.batch_size, 32, 32, 3), np.uint8)
    cost = _features_fn(mesh, graphdef).lower(weights, batch).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    gflop_per_image = float(cost.get("flops", float("nan"))) / FLAGS.batch_size / 1e9
    peak = _matmul_peak_gflops()
    record = {
        "backend": jax.default_backend(), "devices": f"{jax.device_count()} × {jax.devices()[0].device_kind}",
        "jax": jax.__version__, "batch_size": FLAGS.batch_size, "images": FLAGS.images,
        "first_call_s": first_call, "images_per_s": rate, "seconds_for_50000": 50_000 / rate,
        "gflop_per_image_xla": gflop_per_image, "achieved_gflops": gflop_per_image * rate,
        "matmul_peak_gflops": peak, "fraction_of_peak": gflop_per_image * rate / peak,
    }
    print(f"FID Inception features: {rate:.1f} images/s at batch {FLAGS.batch_size} on {record['devices']} "
          f"(first call {first_call:.1f} s); 50,000 images in {50_000 / rate / 60:.1f} min; "
          f"{gflop_per_image:.2f} GFLOP/image, {gflop_per_image * rate:.0f} GFLOP/s = "
          f"{100 * gflop_per_image * rate / peak:.0f}% of the measured matmul peak ({peak:.0f} GFLOP/s)")
    if FLAGS.torch:
        peers = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "torch_peers.py")
        run = subprocess.run([sys.executable, "-c", _TORCH, peers, str(FLAGS.batch_size), str(FLAGS.images)],
                             capture_output=True, text=True, timeout=3600)
        if run.returncode:
            raise SystemExit(f"the torch peer failed: {run.stderr[-2000:]}")
        record["torch"] = json.loads(run.stdout.strip().splitlines()[-1])
        record["ratio_to_torch"] = rate / record["torch"]["images_per_s"]
        print(f"pytorch-fid (its own process): {record['torch']['images_per_s']:.1f} images/s; "
              f"vdm_jax / torch = {record['ratio_to_torch']:.2f}×")
    write_result(record, FLAGS.out, f"fid_throughput_{jax.default_backend()}.json")


if __name__ == "__main__":
    app.run(main)
