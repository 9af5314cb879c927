"""XLA:CPU tuning as an explicit, process-wide call: vdm_jax never changes XLA's settings on import.

    import vdm_jax
    vdm_jax.set_cpu_xla_flags()  # first thing, before JAX's first computation

The entry points (`experiments/`, `benchmarks/`, the test suite) make this call. It adds two
XLA:CPU flags to `XLA_FLAGS`:

- `--xla_cpu_enable_concurrency_optimized_scheduler=false`: XLA's memory-minimising schedule,
  under which rematerialisation (`UNetConfig.remat`) saves memory on CPU;
- `--xla_cpu_experimental_ynn_fusion_type=` (empty): XLA's own convolutions instead of YNNPACK's,
  faster for the small nets trained on CPUs, slower for the 128-channel CIFAR-10 nets at small
  batches (`convolutions='ynnpack'` or $VDM_JAX_CPU_CONVOLUTIONS=ynnpack keeps YNNPACK's).

The measurements behind the choice, with their commands: docs/benchmarks.md, "XLA:CPU
convolutions". The flags only change how XLA:CPU compiles; other backends ignore them.
"""
from __future__ import annotations

import importlib.metadata
import os

_CPU_FLAGS = {
    "xla_cpu_enable_concurrency_optimized_scheduler": "false",
    "xla_cpu_experimental_ynn_fusion_type": "",
}
# An unknown flag in XLA_FLAGS aborts the process, so the flags are only set for the jaxlib
# releases (major, minor) checked to have them; another release gets none.
_KNOWN_JAXLIB = ((0, 10), (0, 12))


CONVOLUTIONS = ("xla", "ynnpack")


def cpu_xla_flags(*, convolutions: str | None = None) -> str:
    """The `XLA_FLAGS` entries vdm_jax recommends on XLA:CPU for this jaxlib ('' if not known).

    convolutions: 'xla' (XLA's own, the default) or 'ynnpack' (jaxlib's default path); None:
    $VDM_JAX_CPU_CONVOLUTIONS if set, else 'xla'. See docs/benchmarks.md for the measurements
    behind the default (`python -m benchmarks step_time --model=M --convolutions=xla|ynnpack`).
    """
    convolutions = convolutions or os.environ.get("VDM_JAX_CPU_CONVOLUTIONS") or "xla"
    if convolutions not in CONVOLUTIONS:
        raise ValueError(f"convolutions (or $VDM_JAX_CPU_CONVOLUTIONS) must be one of {CONVOLUTIONS}, got "
                         f"{convolutions!r}.")
    try:
        major, minor = (int(p) for p in importlib.metadata.version("jaxlib").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return ""
    low, high = _KNOWN_JAXLIB
    if not low <= (major, minor) <= high:
        return ""
    flags = dict(_CPU_FLAGS)
    if convolutions == "ynnpack":
        del flags["xla_cpu_experimental_ynn_fusion_type"]  # jaxlib's default path
    return " ".join(f"--{name}={value}" for name, value in flags.items())


def set_cpu_xla_flags(*, convolutions: str | None = None) -> str:
    """Adds `cpu_xla_flags(convolutions=...)` to `os.environ['XLA_FLAGS']`, each unless
    `XLA_FLAGS` already sets it (the user's choice wins). Returns the new `XLA_FLAGS`.

    XLA reads `XLA_FLAGS` once, when JAX's backends start (the first computation): call this
    before, e.g. first thing in `main`; afterwards it changes nothing. The entry points take
    `VDM_JAX_CPU_CONVOLUTIONS=ynnpack` from the environment to use jaxlib's default
    convolutions instead of XLA's.
    """
    current = os.environ.get("XLA_FLAGS", "")
    new = [flag for flag in cpu_xla_flags(convolutions=convolutions).split() if flag.split("=")[0] + "=" not in current]
    os.environ["XLA_FLAGS"] = " ".join([current, *new]).strip()
    return os.environ["XLA_FLAGS"]
