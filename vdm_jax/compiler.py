"""XLA options that vdm_jax compiles its programs with, chosen per backend by measurement.

    step = jax.jit(train_step, compiler_options=vj.compiler_options())

On XLA:CPU, jaxlib 0.10-0.12 sends convolutions to YNNPACK by default. For the U-Net's gradient
convolutions (a 3×3 weight gradient is a convolution whose window is the whole image) that path
was 2-11× slower on the 2-core AMD EPYC we measured than XLA's own Eigen convolutions, and the
U-Net's whole gradient 1.8× and its forward pass 2× slower (`python -m benchmarks.cpu_conv_paths`;
`benchmarks/results/cpu_conv_paths_x86_64.json`). `compiler_options()` turns those library
fusions off for the programs vdm_jax compiles itself (training, evaluation, sampling). Other
backends get no options.

XLA:CPU's memory-minimising schedule, without which jaxlib 0.10's rematerialisation
(`UNetConfig.remat`) saved no memory on CPU (see `_CPU_XLA_FLAGS`), can only be chosen through
`XLA_FLAGS`, which JAX reads when it first initialises its backends: `set_cpu_xla_flags()` adds
it there, and the entry points (`experiments.*`, the benchmarks, the test suite) call it before
any computation. In your own program call it first thing, or set the flag yourself.

An option is only passed if this jaxlib accepts it (checked once by compiling a trivial
program), so a JAX release that renames or drops it loses the speed-up, not the run. A flag the
user set in `XLA_FLAGS` wins: its option is left out.
"""
from __future__ import annotations

import functools
import importlib.metadata
import os
from types import MappingProxyType
from typing import Any, Mapping

import jax
import jax.numpy as jnp

# An empty list of YNNPACK fusion types: convolutions and dots go to XLA's own CPU emitters.
_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}

# XLA:CPU options that only XLA_FLAGS can set (as a per-program compiler option they are accepted
# and ignored), for the jaxlib releases known to have them: an unknown flag in XLA_FLAGS aborts.
# The memory-minimising schedule instead of the one that starts independent work early: with the
# latter every rematerialised forward pass ran as soon as it could, so `jax.checkpoint` saved
# nothing (tiny32's train step, batch 32: 314 MiB of temporaries with or without model.remat;
# with this flag 287 MiB without and 176 MiB with), and it was no faster (the same step 0.94 s
# with the flag against 1.05-1.11 s without; ddpm_cifar10's at batch 8 4.31 s against 4.48 s).
_CPU_XLA_FLAGS = {"xla_cpu_enable_concurrency_optimized_scheduler": "false"}
_CPU_XLA_FLAGS_JAXLIB = ((0, 10), (0, 12))  # checked in 0.10.2 and 0.12.0.1


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


def cpu_xla_flags(*, with_compiler_options: bool = False) -> str:
    """The `XLA_FLAGS` entries vdm_jax wants on XLA:CPU for this jaxlib ('' for releases not
    known to have them); `with_compiler_options` adds the CPU `compiler_options()` as flags, which
    then apply to every program (the test suite's own `jax.jit`s too)."""
    try:
        major, minor = (int(p) for p in importlib.metadata.version("jaxlib").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return ""
    low, high = _CPU_XLA_FLAGS_JAXLIB
    if not low <= (major, minor) <= high:
        return ""
    flags = {**_CPU_XLA_FLAGS, **(_CPU_OPTIONS if with_compiler_options else {})}
    return " ".join(f"--{name}={value}" for name, value in flags.items())


def set_cpu_xla_flags() -> str:
    """Adds `cpu_xla_flags()` to `os.environ['XLA_FLAGS']`, each unless `XLA_FLAGS` already names it.

    Call it before JAX's first computation (XLA reads `XLA_FLAGS` once, when the backends start);
    later it changes nothing. The flags concern XLA:CPU only. Returns the new `XLA_FLAGS`.
    """
    current = os.environ.get("XLA_FLAGS", "")
    new = [flag for flag in cpu_xla_flags().split() if flag.split("=")[0] + "=" not in current]
    os.environ["XLA_FLAGS"] = " ".join([current, *new]).strip()
    return os.environ["XLA_FLAGS"]


def jit(fun, **kwargs):
    """`jax.jit(fun, **kwargs)` with `compiler_options()` for the default backend added."""
    return jax.jit(fun, compiler_options=dict(compiler_options()), **kwargs)
