"""`gpu_check`: DDPM and VDM training, sampling and bits/dim speed on one accelerator, in one JSON."""
import time

import numpy as np

from benchmarks import common
from benchmarks.common import command, flag, matmul_peak, out_flag, write_result


def plan(dry: bool) -> dict:
    """The check's sizes: the full ones, or `dry`'s small ones."""
    sizes = (16, 4, 2, 16, 32, 64, 256) if dry else (128, 20, 3, 128, 512, 10_000, 8192)
    return dict(zip(("batch", "timed_steps", "repeats", "sample_images", "eval_images", "scale_images", "matmul_n"),
                    sizes))


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
        c.model.dtype, c.training.batch_size = dtype, batch
        return c

    vdm = cifar10.vdm_nnet()  # the MLP schedule with variance minimisation, in the backend's dtype: what the
    vdm.model.dtype = "auto"  # earlier results measured as `vdm` (the official `vdm` is float32 throughout)
    if dry:
        set_model(vdm, vdm_cifar10(image_size=8, in_channels=1, base_channels=8, num_res_blocks=1, num_groups=4,
                                   embedding_dim=16, mid_attention=False))
        vdm.diffusion.schedule_hidden = 16
    vdm.training.batch_size = batch
    return {"ddpm_bfloat16": ddpm("bfloat16"), "ddpm_float32": ddpm("float32"), "vdm": vdm}


def train_section(config, mesh, p: dict, peaks: dict, without_update: bool = False) -> tuple[dict, object, object]:
    """One config's train step, and `without_update` the step without the update (the update's share
    of the step, `benchmarks update_cost`): (its record, the state after, the key)."""
    import jax

    from vdm_jax.models import count_params

    model_config, state, data, key = common.setup(config, mesh)
    state, r = common.train(state, data, key, mesh, steps=p["timed_steps"], repeats=p["repeats"],
                            without_update=without_update)
    batch = config.training.batch_size
    record = {"params": count_params(model_config), "dtype": model_config.dtype, "batch": batch,
              "compile_s": r["compile_s"], "step_s": r["step_s"], "repeats_s": r["repeats_s"],
              "images_per_s": batch / r["step_s"], "memory": r["memory"], "copies": r["copies"],
              "device_peak_memory_bytes": common.peak_memory(),
              **{k: r[k] for k in ("no_update_s", "no_update_repeats_s", "update_share") if k in r}}
    if r["flops_per_step"] is not None:
        achieved = r["flops_per_step"] / r["step_s"] / mesh.devices.size  # per device
        spec = common.spec_peak(jax.devices()[0].device_kind)
        record.update(flops_per_image=r["flops_per_step"] / batch, flops_per_s_per_device=achieved,
                      mfu=achieved / spec if spec else None,
                      share_of_measured_matmul=achieved / peaks[model_config.dtype])
    return record, state, key


def run_check(dry: bool, budget_s: float) -> dict:
    import jax

    from vdm_jax.data import ArraySource
    from vdm_jax.training import parallel

    start = time.perf_counter()
    p = plan(dry)
    mesh = parallel.make_mesh()
    device = jax.devices()[0]
    record = {"benchmark": "gpu_check", "dry": dry, "plan": p,
              "device": common.device(), "device_peak_flops": common.spec_peak(device.device_kind), "sections": {}}
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
        print(f"{name}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in result.items() if not isinstance(v, (dict, list))), flush=True)
        return out

    n = p["matmul_n"] if jax.default_backend() != "cpu" or dry else 4096
    peaks = {}

    def matmuls():
        for dtype in ("bfloat16", "float32"):
            peaks[dtype] = matmul_peak(n, dtype)
        return {"n": n, "bfloat16_flops_per_s": peaks["bfloat16"], "float32_flops_per_s": peaks["float32"]}

    section("matmul", matmuls)
    train_configs = configs(dry, p["batch"])
    ddpm = section("ddpm_bfloat16", lambda: train_section(train_configs["ddpm_bfloat16"], mesh, p, peaks, True))
    section("ddpm_float32", lambda: train_section(train_configs["ddpm_float32"], mesh, p, peaks, True))
    section("vdm", lambda: train_section(train_configs["vdm"], mesh, p, peaks)[0])
    if ddpm is None:
        return record
    _, state, key = ddpm
    for name, sampler, steps in (("sample_ancestral_1000", "ancestral", 0), ("sample_dpm_solver_20", "dpm_solver", 20)):
        section(name, lambda: common.sample(state, key, mesh, num=p["sample_images"], sampler=sampler,
                                             sample_steps=steps, repeats=max(1, p["repeats"] - 1)))
    config = train_configs["ddpm_bfloat16"]
    shape = (config.model.image_size, config.model.image_size, config.model.in_channels)
    images = np.random.default_rng(0).integers(0, 256, (p["eval_images"], *shape), dtype=np.uint8)
    section("bpd", lambda: common.evaluate(state, key, mesh, images=images, repeats=p["repeats"]))

    pixels = np.random.default_rng(1).integers(0, 256, (p["scale_images"], *shape), dtype=np.uint8)
    source = ArraySource(pixels, np.zeros(len(pixels), np.int64))
    section("bpd_at_scale", lambda: common.bpd_at_scale(state, source, mesh, batch=min(p["eval_images"], len(source)),
                                                        key=key))
    record["total_s"] = time.perf_counter() - start
    return record


@command(flag("--dry", action="store_true", help="Small shapes, few steps: checks the program."),
         flag("--budget_s", type=float, default=420.0, help="Sections that would start later than this are skipped."),
         out_flag("gpu_check_<device>[_dry].json"))
def gpu_check(args):
    """The GPU check: DDPM and VDM train steps, sampling chains and bits/dim on all local devices, in one JSON.

    bash benchmarks/gpu_check.sh                # on the GPU machine (installs the wheels carried in .whl/)
    python -m benchmarks gpu_check [--out=PATH] # the same, wheels already installed
    python -m benchmarks gpu_check --dry        # the same program at small shapes, on any device (the tests)

Sections: matmul (8192² in bf16 and fp32); ddpm_bfloat16, ddpm_float32, vdm (the CIFAR-10
recipes' train steps at batch 128: images/s, FLOPs, MFU, memory, copies; the DDPM steps also
without the update, alternated: the update's share of the step); sample_ancestral_1000,
sample_dpm_solver_20 (128 images); bpd (512 images), bpd_at_scale (10,000). A section that would
start after --budget_s is skipped. --dry: 8-channel U-Nets on 8×8×1, batch 16.
"""
    import jax

    record = run_check(args.dry, args.budget_s)
    kind = jax.devices()[0].device_kind.replace(" ", "_")
    write_result(record, args.out, f"gpu_check_{kind}{'_dry' if args.dry else ''}.json")
