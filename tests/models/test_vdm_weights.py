"""google-research/vdm's checkpoints read by `vdm_jax.models.vdm_weights`, proven against the official
code's own outputs without the released file.

The fixture (tests/data/vdm_official_small.*) was made once, outside this repository, by running the
official `model_vdm.py` and `train_state.py` of google-research/vdm (commit dc27b98, unmodified) with
the venv's jax 0.10.2 / flax 0.12.8 / optax 0.2.8:

    git clone https://github.com/google-research/vdm /tmp/vdm && git -C /tmp/vdm checkout dc27b98
    mkdir /tmp/vdm_official && cp /tmp/vdm/model_vdm.py /tmp/vdm/train_state.py /tmp/vdm_official/
    JAX_PLATFORMS=cpu python /tmp/vdm_official/make_fixture.py tests/data   # (imports the two files beside it)

make_fixture.py (kept outside the repository with the official code; about 130 lines) does this:
- `VDMConfig(vocab_size=256, sample_softmax=False, antithetic_time_sampling=True,
  with_fourier_features=True, with_attention=True, gamma_type='learnable_scalar', gamma_min=-13.3,
  gamma_max=5.0, sm_n_timesteps=0, sm_n_embd=64, sm_n_layer=1, sm_pdrop=0.1)`: the CIFAR-10 network's
  layout, 1 layer of 64 channels (at 32 channels each GroupNorm group is one channel and cancels the
  time embedding, which would then go untested), with attention after every block (the CIFAR-10
  config has none but the middle one) so that its placement is tested too;
- `VDM(config).init` as `experiment_vdm.py` does, then every parameter redrawn (the zero-initialised
  ones too) on a coarse power-of-two grid so that the file compresses: kernels ~ N(0, 1/fan_in),
  biases ~ N(0, 0.1²), GroupNorm scales ~ 1 + N(0, 0.1²), γ's w = -18.925 (negative: γ = b + |w| t)
  and b = -13.05; the EMA the same kernels but conv_out's, all other parameters redrawn, w = -18.425,
  b = -12.55 (as a FrozenDict, what flax's init returned in 2022);
- the train state as the official code makes and saves it: `train_state.TrainState.create` with
  `experiment.py`'s AdamW (its decay mask; cifar10.py's b1 0.9, b2 0.99, eps 1e-8, decay 0.01), step
  set to 1234, `flax.serialization.to_bytes(state)` (clu's `Checkpoint.save` writes exactly that as
  `ckpt-N.flax`), xz-compressed here (11.3 MB -> 272 KB);
- `vdm_official_small.npz`: z ~ N(0, 1) [4, 8, 8, 3], γ_t = (-13.3, -4, 1.5, 5), conditioning
  ~ N(0, 1) [4]; `score_model(z, γ_t, conditioning)` with the parameters (conditioning 0 and the
  drawn one) and the EMA (conditioning 0); uint8 images [4, 8, 8, 3]; `VDM.__call__(images,
  zeros, deterministic=True)` for sm_n_timesteps 0 and 10: loss_recon, loss_klz, loss_diff [4],
  var_0, var_1, and the draws it made (eps_0, t after the antithetic shift and the rounding to
  multiples of 1/T, eps), recorded by wrapping jax.random.normal/uniform while it ran; one step of the
  ancestral sampler `VDM.sample(i, 1000, z, zeros, PRNGKey(11))` at i = 300 and 999, and
  `generate_x(0.95 tanh(z))`.
"""
import lzma
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vdm_jax import (VDM, LearnedLinearSchedule, data_to_pixels, eps_and_x, losses, pixels_to_data, q_posterior,
                     q_sample)
