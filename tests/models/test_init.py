"""Tests for vdm_jax.models._init: flax's initialisers, one random draw per network (the U-Net's
and the Inception network's own construction tests are in test_unet.py and test_inception.py)."""
import chex
import jax
import numpy as np
import pytest
from flax import nnx

from vdm_jax.models._init import OneDrawModule, constant, variance_scaling


class _Net(OneDrawModule):
    """Two flax layers and a nested OneDrawModule, initialised like the networks."""

    def __init__(self, width: int, *, rngs: nnx.Rngs, scale: float = 2.0):
        init = dict(kernel_init=variance_scaling(scale), bias_init=constant(0.0))
        self.conv = nnx.Conv(3, width, (3, 3), rngs=rngs, **init)
        self.norm = nnx.GroupNorm(width, num_groups=4, scale_init=constant(1.0), bias_init=constant(0.0),
                                  rngs=rngs)
        self.head = _Head(width, rngs=rngs)


class _Head(OneDrawModule):
    def __init__(self, width: int, *, rngs: nnx.Rngs):
        self.dense = nnx.Linear(width, 5, kernel_init=variance_scaling(1.0), bias_init=constant(0.0),
                                rngs=rngs)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_outside_a_construction_the_initialisers_are_flaxs(dtype):
    key, shape = jax.random.key(3), (3, 3, 8, 16)
    chex.assert_trees_all_equal(variance_scaling(1.0)(key, shape, dtype),
                                nnx.initializers.lecun_normal()(key, shape, dtype))
    chex.assert_trees_all_equal(variance_scaling(2.0)(key, shape, dtype),
                                nnx.initializers.he_normal()(key, shape, dtype))
    for fill in (0.0, 1.0):
        eager = constant(fill)(key, shape, dtype)
        assert isinstance(eager, jax.Array) and eager.dtype == dtype
        chex.assert_trees_all_equal(eager, jax.jit(lambda k: constant(fill)(k, shape, dtype))(key),
                                    nnx.initializers.constant(fill)(key, shape, dtype))


def test_eager_and_traced_constructions_agree_and_rngs_advance():
    rngs = nnx.Rngs(params=jax.random.key(0))
    eager = nnx.state(_Net(8, rngs=rngs), nnx.Param)
    traced = jax.jit(lambda k: nnx.state(_Net(8, rngs=nnx.Rngs(params=k)), nnx.Param))(jax.random.key(0))
    chex.assert_trees_all_equal(eager, traced)
    again = nnx.state(_Net(8, rngs=rngs), nnx.Param)  # the same Rngs, one key further
    assert not np.array_equal(eager["conv"]["kernel"], again["conv"]["kernel"])
    abstract = nnx.state(nnx.eval_shape(lambda: _Net(8, rngs=nnx.Rngs(0))), nnx.Param)
    chex.assert_trees_all_equal_shapes_and_dtypes(abstract, eager)


def test_kernels_are_cut_in_order_from_one_draw():
    """The kernels, standardised by their std sqrt(scale / fan_in) / 0.8796, are one truncated
    normal drawn with the first key of `rngs.params()`, the nested module's kernel included."""
    net = _Net(64, rngs=nnx.Rngs(1))
    std = lambda scale, fan_in: np.sqrt(scale / fan_in) / 0.87962566103423978
    conv = np.asarray(net.conv.kernel[...]).ravel() / std(2.0, 3 * 3 * 3)
    dense = np.asarray(net.head.dense.kernel[...]).ravel() / std(1.0, 64)
    drawn = jax.random.truncated_normal(jax.random.fold_in(jax.random.key(1), 0), -2.0, 2.0,
                                        (conv.size + dense.size,))
    np.testing.assert_allclose(np.concatenate([conv, dense]), drawn, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(net.conv.bias[...], 0.0)
    np.testing.assert_array_equal(net.norm.scale[...], 1.0)


def test_eager_construction_compiles_one_random_draw():
    compiles = []

    def listener(event, secs, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(secs)

    rngs = nnx.Rngs(params=jax.random.key(5))
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        jax.block_until_ready(nnx.state(_Net(12, rngs=rngs, scale=1.5)))  # a size no other test draws
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert len(compiles) <= 3, compiles  # the key's fold_in and count, the draw


def test_a_parameter_with_another_initialiser_is_refused():
    class _Plain(OneDrawModule):  # nnx.Linear's default kernel_init would draw from a throw-away key
        def __init__(self, *, rngs: nnx.Rngs):
            self.dense = nnx.Linear(4, 2, bias_init=constant(0.0), rngs=rngs)

    with pytest.raises(TypeError, match=r"_Plain: parameter dense\.kernel is not initialised by"):
        _Plain(rngs=nnx.Rngs(0))
