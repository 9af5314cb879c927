"""Test setup: JAX's compilation cache and strict rank promotion (the environment — 8 fake CPU
devices, XLA flags — is set before JAX is imported, by the repository's top-level conftest.py).
"""
import os

import jax
import pytest

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
# Catches the `t[:, None, None, None]` slips that silently broadcast a loss wrongly.
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
    """Runs a test in float32 and in float64 (with x64 enabled just for that test)."""
    import jax.numpy as jnp

    if request.param == "float64":
        with jax.enable_x64(True):
            yield jnp.float64
    else:
        yield jnp.float32


@pytest.fixture
def x64():
    """Enables 64-bit types for one test."""
    with jax.enable_x64(True):
        yield