from vdm_jax.models import as_pred_fn
from vdm_jax.models.vdm_weights import read_flax_msgpack, read_vdm_checkpoint, vdm_unet_config, vdm_unet_state

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
GAMMA_MIN, GAMMA_MAX = -13.3, 5.0
# float32 tolerances, relative to the largest official value. Measured (jitted, 2-core CPU): the network's ε̂
# 1.6e-6, a sampler step 6.6e-7, loss_diff 2.8e-6, var_0 and var_1 exact. Two official terms lose float32
# bits where vdm_jax computes otherwise:
# - loss_klz (2.6e-5): σ²_1 - log σ²_1 - 1 at σ²_1 ≈ 0.997 cancels; vdm_jax sums a series and is within
#   1.3e-7 of the official formula evaluated in float64 (checked);
# - loss_recon (1.5e-5): the decoder reads z_0/α_0 at a precision of e^(-γ_0/2) ≈ 680, so the float32
#   rounding of z_0 grows to ~1e-4 nats per image, in the official value (7.8e-5 from the float64 one)
#   as in vdm_jax's (9.2e-5).
RTOL, RTOL_CANCELLED = 5e-6, 5e-5


def official_checkpoint(directory) -> str:
    """The fixture's checkpoint where clu writes one: `directory/checkpoints-0/ckpt-1.flax`; returns the folder."""
    folder = os.path.join(directory, "checkpoints-0")
    os.makedirs(folder, exist_ok=True)
    with lzma.open(os.path.join(DATA, "vdm_official_small.flax.xz")) as src, \
            open(os.path.join(folder, "ckpt-1.flax"), "wb") as dst:
        shutil.copyfileobj(src, dst)
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return official_checkpoint(str(tmp_path_factory.mktemp("vdm")))


@pytest.fixture(scope="module")
def checkpoint(folder):
    return read_vdm_checkpoint(folder, image_size=8)


@pytest.fixture(scope="module")
def official():
    with np.load(os.path.join(DATA, "vdm_official_small.npz")) as f:
        return dict(f)


def close(ours, theirs, rtol=RTOL):
    """|ours - theirs| <= rtol · max |theirs| everywhere (float32 rounding of sums of many terms)."""
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=rtol * np.abs(theirs).max())


def test_the_checkpoint_reads_as_the_official_network_and_schedule(checkpoint, folder):
    c = checkpoint.model_config
    assert (c.base_channels, c.embedding_dim, c.num_res_blocks, c.in_channels, c.extra_cond_dim) == (64, 64, 1, 3, 1)
    assert c.fourier_features == (6, 7) and c.attn_resolutions == (8,) and not c.downsample and c.skip_input
    assert not c.emb_proj_bias and c.mid_attention and c.num_groups == 32 and c.prediction == "eps"
    assert checkpoint.step == 1234 and checkpoint.gamma_type == "learnable_scalar"
    f32 = lambda **kw: {k: float(np.float32(v)) for k, v in kw.items()}  # noqa: E731 - the file's float32 values
    assert checkpoint.schedule == f32(w=-18.925, b=-13.05) and checkpoint.ema_schedule == f32(w=-18.425, b=-12.55)
    path, tree = read_flax_msgpack(folder)  # (a directory: its newest ckpt-N.flax)
    assert path.endswith("ckpt-1.flax") and sorted(tree) == ["ema_params", "opt_state", "params", "step"]
    for name, state in (("params", checkpoint.params), ("ema_params", checkpoint.ema_params)):
        ours = sorted(float(np.sum(np.asarray(x, np.float64))) for x in jax.tree.leaves(state))
        theirs = sorted(float(np.sum(np.asarray(x, np.float64))) for x in jax.tree.leaves(tree[name]["score_model"]))
        assert ours == theirs  # every official parameter has its place, unchanged


def _network(checkpoint, state):
    model = nnx.merge(checkpoint.graphdef, state)
    return jax.jit(lambda z, cond, extra: model(z, cond, extra_cond=extra))


def test_the_network_is_the_official_score_network(checkpoint, official):
    """vdm_jax's UNet with the imported parameters (and EMA) gives the official ScoreUNet's ε̂ at the
    same (z, γ_t, conditioning): the network sees (γ_t - γ_min) / (γ_max - γ_min), as the official one."""
    cond = (official["g_t"] - np.float32(GAMMA_MIN)) / (np.float32(GAMMA_MAX) - np.float32(GAMMA_MIN))
    zeros = np.zeros((4, 1), np.float32)
    for state, extra, key in ((checkpoint.params, zeros, "eps_hat"),
                              (checkpoint.params, official["conditioning"][:, None], "eps_hat_cond"),
                              (checkpoint.ema_params, zeros, "eps_hat_ema")):
        close(_network(checkpoint, state)(official["z"], cond, extra), official[key])
    assert np.abs(official["eps_hat"] - official["eps_hat_cond"]).max() > 1e-2  # (the conditioning path is tested)


