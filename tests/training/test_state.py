"""The optimiser on the parameter tree: the official VDM recipe's weight-decay mask and warm-up, and
vdm_jax's 'kernels' mask beside it."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flax import nnx

import vdm_jax as vj
from vdm_jax.models import UNet, vdm_cifar10
from vdm_jax.training import Optimizer, create_train_state, decay_mask, validate_config
from vdm_jax.training.checkpoint import path_str

from experiments.configs import cifar10


def _leaf_names(tree):
    return [path_str(p).removesuffix("/value") for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


@pytest.fixture(scope="module", params=["vdm", "vdm_nnet"])
def vdm_state(request):
    """The micro model with the variant's schedule (learned linear; monotone MLP), trained with the
    variant's optimiser (the official mask; the kernels only)."""
    from tests.training.conftest import micro_config

    variant = cifar10.get_config(request.param)
    config = micro_config(family="vdm", timesteps=0, schedule=variant.diffusion.schedule)
    config.optim.update(variant.optim)
    return jax.device_get(create_train_state(config, validate_config(config), key=jax.random.key(0)))


def _decayed_by_the_official_mask(name):
    """google-research/vdm's rule (experiment.py, get_optimizer): all but parameters named 'bias' (and
    LayerNorm scales, which neither network has)."""
    return not name.endswith("/bias")


def _decayed_by_the_kernels_mask(name):
    return name.startswith("model/") and name.endswith("/kernel")


def test_vdm_config_is_the_official_optimiser():
    assert Optimizer.from_config(cifar10.get_config("vdm").optim) == Optimizer(
        optimizer="adamw", learning_rate=2e-4, warmup_steps=100, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.01,
        weight_decay_mask="official", grad_clip=0.0)
    assert Optimizer.from_config(cifar10.get_config("vdm_nnet").optim) == Optimizer(
        optimizer="adamw", learning_rate=2e-4, warmup_steps=100, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.01,
        weight_decay_mask="kernels", grad_clip=0.0)
    # Ho et al.'s DDPM: Adam 2e-4, 5000 warm-up steps, clipping at norm 1, no weight decay.
    assert Optimizer.from_config(cifar10.get_config("ddpm").optim) == Optimizer(
        optimizer="adam", learning_rate=2e-4, warmup_steps=5000, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
        weight_decay_mask="kernels", grad_clip=1.0)


@pytest.mark.parametrize("kind", ["official", "kernels"])
def test_decay_masks_on_the_real_vdm_network(kind):
    """Each mask on the `vdm` config's own tree: vdm_cifar10()'s U-Net (by nnx.eval_shape: no
    initialisation) and the learned linear schedule. 'official' decays every kernel, every GroupNorm
    scale and the schedule's w and b, and no bias; 'kernels' the U-Net's kernels alone."""
    unet = nnx.eval_shape(lambda: UNet(vdm_cifar10(), rngs=nnx.Rngs(0)))
    params = {"model": nnx.state(unet, nnx.Param), "schedule": nnx.state(vj.LearnedLinearSchedule(), nnx.Param)}
    mask = decay_mask(params, kind)
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    names = dict(zip(_leaf_names(params), jax.tree.leaves(mask)))
    kinds = {}
    for name, decayed in names.items():
        kinds.setdefault((name.split("/")[0], name.rsplit("/", 1)[-1]), set()).add(decayed)
    official = kind == "official"
    assert kinds == {("model", "kernel"): {True}, ("model", "bias"): {False}, ("model", "scale"): {official},
                     ("schedule", "w"): {official}, ("schedule", "b"): {official}}
    counts = {k: sum(1 for n in names if (n.split("/")[0], n.rsplit("/", 1)[-1]) == k) for k in kinds}
    assert counts == {("model", "kernel"): 242, ("model", "bias"): 311, ("model", "scale"): 136,
                      ("schedule", "w"): 1, ("schedule", "b"): 1}
    assert sum(names.values()) == (242 + 136 + 2 if official else 242)
    rule = _decayed_by_the_official_mask if official else _decayed_by_the_kernels_mask
    assert all(decayed == rule(name) for name, decayed in names.items())


def test_the_optimisers_mask_is_the_configs():
    """`Optimizer.transformation()` decays what `optim.weight_decay_mask` names: with zero gradients
    the update is -lr·wd·p on the decayed leaves and 0 on the others (a toy tree: no network)."""
    params = {"model": {"conv": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)}, "norm": {"scale": jnp.ones(3)}},
              "schedule": {"w": jnp.ones(()), "b": jnp.ones(())}}
    updates = {}
    for kind in ("official", "kernels"):
        opt = Optimizer(optimizer="adamw", learning_rate=1.0, warmup_steps=0, b1=0.9, b2=0.99, eps=1e-8,
                        weight_decay=0.5, weight_decay_mask=kind, grad_clip=0.0).transformation()
        zeros = jax.tree.map(jnp.zeros_like, params)
        updates[kind] = jax.jit(lambda p: opt.update(zeros, opt.init(p), p)[0])(params)
    decayed = {k: sorted(path_str(p) for p, u in jax.tree_util.tree_flatten_with_path(v)[0] if np.any(u != 0.0))
               for k, v in updates.items()}
    assert decayed == {"official": ["model/conv/kernel", "model/norm/scale", "schedule/b", "schedule/w"],
                       "kernels": ["model/conv/kernel"]}


