"""`run`: the suite, training, sampling and evaluation speed, optionally against PyTorch."""
import contextlib
import statistics

import numpy as np

from benchmarks import common
from benchmarks.common import command, flag, matmul_peak, model_flag, out_flag, write_result
from benchmarks.torch_reference import Peer


@command(
    model_flag("tiny32", ("tiny8", "tiny32", "ddpm_cifar10")),
    flag("--batch", type=int, default=32, help="Global training batch."),
    flag("--dtype", default="float32", choices=["float32", "bfloat16"], help="Activation dtype."),
    flag("--remat", action="store_true", help="Rematerialise the U-Net's blocks in the backward pass (model.remat)."),
    flag("--train_steps", type=int, default=10, help="Timed training steps per repeat."),
    flag("--repeats", type=int, default=3, help="Timed repeats (the median is reported)."),
    flag("--sample_batch", type=int, default=16, help="Images per sampling chain."),
    flag("--sample_steps", type=int, default=1000, choices=[1000], help="Steps of the chain (T of the DDPM config)."),
    flag("--eval_batch", type=int, default=64, help="Images per evaluation batch."),
    flag("--torch", action="store_true", help="Also run the PyTorch (diffusers) reference, in its own process."),
    flag("--xla_options", default="vdm_jax", choices=["vdm_jax", "none"],
         help="vdm_jax: XLA:CPU flags as the entry points set them; none: XLA's defaults."),
    flag("--peak_tflops", type=float, default=None, help="Peak FLOP/s of one device in TFLOP/s, for devices the "
         "table lacks (a CPU: cores × GHz × FLOPs per cycle per core, e.g. 2 × 2.45 × 32 / 1000)."),
    out_flag("run_<backend>_<model>_<dtype>[_remat].json"))
def run(args):
    """The suite: train step, sampling chain and bits/dim speed on all local devices (data parallel).

Train: compile time, steps/s (median of --repeats runs of --train_steps), model FLOPs (XLA's count
of the loss gradient), MFU against `common.PEAK_FLOPS` or --peak_tflops; sample: one ancestral
chain, one compiled scan; eval: the one-t bound, images/s. --torch: diffusers' `UNet2DModel` of
the same size in its own process (`torch_reference.Peer`), its timed repeats alternating with
ours; ratios torch time / vdm_jax time, and each side's FLOP/s over the faster 4096² matmul.
"""
    import jax

    from vdm_jax.models import count_params

    # embedding_dim = base_channels, as in diffusers (its time MLP is 4× the first width).
    base = common.unet(args.model)
    model_config = base.replace(embedding_dim=base.base_channels, dtype=args.dtype, dropout=0.0, remat=args.remat)
    record = {"benchmark": "run", **{k: v for k, v in vars(args).items() if k not in ("command", "out", "torch")},
              "model_config": model_config.to_dict(), "versions": {}}
    with contextlib.ExitStack() as stack:
        # The peer is built and warmed up before JAX compiles anything: the two processes never compute at once.
        peer = stack.enter_context(Peer(model_config.to_dict(), params=count_params(model_config), batch=args.batch,
                                        sample_batch=args.sample_batch, sample_steps=args.sample_steps,
                                        train_steps=args.train_steps, dtype=args.dtype)) if args.torch else None
        record["vdm_jax"], theirs = _bench(args, model_config, peer)
    if theirs is not None:
        record["torch"] = theirs
        record["versions"].update(theirs.pop("versions"))
        ours = record["vdm_jax"]
        record["torch_over_vdm_jax"] = {"train_step": theirs["train_step_s"] / ours["train_step_s"],
                                        "sample_chain": theirs["sample_chain_s"] / ours["sample_chain_s"]}
    record["efficiency"] = efficiencies(record)
    _print(record, common.device())
    suffix = "_remat" if args.remat else ""
    write_result(record, args.out, f"run_{jax.default_backend()}_{args.model}_{args.dtype}{suffix}.json")


