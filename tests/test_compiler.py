"""vdm_jax.compiler: the XLA options vdm_jax compiles with, per backend."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vdm_jax
from vdm_jax import compiler

_YNN = "xla_cpu_experimental_ynn_fusion_type"
_SCHEDULER = "xla_cpu_enable_concurrency_optimized_scheduler"


def test_only_the_cpu_gets_options():
    for backend in ("gpu", "cuda", "rocm", "tpu"):
        assert dict(compiler._options(backend, "")) == {}
    assert dict(vdm_jax.compiler_options("tpu")) == {}


def test_cpu_options_are_the_accepted_ones():
    """Each CPU option is passed exactly when this jaxlib's compiler accepts it."""
    options = compiler._options("cpu", "")
    for name, value in compiler._CPU_OPTIONS.items():
        assert (name in options) == compiler._accepted(name, value)
    if jax.__version__.startswith("0.10."):  # the jaxlib these options were measured on
        assert options == {_YNN: ""}


def test_unknown_options_are_rejected_not_passed():
    assert not compiler._accepted("xla_cpu_no_such_option", "1")
    assert not compiler._accepted(_YNN, "not-a-fusion-type")


def test_a_flag_in_xla_flags_wins():
    assert _YNN not in compiler._options("cpu", f"--xla_force_host_platform_device_count=8 --{_YNN}=")


def test_options_are_read_only():
    with pytest.raises(TypeError):
        vdm_jax.compiler_options("cpu")["x"] = 1


def test_convolutions_leave_ynnpack_and_results_stay():
    """With the options a convolution's gradient compiles to XLA's own kernels, with the same values."""
    if _YNN not in compiler._options("cpu", ""):
        pytest.skip(f"this jaxlib ({jax.__version__}) has no {_YNN} option")
    x = jax.random.normal(jax.random.key(0), (8, 16, 16, 32))
    w = 0.1 * jax.random.normal(jax.random.key(1), (3, 3, 32, 32))

    def loss(x, w):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(y**2)

    grad = jax.grad(loss, argnums=(0, 1))
    ours = jax.jit(grad, compiler_options={_YNN: ""}).lower(x, w).compile()
    default = jax.jit(grad, compiler_options={_YNN: "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"}).lower(x, w).compile()
    assert "__ynn_fusion" not in ours.as_text()
    assert "__ynn_fusion" in default.as_text()  # the path the option turns off
    for a, b in zip(ours(x, w), default(x, w)):  # equal up to float32 summation order
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())


def test_rematerialisation_saves_memory_under_the_options():
    """With vdm_jax's options (and the suite's XLA_FLAGS, which set them too), `jax.checkpoint`
    over a chain of convolution blocks keeps only the blocks' inputs: under jaxlib 0.10's default
    CPU schedule the recomputations all ran early and the temporaries stayed ~the same."""
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
    options = dict(compiler._options("cpu", ""))
    temp = {}
    for name, f in (("plain", block), ("remat", jax.checkpoint(block))):
        compiled = jax.jit(jax.grad(lambda ws, x: loss(ws, x, f)), compiler_options=options).lower(ws, x).compile()
        temp[name] = compiled.memory_analysis().temp_size_in_bytes
    # 8 blocks × 8 saved [8, 16, 16, 16] tensors without remat; 8 inputs + one block's working set with.
    assert temp["remat"] < 0.5 * temp["plain"], temp


def test_cpu_xla_flags_are_added_once_and_never_override(monkeypatch):
    flags = compiler.cpu_xla_flags()
    if jax.__version__.startswith(("0.10.", "0.11.", "0.12.")):
        assert flags == f"--{_SCHEDULER}=false"
        assert compiler.cpu_xla_flags(with_compiler_options=True) == f"--{_SCHEDULER}=false --{_YNN}="
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    assert compiler.set_cpu_xla_flags() == f"--xla_force_host_platform_device_count=2 {flags}".strip()
    assert compiler.set_cpu_xla_flags() == f"--xla_force_host_platform_device_count=2 {flags}".strip()
    monkeypatch.setenv("XLA_FLAGS", f"--{_SCHEDULER}=true")  # the user's choice stays
    assert vdm_jax.set_cpu_xla_flags() == f"--{_SCHEDULER}=true"
    monkeypatch.delenv("XLA_FLAGS")
    assert compiler.set_cpu_xla_flags() == flags


def test_jit_adds_the_options():
    f = compiler.jit(lambda x: x * 2)
    np.testing.assert_array_equal(f(jnp.arange(3.0)), [0.0, 2.0, 4.0])
