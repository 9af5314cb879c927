"""The train step on one device: its time (`step_time`), the update's share of it (`update_cost`),
and its memory with and without rematerialisation (`memory`)."""
import itertools
import json
import os
import statistics

from benchmarks import common
from benchmarks.common import command, flag, csv, model_flag, out_flag, write_result

BATCH = flag("--batch", type=int, default=8, help="Training batch.")


@command(model_flag("ddpm_cifar10"), BATCH, flag("--steps", type=int, default=5, help="Timed steps per repeat."),
         flag("--convolutions", default="xla", choices=["xla", "ynnpack"], help="XLA:CPU's convolution path."))
def step_time(args):
    """Seconds per step of the loop's compiled train step on one device (median of 3 repeats), one JSON line.

To compare two checkouts of the training layer (each in its own process, PYTHONPATH=<checkout>),
or XLA:CPU's two convolution paths for a model (--convolutions, as `set_cpu_xla_flags` takes them).
"""
    import jax

    from vdm_jax.training import parallel

    mesh = parallel.make_mesh(jax.devices()[:1])
    _, state, data, key = common.setup(common.train_config(args.model, batch=args.batch), mesh, key=0)
    _, r = common.train(state, data, key, mesh, steps=args.steps, repeats=3)
    print(json.dumps({"model": args.model, "batch": args.batch, "s_per_step": r["step_s"], "repeats": r["repeats_s"],
                      "convolutions": args.convolutions, "xla_flags": os.environ.get("XLA_FLAGS", ""),
                      "device": jax.devices()[0].device_kind, "jax": jax.__version__}))


BYTES_PER_PARAM = 10 * 4  # read g (norm); read g, p, m, v, e; write p, m, v, e (float32)


def stream_bandwidth(size: int, repeats: int = 5) -> float:
    """Bytes/s of y ← 2x + y on float32 arrays of `size` elements (12 bytes an element), y donated (the median)."""
    import jax
    import jax.numpy as jnp

    x, y = jnp.ones((size,), jnp.float32), jnp.zeros((size,), jnp.float32)
    f = jax.jit(lambda x, y: 2.0 * x + y, donate_argnums=1)

    def call():
        nonlocal y
        y = jax.block_until_ready(f(x, y))

    call()
    return 12 * size / common.median_time(call, repeats)


@command(model_flag("ddpm_cifar10"), BATCH, flag("--steps", type=int, default=3, help="Timed calls per round."),
         flag("--rounds", type=int, default=7, help="Alternations of the step and the step without the update."),
         flag("--optimizer", default=None, choices=["adam", "adamw"], help="Default: the config's."),
         flag("--profile", default=None, metavar="DIR", help="Also profile --rounds more calls of each into DIR, "
              "and print where the step's extra time goes."),
         out_flag("update_cost_<backend>_<model>.json"))