@pytest.mark.parametrize("T", [0, 10])
def test_the_loss_terms_are_the_official_ones(checkpoint, official, T):
    """The VDM family's terms (`vdm_jax.VDM` with the learned linear schedule: the prior, the decoder's
    reconstruction and the diffusion loss) at the official draws equal the official loss_klz,
    loss_recon and loss_diff per example, in continuous (T = 0) and discrete time (T = 10)."""
    n = "" if T == 0 else f"_T{T}"
    schedule = LearnedLinearSchedule(GAMMA_MIN, GAMMA_MAX)
    schedule.w[...], schedule.b[...] = checkpoint.schedule["w"], checkpoint.schedule["b"]
    family = VDM(timesteps=T, schedule="learned_linear", gamma_min=GAMMA_MIN, gamma_max=GAMMA_MAX)
    model = nnx.merge(checkpoint.graphdef, checkpoint.params)

    @jax.jit
    def terms(images, eps_0, t, eps):
        gamma = family.gamma_schedule(schedule)
        pred_fn = as_pred_fn(model, gamma, gamma_min=GAMMA_MIN, gamma_max=GAMMA_MAX)
        x = pixels_to_data(images, grid=family.grid)
        gamma_0, gamma_1, gamma_t = gamma(jnp.zeros(())), gamma(jnp.ones(())), gamma(t)
        return {"loss_klz": losses.prior_loss(x, gamma_1),
                "loss_recon": losses.vdm_decoder_nll(q_sample(x, eps_0, gamma_0), x, gamma_0),
                "loss_diff": losses.diffusion_loss(pred_fn(q_sample(x, eps, gamma_t), t), eps, t, gamma, T=T),
                "var_0": jax.nn.sigmoid(gamma_0)[None], "var_1": jax.nn.sigmoid(gamma_1)[None]}

    ours = terms(official["images"], official[f"eps_0{n}"], official[f"t{n}"], official[f"eps{n}"])
    close(ours["loss_diff"], official["loss_diff" + n])
    for name in ("loss_klz", "loss_recon"):
        close(ours[name], official[name + n], RTOL_CANCELLED)
    var_1 = 1.0 / (1.0 + np.exp(-(np.float64(checkpoint.schedule["b"]) + abs(checkpoint.schedule["w"]))))
    f = 2.0 * ((official["images"].astype(np.float64) + 0.5) / 256.0) - 1.0  # (the official encoder, in float64)
    exact = 0.5 * np.sum((1.0 - var_1) * f**2 + var_1 - np.log(var_1) - 1.0, axis=(1, 2, 3))
    close(ours["loss_klz"], exact)
    close(ours["var_0"], official["var_0" + n])
    close(ours["var_1"], official["var_1" + n])



def test_an_ancestral_step_and_the_decoder_are_the_official_ones(checkpoint, official):
    """One step of VDM's ancestral sampler as vdm_jax's `vdm_sample` takes it (x̂ from ε̂, then the posterior
    q(z_s | z_t, x̂) plus its noise) equals the official `VDM.sample` from the same z_t with the same noise
    (`normal(fold_in(PRNGKey(11), i))`), at t = 0.7 and at the last step (s = 0); the decoder's pixels
    (`data_to_pixels` of z_0/α_0) are the official `generate_x`'s argmax."""
    schedule = LearnedLinearSchedule(GAMMA_MIN, GAMMA_MAX)
    schedule.w[...], schedule.b[...] = checkpoint.schedule["w"], checkpoint.schedule["b"]
    pred_fn = as_pred_fn(nnx.merge(checkpoint.graphdef, checkpoint.params), schedule, gamma_min=GAMMA_MIN,
                         gamma_max=GAMMA_MAX)

    @jax.jit
    def step(z, i):
        t, s = jnp.full((4,), (1000 - i) / 1000), jnp.full((4,), (1000 - i - 1) / 1000)
        gamma_t, gamma_s = schedule(t), schedule(s)
        _, x_hat = eps_and_x(pred_fn(z, t), z, gamma_t, kind="eps")
        mean, var = q_posterior(x_hat, z, gamma_s, gamma_t)
        return mean + jnp.sqrt(var) * jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(11), i), z.shape)

    for i in (300, 999):
        close(step(official["z"], i), official[f"z_s_{i}"])
    alpha_0 = np.sqrt(jax.nn.sigmoid(-schedule(jnp.zeros(()))))
    pixels = data_to_pixels(official["z_0"] / alpha_0, grid="vdm")
    np.testing.assert_array_equal(pixels, official["generated_x"])

