"""The environment of everything the test command runs: the tests and the notebooks' kernels.

Set here, before JAX's first computation, so that the tests (tests/conftest.py) and the notebook
kernels that `--nbmake` starts (they inherit this environment) run alike:
- 8 fake CPU devices;
- cheaper LLVM optimisation, which on XLA:CPU cuts compile times of the model and init programs
  about 4× (e.g. 19 s -> 4.5 s) at no measurable cost to the tests' run time (-O0 compiles a train
  step another 35% faster but slows the Monte Carlo tests and the notebook's training 1.5-3×: the
  whole suite took as long);
- vdm_jax's XLA:CPU flags (`vdm_jax.set_cpu_xla_flags()`, as the entry points set them);
- one persistent compilation cache, `.jax_cache/` (or $VDM_JAX_TEST_CACHE);
- VDM_JAX_DATA_DIR (the folder of the optional real CIFAR-10 copies that the notebooks and
  benchmarks read) set to the repository's sibling `../shared/data` when that folder exists and
  the variable is unset, so the notebook kernels find the data on the development machines.
"""
import os

CACHE_DIR = os.environ.get("VDM_JAX_TEST_CACHE", os.path.join(os.path.dirname(os.path.abspath(__file__)), ".jax_cache"))

# JAX reads its JAX_* variables when it is imported, XLA_FLAGS when its backends start (the first
# computation).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", CACHE_DIR)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

_SIBLING_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "shared", "data")
if os.path.isdir(_SIBLING_DATA):
    os.environ.setdefault("VDM_JAX_DATA_DIR", _SIBLING_DATA)

from vdm_jax import set_cpu_xla_flags  # noqa: E402

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    " --xla_llvm_disable_expensive_passes=true --xla_backend_optimization_level=1"
).strip()
set_cpu_xla_flags()


# The notebooks' expected seconds (as `slow(seconds)` marks say for tests): see the hook below.
NOTEBOOK_SECONDS = {"train_and_sample.ipynb": 65, "three_objectives.ipynb": 25, "forward_and_posterior.ipynb": 22,
                    "colab_cifar10.ipynb": 12}


def pytest_collection_modifyitems(config, items):
    """Runs the long tests first, longest first (the rest keep their order).

    With `-n`, each worker takes the next test when it is done with one (`--dist load
    --maxschedchunk 1`, pyproject.toml), so a long test never starts last while the other worker
    has nothing left to do (the longest-processing-time rule). A test's expected seconds (cold, on
    2 cores with -n 2) are its `slow(seconds)` mark's; a notebook's are in NOTEBOOK_SECONDS.
    """
    def seconds(item):
        mark = item.get_closest_marker("slow")
        if mark is not None:
            return float(mark.args[0]) if mark.args else 10.0
        return float(NOTEBOOK_SECONDS.get(item.path.name, 0)) if item.path.suffix == ".ipynb" else 0.0

    items.sort(key=seconds, reverse=True)  # stable
