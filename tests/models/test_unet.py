"""Tests for vdm_jax.models.unet: parameter counts, construction, the pure split/merge forward,
the pred_fn adapter, input checks.

Forward passes use tiny configs only; the paper-sized networks are counted, never run.
"""
import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import vdm_jax
from vdm_jax import models
from vdm_jax.models import (
    PREDICTIONS,
    ResBlock,
    UNet,
    UNetConfig,
    as_pred_fn,
    count_params,
    ddpm_cifar10,
    fourier_features,
    sinusoidal_embedding,
    tiny,
    vdm_cifar10,
)

B = 8
# Zero-initialised output layers would hide most of the network (and all dropout) at init.
_NONZERO = dict(zero_init_residual=False, zero_init_output=False)
GRAY16 = tiny(image_size=16, in_channels=1, **_NONZERO)
RGB32 = tiny(**_NONZERO)
# VDM-style and very small: one full-resolution level, Fourier features, base measure,
# extra conditioning, learned variance.
MICRO_VDM = tiny(image_size=8, in_channels=1, base_channels=8, num_groups=4, embedding_dim=8,
                 downsample=False, channel_mult=(1,), num_res_blocks=1, attn_resolutions=(),
                 fourier_features=(6, 7), skip_input=True, extra_cond_dim=1,
                 emb_proj_bias=False, learned_variance=True)
# Three levels (16, 8, 4): H and W must be multiples of 4.
DEEP16 = tiny(image_size=16, in_channels=1, channel_mult=(1, 2, 2), **_NONZERO)


def _abstract(config: UNetConfig) -> UNet:
    return nnx.eval_shape(lambda: UNet(config, rngs=nnx.Rngs(0)))


@functools.cache
def _split(config: UNetConfig):
    """graphdef and "trained-looking" random params, drawn on the host: biases and GroupNorm
    scales away from the 0 and 1 that a fresh initialisation gives them."""
    graphdef, shapes = nnx.split(_abstract(config))
    rng = np.random.default_rng(0)

    def draw(path, s):
        is_scale = "['scale']" in jax.tree_util.keystr(path)  # GroupNorm scales near 1
        fan_in = int(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 100
        return jnp.asarray(is_scale + rng.normal(0.0, fan_in**-0.5, s.shape), s.dtype)

    return graphdef, jax.tree_util.tree_map_with_path(draw, shapes)


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, params, z, cond, key=None, extra_cond=None):
    """The pure forward the training code uses: merge, call, discard the module."""
    return nnx.merge(graphdef, params)(z, cond, key=key, extra_cond=extra_cond)


def _inputs(config: UNetConfig, seed: int = 1, size: tuple[int, int] | None = None):
    height, width = size or (config.image_size, config.image_size)
    z = jax.random.normal(jax.random.key(seed), (B, height, width, config.in_channels))
    return z, jnp.linspace(0.0, 1.0, B)


