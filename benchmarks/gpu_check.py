"""The GPU check: DDPM and VDM training, sampling and bits/dim speed on one accelerator, in one JSON.

    bash benchmarks/gpu_check.sh                 # on the GPU machine (installs the wheels carried in .whl/)
    python -m benchmarks.gpu_check [--out=PATH]  # the same, wheels already installed
    python -m benchmarks.gpu_check --dry         # the same program at small shapes, on any device (the tests)

Runs, on all local devices (data parallel, as the loop trains), in this order, each section's
programs compiled as the library compiles them:

1. `matmul`: an n×n matmul in bfloat16 and in float32 (n = 8192; 4096 on a CPU), the practical
   peaks measured in this run;
2. `ddpm_bfloat16`, `ddpm_float32`: the DDPM CIFAR-10 recipe's train step (35.7M U-Net,
   `experiments/configs/cifar10.py:ddpm`) at batch 128 with bfloat16 or float32 activations:
   images/s, model FLOPs (XLA's count of the loss gradient, forward and backward), MFU against
   the device's dense bf16 peak (`measure.PEAK_FLOPS`) and against the matmul measured in 1, and
   memory (XLA's buffer assignment for the step; the device's peak so far);
3. `vdm`: the VDM CIFAR-10 recipe's train step (learned schedule, variance minimisation, AdamW)
   at batch 128 in the recipe's dtype ('auto': bfloat16 on an accelerator);
4. `sample_ancestral_1000`: a 1000-step ancestral chain of 128 images from the bfloat16 DDPM,
   one compiled `lax.scan`; `sample_dpm_solver_20`: DPM-Solver++(2M) in 20 steps;
5. `bpd`: the one-t bound of a batch of 512 images (`steps.eval_step`); `bpd_at_scale`: the
   library's `evaluate_bpd` over 10,000 images (as `benchmarks.eval_at_scale` on the CIFAR-10 test
   split, here random uint8 images: speed does not depend on the pixels or the weights).

A section that would start after `--budget_s` seconds is recorded as skipped, so that the whole
check stays under 8 minutes on one H100 or H200. `--dry` runs every section with U-Nets of one
level of 8 channels on 8×8×1 images, batch 16, 16 images and 4 timed steps, on whatever device JAX
has (the test suite runs it on one CPU device).
Writes benchmarks/results/gpu_check_<device>.json (or `--out`).
"""
from __future__ import annotations

import platform
import time

import numpy as np
from absl import app, flags

from benchmarks import measure
from benchmarks.common import matmul_peak, write_result

flags.DEFINE_boolean("dry", False, "Small shapes and few steps: checks the script, measures nothing of interest.")
flags.DEFINE_float("budget_s", 420.0, "Sections that would start later than this are skipped.")
flags.DEFINE_string("out", None, "JSON output (default benchmarks/results/gpu_check_<device>.json).")
FLAGS = flags.FLAGS


def plan(dry: bool) -> dict:
    """The check's sizes: the full ones, or `dry`'s small ones."""
    if dry:
        return {"batch": 16, "timed_steps": 4, "repeats": 2, "sample_images": 16, "eval_images": 32,
                "scale_images": 64, "matmul_n": 256}
    return {"batch": 128, "timed_steps": 20, "repeats": 3, "sample_images": 128, "eval_images": 512,
            "scale_images": 10_000, "matmul_n": 8192}


def configs(dry: bool, batch: int) -> dict:
    """The three training configs: DDPM in bfloat16 and float32, and VDM (its recipe's dtype)."""
    from experiments.configs import cifar10
    from vdm_jax.models import tiny, vdm_cifar10
    from vdm_jax.training import set_model

    def ddpm(dtype):
        c = cifar10.ddpm()
        if dry:
            set_model(c, tiny(image_size=8, in_channels=1, base_channels=8, channel_mult=(1,), num_groups=4,
                              embedding_dim=16, attn_resolutions=(), mid_attention=False))
        c.model.dtype = dtype
        return c

    vdm = cifar10.vdm()
    if dry:
        set_model(vdm, vdm_cifar10(image_size=8, in_channels=1, base_channels=8, num_res_blocks=1, num_groups=4,
                                   embedding_dim=16, mid_attention=False))
        vdm.diffusion.schedule_hidden = 16
    out = {"ddpm_bfloat16": ddpm("bfloat16"), "ddpm_float32": ddpm("float32"), "vdm": vdm}
    for c in out.values():
        c.training.batch_size = batch
    return out


