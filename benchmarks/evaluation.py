"""Evaluation speed: the FID Inception network's features (`fid_throughput`), and bits/dim on the
CIFAR-10 test split and sampling at scale (`eval_at_scale`)."""
import json
import math
import os
import subprocess
import sys
import time

from benchmarks import common
from benchmarks.common import command, flag, median_time, out_flag, write_result

_TORCH = """
import importlib.util, json, sys, timeit
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
    times = timeit.repeat(lambda: [model(x) for _ in range(images // batch)], repeat=3, number=1)
print(json.dumps({"images_per_s": images / sorted(times)[1], "torch": torch.__version__,
                  "threads": torch.get_num_threads()}))
"""


@command(flag("--batch_size", type=int, default=100, help="Images per compiled call (a multiple of the devices)."),
         flag("--images", type=int, default=400, help="Images per timed pass (a multiple of --batch_size)."),
         flag("--repeats", type=int, default=3, help="Timed passes (the median is reported)."),
         flag("--torch", action="store_true", help="Also time pytorch-fid's network, in its own process."),
         out_flag("fid_throughput_<backend>.json"))
def fid_throughput(args):
    """Throughput of the FID Inception network's features, and the time for 50,000 images.

`inception_features` (sharded over all devices) on random 32×32×3 images with random weights;
FLOP/s (XLA's count) over a float32 matmul measured here. --torch: pytorch-fid, its own process.
"""
    import jax
    import numpy as np
    from flax import nnx

    from vdm_jax.models import FIDInception
    from vdm_jax.training import inception_features, make_mesh
    from vdm_jax.training.evaluation import _features_fn

    mesh, batch_size = make_mesh(), args.batch_size
    network = FIDInception(rngs=nnx.Rngs(0))
    images = np.random.default_rng(0).integers(0, 256, (args.images, 32, 32, 3), dtype=np.uint8)
    start = time.perf_counter()
    inception_features(network, images[:batch_size], mesh=mesh, batch_size=batch_size)
    first_call = time.perf_counter() - start
    seconds = median_time(lambda: inception_features(network, images, mesh=mesh, batch_size=batch_size), args.repeats)
    rate = args.images / seconds
    graphdef, weights = nnx.split(network)
    spec = jax.ShapeDtypeStruct((batch_size, 32, 32, 3), np.uint8)
    flops = common.flops(_features_fn(mesh, graphdef).lower(weights, spec).compile())
    gflop_per_image = (flops or math.nan) / batch_size / 1e9
    peak = common.matmul_peak(repeats=8) / 1e9
    record = {"benchmark": "fid_throughput", "batch_size": batch_size, "images": args.images,
              "first_call_s": first_call, "images_per_s": rate, "seconds_for_50000": 50_000 / rate,
              "gflop_per_image_xla": gflop_per_image, "achieved_gflops": gflop_per_image * rate,
              "matmul_peak_gflops": peak, "fraction_of_peak": gflop_per_image * rate / peak}
    print(f"FID Inception features: {rate:.1f} images/s at batch {batch_size} on {common.device()} "
          f"(first call {first_call:.1f} s); 50,000 images in {50_000 / rate / 60:.1f} min; "
          f"{gflop_per_image:.2f} GFLOP/image, {gflop_per_image * rate:.0f} GFLOP/s = "
          f"{100 * gflop_per_image * rate / peak:.0f}% of the measured matmul peak ({peak:.0f} GFLOP/s)")
    if args.torch:
        peers = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "torch_peers.py")
        run = subprocess.run([sys.executable, "-c", _TORCH, peers, str(batch_size), str(args.images)],
                             capture_output=True, text=True, timeout=3600)
        if run.returncode:
            raise SystemExit(f"the torch peer failed: {run.stderr[-2000:]}")
        record["torch"] = json.loads(run.stdout.strip().splitlines()[-1])
        record["ratio_to_torch"] = rate / record["torch"]["images_per_s"]
        print(f"pytorch-fid (its own process): {record['torch']['images_per_s']:.1f} images/s; "
              f"vdm_jax / torch = {record['ratio_to_torch']:.2f}×")
    write_result(record, args.out, f"fid_throughput_{jax.default_backend()}.json")


_DATA_DIR = os.environ.get("VDM_JAX_DATA_DIR")  # a folder holding cifar10_jpeg.zip


