"""What the benchmarks share: the subcommand table, the model registry, timing, XLA's counts, the
loop's compiled programs timed, and the JSON writer (machine, device, versions)."""
import bisect
import json
import math
import os
import platform
import statistics
import time

import numpy as np

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# --- Subcommands: `@command(flag(...), ...)` registers a function as `python -m benchmarks <its name>`.

COMMANDS = {}  # name -> (function, flags); the function's docstring is its help


def flag(*names, **kwargs):  # one argparse argument
    return names, kwargs


def out_flag(default: str):
    return flag("--out", default=None, help=f"JSON output (default benchmarks/results/{default}).")


def command(*flags):
    def register(fn):
        COMMANDS[fn.__name__] = (fn, flags)
        return fn
    return register


def csv(kind=str):  # a flag type: comma-separated values of `kind`
    return lambda text: [kind(v) for v in text.split(",") if v]


# --- The model registry: name -> (what it is, the `vdm_jax.models` factory and its arguments).

MODELS = {
    "tiny8": ("the quickstart's tiny U-Net on 8×8×1", "tiny", dict(image_size=8, in_channels=1, dropout=0.0)),
    "tiny32": ("the `small` CIFAR-10 config's tiny U-Net on 32×32×3", "tiny", {}),
    "ddpm_cifar10": ("DDPM's CIFAR-10 U-Net (35.7M)", "ddpm_cifar10", {}),
    "vdm_cifar10": ("VDM's CIFAR-10 network (30.6M), trained as VDM", "vdm_cifar10", {}),
    "vdm32": ("VDM's layout at 32 channels, trained as VDM", "vdm_cifar10", dict(base_channels=32, num_groups=8)),
}


def model_flag(default: str, names=tuple(MODELS)):
    return flag("--model", default=default, choices=list(names),
                help="; ".join(f"{n}: {MODELS[n][0]}" for n in names) + ".")


def unet(name: str, **changes):
    """The `UNetConfig` of the registry's `name`, with `changes`."""
    from vdm_jax import models

    _, factory, arguments = MODELS[name]
    return getattr(models, factory)(**arguments).replace(**changes)


def train_config(name: str, *, batch: int, dtype: str = "float32", **changes):
    """The training config of a registry model: DDPM (the default config) for the DDPM nets, VDM's
    continuous-time learned schedule for the VDM nets; no warm-up."""
    from vdm_jax.training import default_config, set_model

    c = default_config()
    set_model(c, unet(name, **changes), dtype=dtype)
    if name.startswith("vdm"):
        c.diffusion.family, c.diffusion.timesteps, c.diffusion.schedule = "vdm", 0, "learned"
    c.training.batch_size = batch
    c.optim.warmup_steps = 0
    return c


# --- Timing and peaks.

def median_time(fn, repeats: int) -> float:
    """The median wall time of `repeats` calls of `fn` (which must wait for its own results)."""
    return statistics.median(repeat_times(fn, repeats))


def repeat_times(fn, repeats: int, between=None) -> list[float]:
    """Wall times of `repeats` calls of `fn`; `between()` runs after each (a peer's turn, untimed)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        if between is not None:
            between()
    return times


def matmul_peak(n: int = 4096, dtype: str = "float32", repeats: int = 5) -> float:
    """FLOP/s of an n×n matmul in `dtype` on JAX's default device (the best of `repeats`): the
    practical peak the benchmarks state their efficiency against."""
    import jax
    import jax.numpy as jnp

    a, b = (jax.random.normal(jax.random.key(i), (n, n), dtype) for i in range(2))
    f = jax.jit(jnp.matmul)
    jax.block_until_ready(f(a, b))
    return 2 * n**3 / min(repeat_times(lambda: jax.block_until_ready(f(a, b)), repeats))


# Dense peak FLOP/s per device (bf16 matmul; float32 runs are measured against the same peak).
PEAK_FLOPS = {
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "V100": 125e12, "A10G": 125e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
    "TPU v6e": 918e12, "TPU v3": 123e12, "TPU v2": 45e12,
}


def spec_peak(device_kind: str) -> float | None:
    """The device's dense bf16 peak FLOP/s from `PEAK_FLOPS`, None for devices it lacks (e.g. CPUs)."""
    return next((f for name, f in PEAK_FLOPS.items() if name.lower() in device_kind.lower()), None)


