"""The benchmark suite: training, sampling and evaluation speed on the current device(s).

    python -m benchmarks.run [--model=tiny32] [--batch=32] [--dtype=float32|bfloat16] [--torch] [--out=PATH]

Measures, for one model and batch, on every local device (data parallel, as training runs):

- train: compile time of the train step; steady-state steps/s and images/s after warm-up (the
  median of `--repeats` timed runs of `--train_steps` steps, one host sync at the end of each);
  model FLOPs per image counted by XLA's cost analysis of the lowered loss gradient; MFU =
  achieved FLOP/s ÷ the devices' peak (`measure.PEAK_FLOPS`; "unknown" for other devices, e.g. CPUs);
- sample: one DDPM ancestral chain of `--sample_steps` steps for `--sample_batch` images, the whole
  chain one compiled `lax.scan` (compile time and wall time);
- eval: the bits/dim bound (one t per image) on `--eval_batch` images: images/s;
- peak device memory where the backend reports it (GPU/TPU `memory_stats`).

With `--torch`, the same train step and sampling chain with diffusers' `UNet2DModel` of the same
parameter count, batch and optimiser (`benchmarks/torch_reference.py`), in a process of its own
(JAX's threads slow a peer in the same process), each timed repeat of the peer's alternating with
one of vdm_jax's while the other process waits; the ratios torch time / vdm_jax time.

Every result also states its efficiency against a peak measured in the same run: an n×n matmul in
the run's dtype (n = 4096), timed by JAX and, with `--torch`, by PyTorch; the measured peak is the
faster of the two, and each side's train FLOP/s (the same model FLOPs, XLA's count) is divided by
it. Prints a table and writes JSON (device, versions, config).
"""
import contextlib
import platform
import statistics

import numpy as np
from absl import app, flags

from benchmarks import measure
from benchmarks.common import matmul_peak, write_result

flags.DEFINE_enum("model", "tiny32", ["tiny8", "tiny32", "ddpm_cifar10"],
                  "tiny8: the quickstart U-Net (8×8×1); tiny32: the same on 32×32×3; ddpm_cifar10: 35.7M.")
flags.DEFINE_integer("batch", 32, "Global training batch.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Activation dtype (parameters stay float32).")
flags.DEFINE_boolean("remat", False, "Rematerialise the U-Net's blocks in the backward pass (model.remat).")
flags.DEFINE_integer("train_steps", 10, "Timed training steps per repeat.")
flags.DEFINE_integer("repeats", 3, "Timed repeats (the median is reported).")
flags.DEFINE_integer("sample_batch", 16, "Images per sampling chain.")
flags.DEFINE_integer("sample_steps", 1000, "Steps of the sampling chain (T).")
flags.DEFINE_integer("eval_batch", 64, "Images per evaluation batch.")
flags.DEFINE_boolean("torch", False, "Also run the PyTorch (diffusers) reference, in its own process, and report "
                     "the ratios.")
flags.DEFINE_enum("xla_options", "vdm_jax", ["vdm_jax", "none"],
                  "vdm_jax: XLA:CPU flags as the entry points set them (vdm_jax.set_cpu_xla_flags()); "
                  "none: XLA's defaults.")
flags.DEFINE_float("peak_tflops", None, "Peak FLOP/s of one device in TFLOP/s, for devices the table lacks (a CPU: "
                   "cores × GHz × FLOPs per cycle per core, e.g. 2 × 2.45 × 32 / 1000 for 2 AVX2 cores with 2 FMA units).")
flags.DEFINE_string("out", None, "JSON output (default benchmarks/results/run_<backend>_<model>_<dtype>.json).")
FLAGS = flags.FLAGS


def _model_config(name: str, dtype: str):
    from vdm_jax.models import ddpm_cifar10, tiny

    # embedding_dim = base_channels, as in diffusers (its time MLP is 4× the first width).
    config = {"tiny8": lambda: tiny(image_size=8, in_channels=1, embedding_dim=24),
              "tiny32": lambda: tiny(embedding_dim=24),
              "ddpm_cifar10": ddpm_cifar10}[name]()
    return config.replace(dtype=dtype, dropout=0.0, remat=FLAGS.remat)


