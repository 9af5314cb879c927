"""What the benchmarks share: timing and writing results."""
import json
import os
import platform
import statistics
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def median_time(fn, repeats: int) -> float:
    """The median wall time of `repeats` calls of `fn` (which must wait for its own results)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak(n: int = 4096, dtype: str = "float32", repeats: int = 5) -> float:
    """FLOP/s of an n×n matmul in `dtype` on JAX's default device (the best of `repeats`): the
    practical peak the benchmarks state their efficiency against."""
    import jax
    import jax.numpy as jnp

    a, b = (jax.random.normal(jax.random.key(i), (n, n), dtype) for i in range(2))
    f = jax.jit(jnp.matmul)
    jax.block_until_ready(f(a, b))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(f(a, b))
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times)


def machine() -> dict:
    """The host that ran a benchmark: CPU model, cores, OS and Python (the devices are each result's own)."""
    info = {"cpu": platform.processor() or platform.machine()}
    try:
        with open("/proc/cpuinfo") as f:
            fields = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        flags = set(fields.get("flags", "").split())
        info = {"cpu": fields.get("model name", info["cpu"]),
                "cpu_family_model": f"{fields.get('cpu family', '?')}/{fields.get('model', '?')}",
                "simd": next((f for f in ("avx512f", "avx2", "avx", "sse4_2") if f in flags), "?")}
    except OSError:
        pass
    return {**info, "arch": platform.machine(), "cores": os.cpu_count(), "os": platform.platform(),
            "python": platform.python_version()}


def write_result(result: dict, out: str | None, default_name: str) -> str:
    """Writes `result` as JSON, with the `machine()` that ran it, to `out` (default
    benchmarks/results/<default_name>) and says where."""
    result = {"machine": machine(), **result}
    out = out or os.path.join(RESULTS, default_name)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out}")
    return out