def _compiles(fn):
    """fn()'s result and the number of XLA compiles it ran."""
    seen = []

    def listener(event, secs, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            seen.append(secs)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        out = jax.block_until_ready(fn())
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return out, len(seen)


# ---------------------------------------------------------------------------------------------
# Parameter counts
# ---------------------------------------------------------------------------------------------


def test_ddpm_cifar10_param_count():
    n = count_params(ddpm_cifar10())
    assert n == 35_746_307  # diffusers' DDPM-shaped UNet2DModel: the same number.
    assert abs(n - 35.7e6) / 35.7e6 < 0.01  # Ho et al. 2020: "35.7 million parameters".


def test_vdm_cifar10_param_count():
    n = count_params(vdm_cifar10())
    assert n == 30_578_179
    # The official 30,578,181 also counts the 2 scalars (w, b) of VDM's learnable noise
    # schedule gamma(t) = b + |w| t, which lives outside the network here.
    assert n + 2 == 30_578_181


def test_tiny_param_count():
    _, params = _split(GRAY16)
    assert count_params(GRAY16) == sum(p.size for p in jax.tree.leaves(params))
    assert 2e5 < count_params(tiny()) < 1e6  # "a few hundred thousand"
    # An extra conditioning input of width k adds k rows to the first embedding Dense
    # (vdm_cifar10's 1-wide slot adds 4 * 128 = 512 parameters).
    config = tiny()
    assert count_params(config.replace(extra_cond_dim=1)) == count_params(config) + 4 * 32


def test_count_params_takes_a_model_or_a_config():
    model = UNet(MICRO_VDM, rngs=nnx.Rngs(0))
    assert count_params(model) == count_params(MICRO_VDM)
    assert count_params(model) == sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    with pytest.raises(TypeError, match=r"count_params: model_or_config: expected a UNet or a "
                                        r"UNetConfig, got dict"):
        count_params(MICRO_VDM.to_dict())


def test_predictions_are_the_cores():
    assert PREDICTIONS is vdm_jax.diffusion.PREDICTIONS
    assert all(tiny(prediction=kind).prediction == kind for kind in PREDICTIONS)


# ---------------------------------------------------------------------------------------------
# Construction: flax's default initialisers, all parameters drawn by one program
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_eager_and_traced_construction_give_the_same_parameters(param_dtype):
    """Eagerly the init vector is cut into parameters on the host, under a trace in jnp."""
    config, key = GRAY16.replace(param_dtype=param_dtype), jax.random.key(7)
    eager = nnx.state(UNet(config, rngs=nnx.Rngs(params=key)), nnx.Param)
    traced = jax.jit(lambda k: nnx.state(UNet(config, rngs=nnx.Rngs(params=k)), nnx.Param))(key)
    assert all(p.dtype == param_dtype for p in jax.tree.leaves(eager))
    chex.assert_trees_all_equal(eager, traced)
    other = nnx.state(UNet(config, rngs=nnx.Rngs(params=jax.random.key(8))), nnx.Param)
    assert not np.array_equal(eager["conv_in"]["kernel"], other["conv_in"]["kernel"])


def test_initialisation_is_flax_default():
    """Lecun-normal kernels (truncated at 2 std, variance 1/fan_in), zero biases, unit GroupNorm
    scales, zero-initialised output and residual branches."""
    model = UNet(tiny(), rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    zeroed = {"conv_out", "conv2", "proj_out"}
    kernels = []
    for path, p in jax.tree_util.tree_leaves_with_path(params):
        name = jax.tree_util.keystr(path)
        assert isinstance(p, jax.Array) and p.dtype == jnp.float32, name
        if "['bias']" in name or any(f"['{z}']" in name for z in zeroed):
            np.testing.assert_array_equal(p, 0.0, err_msg=name)
        elif "['scale']" in name:
            np.testing.assert_array_equal(p, 1.0, err_msg=name)
        else:
            fan_in = int(np.prod(p.shape[:-1]))
            kernels.append(np.asarray(p).ravel() * fan_in**0.5)  # standardised: std 1 if lecun-normal
    z = np.concatenate(kernels)
    assert z.size > 1e5
    np.testing.assert_allclose(np.std(z), 1.0, rtol=0.01)
    assert np.abs(z).max() <= 2.0 / 0.87962566 + 1e-5  # truncated at 2 standard normal std
    assert abs(np.mean(z)) < 0.01


def test_a_block_built_alone_is_initialised():
    block = ResBlock(8, 16, GRAY16, rngs=nnx.Rngs(0))
    params = jax.tree.leaves(nnx.state(block, nnx.Param))
    assert all(isinstance(p, jax.Array) for p in params)
    assert float(jnp.std(block.conv1.kernel[...])) > 0.0


def test_eager_construction_and_first_call_compile_one_program_each():
    """Not one program per parameter shape or per operation (a config no other test builds)."""
    config = tiny(image_size=8, in_channels=2, base_channels=16, embedding_dim=16)
    z, t = jnp.zeros((2, 8, 8, 2)), jnp.full((2,), 0.5)
    rngs = nnx.Rngs(params=jax.random.key(0))
    model, compiles = _compiles(lambda: UNet(config, rngs=rngs))
    assert compiles <= 3, compiles  # the key's fold_in and count, the init draw
    out, compiles = _compiles(lambda: model(z, t))
    assert compiles == 1
    chex.assert_shape(out, z.shape)


# ---------------------------------------------------------------------------------------------
# Forward pass through nnx.split / nnx.merge under jit
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [GRAY16, RGB32], ids=["16x16x1", "32x32x3"])
def test_forward_shape_dtype_finite(config):
    graphdef, params = _split(config)
    z, t = _inputs(config)
    out = _apply(graphdef, params, z, t)
    chex.assert_shape(out, z.shape)
    assert out.dtype == jnp.float32
    chex.assert_tree_all_finite(out)
    assert float(jnp.std(out)) > 0.0


def test_module_holds_params_only():
    model = _abstract(GRAY16)
    everything = jax.tree.leaves(nnx.state(model))
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert len(everything) == len(params)
    assert not jax.tree.leaves(nnx.state(model, nnx.RngState))
    assert all(p.dtype == jnp.float32 for p in params)


def test_no_key_is_deterministic():
    graphdef, params = _split(GRAY16)
    z, t = _inputs(GRAY16)
    np.testing.assert_array_equal(_apply(graphdef, params, z, t), _apply(graphdef, params, z, t))


def test_key_turns_dropout_on():
    graphdef, params = _split(GRAY16)
    z, t = _inputs(GRAY16)
    k1, k2 = jax.random.key(10), jax.random.key(11)
    clean = _apply(graphdef, params, z, t)
    noisy1 = _apply(graphdef, params, z, t, k1)
    assert not np.allclose(clean, noisy1)
    assert not np.allclose(noisy1, _apply(graphdef, params, z, t, k2))
    np.testing.assert_array_equal(noisy1, _apply(graphdef, params, z, t, k1))


@pytest.mark.parametrize("rate, draws", [(0.1, True), (0.0, False)])
def test_dropout_draws_random_bits_only_when_on(rate, draws):
    graphdef, params = _split(GRAY16.replace(dropout=rate))
    z, t = _inputs(GRAY16)
    jaxpr = jax.make_jaxpr(lambda k: nnx.merge(graphdef, params)(z, t, key=k))(jax.random.key(0))
    assert ("random_bits" in str(jaxpr)) == draws


def test_zero_init_base_measure_and_learned_variance():
    """Real init: the output conv starts at zero, so with skip_input the prediction channels are
    exactly z and the variance channels exactly 0; once trained, both move. The output is one
    array: the prediction's C channels, then v's (the base measure only on the first)."""
    graphdef, params = nnx.split(UNet(MICRO_VDM, rngs=nnx.Rngs(0)))
    z, t = _inputs(MICRO_VDM)
    extra = jnp.ones((B, 1))
    out = _apply(graphdef, params, z, t, None, extra)
    chex.assert_shape(out, (B, 8, 8, 2))
    np.testing.assert_array_equal(out[..., :1], z)
    np.testing.assert_array_equal(out[..., 1:], 0.0)

    trained = jax.tree.map(lambda p: p + 0.01, params)
    out = _apply(graphdef, trained, z, t, None, extra)
    pred, v = out[..., :1], out[..., 1:]
    assert not np.allclose(pred, z) and not np.allclose(v, 0.0)
    no_skip, _ = nnx.split(_abstract(MICRO_VDM.replace(skip_input=False)))
    raw = _apply(no_skip, trained, z, t, None, extra)
    np.testing.assert_allclose(pred, raw[..., :1] + z, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(v, raw[..., 1:])


def test_jit_traces_once_and_scalar_cond_is_broadcast():
    graphdef, params = _split(GRAY16)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def apply(params, z, t):
        return nnx.merge(graphdef, params)(z, t)

    z, _ = _inputs(GRAY16)
    out = apply(params, z, jnp.asarray(0.3))  # scalar cond, broadcast to [B]
    np.testing.assert_allclose(out, _apply(graphdef, params, z, jnp.full((B,), 0.3)),
                               rtol=1e-5, atol=1e-5)
    z2, _ = _inputs(GRAY16, seed=2)
    apply(jax.tree.map(lambda p: p * 1.5, params), z2, jnp.asarray(0.7))


def test_mixed_precision_keeps_float32_params_and_output():
    config = GRAY16.replace(dtype="bfloat16")
    graphdef, params = nnx.split(_abstract(config))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    z, t = _inputs(config)
    out = jax.eval_shape(lambda p: nnx.merge(graphdef, p)(z, t), params)
    assert out.shape == z.shape and out.dtype == jnp.float32


@pytest.mark.parametrize(
    "config, size",
    [(GRAY16, (16, 24)), (GRAY16, (8, 8)), (DEEP16, (12, 20)), (MICRO_VDM, (5, 7))],
    ids=["16x24", "8x8", "3-level-12x20", "vdm-5x7"],
)
def test_any_spatial_size_the_downsampling_allows(config, size):
    """Convolutional: other sizes than image_size (non-square too) keep the layout and shapes."""
    graphdef, params = _split(config)
    z, t = _inputs(config, size=size)
    extra = jnp.ones((B, 1)) if config.extra_cond_dim else None
    out = _apply(graphdef, params, z, t, None, extra)
    chex.assert_shape(out, (B, *size, config.in_channels * (1 + config.learned_variance)))
    chex.assert_tree_all_finite(out)
    assert float(jnp.std(out)) > 0.0


@pytest.mark.slow(15)
@pytest.mark.parametrize("config", [GRAY16, MICRO_VDM], ids=["ddpm", "vdm"])
def test_remat_changes_memory_not_results(config):
    """Rematerialised blocks: the same prediction and gradient (dropout included), and the
    compiled gradient keeps clearly less in memory."""
    graphdef, params = _split(config)
    z, t = _inputs(config)
    key = jax.random.key(3)

    def loss(graphdef, params):
        return jnp.mean(nnx.merge(graphdef, params)(z, t, key=key) ** 2)

    remat_graphdef, _ = _split(config.replace(remat=True))
    # nnx.remat: one rematerialised call per ResBlock / attention block, none without remat.
    model = _abstract(config)
    resampling = (models.Downsample, models.Upsample)
    blocks = sum(not isinstance(m, resampling) for m in [*model.down, *model.up]) + 2 + config.mid_attention
    for g, expected in ((graphdef, 0), (remat_graphdef, blocks)):
        jaxpr = str(jax.make_jaxpr(functools.partial(loss, g))(params))
        assert len(re.findall(r"\b(?:remat2?|checkpoint)\[", jaxpr)) == expected
    results, temp_bytes = {}, {}
    for name, g in (("plain", graphdef), ("remat", remat_graphdef)):
        compiled = jax.jit(jax.value_and_grad(functools.partial(loss, g))).lower(params).compile()
        results[name] = compiled(params)
        temp_bytes[name] = compiled.memory_analysis().temp_size_in_bytes
    chex.assert_trees_all_close(results["remat"], results["plain"], rtol=1e-5, atol=1e-6)
    # Measured 0.63 (ddpm) and 0.80 (vdm, a 4-channel net whose activations are a small share;
    # 0.87 under jax 0.12); ~0.99 under jaxlib 0.10's default CPU schedule (conftest sets
    # vdm_jax's XLA flags).
    assert temp_bytes["remat"] < 0.9 * temp_bytes["plain"], temp_bytes


@pytest.mark.slow(20)
def test_bfloat16_activations_track_float32():
    """Mixed precision (bfloat16 activations, float32 parameters): the ε-loss and its gradient stay
    within bfloat16's rounding of the float32 ones (8 mantissa bits: ~0.4% per operation)."""
    graphdef, params = _split(GRAY16)
    bf16_graphdef, _ = _split(GRAY16.replace(dtype="bfloat16"))
    z, t = _inputs(GRAY16)
    eps = jax.random.normal(jax.random.key(5), z.shape)

    @functools.partial(jax.jit, static_argnums=0)
    def loss_and_grad(graphdef, params):
        return jax.value_and_grad(lambda p: jnp.mean((nnx.merge(graphdef, p)(z, t) - eps) ** 2))(params)

    loss32, grad32 = loss_and_grad(graphdef, params)
    loss16, grad16 = loss_and_grad(bf16_graphdef, params)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grad16))
    np.testing.assert_allclose(loss16, loss32, rtol=0.02)
    flat32, flat16 = (jnp.concatenate([g.ravel() for g in jax.tree.leaves(g)]) for g in (grad32, grad16))
    cosine = jnp.dot(flat32, flat16) / (jnp.linalg.norm(flat32) * jnp.linalg.norm(flat16))
    assert cosine > 0.99
    np.testing.assert_allclose(jnp.linalg.norm(flat16), jnp.linalg.norm(flat32), rtol=0.05)