def bench_jax(model_config, batch: int, peer=None) -> tuple[dict, dict | None]:
    """vdm_jax's measurements, and the peer's (`torch_reference.Peer`), its timed runs alternating with ours."""
    import jax

    from vdm_jax.models import count_params
    from vdm_jax.training import default_config, parallel

    c = default_config()
    c.model.update(model_config.to_dict())
    c.optim.warmup_steps = 0
    c.training.batch_size = batch
    mesh = parallel.make_mesh()
    model_config, state, data, key = measure.setup(c, mesh)
    theirs = None if peer is None else {**peer.info}
    result = {"params": count_params(model_config), "devices": mesh.devices.size}

    # Train: the step as the loop compiles it (replicated state, sharded batch, state donated).
    turn = None if peer is None else (lambda: theirs.setdefault("train_repeats_s", []).append(peer.call("train")["step_s"]))
    state, train = measure.train(state, data, key, mesh, steps=FLAGS.train_steps, repeats=FLAGS.repeats, between=turn)
    step_s = train["step_s"]
    result.update(train_compile_s=train["compile_s"], train_step_s=step_s, train_repeats_s=train["repeats_s"],
                  train_steps_per_s=1 / step_s, train_images_per_s=batch / step_s,
                  train_temp_bytes=(train["memory"] or {}).get("temp_bytes"))
    if train["flops_per_step"] is not None:
        total = train["flops_per_step"]
        result["train_flops_per_image"] = total / batch
        result["train_flops_per_s"] = total / step_s
        peak = FLAGS.peak_tflops * 1e12 if FLAGS.peak_tflops else measure.spec_peak(jax.devices()[0].device_kind)
        result["peak_flops_per_device"] = peak
        result["mfu"] = total / step_s / (peak * mesh.devices.size) if peak else "unknown (no peak for this device)"

    # Sample: one ancestral chain, the whole chain one compiled scan.
    turn = None if peer is None else (lambda: theirs.setdefault("sample_repeats_s", []).append(peer.call("sample")["chain_s"]))
    chain = measure.sample(state, key, mesh, num=FLAGS.sample_batch, sampler="ancestral", sample_steps=0,
                           repeats=max(1, FLAGS.repeats - 1), between=turn)
    result.update(sample_compile_s=chain["compile_s"], sample_chain_s=chain["chain_s"],
                  sample_ms_per_step=1e3 * chain["chain_s"] / FLAGS.sample_steps)

    # Evaluate: the one-t bound per image.
    images = np.resize(np.asarray(jax.device_get(data["image"])), (FLAGS.eval_batch, *data["image"].shape[1:]))
    evaluation = measure.evaluate(state, key, mesh, images=images, repeats=FLAGS.repeats)
    result.update(eval_compile_s=evaluation["compile_s"], eval_images_per_s=evaluation["images_per_s"],
                  peak_memory_bytes=measure.peak_memory(), matmul_flops_per_s=matmul_peak(dtype=FLAGS.dtype))
    if peer is not None:
        step_s = statistics.median(theirs["train_repeats_s"])
        theirs.update(train_step_s=step_s, train_steps_per_s=1 / step_s, train_images_per_s=batch / step_s,
                      sample_chain_s=statistics.median(theirs["sample_repeats_s"]),
                      matmul_flops_per_s=peer.call("matmul")["flops_per_s"])
        theirs["sample_ms_per_step"] = 1e3 * theirs["sample_chain_s"] / FLAGS.sample_steps
    return result, theirs


def efficiencies(record: dict) -> dict:
    """Each side's train FLOP/s over the peak measured in this run (the faster matmul of the two)."""
    sides = [side for side in ("vdm_jax", "torch") if side in record]
    peak = max(record[side]["matmul_flops_per_s"] for side in sides)
    out = {"measured_peak_flops_per_s": peak, "peak_from": max(sides, key=lambda s: record[s]["matmul_flops_per_s"])}
    flops = record["vdm_jax"].get("train_flops_per_image")
    for side in sides:
        if flops is not None:  # the same model FLOPs on both sides (same architecture and parameter count)
            out[side] = flops * record["batch"] / record[side]["train_step_s"] / peak
    return out