# --- XLA's counts.

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

    peaks = [s.get("peak_bytes_in_use") for s in (d.memory_stats() for d in jax.local_devices()) if s]
    return max(peaks) if peaks and all(p is not None for p in peaks) else None


# --- The loop's programs, timed: train step, sampling chain, bits/dim.

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


def train(state, data, key, mesh, *, steps: int, repeats: int, between=None, without_update: bool = False,
          profile: str | None = None) -> tuple[object, dict]:
    """The loop's compiled train step (state replicated and donated, batch sharded), timed: (the state
    after, {'compile_s', 'step_s' (median of `repeats` runs of `steps` steps, one sync each), 'repeats_s',
    'flops_per_step' (XLA's count of the loss gradient, all devices: model FLOPs), 'memory', 'copies'
    (`copies` of the compiled step)}).

    without_update: also the same step without the update (the loss gradient alone, compiled alike),
    each repeat running both in turn: 'no_update_s', 'no_update_repeats_s', 'update_share_rounds', each
    repeat's (step − step without the update) / step, 'update_share', their median, and 'no_update_program', that
    compiled program, (state, batch, key) -> (state, (loss, terms, gradients)) (not for the JSON).
    profile: a directory for a profile of `repeats` more calls of each program, in turn: 'profile' is
    `thunk_times` of it.
    """
    import jax

    from vdm_jax.training import parallel, steps as steps_lib
    from vdm_jax.training.loop import compiled_steps

    rep, data_sharding = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    step, _ = compiled_steps(mesh)
    compiled, compile_s = timed_compile(step, state, data, key)
    programs = {"step": compiled}
    if without_update:
        def gradient(state, batch, key):  # the train step without the fault check and the update
            return state, steps_lib._grads(state, batch, jax.random.fold_in(key, state.step))

        programs["no_update"] = jax.jit(gradient, in_shardings=(rep, data_sharding, rep), out_shardings=(rep, rep),
                                        donate_argnums=0).lower(state, data, key).compile()
    grad_flops = flops(jax.jit(steps_lib._grads, in_shardings=(rep, data_sharding, rep)).lower(state, data, key))

    def run(program, n):
        nonlocal state
        for _ in range(n):
            state, out = program(state, data, key)
        jax.block_until_ready(out)

    for program in programs.values():
        run(program, 2)  # warm-up
    times = {name: [] for name in programs}
    for _ in range(repeats):
        for name, program in programs.items():
            start = time.perf_counter()
            run(program, steps)
            times[name].append((time.perf_counter() - start) / steps)
        if between is not None:
            between()
    if profile:
        with jax.profiler.trace(profile, create_perfetto_trace=True):
            for _ in range(repeats):
                for program in programs.values():
                    run(program, 1)
    r = {"compile_s": compile_s, "step_s": statistics.median(times["step"]), "repeats_s": times["step"],
         "flops_per_step": None if grad_flops is None else grad_flops * mesh.devices.size,
         "memory": program_memory(compiled), "copies": copies(compiled)}
    if without_update:
        shares = [(a - b) / a for a, b in zip(times["step"], times["no_update"])]
        r.update(no_update_s=statistics.median(times["no_update"]), no_update_repeats_s=times["no_update"],
                 update_share_rounds=shares, update_share=statistics.median(shares),
                 no_update_program=programs["no_update"])
    if profile:
        r["profile"] = thunk_times(profile, programs)
    return state, r