def _fake(tree: dict, path: tuple, value):
    """A copy of a nested dict with `path` set to `value` (or removed if value is None)."""
    out = dict(tree)
    if len(path) == 1:
        if value is None:
            out.pop(path[0])
        else:
            out[path[0]] = value
        return out
    out[path[0]] = _fake(tree[path[0]], path[1:], value)
    return out


def test_bad_files_and_parameters_are_one_line(tmp_path, folder):
    (tmp_path / "text.flax").write_text("not a checkpoint at all")
    with pytest.raises(ValueError, match=r"text.flax is not a Flax msgpack checkpoint \("):
        read_vdm_checkpoint(tmp_path / "text.flax")
    with pytest.raises(FileNotFoundError, match="holds no ckpt-N.flax"):
        read_vdm_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_vdm_checkpoint(tmp_path / "absent.flax")
    from flax import serialization
    (tmp_path / "other.flax").write_bytes(serialization.msgpack_serialize({"step": 1, "params": {"x": np.ones(2)}}))
    with pytest.raises(ValueError, match="is a Flax msgpack file but not a VDM train state"):
        read_vdm_checkpoint(tmp_path / "other.flax")
    _, tree = read_flax_msgpack(folder)
    score = tree["params"]["score_model"]
    wrong = _fake(score, ("mid.block_1", "conv1", "kernel"), np.zeros((3, 3, 64, 63), np.float32))
    config = vdm_unet_config(score, image_size=8)
    with pytest.raises(ValueError, match=re.escape("score_model/mid.block_1/conv1/kernel has shape [3, 3, 64, 63], "
                                                   "but vdm_jax's mid_res1/conv1/kernel takes [3, 3, 64, 64]")):
        vdm_unet_state(wrong, config)
    with pytest.raises(ValueError, match=re.escape("score_model/up.block_1/nin_shortcut/bias is missing")):
        vdm_unet_state(_fake(score, ("up.block_1", "nin_shortcut", "bias"), None), config)
    with pytest.raises(ValueError, match="1 parameter\\(s\\) vdm_jax's UNet has no place for, e.g. score_model/extra/kernel"):
        vdm_unet_state(_fake(score, ("extra",), {"kernel": np.ones(3, np.float32)}), config)
    with pytest.raises(ValueError, match="conv_in/kernel takes 7 channels"):
        vdm_unet_config(_fake(score, ("conv_in", "kernel"), np.zeros((3, 3, 7, 64), np.float32)))
    nnet = _fake(tree, ("params", "gamma"), {"l1": {"kernel": np.ones((1, 1), np.float32)}})
    (tmp_path / "nnet.flax").write_bytes(serialization.msgpack_serialize(nnet))
    with pytest.raises(ValueError, match="params/gamma holds \\['l1'\\]: only the 'learnable_scalar' schedule .* "
                                         "'learnable_nnet' is not"):
        read_vdm_checkpoint(tmp_path / "nnet.flax", image_size=8)
    fixed = _fake(_fake(tree, ("params", "gamma"), None), ("ema_params", "gamma"), None)
    (tmp_path / "fixed.flax").write_bytes(serialization.msgpack_serialize(fixed))
    read = read_vdm_checkpoint(tmp_path / "fixed.flax", image_size=8)
    assert read.gamma_type == "fixed" and read.schedule == read.ema_schedule == {}
    # Without attention after the blocks (the CIFAR-10 layout) and without Fourier features: read from the names.
    plain = {k: v for k, v in score.items() if not re.fullmatch(r"(down|up)\.attn_\d+", k)}
    assert vdm_unet_config(plain).attn_resolutions == ()
    assert vdm_unet_config(_fake(plain, ("conv_in", "kernel"), np.zeros((3, 3, 3, 64)))).fourier_features == ()
