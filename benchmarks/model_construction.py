"""How long building a U-Net and its first forward pass take, as a new user meets them.

    python -m benchmarks.model_construction [--models=tiny,ddpm_cifar10] [--batch=8] [--repeats=3]
        [--compare=CHECKOUT]

Every measurement runs in a fresh Python process with no persistent compilation cache and no
`XLA_FLAGS` (what a user has), so each compile is paid as a user pays it. Two ways to get a model:

- eager: `UNet(config, rngs=nnx.Rngs(0))`, then `model(z, cond)` called eagerly;
- init_model (where the checkout has it): `init_model(config, key)`, then a `jax.jit` of the
  merged module's call.

Reports, per model and way, the seconds to build (parameters ready), for the first call and for a
second call (output ready), and the XLA compiles in each phase (jax.monitoring): the median of
`--repeats` fresh processes, and every run. `--compare` measures another
checkout of the repository too (e.g. `git worktree add /tmp/before <commit>`), stored under "before".
Writes benchmarks/results/model_construction_<backend>.json (or `--out`).
"""
import json
import os
import statistics
import subprocess
import sys

from absl import app, flags

from benchmarks.common import write_result

flags.DEFINE_list("models", ["tiny", "ddpm_cifar10"], "Named configs of vdm_jax.models.")
flags.DEFINE_integer("batch", 8, "Images in the forward pass.")
flags.DEFINE_integer("repeats", 3, "Fresh processes per measurement (the median of each time is reported).")
flags.DEFINE_string("compare", None, "Another checkout of the repository to measure too (as 'before').")
flags.DEFINE_string("out", None, "JSON output path.")
FLAGS = flags.FLAGS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in the child process; prints one JSON line.
_CHILD = r"""
import inspect, json, sys, time
way, name, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
compiles = []  # seconds of each XLA compile
start = time.perf_counter()
import jax, jax.numpy as jnp
from flax import nnx
from vdm_jax import models
imported = time.perf_counter() - start
def on_event(event, secs, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
        compiles.append(secs)
jax.monitoring.register_event_duration_secs_listener(on_event)
config = getattr(models, name)()
z = jnp.zeros((batch, config.image_size, config.image_size, config.in_channels))
cond = jnp.full((batch,), 0.5)
def phase(fn):
    n = len(compiles); t = time.perf_counter(); out = fn()  # fn waits for its own results
    return out, time.perf_counter() - t, {"count": len(compiles) - n, "seconds": sum(compiles[n:])}
if way == "eager":
    def build_model():
        model = models.UNet(config, rngs=nnx.Rngs(0))
        jax.block_until_ready(nnx.state(model))
        return model
    model, build, build_compiles = phase(build_model)
    forward = lambda: jax.block_until_ready(model(z, cond))
else:
    init = models.init_model
    keyword = inspect.signature(init).parameters["key"].kind == inspect.Parameter.KEYWORD_ONLY
    key = jax.random.key(0)
    (graphdef, params), build, build_compiles = phase(
        lambda: jax.block_until_ready(init(config, key=key) if keyword else init(config, key)))
    apply = jax.jit(lambda p, z, c: nnx.merge(graphdef, p)(z, c))
    forward = lambda: jax.block_until_ready(apply(params, z, cond))
_, first, first_compiles = phase(forward)
_, second, second_compiles = phase(forward)
print(json.dumps({"import_s": imported, "build_s": build, "first_call_s": first, "second_call_s": second,
                  "build_plus_first_call_s": build + first, "backend": jax.default_backend(),
                  "compiles": {"build": build_compiles, "first_call": first_compiles,
                               "second_call": second_compiles}}))
"""


def _measure(checkout: str, way: str, name: str, batch: int) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("JAX_COMPILATION_CACHE") or k.startswith("JAX_PERSISTENT_CACHE")
                   or k in ("XLA_FLAGS", "VDM_JAX_TEST_CACHE"))}
    env["PYTHONPATH"] = checkout
    proc = subprocess.run([sys.executable, "-c", _CHILD, way, name, str(batch)], cwd=checkout, env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{way} {name} in {checkout} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _has_init_model(checkout: str) -> bool:
    with open(os.path.join(checkout, "vdm_jax", "models", "__init__.py")) as f:
        return "init_model" in f.read()


def _commit(checkout: str) -> str | None:
    """The checkout's commit, or None where git cannot tell (e.g. a pruned worktree's copy)."""
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=checkout, capture_output=True, text=True)
    return proc.stdout.strip() or None


_TIMES = ("import_s", "build_s", "first_call_s", "second_call_s", "build_plus_first_call_s")


def _measure_checkout(checkout: str) -> dict:
    ways = ["eager"] + (["init_model"] if _has_init_model(checkout) else [])
    result = {"commit": _commit(checkout), "models": {}}
    for name in FLAGS.models:
        result["models"][name] = {}
        for way in ways:
            runs = [_measure(checkout, way, name, FLAGS.batch) for _ in range(FLAGS.repeats)]
            r = {k: statistics.median(run[k] for run in runs) for k in _TIMES}
            r |= {"backend": runs[0]["backend"], "compiles": runs[0]["compiles"], "runs": runs}
            result["models"][name][way] = r
            print(f"{result['commit'] or checkout} {name:>13} {way:>10}: build {r['build_s']:6.2f} s "
                  f"({r['compiles']['build']['count']} compiles), first call {r['first_call_s']:6.2f} s "
                  f"({r['compiles']['first_call']['count']}), together {r['build_plus_first_call_s']:6.2f} s; "
                  f"second call {r['second_call_s']:.3f} s", flush=True)
    return result


def main(argv):
    del argv
    result = {"benchmark": "model_construction", "batch": FLAGS.batch, "repeats": FLAGS.repeats,
              "xla_flags": None, "persistent_cache": None}
    if FLAGS.compare:
        result["before"] = _measure_checkout(os.path.abspath(FLAGS.compare))
    result["after" if FLAGS.compare else "current"] = _measure_checkout(REPO)
    write_result(result, FLAGS.out, "model_construction_cpu.json")


if __name__ == "__main__":
    app.run(main)