def thunk_times(directory: str, programs: dict) -> dict[str, dict[str, float]]:
    """{program: {kind of instruction: seconds a call}} from the newest profile in `directory` of calls
    of the compiled `programs` made in turn, one at a time: each thunk (an instruction of the
    program's text, e.g. 'multiply_add_fusion.12') is timed by its median over the calls, then summed
    by kind (its name without the number). Thunks that run at once on different threads both count.
    XLA:CPU's convolutions run asynchronously on its thread pool and their events time only their
    dispatch, so the sum falls short of the wall time by about the convolutions' share."""
    import glob
    import gzip
    import re

    path = max(glob.glob(os.path.join(directory, "**", "perfetto_trace.json.gz"), recursive=True), key=os.path.getmtime)
    with gzip.open(path) as f:
        events = json.load(f)
    events = [e for e in (events["traceEvents"] if isinstance(events, dict) else events) if e.get("ph") == "X"]
    texts = {name: program.as_text() for name, program in programs.items()}
    names = {name: set(re.findall(r"%([\w.\-]+) = ", text))  # (not the loops and branches: their thunks count)
             - set(re.findall(r"%([\w.\-]+) = [^\n]* (?:conditional|while|call)\(", text)) for name, text in texts.items()}
    modules = {name: re.match(r"HloModule jit_(\w+)", text).group(1) for name, text in texts.items()}
    jitted = {f"PjitFunction(jit({module}))": name for name, module in modules.items()}  # a call's event
    calls = sorted((e["ts"], jitted[e["name"]]) for e in events if e["name"] in jitted)
    durations = {name: {} for name in programs}
    for e in events:
        at = bisect.bisect_right(calls, (e["ts"], "\uffff")) - 1  # the last call started before the thunk
        if at >= 0 and e["name"] in names[calls[at][1]]:
            durations[calls[at][1]].setdefault(e["name"], []).append(e["dur"] * 1e-6)
    out = {}
    for program, thunks in durations.items():
        kinds = {}
        for thunk, seconds in thunks.items():
            kind = thunk.rsplit(".", 1)[0]
            kinds[kind] = kinds.get(kind, 0.0) + statistics.median(seconds)
        out[program] = dict(sorted(kinds.items(), key=lambda kv: -kv[1]))
    return out


def copies(compiled) -> dict[str, int]:
    """The `copy` instructions of a compiled program (XLA's text; fused copies included): how many and
    their elements, and 'whole_argument': those that duplicate an argument unchanged (same shape and
    layout), as XLA does for a donated buffer it cannot update in place."""
    import re

    text = compiled.as_text()
    entry = text[text.index("\nENTRY"):]
    params = dict(re.findall(r"%(\S+) = (\w+\[[\d,]*\]\{[^}]*\}) parameter\(", entry[:entry.index("\n}")]))
    found = [(kind, dims, a or b) for kind, dims, a, b in re.findall(
        r"= (\w+\[([\d,]*)\]\{[^}]*\}) (?:copy\(%([^)\s]+)\)|fusion\(%([^),\s]+)\), kind=kLoop, calls=%wrapped_copy)", text)]
    return {"copies": len(found), "copy_elements": sum(math.prod(int(d) for d in dims.split(",") if d)
                                                        for _, dims, _ in found),
            "whole_argument": sum(params.get(source) == kind for kind, _, source in found)}


def _timed_call(fn, args, shardings, repeats: int, between=None):
    """(compile seconds, wall times of `repeats` calls after a warm-up, XLA's memory) of `fn` jitted
    with `shardings` for `args` (its output replicated, as `shardings[0]`)."""
    import jax

    compiled, compile_s = timed_compile(jax.jit(fn, in_shardings=shardings, out_shardings=shardings[0]), *args)
    jax.block_until_ready(compiled(*args))
    times = repeat_times(lambda: jax.block_until_ready(compiled(*args)), repeats, between)
    return compile_s, times, program_memory(compiled)