def update_cost(args):
    """The update's share of the train step, and the step's share of the machine's peak.

On one device, in one process, compiled as the loop compiles them: the train step and the step
without the update (the loss gradient alone), alternated --rounds times (`update_share`: the median
over rounds of (step − step without the update) / step); the update alone on fixed gradients
(fault check, clipping, Adam(W), EMA, the non-finite guard); a 4096² matmul (the FLOP/s peak) and
y ← 2x + y on arrays of the parameters' size (the memory bandwidth). `copies` counts the compiled
step's copy instructions, and those that copy a whole argument (a donated array not updated in place).
--profile: the time of each kind of thunk (XLA's instruction, e.g. 'multiply_add_fusion') in the
step and in the step without the update, and the kinds that differ most.
"""
    import jax

    from vdm_jax.models import count_params
    from vdm_jax.training import faults, parallel, steps as steps_lib

    config = common.train_config(args.model, batch=args.batch)
    if args.optimizer:
        config.optim.optimizer = args.optimizer
    mesh = parallel.make_mesh(jax.devices()[:1])
    model_config, state, data, key = common.setup(config, mesh)
    state, r = common.train(state, data, key, mesh, steps=args.steps, repeats=args.rounds, without_update=True,
                            profile=args.profile)

    def update(state, loss, terms, grads):  # what the step adds to the gradient: the fault check and the update
        return steps_lib.apply_gradients(state, grads, faults.inspect(loss, terms, grads))

    state, (loss, terms, grads) = r.pop("no_update_program")(state, data, key)  # (the step's own gradients)
    update = jax.jit(update, in_shardings=parallel.replicated(mesh), out_shardings=parallel.replicated(mesh),
                     donate_argnums=0)

    def run(n):
        nonlocal state
        for _ in range(n):
            state = update(state, loss, terms, grads)
        jax.block_until_ready(state)

    run(2)
    update_rounds = common.repeat_times(lambda: run(args.steps), args.rounds)
    params = count_params(model_config)
    bandwidth, peak = stream_bandwidth(params), common.matmul_peak()
    r.update(params=params, optimizer=config.optim.optimizer, grad_clip=config.optim.grad_clip,
             update_s=statistics.median(update_rounds) / args.steps, update_rounds_s=[t / args.steps for t in update_rounds],
             update_bytes=BYTES_PER_PARAM * params, stream_bytes_per_s=bandwidth,
             update_memory_bound_s=BYTES_PER_PARAM * params / bandwidth, matmul_peak_flops_per_s=peak,
             step_flops_per_s=r["flops_per_step"] / r["step_s"], step_share_of_peak=r["flops_per_step"] / r["step_s"] / peak,
             no_update_share_of_peak=r["flops_per_step"] / r["no_update_s"] / peak)
    r["update_alone_share"] = r["update_s"] / r["step_s"]
    r["update_in_step_over_alone"] = r["update_share"] * r["step_s"] / r["update_s"]
    r["update_over_memory_bound"] = r["update_s"] / r["update_memory_bound_s"]
    record = {"benchmark": "update_cost", "model": args.model, "batch": args.batch, "steps": args.steps,
              "rounds": args.rounds, "device": common.device(1), **r}
    print(json.dumps({k: v for k, v in record.items() if not isinstance(v, dict)}, indent=1))
    shares = r["update_share_rounds"]
    print(f"update: {r['update_share']:.1%} of the step (median of {args.rounds} rounds, from {min(shares):.1%} to "
          f"{max(shares):.1%}; step {r['step_s']:.3f} s, without the update {r['no_update_s']:.3f} s), "
          f"{r['update_in_step_over_alone']:.1f}× the update alone ({r['update_s'] * 1e3:.0f} ms, "
          f"{r['update_over_memory_bound']:.1f}× its memory bound of {r['update_memory_bound_s'] * 1e3:.0f} ms at "
          f"{bandwidth / 1e9:.1f} GB/s); train step at {r['step_share_of_peak']:.0%} of the {peak / 1e9:.0f} GFLOP/s "
          f"matmul peak; {r['copies']['whole_argument']} whole-argument copies in the step")
    if args.profile:
        step, gradient = r["profile"]["step"], r["profile"]["no_update"]
        print(f"profiled thunks: step {sum(step.values()) * 1e3:.0f} ms, without the update "
              f"{sum(gradient.values()) * 1e3:.0f} ms; the kinds that differ most (ms a call):")
        for kind in sorted(set(step) | set(gradient), key=lambda k: -abs(step.get(k, 0) - gradient.get(k, 0)))[:12]:
            print(f"  {(step.get(kind, 0) - gradient.get(kind, 0)) * 1e3:+7.1f}  {kind}")
    write_result(record, args.out, f"update_cost_{jax.default_backend()}_{args.model}.json")


@command(model_flag("ddpm_cifar10"),
         flag("--batches", type=csv(int), default=[32, 128], help="Comma-separated batch sizes (one device)."),
         flag("--dtypes", type=csv(), default=["float32"], help="Comma-separated activation dtypes."),
         out_flag("memory_<backend>_<model>.json"))
def memory(args):
    """Train-step memory with and without rematerialisation, from XLA's buffer assignment (compile only).

For each batch, dtype and `model.remat`: the step compiled as training compiles it (one device,
state donated) from abstract shapes; XLA's temporary and argument bytes, and the gradient's FLOPs.
"""
    import jax
    import numpy as np

    from vdm_jax.training import create_train_state, steps, validate_config

    rows = []
    for batch, dtype, remat in itertools.product(args.batches, args.dtypes, (False, True)):
        config = common.train_config(args.model, batch=batch, dtype=dtype, remat=remat)
        model_config = validate_config(config)
        state = jax.eval_shape(lambda k: create_train_state(config, model_config, key=k), jax.random.key(0))
        shape = (batch, model_config.image_size, model_config.image_size, model_config.in_channels)
        spec, key = {"image": jax.ShapeDtypeStruct(shape, np.uint8)}, jax.random.key(1)
        step = jax.jit(lambda s, b, k: steps.train_step(s, b, key=k), donate_argnums=0)  # as training compiles it
        compiled, seconds = common.timed_compile(step, state, spec, key)
        m = common.program_memory(compiled)
        flops = common.flops(jax.jit(steps._grads).lower(state, spec, key).compile())  # the gradient's: model FLOPs
        rows.append({"model": args.model, "dtype": dtype, "remat": remat, "batch": batch, "compile_s": seconds,
                     "temp_bytes": m["temp_bytes"], "argument_bytes": m["argument_bytes"], "flops": flops})
        print(f"{args.model} batch {batch:4d} {dtype:9} remat={str(remat):5}  temporary {m['temp_bytes'] / 2**30:7.2f} "
              f"GiB  arguments {m['argument_bytes'] / 2**30:5.2f} GiB  {(flops or 0) / batch / 1e9:6.1f} GFLOP/image  "
              f"(compiled in {seconds:.0f} s)", flush=True)
    write_result({"benchmark": "memory", "model": args.model, "rows": rows, "device": common.device(1)}, args.out,
                 f"memory_{jax.default_backend()}_{args.model}.json")
