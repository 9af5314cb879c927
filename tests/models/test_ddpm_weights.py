"""DDPM's weights as diffusers publishes them (vdm_jax.models.ddpm_weights), against diffusers itself.

The parity tests run diffusers' `UNet2DModel` with random weights in a process of its own
(tests/diffusers_ddpm_peer.py; torch and JAX stay apart), save it as `google/ddpm-cifar10-32` is
published, import the files and compare the U-Nets' outputs at the same inputs and steps:
max |vdm_jax - diffusers| <= 1e-5 · max |diffusers| in float32 (measured: 2.0e-6 for the full
35.7M-parameter CIFAR-10 shape, 1.3e-6 for the small one). They skip, saying why, without torch
and diffusers (`pip install -e ".[dev]"`). The other tests need neither.
"""
import importlib.util
import json
import os
import pickle
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vdm_jax.families import DDPM
from vdm_jax.models import UNet, UNetConfig, count_params, ddpm_cifar10
from vdm_jax.models import ddpm_weights

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PEER = os.path.join(REPO, "tests", "diffusers_ddpm_peer.py")
TOLERANCE = 1e-5  # max abs error relative to the output's max abs value, float32

# google/ddpm-cifar10-32's config.json as published (written by diffusers 0.0.4).
HUB_CONFIG = {
    "_class_name": "UNet2DModel", "_diffusers_version": "0.0.4", "act_fn": "silu", "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256], "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32, "out_channels": 3, "sample_size": 32,
    "time_embedding_type": "positional", "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
# The same block types, small: two levels, attention at 8×8 and in the middle.
SMALL_CONFIG = {**HUB_CONFIG, "block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8,
                "sample_size": 16, "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
                "up_block_types": ["AttnUpBlock2D", "UpBlock2D"]}
SMALL = UNetConfig(image_size=16, base_channels=32, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
                   num_groups=8, embedding_dim=32, time_offset=-1.0)


# --------------------------------------------------------------------------------------------
# Against diffusers (torch in its own process)
# --------------------------------------------------------------------------------------------


def _diffusers_peer(out, config, *, timesteps, formats, seed=0):
    """Runs tests/diffusers_ddpm_peer.py; returns its io.npz (skips without torch or diffusers)."""
    for module in ("torch", "diffusers"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (installed by .[dev]): the parity test runs diffusers")
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    spec = out / "spec.json"
    spec.write_text(json.dumps({"config": kwargs, "seed": seed, "timesteps": timesteps, "formats": formats}))
    run = subprocess.run([sys.executable, PEER, str(spec), str(out)], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return np.load(out / "io.npz")


def _cond(timesteps):
    """vdm_jax's t = i/T for diffusers' 0-based steps i - 1; the embedded 1000 t - 1 must be the step
    exactly in float32 (true for 990 of the 1000 steps), so that both nets embed the same number."""
    cond = np.asarray(timesteps + 1, np.float32) / np.float32(1000)
    assert np.all(np.float32(1000) * cond - np.float32(1) == timesteps)
    return jnp.asarray(cond)


def _relative_error(model, io):
    out = model(jnp.asarray(io["z"].transpose(0, 2, 3, 1)), _cond(io["timesteps"]))
    reference = io["out"].transpose(0, 2, 3, 1)
    return float(np.max(np.abs(np.asarray(out) - reference)) / np.max(np.abs(reference)))


@pytest.mark.slow(20)
def test_the_ddpm_cifar10_shape_matches_diffusers_as_the_hub_publishes_it(tmp_path):
    """The full 35.7M-parameter shape, saved as google/ddpm-cifar10-32 is: diffusers 0.0.4's config
    keys, the attention's old names, torch's legacy format (safetensors: the small model's test)."""
    io = _diffusers_peer(tmp_path, HUB_CONFIG, timesteps=[0, 999], formats=["hub"])
    config, _ = ddpm_weights.load_ddpm_weights(tmp_path / "hub")
    assert config == ddpm_cifar10(time_offset=-1.0)
    model = ddpm_weights.ddpm_unet(tmp_path / "hub")
    assert count_params(model) == 35_746_307
    assert _relative_error(model, io) <= TOLERANCE
    assert ddpm_weights.load_ddpm_family(tmp_path / "hub") == DDPM(timesteps=1000, schedule="linear",
                                                                    beta_start=1e-4, beta_end=0.02)


@pytest.fixture(scope="module")
def small_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddpm_small")
    return out, _diffusers_peer(out, SMALL_CONFIG, timesteps=[0, 17, 999], formats=["bin", "safetensors", "hub"])


@pytest.mark.parametrize("where", ["bin", "safetensors", "hub", "bin/diffusion_pytorch_model.bin",
                                   "safetensors/diffusion_pytorch_model.safetensors"])
def test_a_small_model_matches_diffusers_from_each_format(small_files, where):
    out, io = small_files
    model = ddpm_weights.ddpm_unet(out / where)
    assert model.config == SMALL
    assert _relative_error(model, io) <= TOLERANCE


# --------------------------------------------------------------------------------------------
# The config
# --------------------------------------------------------------------------------------------


def test_the_published_config_is_ddpm_cifar10_with_steps_from_zero():
    assert ddpm_weights.unet_config_from_diffusers(HUB_CONFIG) == ddpm_cifar10(time_offset=-1.0)
    assert ddpm_weights.unet_config_from_diffusers(SMALL_CONFIG) == SMALL
    assert ddpm_weights.unet_config_from_diffusers(HUB_CONFIG, dropout=0.0).dropout == 0.0


DROP = object()  # a key the config omits


@pytest.mark.parametrize("changes, match", [
    ({"norm_eps": 1e-5}, "norm_eps = 1e-05, but DDPM's U-Net"),
    ({"flip_sin_to_cos": DROP}, "flip_sin_to_cos = True"),  # omitted: diffusers' default
    ({"freq_shift": 0}, "freq_shift = 0"),
    ({"downsample_padding": 1}, "downsample_padding = 1"),
    ({"attention_head_dim": 8}, "attention_head_dim = 8: DDPM's attention has one head"),
    ({"time_embedding_type": "fourier"}, "time_embedding_type"),
    ({"up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"]}, "must mirror"),
    ({"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"]},
     "'CrossAttnDownBlock2D' is not DownBlock2D or AttnDownBlock2D"),
    ({"block_out_channels": [128, 192, 256, 256]}, "multiples of the first"),
    ({"block_out_channels": [128, 256]}, "one entry per level"),
    ({"block_out_channels": [0, 256, 256, 256]}, "multiples of the first"),
    ({"out_channels": 6}, "out_channels = 6"),
    ({"sample_size": None}, "sample_size = None"),
    ({"_class_name": "UNet2DConditionModel"}, "expected a UNet2DModel's config"),
    ({"norm_num_groups": 48}, "no vdm_jax U-Net has this shape: UNetConfig.num_groups"),
])
def test_a_config_of_another_architecture_is_one_line(changes, match):
    config = {k: v for k, v in {**HUB_CONFIG, **changes}.items() if v is not DROP}
    with pytest.raises(ValueError, match=match) as info:
        ddpm_weights.unet_config_from_diffusers(config)
    assert "\n" not in str(info.value)


def test_time_offset_is_checked_and_defaults_to_zero():
    assert UNetConfig().time_offset == 0.0
    old = {k: v for k, v in ddpm_cifar10().to_dict().items() if k != "time_offset"}  # a config saved before it
    assert UNetConfig.from_dict(old) == ddpm_cifar10()
    for bad in (True, float("nan"), "1"):
        with pytest.raises(ValueError, match="UNetConfig.time_offset: expected a finite number"):
            ddpm_cifar10(time_offset=bad)


# --------------------------------------------------------------------------------------------
# The files, without torch: a vdm_jax U-Net written under diffusers' names
# --------------------------------------------------------------------------------------------


def _write_safetensors(path, arrays):
    header, blobs, offset = {}, [], 0
    for name, value in arrays.items():
        value = np.ascontiguousarray(value)
        code = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.int64): "I64"}[value.dtype]
        header[name] = {"dtype": code, "shape": list(value.shape), "data_offsets": [offset, offset + value.nbytes]}
        blobs.append(value.tobytes())
        offset += value.nbytes
    raw = json.dumps({"__metadata__": {"format": "pt"}, **header}).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"".join(blobs))