@command(flag("--model", default="small", choices=["small", "ddpm", "vdm"], help="A cifar10 config."),
         flag("--source", default=f"images:{os.path.join(_DATA_DIR, 'cifar10_jpeg.zip')}" if _DATA_DIR else None,
              help="Data spec of CIFAR-10 (its 'test' split); default images:$VDM_JAX_DATA_DIR/cifar10_jpeg.zip."),
         flag("--bpd_images", type=int, default=10_000, help="Test images to evaluate (the first N)."),
         flag("--batch_size", type=int, default=200, help="Evaluation batch."),
         flag("--num_samples", type=int, default=10_000, help="Samples the projection is for."),
         flag("--sample_batch", type=int, default=256, help="Images per sampling call."),
         flag("--sample_batches", type=int, default=1, help="Sampling calls actually run (after one to compile)."),
         flag("--sampler", default="ancestral", choices=["ancestral", "ddim", "dpm_solver", "heun", "euler"]),
         flag("--sample_steps", type=int, default=0, help="Reverse steps (0: T = 1000)."),
         out_flag("eval_at_scale_<backend>_<model>.json"))
def eval_at_scale(args):
    """Time to evaluate bits/dim on the 10,000 CIFAR-10 test images and to sample 10,000 images.

The library's `evaluate_bpd` and `generate_samples` on a fresh model of the CIFAR-10 config
--model; the time for --num_samples is projected from --sample_batches batches (and for 1000 steps).
"""
    if args.source is None:
        raise SystemExit("error: no CIFAR-10 data; set VDM_JAX_DATA_DIR (a folder holding cifar10_jpeg.zip) "
                         "or pass --source=SPEC.")
    import jax

    from experiments.configs.cifar10 import get_config
    from vdm_jax.data import FirstExamples, load_source
    from vdm_jax.models import count_params
    from vdm_jax.training import create_train_state, generate_samples, make_mesh, parallel, validate_config

    config = get_config(args.model)
    model_config = validate_config(config)
    mesh = make_mesh()
    state = parallel.replicate(create_train_state(config, model_config, key=jax.random.key(0)), mesh)
    source = FirstExamples(load_source(args.source, "test"), args.bpd_images)
    record = {"benchmark": "eval_at_scale", "model": args.model, "params": count_params(model_config),
              "source": args.source, "dtype": model_config.dtype}
    key = jax.random.key(1)
    record["bpd"] = bpd = common.bpd_at_scale(state, source, mesh, batch=args.batch_size, key=key)
    print(f"bits/dim on {bpd['images']} test images: {bpd['seconds']:.1f} s ({bpd['images_per_s']:.1f} images/s); "
          f"10,000 images: {10_000 / bpd['images_per_s'] / 60:.1f} min")

    def sample(b):
        generate_samples(state, mesh=mesh, num=args.sample_batch, batch_size=args.sample_batch,
                                key=jax.random.fold_in(key, b), sampler=args.sampler, sample_steps=args.sample_steps)

    times = [common.repeat_times(lambda b=b: sample(b), 1)[0] for b in range(args.sample_batches + 1)]
    first, per_batch = times[0], sum(times[1:]) / args.sample_batches  # (the first compiles)
    batches = math.ceil(args.num_samples / args.sample_batch)
    steps = args.sample_steps or 1000
    calls = 2 * steps - 1 if args.sampler == "heun" else steps  # (the DDPM models: Heun's last step is Euler's)
    record["samples"] = {"sampler": args.sampler, "steps": steps, "network_calls": calls, "batch": args.sample_batch,
                         "batches_run": args.sample_batches, "seconds_per_batch": per_batch,
                         "first_batch_with_compile_s": first, "projected_num": args.num_samples,
                         "projected_seconds": per_batch * batches,
                         "projected_seconds_1000_steps": per_batch * batches * 1000 / calls}
    print(f"sampling ({args.sampler}, {steps} steps): {per_batch:.1f} s per batch of {args.sample_batch} "
          f"(measured over {args.sample_batches}); {args.num_samples:,} images = {batches} batches: "
          f"{per_batch * batches / 3600:.2f} h projected; with 1000 steps (a DDPM ancestral chain): "
          f"{per_batch * batches * 1000 / calls / 3600:.1f} h")
    write_result(record, args.out, f"eval_at_scale_{jax.default_backend()}_{args.model}.json")