# ---------------------------------------------------------------------------------------------
# as_pred_fn: the network as the core's pred_fn(z_t, t)
# ---------------------------------------------------------------------------------------------


def test_pred_fn_ddpm_conditions_on_t(dtype):
    graphdef, params = _split(GRAY16)
    z, t = _inputs(GRAY16)
    z, t = z.astype(dtype), t.astype(dtype)

    @jax.jit
    def both(params, z, t):
        model = nnx.merge(graphdef, params)  # rebuilt inside the traced function
        return as_pred_fn(model)(z, t), model(z, t.astype(jnp.float32))

    pred, direct = both(params, z, t)
    assert pred.dtype == dtype
    np.testing.assert_allclose(pred, direct, rtol=1e-6, atol=1e-6)
    other = _apply(graphdef, params, z, 1.0 - t)
    assert not np.allclose(pred, other)


def test_pred_fn_vdm_conditions_on_the_normalised_noise_level(dtype):
    graphdef, params = _split(GRAY16)
    z, t = _inputs(GRAY16)
    z, t = z.astype(dtype), t.astype(dtype)
    gamma_fn = lambda t: -10.0 + 12.0 * t**2  # noqa: E731; a nonlinear schedule from -10 to 2

    @jax.jit
    def both(params, z, t):
        model = nnx.merge(graphdef, params)
        default_ends = as_pred_fn(model, gamma_fn)(z, t)  # (γ + 13.3) / 18.3
        own_ends = as_pred_fn(model, gamma_fn, gamma_min=-10.0, gamma_max=2.0)(z, t)  # t²
        return (default_ends, model(z, ((gamma_fn(t) + 13.3) / 18.3).astype(jnp.float32)),
                own_ends, model(z, (t**2).astype(jnp.float32)))

    default_ends, expected_default, own_ends, expected_own = both(params, z, t)
    np.testing.assert_allclose(default_ends, expected_default, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(own_ends, expected_own, rtol=1e-5, atol=1e-5)
    assert not np.allclose(default_ends, own_ends)


def test_pred_fn_splits_a_learned_variance():
    graphdef, params = _split(MICRO_VDM)
    z, t = _inputs(MICRO_VDM)
    model = nnx.merge(graphdef, params)
    pred, v = jax.jit(lambda z, t: as_pred_fn(model)(z, t))(z, t)
    out = model(z, t)
    chex.assert_shape([pred, v], z.shape)
    np.testing.assert_allclose(pred, out[..., :1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(v, out[..., 1:], rtol=1e-6, atol=1e-6)


@pytest.mark.slow(13)
def test_pred_fn_under_grad_scan_and_vmap():
    """Differentiable in the parameters and in z_t, usable in a scan body (as a sampler does) and
    under vmap; the eager call and the traced ones agree."""
    graphdef, params = _split(GRAY16)
    z, t = _inputs(GRAY16)

    def loss(params, z):
        return jnp.mean(as_pred_fn(nnx.merge(graphdef, params))(z, t) ** 2)

    value, (g_params, g_z) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, z)
    np.testing.assert_allclose(value, jnp.mean(as_pred_fn(nnx.merge(graphdef, params))(z, t) ** 2),
                               rtol=1e-5)
    assert all(float(jnp.abs(g).max()) > 0 for g in (g_z, g_params["conv_in"]["kernel"]))

    pred_fn = as_pred_fn(nnx.merge(graphdef, params))
    times = jnp.array([0.9, 0.5])

    @jax.jit
    def chain(z):
        def step(z, s):
            return z - 0.1 * pred_fn(z, jnp.full((B,), s)), None
        return jax.lax.scan(step, z, times)[0]

    looped = z
    for s in times:
        looped = looped - 0.1 * pred_fn(looped, jnp.full((B,), s))
    np.testing.assert_allclose(chain(z), looped, rtol=1e-4, atol=1e-5)

    per_half = jax.jit(jax.vmap(lambda z, t: pred_fn(z, t)))(z.reshape(2, B // 2, 16, 16, 1),
                                                              t.reshape(2, B // 2))
    np.testing.assert_allclose(per_half.reshape(z.shape), pred_fn(z, t), rtol=1e-4, atol=1e-5)


def test_pred_fn_key_turns_dropout_on():
    graphdef, params = _split(GRAY16)
    z, t = _inputs(GRAY16)
    model = nnx.merge(graphdef, params)
    run = jax.jit(lambda key: as_pred_fn(model, key=key)(z, t))
    clean = jax.jit(lambda: as_pred_fn(model)(z, t))()
    k1, k2 = jax.random.key(10), jax.random.key(11)
    assert not np.allclose(run(k1), clean)
    assert not np.allclose(run(k1), run(k2))
    np.testing.assert_array_equal(run(k1), run(k1))
    np.testing.assert_allclose(clean, model(z, t), rtol=1e-5, atol=1e-5)  # closure vs argument params


# ---------------------------------------------------------------------------------------------
# Input checks: raised at trace time, naming the argument
# ---------------------------------------------------------------------------------------------

_Z = jnp.zeros((B, 16, 16, 1))
_T = jnp.zeros((B,))


@pytest.mark.parametrize(
    "config, z, cond, extra_cond, error, match",
    [
        (GRAY16, jnp.zeros((B, 16, 16)), _T, None, ValueError, r"z: .*rank 4"),
        (GRAY16, jnp.zeros((B, 16, 16, 1), jnp.int32), _T, None, TypeError, r"z: .*floating"),
        (GRAY16, jnp.zeros((B, 16, 16, 3)), _T, None, ValueError, r"z: expected 1 channels"),
        (GRAY16, jnp.zeros((B, 15, 16, 1)), _T, None, ValueError,
         r"z: expected H and W multiples of 2\*\*\(len\(channel_mult\)-1\) = 2 \(the downsampling\)"),
        (DEEP16, jnp.zeros((B, 16, 10, 1)), _T, None, ValueError, r"z: expected H and W multiples of .* = 4"),
        (DEEP16, jnp.zeros((B, 2, 4, 1)), _T, None, ValueError, r"z: expected H and W multiples of .* = 4"),
        (GRAY16, _Z, jnp.zeros((B, 1)), None, ValueError, r"cond: expected shape \[B\]"),
        (GRAY16, _Z, jnp.zeros((B + 1,)), None, ValueError, r"cond: expected shape \[B\]"),
        (GRAY16, _Z, jnp.zeros((B,), jnp.int32), None, TypeError, r"cond: .*floating"),
        (GRAY16, _Z, _T, jnp.zeros((B, 1)), ValueError, r"extra_cond: .*extra_cond_dim=0"),
        (MICRO_VDM, jnp.zeros((B, 8, 8, 1)), _T, jnp.zeros((B,)), ValueError,
         r"extra_cond: expected shape \[B, extra_cond_dim\] = \(8, 1\)"),
    ],
)
def test_bad_inputs_raise(config, z, cond, extra_cond, error, match):
    model = nnx.merge(*_split(config))
    with pytest.raises(error, match=match):
        model(z, cond, extra_cond=extra_cond)


def _model_of(config):
    return nnx.merge(*_split(config))


@pytest.mark.parametrize(
    "model, gamma_fn, ends, error, match",
    [
        ("a function", None, {}, TypeError, r"as_pred_fn: model: expected a UNet, got function"),
        ("a UNet", 0.5, {}, TypeError, r"as_pred_fn: gamma_fn: expected a schedule t -> gamma\(t\) or None"),
        ("a UNet", jnp.exp, dict(gamma_min=5.0, gamma_max=-13.3), ValueError,
         r"as_pred_fn: gamma_max: expected > gamma_min = 5.0, got -13.3"),
    ],
)
def test_bad_as_pred_fn_arguments_raise(model, gamma_fn, ends, error, match):
    model = _model_of(GRAY16) if model == "a UNet" else (lambda z, t: z)
    with pytest.raises(error, match=match):
        as_pred_fn(model, gamma_fn, **ends)


def test_pred_fn_rejects_integer_steps():
    pred_fn = as_pred_fn(_model_of(GRAY16))
    with pytest.raises(TypeError, match=r"pred_fn: t: expected float times in \[0, 1\], got dtype int32"):
        jax.eval_shape(pred_fn, _Z, jnp.zeros((B,), jnp.int32))


# ---------------------------------------------------------------------------------------------
# Config validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(image_size=20, channel_mult=(1, 2, 2, 2)),
         r"image_size: .*2\*\*\(len\(channel_mult\)-1\) = 8"),
        (dict(attn_resolutions=(3,)), r"attn_resolutions: .*reachable resolutions \(32, 16\)"),
        (dict(prediction="noise"), r"prediction: expected one of \('eps', 'x', 'score', 'v'\)"),
        (dict(num_groups=7), r"num_groups: expected a divisor"),
        (dict(dropout=-0.1), r"dropout: expected a rate in \[0, 1\)"),
        (dict(dropout=1.0), r"dropout: expected a rate in \[0, 1\)"),
        (dict(in_channels=0), r"in_channels: expected an int >= 1"),
        (dict(base_channels=2.5), r"base_channels: expected an int >= 1"),
        (dict(channel_mult=()), r"channel_mult: expected a non-empty tuple"),
        (dict(channel_mult=2), r"channel_mult: expected a tuple of ints"),
        (dict(downsample=False), r"channel_mult: expected a single level when downsample=False"),
        (dict(embedding_dim=33), r"embedding_dim: expected an even int >= 4"),
        (dict(fourier_features=(-1,)), r"fourier_features: expected a tuple of ints >= 0"),
        (dict(extra_cond_dim=-1), r"extra_cond_dim: expected an int >= 0"),
        (dict(num_classes=-1), r"num_classes: expected an int >= 0"),
        (dict(num_classes=2.0), r"num_classes: expected an int >= 0"),
        (dict(dtype="int8"), r"dtype: expected a floating dtype"),
        (dict(param_dtype="float33"), r"param_dtype: expected a floating dtype"),
        (dict(remat=1), r"remat: expected a bool"),
        (dict(downsample="yes"), r"downsample: expected a bool"),
    ],
)
def test_config_validation(changes, match):
    with pytest.raises(ValueError, match=match):
        tiny().replace(**changes)


def test_from_dict_rejects_unknown_keys():
    fields = tiny().to_dict() | {"num_heads": 4}
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['num_heads'\]"):
        UNetConfig.from_dict(fields)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['chanel_mult'\]"):
        tiny(chanel_mult=(1, 2))


def test_from_dict_round_trip_and_lists_become_tuples():
    config = vdm_cifar10()
    fields = config.to_dict() | {"channel_mult": [1], "fourier_features": [6, 7]}
    restored = UNetConfig.from_dict(fields)
    assert restored == config and hash(restored) == hash(config)


def test_dtype_objects_are_stored_by_name():
    assert tiny(dtype=jnp.bfloat16) == tiny(dtype="bfloat16")
    assert tiny(dtype=jnp.bfloat16).dtype == "bfloat16"


def test_named_configs_are_what_the_papers_say():
    ddpm, vdm = ddpm_cifar10(), vdm_cifar10()
    assert (ddpm.base_channels, ddpm.channel_mult, ddpm.num_res_blocks) == (128, (1, 2, 2, 2), 2)
    assert ddpm.attn_resolutions == (16,) and ddpm.dropout == 0.1 and ddpm.downsample
    assert (vdm.num_res_blocks, vdm.downsample, vdm.fourier_features) == (32, False, (6, 7))
    assert vdm.skip_input and vdm.attn_resolutions == () and vdm.mid_attention
    assert tiny(image_size=16, in_channels=1).attn_resolutions == (8,)


# ---------------------------------------------------------------------------------------------
# Pure helpers, hand-computed
# ---------------------------------------------------------------------------------------------


def test_sinusoidal_embedding_values():
    emb = jax.jit(sinusoidal_embedding, static_argnums=1)(jnp.array([0.0, 1.0]), 4)
    # half = 2 frequencies: 1 and 10000^-1.
    expected = [[0.0, 0.0, 1.0, 1.0],
                [np.sin(1.0), np.sin(1e-4), np.cos(1.0), np.cos(1e-4)]]
    np.testing.assert_allclose(emb, expected, rtol=1e-6, atol=1e-7)


def test_fourier_features_values_and_order():
    z = jnp.array([[0.125, 0.25]])  # [1, C=2]
    f = jax.jit(fourier_features, static_argnums=1)(z, (0, 1))
    angles = 2 * np.pi * np.array([0.125 * 1, 0.125 * 2, 0.25 * 1, 0.25 * 2])  # c-major
    np.testing.assert_allclose(f, [np.concatenate([np.sin(angles), np.cos(angles)])], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Class conditioning
# ---------------------------------------------------------------------------------------------

COND10 = GRAY16.replace(num_classes=10)


def test_class_conditioning_adds_only_the_class_embedding():
    """num_classes K adds one parameter, `class_emb`'s kernel [K + 1, 4·embedding_dim] (K: no label);
    an unconditional config has the same parameters as before (its checkpoints still load)."""
    plain = nnx.state(_abstract(GRAY16), nnx.Param)
    cond = nnx.state(_abstract(COND10), nnx.Param)
    paths = lambda state: {jax.tree_util.keystr(p, simple=True, separator="/")  # noqa: E731
                           for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]}
    assert paths(cond) - paths(plain) == {"class_emb/kernel/value"} and paths(plain) <= paths(cond)
    assert cond["class_emb"]["kernel"].shape == (11, 4 * GRAY16.embedding_dim)
    assert count_params(COND10) - count_params(GRAY16) == 11 * 4 * GRAY16.embedding_dim


def test_class_embedding_has_unit_variance_at_initialisation():
    """EDM's scaling: a lecun-normal dense layer on sqrt(K + 1)·one_hot, so each class's vector ~ N(0, 1)."""
    kernel = UNet(tiny(num_classes=99, embedding_dim=64), rngs=nnx.Rngs(0)).class_emb.kernel[...]
    assert abs(float(jnp.std(kernel)) * np.sqrt(100) - 1.0) < 0.05


def test_labels_change_the_prediction_and_no_label_is_the_null_class():
    model = _model_of(COND10)
    z, cond = _inputs(COND10)
    out = {name: model(z, cond, labels=labels) for name, labels in
           [("a", jnp.arange(B) % 10), ("b", (jnp.arange(B) + 1) % 10), ("none", None), ("null", jnp.full((B,), 10))]}
    assert not np.allclose(out["a"], out["b"], atol=1e-4)
    np.testing.assert_array_equal(out["none"], out["null"])
    # Each example's output depends on its own label only (the labels enter per example).
    mixed = model(z, cond, labels=jnp.where(jnp.arange(B) < 4, jnp.arange(B) % 10, (jnp.arange(B) + 1) % 10))
    np.testing.assert_allclose(mixed[:4], out["a"][:4], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mixed[4:], out["b"][4:], rtol=1e-5, atol=1e-6)


def test_pred_fn_passes_labels_and_guided_uses_one_call():
    model = _model_of(COND10)
    z, t = _inputs(COND10)
    labels = jnp.arange(B) % 10
    pred_fn = as_pred_fn(model)
    np.testing.assert_array_equal(pred_fn(z, t, labels), model(z, t, labels=labels))
    guided = jax.jit(vdm_jax.guided(pred_fn, labels, 2.0, null_label=10))(z, t)
    np.testing.assert_allclose(guided, 3.0 * model(z, t, labels=labels) - 2.0 * model(z, t), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("config, labels, match", [
    (GRAY16, jnp.zeros((B,), jnp.int32), r"labels: given, but the config has num_classes=0"),
    (COND10, jnp.zeros((B,)), r"labels: expected integer classes \[B\] = \(8,\) in 0..10 \(10: no label\), got float32"),
    (COND10, jnp.zeros((B, 1), jnp.int32), r"labels: expected integer classes .* got int32 of shape \(8, 1\)"),
])
def test_bad_labels_raise(config, labels, match):
    z, cond = _inputs(config)
    with pytest.raises(ValueError, match=match):
        _model_of(config)(z, cond, labels=labels)