def _as_diffusers(model, *, legacy=False):
    """The U-Net's parameters as a diffusers state dict {name: torch-layout array}."""
    names = ddpm_weights._block_names(model)
    weights = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, value = ddpm_weights._diffusers_name(names, path), np.asarray(variable[...])
        value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
        if name.endswith("conv_shortcut.weight"):
            value = value[:, :, None, None]
        if legacy:
            for new, old in ddpm_weights._LEGACY.items():
                name = name.replace(f".{new}.", f".{old}.")
        weights[name] = value
    return weights


@pytest.fixture(scope="module")
def small_model():
    config = SMALL.replace(zero_init_output=False, zero_init_residual=False)
    return UNet(config, rngs=nnx.Rngs(3))


def _folder(tmp_path, weights, config=SMALL_CONFIG):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    _write_safetensors(tmp_path / "diffusion_pytorch_model.safetensors", weights)
    return tmp_path


@pytest.mark.parametrize("legacy", [False, True])
def test_written_and_read_back_the_parameters_are_the_same(tmp_path, small_model, legacy):
    _, params = ddpm_weights.load_ddpm_weights(_folder(tmp_path, _as_diffusers(small_model, legacy=legacy)))
    expected = nnx.state(small_model, nnx.Param)
    assert jax.tree.structure(params) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
        assert got.dtype == jnp.float32
        np.testing.assert_array_equal(got, want)


