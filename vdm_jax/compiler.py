"""XLA options that vdm_jax compiles its programs with, chosen per backend by measurement.

    step = jax.jit(train_step, compiler_options=vj.compiler_options())

On XLA:CPU, jaxlib 0.10-0.12 sends convolutions to YNNPACK by default. For the U-Net's gradient
convolutions (a 3×3 weight gradient is a convolution whose window is the whole image) that path
was 2-11× slower on the 2-core AMD EPYC we measured than XLA's own Eigen convolutions, and the
U-Net's whole gradient 1.8× and its forward pass 2× slower (`python -m benchmarks.cpu_conv_paths`;
`benchmarks/results/cpu_conv_paths_x86_64.json`). `compiler_options()` turns those library
fusions off for the programs vdm_jax compiles itself (training, evaluation, sampling). Other
backends get no options.

An option is only passed if this jaxlib accepts it (checked once by compiling a trivial
program), so a JAX release that renames or drops it loses the speed-up, not the run. A flag the
user set in `XLA_FLAGS` wins: its option is left out.
"""
from __future__ import annotations

import functools
import os
from types import MappingProxyType
from typing import Any, Mapping

import jax
import jax.numpy as jnp

# An empty list of YNNPACK fusion types: convolutions and dots go to XLA's own CPU emitters.
_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def compiler_options(backend: str | None = None) -> Mapping[str, Any]:
    """The XLA compiler options for `backend` (default: JAX's default backend), for `jax.jit`.

    Returns a read-only mapping; empty except on CPU. Pass `dict(...)` of it as `jax.jit`'s
    `compiler_options`.
    """
    return _options(backend or jax.default_backend(), os.environ.get("XLA_FLAGS", ""))


@functools.lru_cache(maxsize=None)
def _options(backend: str, xla_flags: str) -> Mapping[str, Any]:
    if backend != "cpu":
        return MappingProxyType({})
    chosen = {name: value for name, value in _CPU_OPTIONS.items()
              if f"--{name}=" not in xla_flags and _accepted(name, value)}
    return MappingProxyType(chosen)


def _accepted(name: str, value: Any) -> bool:
    """Whether this jaxlib's CPU compiler knows the option (compiles a trivial program with it)."""
    try:
        jax.jit(lambda x: x + 1).lower(jax.ShapeDtypeStruct((), jnp.float32)).compile({name: value})
    except Exception:  # noqa: BLE001 - an unknown option or value: leave it out
        return False
    return True


def jit(fun, **kwargs):
    """`jax.jit(fun, **kwargs)` with `compiler_options()` for the default backend added."""
    return jax.jit(fun, compiler_options=dict(compiler_options()), **kwargs)
