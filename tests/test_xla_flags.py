"""vdm_jax.xla_flags: the XLA:CPU flags the entry points set, and what they change."""
import importlib.metadata
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vdm_jax
from vdm_jax import xla_flags

_YNN = "xla_cpu_experimental_ynn_fusion_type"
_SCHEDULER = "xla_cpu_enable_concurrency_optimized_scheduler"
_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _with_jaxlib(monkeypatch, version):
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: version if name == "jaxlib" else real(name))


def test_the_flags_for_known_jaxlib_releases(monkeypatch):
    for version in ("0.10.2", "0.11.0", "0.12.0.1"):
        _with_jaxlib(monkeypatch, version)
        assert xla_flags.cpu_xla_flags() == f"--{_SCHEDULER}=false --{_YNN}="


def test_an_unknown_jaxlib_gets_no_flags(monkeypatch):
    """An unknown flag in XLA_FLAGS aborts the process: releases not checked get none."""
    for version in ("0.9.2", "0.13.0", "1.0.0", "nightly"):
        _with_jaxlib(monkeypatch, version)
        assert xla_flags.cpu_xla_flags() == ""
        monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
        assert xla_flags.set_cpu_xla_flags() == "--xla_force_host_platform_device_count=2"


def test_flags_are_added_once_and_never_override(monkeypatch):
    _with_jaxlib(monkeypatch, "0.10.2")
    ours = f"--{_SCHEDULER}=false --{_YNN}="
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    assert xla_flags.set_cpu_xla_flags() == f"--xla_force_host_platform_device_count=2 {ours}"
    assert xla_flags.set_cpu_xla_flags() == f"--xla_force_host_platform_device_count=2 {ours}"
    assert os.environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {ours}"
    monkeypatch.setenv("XLA_FLAGS", f"--{_SCHEDULER}=true")  # the user's choice stays
    assert vdm_jax.set_cpu_xla_flags() == f"--{_SCHEDULER}=true --{_YNN}="
    monkeypatch.delenv("XLA_FLAGS")
    assert xla_flags.set_cpu_xla_flags() == ours


def test_the_entry_points_set_the_flags(monkeypatch):
    from experiments.common import start_jax

    monkeypatch.setenv("XLA_FLAGS", "")
    start_jax()
    assert os.environ["XLA_FLAGS"] == xla_flags.cpu_xla_flags()
    for name in ("quickstart", "cifar10"):  # each main calls it before any computation
        assert "start_jax()" in (_ROOT / "experiments" / f"{name}.py").read_text(), name
    # The evaluation commands' main is `common.run_command`'s, which calls it before `fn`.
    import inspect
    from experiments.common import run_command
    assert "start_jax()" in inspect.getsource(run_command)
    for name in ("evaluate", "fid", "fid_stats"):
        assert "run_command(" in (_ROOT / "experiments" / f"{name}.py").read_text(), name
    # The test suite too (the top-level conftest.py), so the library's programs compile as in a run.
    assert "set_cpu_xla_flags()" in (_ROOT / "conftest.py").read_text()


def _needs_flag(name):
    if f"--{name}=" not in os.environ.get("XLA_FLAGS", ""):
        pytest.skip(f"XLA_FLAGS has no --{name} (jaxlib {jax.__version__} is not known to have it)")


def test_convolutions_leave_ynnpack_and_results_stay():
    """Under the suite's XLA_FLAGS a convolution's gradient compiles to XLA's own kernels (a plain
    `jax.jit`), with the values of jaxlib's default path (YNNPACK, asked for per program)."""
    _needs_flag(_YNN)
    x = jax.random.normal(jax.random.key(0), (8, 16, 16, 32))
    w = 0.1 * jax.random.normal(jax.random.key(1), (3, 3, 32, 32))

    def loss(x, w):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(y**2)

    grad = jax.grad(loss, argnums=(0, 1))
    ours = jax.jit(grad).lower(x, w).compile()
    default = jax.jit(grad, compiler_options={_YNN: "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"}).lower(x, w).compile()
    assert "__ynn_fusion" not in ours.as_text()
    assert "__ynn_fusion" in default.as_text()  # the path the flag turns off
    for a, b in zip(ours(x, w), default(x, w)):  # equal up to float32 summation order
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())


def test_rematerialisation_saves_memory_under_the_flags():
    """Under the suite's XLA_FLAGS (the memory-minimising schedule), `jax.checkpoint` over a chain
    of convolution blocks keeps only the blocks' inputs; under XLA:CPU's default schedule the
    recomputations all ran early and the temporaries stayed about the same."""
    _needs_flag(_SCHEDULER)

    def block(w, x):
        for _ in range(4):
            x = jax.nn.silu(jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                         dimension_numbers=("NHWC", "HWIO", "NHWC")))
        return x

    def loss(ws, x, f):
        for w in ws:
            x = x + f(w, x)
        return jnp.sum(x**2)

    ws = [0.01 * jnp.ones((3, 3, 16, 16))] * 8
    x = jnp.ones((8, 16, 16, 16))
    temp = {}
    for name, f in (("plain", block), ("remat", jax.checkpoint(block))):
        compiled = jax.jit(jax.grad(lambda ws, x: loss(ws, x, f))).lower(ws, x).compile()
        temp[name] = compiled.memory_analysis().temp_size_in_bytes
    # 8 blocks × 8 saved [8, 16, 16, 16] tensors without remat; 8 inputs + one block's working set with.
    assert temp["remat"] < 0.5 * temp["plain"], temp


def test_the_convolution_path_is_a_documented_switch(monkeypatch):
    """XLA's own convolutions by default; `convolutions='ynnpack'` or $VDM_JAX_CPU_CONVOLUTIONS=ynnpack
    keeps jaxlib's default path (docs/benchmarks.md has the measurements per model)."""
    _with_jaxlib(monkeypatch, "0.10.2")
    monkeypatch.delenv("VDM_JAX_CPU_CONVOLUTIONS", raising=False)
    xla, ynnpack = f"--{_SCHEDULER}=false --{_YNN}=", f"--{_SCHEDULER}=false"
    assert xla_flags.cpu_xla_flags() == xla and xla_flags.cpu_xla_flags(convolutions="ynnpack") == ynnpack
    monkeypatch.setenv("VDM_JAX_CPU_CONVOLUTIONS", "ynnpack")
    assert xla_flags.cpu_xla_flags() == ynnpack and xla_flags.cpu_xla_flags(convolutions="xla") == xla
    monkeypatch.setenv("XLA_FLAGS", "")
    assert xla_flags.set_cpu_xla_flags() == ynnpack
    monkeypatch.setenv("VDM_JAX_CPU_CONVOLUTIONS", "fast")
    with pytest.raises(ValueError, match=r"VDM_JAX_CPU_CONVOLUTIONS\) must be one of \('xla', 'ynnpack'\)"):
        xla_flags.cpu_xla_flags()