def test_a_pipeline_folder_and_float16_weights_read(tmp_path, small_model):
    half = {k: v.astype(np.float16) for k, v in _as_diffusers(small_model).items()}
    _folder(tmp_path / "unet", half)
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDPMScheduler", "beta_schedule": "linear", "variance_type": "fixed_large"}))
    config, params = ddpm_weights.load_ddpm_weights(tmp_path)
    assert config == SMALL and all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    assert ddpm_weights.load_ddpm_family(tmp_path).variance == "beta"
    assert ddpm_weights.load_ddpm_family(tmp_path / "unet").variance == "beta"


def _without(weights, name):
    return {k: v for k, v in weights.items() if k != name}


@pytest.mark.parametrize("edit, match", [
    (lambda w: _without(w, "mid_block.attentions.0.to_k.bias"), "missing mid_block.attentions.0.to_k.bias .the U-Net's mid_attn/k/bias."),
    (lambda w: {**w, "class_embedding.weight": np.zeros((4, 4), np.float32)}, "unexpected class_embedding.weight"),
    (lambda w: {**w, "conv_out.weight": np.zeros((3, 32, 1, 1), np.float32)},
     r"conv_out.weight has shape \(3, 32, 1, 1\); the U-Net of this config needs \(3, 32, 3, 3\)"),
    (lambda w: {**w, "conv_in.bias": np.zeros(32, np.int64)}, "conv_in.bias must be floating"),
])
def test_a_state_dict_that_does_not_fit_is_one_line(tmp_path, small_model, edit, match):
    folder = _folder(tmp_path, edit(_as_diffusers(small_model)))
    with pytest.raises(ValueError, match=f"load_ddpm_weights: .*diffusion_pytorch_model.safetensors: {match}") as info:
        ddpm_weights.load_ddpm_weights(folder)
    assert "\n" not in str(info.value)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo never",))


def test_wrong_files_are_one_line(tmp_path, small_model):
    with pytest.raises(ValueError, match="holds no config.json with diffusion_pytorch_model.safetensors or "):
        ddpm_weights.load_ddpm_weights(tmp_path)
    with pytest.raises(ValueError, match="no such file or folder"):
        ddpm_weights.load_ddpm_weights(tmp_path / "absent")
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps({"x": _Exploit()}))
    with pytest.raises(ValueError, match="its model's config.json must be in the same folder"):
        ddpm_weights.load_ddpm_weights(tmp_path / "diffusion_pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(SMALL_CONFIG))
    with pytest.raises(pickle.UnpicklingError, match="refusing the global (posix|nt).system"):
        ddpm_weights.load_ddpm_weights(tmp_path)
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"\x10" + b"\0" * 7 + b"not json at all!")
    with pytest.raises(ValueError, match="read_safetensors: .*not a safetensors file .its header is not JSON"):
        ddpm_weights.load_ddpm_weights(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ValueError, match="config.json is not JSON"):
        ddpm_weights.load_ddpm_weights(tmp_path)


def test_read_safetensors_reads_what_the_safetensors_package_writes(tmp_path):
    st = pytest.importorskip("safetensors.numpy", reason="safetensors is not installed")
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones((0, 4), np.float16),
              "c": np.array([-1, 2**40], np.int64), "d": np.full((), 2.5, np.float32)}
    st.save_file(arrays, str(tmp_path / "x.safetensors"))
    got = ddpm_weights.read_safetensors(tmp_path / "x.safetensors")
    assert set(got) == set(arrays)
    for name, value in arrays.items():
        assert got[name].dtype == value.dtype
        np.testing.assert_array_equal(got[name], value)


