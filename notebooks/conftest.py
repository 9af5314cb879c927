"""Executes the notebooks under `pytest --nbmake` with the test suite's cheaper XLA:CPU settings.

The kernels inherit this environment: the same compilation cache as the tests and LLVM flags that
cut compile times on a CPU. The notebooks run their QUICK settings unless VDM_JAX_QUICK=0.
"""
import os

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_FLAGS = "--xla_llvm_disable_expensive_passes=true --xla_backend_optimization_level=1"
if _FLAGS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAGS).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ.get("VDM_JAX_TEST_CACHE", os.path.join(_ROOT, ".jax_cache")))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