def main(argv):
    del argv
    import jax

    from vdm_jax import set_cpu_xla_flags

    if FLAGS.xla_options == "vdm_jax":
        set_cpu_xla_flags()  # before the first computation
    model_config = _model_config(FLAGS.model, FLAGS.dtype)
    timesteps = 1000
    if FLAGS.sample_steps != timesteps:
        raise app.UsageError("--sample_steps must be 1000 (the DDPM chain of the training config).")
    device = jax.devices()[0]
    record = {
        "benchmark": "run", "model": FLAGS.model, "dtype": FLAGS.dtype, "batch": FLAGS.batch,
        "sample_batch": FLAGS.sample_batch, "sample_steps": FLAGS.sample_steps, "eval_batch": FLAGS.eval_batch,
        "train_steps": FLAGS.train_steps, "repeats": FLAGS.repeats, "model_config": model_config.to_dict(),
        "xla_options": FLAGS.xla_options, "remat": FLAGS.remat,
        "device": f"{jax.device_count()} × {device.device_kind} ({jax.default_backend()})",
        "versions": {"python": platform.python_version(), "jax": jax.__version__},
    }
    with contextlib.ExitStack() as stack:
        peer = None
        if FLAGS.torch:  # built and warmed up before JAX compiles anything: the two processes never compute at once
            from benchmarks.torch_reference import Peer
            from vdm_jax.models import count_params

            peer = stack.enter_context(Peer(model_config.to_dict(), params=count_params(model_config),
                                            batch=FLAGS.batch, sample_batch=FLAGS.sample_batch,
                                            sample_steps=FLAGS.sample_steps, train_steps=FLAGS.train_steps,
                                            dtype=FLAGS.dtype))
        record["vdm_jax"], theirs = bench_jax(model_config, FLAGS.batch, peer)
    if theirs is not None:
        record["torch"] = theirs
        record["versions"].update(theirs.pop("versions"))
        ours = record["vdm_jax"]
        record["torch_over_vdm_jax"] = {"train_step": theirs["train_step_s"] / ours["train_step_s"],
                                        "sample_chain": theirs["sample_chain_s"] / ours["sample_chain_s"]}
    record["efficiency"] = efficiencies(record)
    _print(record)
    suffix = "_remat" if FLAGS.remat else ""
    write_result(record, FLAGS.out, f"run_{jax.default_backend()}_{FLAGS.model}_{FLAGS.dtype}{suffix}.json")


def _print(record: dict) -> None:
    ours = record["vdm_jax"]
    print(f"{record['model']} ({ours['params']:,} params, {record['dtype']}) on {record['device']}, "
          f"batch {record['batch']}")
    rows = [("train step", "train_step_s", "s"), ("train images/s", "train_images_per_s", ""),
            ("train compile", "train_compile_s", "s"),
            (f"sample {record['sample_batch']}×{record['sample_steps']}", "sample_chain_s", "s"),
            ("sample compile", "sample_compile_s", "s"), ("eval images/s", "eval_images_per_s", "")]
    theirs = record.get("torch", {})
    print(f"{'':24}{'vdm_jax':>14}" + (f"{'torch':>14}" if theirs else ""))
    for label, key, unit in rows:
        line = f"{label:24}{ours[key]:>13.4g}{unit or ' '}"
        if theirs.get(key) is not None:
            line += f"{theirs[key]:>13.4g}{unit or ' '}"
        print(line)
    if "train_flops_per_image" in ours:
        mfu = ours["mfu"]
        print(f"train: {ours['train_flops_per_image'] / 1e9:.3g} GFLOP per image, "
              f"{ours['train_flops_per_s'] / 1e12:.3g} TFLOP/s, MFU " + (f"{mfu:.1%}" if isinstance(mfu, float) else mfu))
    if ours.get("train_temp_bytes"):
        print(f"train step temporary memory (XLA buffer assignment, per device): "
              f"{ours['train_temp_bytes'] / 2**30:.2f} GiB")
    if ours.get("peak_memory_bytes"):
        print(f"peak device memory: {ours['peak_memory_bytes'] / 2**30:.2f} GiB")
    e = record["efficiency"]
    if "vdm_jax" in e:
        print(f"train FLOP/s over the measured {e['measured_peak_flops_per_s'] / 1e12:.3g} TFLOP/s matmul peak "
              f"({e['peak_from']}): vdm_jax {e['vdm_jax']:.0%}" + (f", torch {e['torch']:.0%}" if "torch" in e else ""))
    if "torch_over_vdm_jax" in record:
        r = record["torch_over_vdm_jax"]
        print(f"torch time / vdm_jax time: train step {r['train_step']:.2f}×, sampling chain {r['sample_chain']:.2f}×")


if __name__ == "__main__":
    app.run(main)