def train_section(config, mesh, p: dict, peaks: dict) -> tuple[dict, object, object]:
    """One config's train step: (its record, the state after, the key)."""
    import jax

    from vdm_jax.models import count_params

    model_config, state, data, key = measure.setup(config, mesh)
    state, r = measure.train(state, data, key, mesh, steps=p["timed_steps"], repeats=p["repeats"])
    batch = config.training.batch_size
    record = {"params": count_params(model_config), "dtype": model_config.dtype, "batch": batch,
              "compile_s": r["compile_s"], "step_s": r["step_s"], "repeats_s": r["repeats_s"],
              "images_per_s": batch / r["step_s"], "memory": r["memory"], "device_peak_memory_bytes": measure.peak_memory()}
    if r["flops_per_step"] is not None:
        achieved = r["flops_per_step"] / r["step_s"] / mesh.devices.size  # per device
        spec = measure.spec_peak(jax.devices()[0].device_kind)
        record.update(flops_per_image=r["flops_per_step"] / batch, flops_per_s_per_device=achieved,
                      mfu=achieved / spec if spec else None,
                      share_of_measured_matmul=achieved / peaks[model_config.dtype])
    return record, state, key


def run_check(dry: bool, budget_s: float) -> dict:
    import jax

    from vdm_jax.data import ArraySource, FirstExamples
    from vdm_jax.training import evaluate_bpd, parallel

    start = time.perf_counter()
    p = plan(dry)
    mesh = parallel.make_mesh()
    device = jax.devices()[0]
    record = {"benchmark": "gpu_check", "dry": dry, "plan": p,
              "device": f"{jax.device_count()} × {device.device_kind} ({jax.default_backend()})",
              "device_peak_flops": measure.spec_peak(device.device_kind),
              "versions": {"python": platform.python_version(), "jax": jax.__version__}, "sections": {}}
    sections = record["sections"]

    def section(name, fn):
        elapsed = time.perf_counter() - start
        if elapsed > budget_s:
            sections[name] = {"skipped": f"over the {budget_s:.0f} s budget at {elapsed:.0f} s"}
            print(f"{name}: skipped ({sections[name]['skipped']})", flush=True)
            return None
        began = time.perf_counter()
        out = fn()
        result = out[0] if isinstance(out, tuple) else out
        result["section_s"] = time.perf_counter() - began
        sections[name] = result
        print(f"{name}: " + ", ".join(f"{k}={_short(v)}" for k, v in result.items()
                                      if not isinstance(v, (dict, list))), flush=True)
        return out

    n = p["matmul_n"] if jax.default_backend() != "cpu" or dry else 4096
    peaks = {}

    def matmuls():
        for dtype in ("bfloat16", "float32"):
            peaks[dtype] = matmul_peak(n, dtype)
        return {"n": n, "bfloat16_flops_per_s": peaks["bfloat16"], "float32_flops_per_s": peaks["float32"]}

    section("matmul", matmuls)
    train_configs = configs(dry, p["batch"])
    ddpm = section("ddpm_bfloat16", lambda: train_section(train_configs["ddpm_bfloat16"], mesh, p, peaks))
    section("ddpm_float32", lambda: train_section(train_configs["ddpm_float32"], mesh, p, peaks))
    section("vdm", lambda: train_section(train_configs["vdm"], mesh, p, peaks)[0])
    if ddpm is None:
        return record
    _, state, key = ddpm
    for name, sampler, steps in (("sample_ancestral_1000", "ancestral", 0), ("sample_dpm_solver_20", "dpm_solver", 20)):
        section(name, lambda: measure.sample(state, key, mesh, num=p["sample_images"], sampler=sampler,
                                             sample_steps=steps, repeats=max(1, p["repeats"] - 1)))
    config = train_configs["ddpm_bfloat16"]
    shape = (config.model.image_size, config.model.image_size, config.model.in_channels)
    images = np.random.default_rng(0).integers(0, 256, (p["eval_images"], *shape), dtype=np.uint8)
    section("bpd", lambda: measure.evaluate(state, key, mesh, images=images, repeats=p["repeats"]))

    def at_scale():
        pixels = np.random.default_rng(1).integers(0, 256, (p["scale_images"], *shape), dtype=np.uint8)
        source = ArraySource(pixels, np.zeros(len(pixels), np.int64))
        batch = min(p["eval_images"], len(source))
        evaluate_bpd(state, FirstExamples(source, batch), mesh=mesh, batch_size=batch, key=key)  # compiles
        began = time.perf_counter()
        result = evaluate_bpd(state, source, mesh=mesh, batch_size=batch, key=key)
        seconds = time.perf_counter() - began
        return {"images": len(source), "batch": batch, "seconds": seconds, "images_per_s": len(source) / seconds,
                "examples_evaluated": int(result["examples"])}

    section("bpd_at_scale", at_scale)
    record["total_s"] = time.perf_counter() - start
    return record


def _short(value):
    return f"{value:.4g}" if isinstance(value, float) else value


def main(argv):
    del argv
    from vdm_jax import set_cpu_xla_flags

    set_cpu_xla_flags()  # (only XLA:CPU reads them: a dry run on a CPU compiles as the entry points do)
    import jax

    record = run_check(FLAGS.dry, FLAGS.budget_s)
    kind = jax.devices()[0].device_kind.replace(" ", "_")
    write_result(record, FLAGS.out, f"gpu_check_{kind}{'_dry' if FLAGS.dry else ''}.json")


if __name__ == "__main__":
    app.run(main)
