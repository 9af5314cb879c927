"""What the benchmarks share: timing and writing results."""
import json
import os
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


def write_result(result: dict, out: str | None, default_name: str) -> str:
    """Writes `result` as JSON to `out` (default benchmarks/results/<default_name>) and says where."""
    out = out or os.path.join(RESULTS, default_name)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out}")
    return out