def _bench(args, model_config, peer=None) -> tuple[dict, dict | None]:
    """vdm_jax's measurements, and the peer's (`torch_reference.Peer`), its timed runs alternating with ours."""
    import jax

    from vdm_jax.models import count_params
    from vdm_jax.training import default_config, parallel

    c = default_config()
    c.model.update(model_config.to_dict())
    c.optim.warmup_steps = 0
    c.training.batch_size = batch = args.batch
    mesh = parallel.make_mesh()
    model_config, state, data, key = common.setup(c, mesh)
    theirs = None if peer is None else {**peer.info}
    result = {"params": count_params(model_config), "devices": mesh.devices.size}

    def turn(command, field, into):  # the peer's timed run, between two of ours
        return None if peer is None else (lambda: theirs.setdefault(into, []).append(peer.call(command)[field]))

    state, train = common.train(state, data, key, mesh, steps=args.train_steps, repeats=args.repeats,
                                between=turn("train", "step_s", "train_repeats_s"))
    step_s = train["step_s"]
    result.update(train_compile_s=train["compile_s"], train_step_s=step_s, train_repeats_s=train["repeats_s"],
                  train_steps_per_s=1 / step_s, train_images_per_s=batch / step_s,
                  train_temp_bytes=(train["memory"] or {}).get("temp_bytes"))
    if train["flops_per_step"] is not None:
        total = train["flops_per_step"]
        peak = args.peak_tflops * 1e12 if args.peak_tflops else common.spec_peak(jax.devices()[0].device_kind)
        result.update(train_flops_per_image=total / batch, train_flops_per_s=total / step_s, peak_flops_per_device=peak,
                      mfu=total / step_s / (peak * mesh.devices.size) if peak else "unknown (no peak for this device)")

    chain = common.sample(state, key, mesh, num=args.sample_batch, sampler="ancestral", sample_steps=0,
                          repeats=max(1, args.repeats - 1), between=turn("sample", "chain_s", "sample_repeats_s"))
    result.update(sample_compile_s=chain["compile_s"], sample_chain_s=chain["chain_s"],
                  sample_ms_per_step=1e3 * chain["chain_s"] / args.sample_steps)

    images = np.resize(np.asarray(jax.device_get(data["image"])), (args.eval_batch, *data["image"].shape[1:]))
    evaluation = common.evaluate(state, key, mesh, images=images, repeats=args.repeats)
    result.update(eval_compile_s=evaluation["compile_s"], eval_images_per_s=evaluation["images_per_s"],
                  peak_memory_bytes=common.peak_memory(), matmul_flops_per_s=matmul_peak(dtype=args.dtype))
    if peer is not None:
        step_s = statistics.median(theirs["train_repeats_s"])
        theirs.update(train_step_s=step_s, train_steps_per_s=1 / step_s, train_images_per_s=batch / step_s,
                      sample_chain_s=statistics.median(theirs["sample_repeats_s"]),
                      matmul_flops_per_s=peer.call("matmul")["flops_per_s"])
        theirs["sample_ms_per_step"] = 1e3 * theirs["sample_chain_s"] / args.sample_steps
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


def _print(record: dict, device: str) -> None:
    ours, theirs = record["vdm_jax"], record.get("torch", {})
    print(f"{record['model']} ({ours['params']:,} params, {record['dtype']}) on {device}, batch {record['batch']}")
    print(f"{'':24}{'vdm_jax':>14}" + (f"{'torch':>14}" if theirs else ""))
    for label, key in (("train step s", "train_step_s"), ("train images/s", "train_images_per_s"),
                       ("train compile s", "train_compile_s"), ("sample chain s", "sample_chain_s"),
                       ("sample compile s", "sample_compile_s"), ("eval images/s", "eval_images_per_s")):
        print(f"{label:24}" + "".join(f"{side[key]:>14.4g}" for side in (ours, theirs) if side.get(key) is not None))
    if "train_flops_per_image" in ours:
        mfu = ours["mfu"]
        print(f"train: {ours['train_flops_per_image'] / 1e9:.3g} GFLOP per image, {ours['train_flops_per_s'] / 1e12:.3g} "
              f"TFLOP/s, MFU " + (f"{mfu:.1%}" if isinstance(mfu, float) else mfu))
    for label, key in (("train step temporary memory, per device", "train_temp_bytes"),
                       ("peak device memory", "peak_memory_bytes")):
        if ours.get(key):
            print(f"{label}: {ours[key] / 2**30:.2f} GiB")
    e = record["efficiency"]
    if "vdm_jax" in e:
        print(f"train FLOP/s over the measured {e['measured_peak_flops_per_s'] / 1e12:.3g} TFLOP/s matmul peak "
              f"({e['peak_from']}): vdm_jax {e['vdm_jax']:.0%}" + (f", torch {e['torch']:.0%}" if "torch" in e else ""))
    if "torch_over_vdm_jax" in record:
        r = record["torch_over_vdm_jax"]
        print(f"torch time / vdm_jax time: train step {r['train_step']:.2f}×, sampling chain {r['sample_chain']:.2f}×")