def test_learning_rate_follows_the_official_warmup():
    """google-research/vdm: lr · min(1, step / 100), with optax's step count from 0."""
    lr = Optimizer.from_config(cifar10.get_config("vdm").optim).schedule()
    for step in (0, 1, 50, 99, 100, 101, 10_000):
        assert float(lr(step)) == pytest.approx(2e-4 * min(1.0, step / 100), rel=1e-6, abs=0.0), step
    assert float(lr(0)) == 0.0 and float(lr(50)) == pytest.approx(1e-4) and float(lr(100)) == pytest.approx(2e-4)


def test_the_train_states_mask_and_schedule(vdm_state):
    mask = decay_mask(vdm_state.params, vdm_state.optimizer.weight_decay_mask)
    names = dict(zip(_leaf_names(vdm_state.params), jax.tree.leaves(mask)))
    kinds = {name.rsplit("/", 1)[-1] for name in names if name.startswith("model/")}
    assert kinds == {"kernel", "bias", "scale"}  # convolutions, dense layers, GroupNorms
    official = vdm_state.optimizer.weight_decay_mask == "official"
    rule = _decayed_by_the_official_mask if official else _decayed_by_the_kernels_mask
    assert all(decayed == rule(name) for name, decayed in names.items())
    assert sorted(n for n in names if n.startswith("schedule/")) == (["schedule/b", "schedule/w"] if official else [
        "schedule/endpoints/gamma_0", "schedule/endpoints/raw_gap", "schedule/shape/b2", "schedule/shape/w1",
        "schedule/shape/w2", "schedule/shape/w3"])


def test_zero_gradient_adamw_update_decays_what_the_mask_says_and_nothing_else(vdm_state):
    """One update with zero gradients under the `vdm` (`vdm_nnet`) config, past the warm-up: Adam's
    part is 0, so every decayed parameter (all but biases; the U-Net's kernels) shrinks by
    lr·wd·itself, and every other is unchanged. At step 0 (lr 0) nothing changes at all. (The
    parameters are redrawn away from 0 first: the U-Net's output convolution starts at zero, which
    decay leaves at zero.)"""
    state = vdm_state
    official = state.optimizer.weight_decay_mask == "official"
    rule = _decayed_by_the_official_mask if official else _decayed_by_the_kernels_mask
    leaves, treedef = jax.tree.flatten(state.params)
    rng = np.random.default_rng(0)
    params = jax.tree.unflatten(treedef, [rng.uniform(0.5, 1.5, x.shape).astype(x.dtype) for x in leaves])
    tx = state.optimizer.transformation()
    zeros = jax.tree.map(jnp.zeros_like, params)

    @jax.jit
    def update(opt_state, params):
        updates, _ = tx.update(zeros, opt_state, params)
        return optax.apply_updates(params, updates)

    chex.assert_trees_all_equal(update(state.opt_state, params), params)  # step 0: lr = 0
    after_warmup = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.full_like(x, 100) if path_str(p).endswith("count") else x, state.opt_state)
    new = update(after_warmup, params)
    checked = 0
    for name, before, now in zip(_leaf_names(params), jax.tree.leaves(params), jax.tree.leaves(new)):
        before, now = np.asarray(before), np.asarray(now)
        if rule(name):
            assert np.all(now != before), name
            np.testing.assert_allclose(now, before * (1 - 2e-4 * 0.01), rtol=1e-6, err_msg=name)
            checked += 1
        else:
            np.testing.assert_array_equal(now, before, err_msg=name)
    assert checked > 10


@pytest.mark.parametrize("scale", [0.1, 10.0])  # a norm below the limit (unchanged) and above it (clipped)
def test_clipping_with_the_fault_checks_norm_is_optax_clip_by_global_norm(scale):
    """`state.clip_by_global_norm` takes the norm the step's fault check computed (`grad_norm=`);
    its updates are optax's, and so is its state (checkpoints stay readable)."""
    from vdm_jax.training import faults
    from vdm_jax.training.state import clip_by_global_norm

    rng = np.random.default_rng(0)
    grads = {"a": rng.normal(size=(3, 4)), "b": {"c": rng.normal(size=(5,))}}
    grads = jax.tree.map(lambda g: jnp.asarray(scale * g / 4.6, jnp.float32), grads)
    ours, theirs = clip_by_global_norm(1.0), optax.clip_by_global_norm(1.0)
    assert jax.tree.structure(ours.init(grads)) == jax.tree.structure(theirs.init(grads))
    expected, _ = theirs.update(grads, theirs.init(grads))
    norm = faults.inspect(jnp.zeros(2), {}, grads)["grad_norm"]
    np.testing.assert_allclose(float(norm), float(optax.tree.norm(grads)), rtol=1e-6)
    given, _ = jax.jit(lambda g, n: ours.update(g, ours.init(g), grad_norm=n))(grads, norm)
    computed, _ = jax.jit(lambda g: ours.update(g, ours.init(g)))(grads)
    chex.assert_trees_all_close(given, expected, rtol=1e-6)
    chex.assert_trees_all_close(computed, expected, rtol=1e-6)  # (jit and eager may round apart)
    assert (float(optax.tree.norm(expected)) < 1.0) == (scale < 1.0)
    # Inside the optimiser's chain the norm passes through to the clipping, Adam ignores it.
    tx = Optimizer(optimizer="adam", learning_rate=1e-3, warmup_steps=0, b1=0.9, b2=0.999, eps=1e-8,
                   weight_decay=0.0, weight_decay_mask="kernels", grad_clip=1.0).transformation()
    reference = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
    updates, _ = tx.update(grads, tx.init(grads), grads, grad_norm=norm)
    chex.assert_trees_all_close(updates, reference.update(grads, reference.init(grads), grads)[0], rtol=1e-5)