def test_read_safetensors_refuses_offsets_outside_the_data(tmp_path):
    _write_safetensors(tmp_path / "x.safetensors", {"a": np.zeros(4, np.float32)})
    raw = (tmp_path / "x.safetensors").read_bytes().replace(b"[0, 16]", b"[0, 32]")
    (tmp_path / "y.safetensors").write_bytes(raw)
    with pytest.raises(ValueError, match=r"a: data_offsets \[0, 32\] do not hold \[4\] of F32"):
        ddpm_weights.read_safetensors(tmp_path / "y.safetensors")


# --------------------------------------------------------------------------------------------
# The process: DDPM's linear β
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler, match", [
    ({"beta_schedule": "squaredcos_cap_v2"}, "only DDPM's linear β reads"),
    ({"trained_betas": [0.1, 0.2]}, "trained_betas given"),
    ({"num_train_timesteps": 500}, "num_train_timesteps = 500"),
    ({"variance_type": "learned_range"}, "variance_type 'learned_range'"),
])
def test_load_ddpm_family_reads_linear_beta_only(tmp_path, scheduler, match):
    (tmp_path / "scheduler_config.json").write_text(json.dumps(scheduler))
    with pytest.raises(ValueError, match=match):
        ddpm_weights.load_ddpm_family(tmp_path)


def test_load_ddpm_family_defaults_are_ho_et_al():
    family = ddpm_weights.load_ddpm_family()
    assert family == DDPM(timesteps=1000, schedule="linear", beta_start=1e-4, beta_end=0.02, prediction="eps",
                          variance="posterior")


# --------------------------------------------------------------------------------------------
# experiments.import_checkpoint --from=ddpm
# --------------------------------------------------------------------------------------------


def _run(module, *args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
               JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow(20)
def test_import_checkpoint_from_ddpm_writes_a_work_directory_that_evaluate_reads(tmp_path, small_model):
    """A small model in diffusers' files (the hub's layout: a pipeline folder with unet/ and scheduler/)
    becomes a DDPM work directory: experiments/configs/cifar10.py:ddpm with the file's network, the weights
    as parameters and EMA; experiments.evaluate prints its bits/dim (its samplers are the work directory's
    tools as for any run: tests/test_import_checkpoint.py samples an imported VDM)."""
    from experiments.import_checkpoint import import_checkpoint
    from vdm_jax.training import load_checkpoint

    _folder(tmp_path / "pipeline" / "unet", _as_diffusers(small_model))
    (tmp_path / "pipeline" / "scheduler").mkdir()
    (tmp_path / "pipeline" / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDPMScheduler", "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
         "clip_sample": True, "num_train_timesteps": 1000, "trained_betas": None, "variance_type": "fixed_small"}))
    rng = np.random.default_rng(0)
    images = {f"x_{s}": rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8) for s in ("train", "test")}
    np.savez(tmp_path / "images.npz", **images, y_train=np.zeros(16, np.int64), y_test=np.zeros(16, np.int64))
    workdir = str(tmp_path / "imported")
    # In this process (one JAX start less; --from's choices are SOURCES' keys, the vdm test runs the command).
    summary = import_checkpoint(types.SimpleNamespace(**{"from": "ddpm"}, checkpoint=str(tmp_path / "pipeline"),
                                                      workdir=workdir, data=f"npz:{tmp_path / 'images.npz'}"))
    assert summary == {"workdir": workdir, "step": 0, "parameters": 702_499}

    config, state = load_checkpoint(workdir)
    d = config.diffusion
    assert (d.family, d.timesteps, d.schedule, d.beta_start, d.beta_end, d.variance) == (
        "ddpm", 1000, "linear", 1e-4, 0.02, "beta")
    assert UNetConfig.from_dict({**config.model, "dtype": "float32"}) == SMALL
    expected = jax.tree.leaves(nnx.state(small_model, nnx.Param))
    for name in ("params", "ema_params"):
        for ours, theirs in zip(jax.tree.leaves(getattr(state, name)["model"]), expected, strict=True):
            np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))

    evaluated = _run("experiments.evaluate", f"--workdir={workdir}", "--noprogress_bar", "--bpd", "--batch_size=8")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "16 examples, each exactly once" in evaluated.stdout and "EMA parameters at step 0" in evaluated.stdout
    with open(os.path.join(workdir, "eval", "step_0", "bpd_test_onet_draws1_seed0.json")) as f:
        assert np.isfinite(json.load(f)["bpd"]["total"]["mean"])
