"""What the JAX benchmarks (`run`, `gpu_check`) measure with: compile times, XLA's FLOP and memory
counts, device peaks, and train, sampling and evaluation timings of a config as the loop runs it."""
from __future__ import annotations

import statistics
import time

import numpy as np

from benchmarks.common import median_time

# Dense peak FLOP/s per device (bf16 matmul; float32 runs are measured against the same peak).
PEAK_FLOPS = {
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "V100": 125e12, "A10G": 125e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
    "TPU v6e": 918e12, "TPU v3": 123e12, "TPU v2": 45e12,
}


def unet(name: str):
    """The `UNetConfig` the CPU step benchmarks (`step_time`, `update_cost`) call `name`: tiny8 is the
    quickstart's (8×8×1), tiny32 the `small` config's, vdm32 VDM's no-downsampling layout at 32 channels."""
    from vdm_jax import models

    return {"tiny8": lambda: models.tiny(image_size=8, in_channels=1, dropout=0.0), "tiny32": models.tiny,
            "ddpm_cifar10": models.ddpm_cifar10, "vdm_cifar10": models.vdm_cifar10,
            "vdm32": lambda: models.vdm_cifar10(base_channels=32, num_groups=8)}[name]()


UNETS = ("tiny8", "tiny32", "ddpm_cifar10", "vdm_cifar10", "vdm32")


def spec_peak(device_kind: str) -> float | None:
    """The device's dense bf16 peak FLOP/s from `PEAK_FLOPS`, None for devices it lacks (e.g. CPUs)."""
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in device_kind.lower():
            return flops
    return None


def timed_compile(jitted, *args):
    """(the compiled program, seconds to lower and compile it)."""
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


def flops(program) -> float | None:
    """XLA's FLOP count of one device's program (lowered or compiled)."""
    analysis = program.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older JAX: one dict per program
        analysis = analysis[0] if analysis else None
    return float(analysis["flops"]) if analysis and "flops" in analysis else None


def program_memory(compiled) -> dict[str, int] | None:
    """XLA's buffer assignment for one device: arguments, outputs, temporaries, and the total live
    at once (arguments + outputs + temporaries − outputs aliased to donated arguments)."""
    try:
        m = compiled.memory_analysis()
        out = {"argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
               "temp_bytes": int(m.temp_size_in_bytes), "alias_bytes": int(m.alias_size_in_bytes)}
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None
    out["total_bytes"] = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
    return out


def peak_memory() -> int | None:
    """The largest `peak_bytes_in_use` of the local devices so far (GPU/TPU; None on CPU)."""
    import jax

    stats = [d.memory_stats() for d in jax.local_devices()]
    peaks = [s.get("peak_bytes_in_use") for s in stats if s]
    return max(peaks) if peaks and all(p is not None for p in peaks) else None


def setup(config, mesh, *, key=0):
    """(model config, replicated train state, a sharded batch of random uint8 images, key) for a config."""
    import jax

    from vdm_jax.training import create_train_state, parallel, validate_config

    model_config = validate_config(config)
    batch = config.training.batch_size
    parallel.check_batch_size(batch, mesh, "batch")
    state = parallel.replicate(create_train_state(config, model_config, key=jax.random.key(key)), mesh)
    shape = (model_config.image_size, model_config.image_size, model_config.in_channels)
    images = np.random.default_rng(0).integers(0, 256, (batch, *shape), dtype=np.uint8)
    return model_config, state, parallel.global_batch({"image": images}, mesh), jax.random.key(key + 1)


def train(state, data, key, mesh, *, steps: int, repeats: int, between=None) -> tuple[object, dict]:
    """The loop's compiled train step (state replicated and donated, batch sharded), timed.

    Returns (the state after, {'compile_s', 'step_s' (median of `repeats` runs of `steps` steps,
    one host sync each), 'repeats_s', 'flops_per_step' (XLA's count of the lowered loss gradient
    for all devices: model FLOPs, forward and backward, not the optimiser's elementwise update),
    'memory' (`program_memory` of the step)}). `between()` runs after each timed repeat (a
    peer's turn, while this process waits).
    """
    import jax

    from vdm_jax.training import parallel, steps as steps_lib
    from vdm_jax.training.loop import compiled_steps

    rep = parallel.replicated(mesh)
    step, _ = compiled_steps(mesh)
    compiled, compile_s = timed_compile(step, state, data, key)
    # Model FLOPs from the loss gradient as lowered, before XLA's optimisations (which add no
    # model work; the compiled count is 0.7% higher for the DDPM U-Net): counting needs no compile.
    grad_flops = flops(jax.jit(steps_lib._grads, in_shardings=(rep, parallel.batch_sharding(mesh), rep))
                       .lower(state, data, key))
    for _ in range(2):  # warm-up
        state, metrics = compiled(state, data, key)
    jax.block_until_ready(metrics)

    def run():
        nonlocal state
        for _ in range(steps):
            state, out = compiled(state, data, key)
        jax.block_until_ready(out)

    times = []
    for _ in range(repeats):
        times.append(median_time(run, 1) / steps)
        if between is not None:
            between()
    return state, {"compile_s": compile_s, "step_s": statistics.median(times), "repeats_s": times,
                   "flops_per_step": None if grad_flops is None else grad_flops * mesh.devices.size,
                   "memory": program_memory(compiled)}


def sample(state, key, mesh, *, num: int, sampler: str, sample_steps: int, repeats: int, between=None) -> dict:
    """One sampling chain of `num` images, the whole chain one compiled call: {'compile_s', 'chain_s'
    (median of `repeats`), 'repeats_s', 'images_per_s', 'memory'}."""
    import jax

    from vdm_jax.training import parallel, steps as steps_lib

    rep = parallel.replicated(mesh)
    fn = jax.jit(lambda s, k: steps_lib.sample_step(s, key=k, num=num, sampler=sampler, sample_steps=sample_steps),
                 in_shardings=(rep, rep), out_shardings=rep)
    compiled, compile_s = timed_compile(fn, state, key)
    jax.block_until_ready(compiled(state, key))
    times = []
    for _ in range(repeats):
        times.append(median_time(lambda: jax.block_until_ready(compiled(state, key)), 1))
        if between is not None:
            between()
    chain_s = statistics.median(times)
    return {"sampler": sampler, "steps": sample_steps, "images": num, "compile_s": compile_s, "chain_s": chain_s,
            "repeats_s": times, "images_per_s": num / chain_s, "memory": program_memory(compiled)}


def evaluate(state, key, mesh, *, images: np.ndarray, repeats: int) -> dict:
    """The one-t bits/dim bound of a batch of images (`steps.eval_step`): {'compile_s', 'images_per_s', 'memory'}."""
    import jax

    from vdm_jax.training import parallel, steps as steps_lib

    rep = parallel.replicated(mesh)
    data = parallel.global_batch({"image": images}, mesh)
    fn = jax.jit(lambda s, b, k: steps_lib.eval_step(s, b, key=k), in_shardings=(rep, parallel.batch_sharding(mesh), rep),
                 out_shardings=rep)
    compiled, compile_s = timed_compile(fn, state, data, key)
    jax.block_until_ready(compiled(state, data, key))
    seconds = median_time(lambda: jax.block_until_ready(compiled(state, data, key)), repeats)
    return {"images": len(images), "compile_s": compile_s, "batch_s": seconds, "images_per_s": len(images) / seconds,
            "memory": program_memory(compiled)}