def sample(state, key, mesh, *, num: int, sampler: str, sample_steps: int, repeats: int, between=None) -> dict:
    """One sampling chain of `num` images, the whole chain one compiled call, timed."""
    from vdm_jax.training import parallel, steps as steps_lib

    rep = parallel.replicated(mesh)
    compile_s, times, memory = _timed_call(
        lambda s, k: steps_lib.sample_step(s, key=k, num=num, sampler=sampler, sample_steps=sample_steps),
        (state, key), (rep, rep), repeats, between)
    chain_s = statistics.median(times)
    return {"sampler": sampler, "steps": sample_steps, "images": num, "compile_s": compile_s, "chain_s": chain_s,
            "repeats_s": times, "images_per_s": num / chain_s, "memory": memory}


def evaluate(state, key, mesh, *, images: np.ndarray, repeats: int) -> dict:
    """The one-t bits/dim bound of a batch of images (`steps.eval_step`), timed."""
    from vdm_jax.training import parallel, steps as steps_lib

    rep = parallel.replicated(mesh)
    compile_s, times, memory = _timed_call(lambda s, b, k: steps_lib.eval_step(s, b, key=k),
                                           (state, parallel.global_batch({"image": images}, mesh), key),
                                           (rep, parallel.batch_sharding(mesh), rep), repeats)
    seconds = statistics.median(times)
    return {"images": len(images), "compile_s": compile_s, "batch_s": seconds, "images_per_s": len(images) / seconds,
            "memory": memory}


def bpd_at_scale(state, source, mesh, *, batch: int, key) -> dict:
    """The library's `evaluate_bpd` over a whole source, after one batch that compiles it."""
    from vdm_jax.data import FirstExamples
    from vdm_jax.training import evaluate_bpd

    start = time.perf_counter()
    evaluate_bpd(state, FirstExamples(source, batch), mesh=mesh, batch_size=batch, key=key)
    first = time.perf_counter() - start
    start = time.perf_counter()
    result = evaluate_bpd(state, source, mesh=mesh, batch_size=batch, key=key)
    seconds = time.perf_counter() - start
    return {"images": len(source), "batch": batch, "seconds": seconds, "images_per_s": len(source) / seconds,
            "first_batch_with_compile_s": first, "examples_evaluated": int(result["examples"]),
            "total_bpd": result["bpd"]["total"]}


# --- Results.

def machine() -> dict:
    """The host that ran a benchmark: CPU model, cores, OS and Python."""
    info = {"cpu": platform.processor() or platform.machine()}
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().split("\n\n")[0].splitlines()
        fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in lines if ":" in line)}
        flags = set(fields.get("flags", "").split())
        info = {"cpu": fields.get("model name", info["cpu"]),
                "cpu_family_model": f"{fields.get('cpu family', '?')}/{fields.get('model', '?')}",
                "simd": next((f for f in ("avx512f", "avx2", "avx", "sse4_2") if f in flags), "?")}
    except OSError:
        pass
    return {**info, "arch": platform.machine(), "cores": os.cpu_count(), "os": platform.platform(),
            "python": platform.python_version()}


def device(count: int | None = None) -> str:
    """'<count> × <device kind> (<backend>)': all local devices, or the first `count`."""
    import jax

    return f"{count or jax.device_count()} × {jax.devices()[0].device_kind} ({jax.default_backend()})"


def write_result(result: dict, out: str | None, default_name: str) -> str:
    """Writes `result` as JSON, with the machine, device (all of JAX's, unless `result` names its
    own) and versions, to `out` (default benchmarks/results/<default_name>) and says where."""
    import jax

    result = {"machine": machine(), "device": device(), **result}
    result["versions"] = {"python": platform.python_version(), "jax": jax.__version__, **result.get("versions", {})}
    out = out or os.path.join(RESULTS, default_name)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out}")
    return out
