"""DDPM's published weights as diffusers stores them, read into vdm_jax's U-Net.

    config, params = load_ddpm_weights("ddpm-cifar10-32")   # UNetConfig, nnx.State of Params
    model = ddpm_unet("ddpm-cifar10-32")                    # the same, as a `UNet`
    family = load_ddpm_family("ddpm-cifar10-32")            # DDPM: linear β, T = 1000

`google/ddpm-cifar10-32` on the Hugging Face Hub is Ho et al.'s CIFAR-10 model (EMA weights),
converted by diffusers from the authors' TensorFlow checkpoint to a `UNet2DModel`: a folder with
`config.json`, `diffusion_pytorch_model.bin` and/or `.safetensors`, and `scheduler_config.json`.
Any `UNet2DModel` of DDPM's architecture reads (e.g. `google/ddpm-cat-256`, whose shape differs).

Nothing from the files runs: the `.bin` is read by `read_torch_state_dict` (an allow-list
unpickler) and the `.safetensors` by `read_safetensors` (a JSON header and raw bytes); the config
is JSON. Names are diffusers' (`down_blocks.1.attentions.0.to_q.weight`), or the older ones of
files written before diffusers 0.14 (`query`, `key`, `value`, `proj_attn`), which diffusers itself
renames when loading.

The architectures agree except for one detail, which the imported `UNetConfig` sets:

* `time_offset=-1`: Ho et al.'s code and diffusers count the steps from 0 (their step i - 1 has
  ᾱ of this library's step i = 1..T), so the network is fed `1000 t - 1` for t = i/T.

What matches without an option (checked against the config, else a one-line `ValueError`):
single-head attention scaled by 1/√C (`attention_head_dim` None), GroupNorm ε = 1e-6, the
sinusoidal embedding [sin, cos] with frequencies 10000^(-k/(d/2 - 1)) (`flip_sin_to_cos=False`,
`freq_shift=1`), stride-2 downsampling convs padded by (0, 1) like TensorFlow's 'SAME'
(`downsample_padding=0`), nearest-neighbour upsampling and a conv, the skips (conv_in's output,
every ResBlock's or attention's, every downsampling's), 1×1 shortcut convs, SiLU.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from vdm_jax.models.inception_weights import read_torch_state_dict
from vdm_jax.models.unet import Downsample, UNet, UNetConfig, Upsample, ddpm_cifar10

__all__ = ["read_safetensors", "unet_config_from_diffusers", "load_ddpm_weights", "ddpm_unet",
           "load_ddpm_family"]

_CONFIG = "config.json"
_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")  # first found is read
_SCHEDULER = "scheduler_config.json"
_HO_TIME_OFFSET = -1.0


class _Error(ValueError):
    """A one-line error naming the function and the file."""

    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}")


# --------------------------------------------------------------------------------------------
# safetensors, read with NumPy
# --------------------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
                       "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_MAX_HEADER = 100 << 20  # the format's own limit on the JSON header


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A `.safetensors` file as {name: np.ndarray}: an 8-byte little-endian header length, a JSON
    header {name: {dtype, shape, data_offsets}} and the raw little-endian bytes.

    Safe by construction (JSON and bytes only). BF16 comes back as `ml_dtypes.bfloat16`.

    Raises:
      ValueError: not a safetensors file, or a tensor whose dtype, shape or offsets do not fit.
    """
    path = os.fspath(path)
    where = f"read_safetensors: {path}"
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise _Error(where, "too short for a safetensors file")
    n = int.from_bytes(data[:8], "little")
    if not 2 <= n <= min(_MAX_HEADER, len(data) - 8):
        raise _Error(where, f"not a safetensors file (header length {n} for a file of {len(data)} bytes)")
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _Error(where, f"not a safetensors file (its header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise _Error(where, "not a safetensors file (its header is not a JSON object)")
    body = memoryview(data)[8 + n:]
    return {name: _tensor(where, name, entry, body) for name, entry in header.items()
            if name != "__metadata__"}


def _tensor(where: str, name: str, entry: Any, body: memoryview) -> np.ndarray:
    """One header entry's array (a copy, so that the file's bytes can be freed)."""
    if not (isinstance(entry, dict) and isinstance(entry.get("shape"), list)
            and all(type(d) is int and d >= 0 for d in entry["shape"])
            and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
            and all(type(o) is int for o in entry["data_offsets"])):
        raise _Error(where, f"{name}: expected {{dtype, shape, data_offsets}}, got {entry!r:.200}")
    dtype = _safetensors_dtype(where, name, entry.get("dtype"))
    begin, end = entry["data_offsets"]
    size = math.prod(entry["shape"]) * dtype.itemsize
    if not (0 <= begin <= end <= len(body) and end - begin == size):
        raise _Error(where, f"{name}: data_offsets {[begin, end]} do not hold {entry['shape']} of "
                            f"{entry['dtype']} within the {len(body)} bytes of data")
    return np.frombuffer(body[begin:end], dtype.newbyteorder("<")).astype(dtype).reshape(entry["shape"])


def _safetensors_dtype(where: str, name: str, code: Any) -> np.dtype:
    if code == "BF16":
        import ml_dtypes  # installed with jax
        return np.dtype(ml_dtypes.bfloat16)
    if code not in _SAFETENSORS_DTYPES:
        raise _Error(where, f"{name}: unknown dtype {code!r}")
    return np.dtype(_SAFETENSORS_DTYPES[code])


# --------------------------------------------------------------------------------------------
# diffusers' UNet2DModel config -> UNetConfig
# --------------------------------------------------------------------------------------------

# Settings vdm_jax's U-Net has no option for: the value it needs, and diffusers' default (used
# when the config omits the key, as configs written by early diffusers versions do).
_REQUIRED = {  # key: (needed, diffusers' default)
    "center_input_sample": (False, False),
    "time_embedding_type": ("positional", "positional"),
    "flip_sin_to_cos": (False, True),
    "freq_shift": (1, 0),
    "mid_block_type": ("UNetMidBlock2D", "UNetMidBlock2D"),
    "mid_block_scale_factor": (1, 1),
    "downsample_padding": (0, 1),
    "downsample_type": ("conv", "conv"),
    "upsample_type": ("conv", "conv"),
    "act_fn": ("silu", "silu"),
    "norm_eps": (1e-6, 1e-5),
    "resnet_time_scale_shift": ("default", "default"),
    "class_embed_type": (None, None),
    "num_class_embeds": (None, None),
}


def unet_config_from_diffusers(config: Mapping[str, Any], *, dropout: float = 0.1) -> UNetConfig:
    """The `UNetConfig` of a diffusers `UNet2DModel` config (its `config.json`) of DDPM's shape.

    block_out_channels (c0, c1, ...) give base_channels = c0 and channel_mult = ci / c0;
    layers_per_block is num_res_blocks; an `Attn*Block2D` at level i puts attention at
    sample_size / 2**i; add_attention is mid_attention; norm_num_groups is num_groups; the
    embedding is c0 wide. `time_offset=-1` (the module docstring says why).

    Args:
      config: the `UNet2DModel` config.
      dropout: the U-Net's dropout rate, which the weights do not record (0.1: Ho et al.'s rate
        on CIFAR-10); it matters only if training continues.

    Raises:
      ValueError: a setting vdm_jax's U-Net cannot reproduce, named with the value it needs.
    """
    return _unet_config(config, dropout=dropout, where="unet_config_from_diffusers")


def _unet_config(config: Mapping[str, Any], *, dropout: float, where: str) -> UNetConfig:
    def get(key, default=None):
        return config.get(key, default)

    if get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise _Error(where, f"expected a UNet2DModel's config, got _class_name {get('_class_name')!r}")
    for key, (needed, default) in _REQUIRED.items():
        if get(key, default) != needed:
            raise _Error(where, f"{key} = {get(key, default)!r}, but DDPM's U-Net (and vdm_jax's) "
                                f"has {needed!r}")
    channels = list(get("block_out_channels", ()))
    down = list(get("down_block_types", ()))
    up = list(get("up_block_types", ()))
    if not channels or len(down) != len(channels) or len(up) != len(channels):
        raise _Error(where, f"block_out_channels {channels}, down_block_types {down} and "
                            f"up_block_types {up} must have one entry per level")
    attn = [_attention(where, "down_block_types", kind, "DownBlock2D") for kind in down]
    if [_attention(where, "up_block_types", kind, "UpBlock2D") for kind in reversed(up)] != attn:
        raise _Error(where, f"up_block_types {up} must mirror down_block_types {down}")
    base = channels[0]
    if any(not isinstance(ch, int) or ch < 1 or ch % base for ch in channels):
        raise _Error(where, f"block_out_channels {channels} must be multiples of the first")
    size = _sample_size(where, get("sample_size"))
    _check_widths(where, config, base, channels, attn)
    if get("out_channels", 3) != get("in_channels", 3):
        raise _Error(where, f"out_channels = {get('out_channels', 3)!r} must equal in_channels = "
                            f"{get('in_channels', 3)!r} (an ε prediction)")
    try:
        return ddpm_cifar10(
            in_channels=get("in_channels", 3), image_size=size, base_channels=base,
            channel_mult=tuple(ch // base for ch in channels),
            num_res_blocks=get("layers_per_block", 2),
            attn_resolutions=tuple(size // 2**i for i, a in enumerate(attn) if a),
            mid_attention=get("add_attention", True), num_groups=get("norm_num_groups", 32),
            embedding_dim=base, time_offset=_HO_TIME_OFFSET, dropout=dropout)
    except ValueError as e:
        raise _Error(where, f"no vdm_jax U-Net has this shape: {e}") from None


def _attention(where: str, field: str, kind: Any, plain: str) -> bool:
    if kind not in (plain, f"Attn{plain}"):
        raise _Error(where, f"{field}: {kind!r} is not {plain} or Attn{plain}")
    return kind != plain


def _sample_size(where: str, size: Any) -> int:
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if not (isinstance(size, int) and size >= 1):
        raise _Error(where, f"sample_size = {size!r}: expected the image size, an int")
    return size


def _check_widths(where: str, config: Mapping[str, Any], base: int, channels: list[int],
                  attn: list[bool]) -> None:
    """The embedding MLP is 4 c0 wide, attention has one head, and its GroupNorm the ResNets' groups."""
    if config.get("time_embedding_dim") not in (None, 4 * base):
        raise _Error(where, f"time_embedding_dim = {config['time_embedding_dim']!r}: DDPM's is "
                            f"4 × block_out_channels[0] = {4 * base}")
    widths = {ch for ch, a in zip(channels, attn) if a}
    if config.get("add_attention", True):
        widths.add(channels[-1])  # the middle block's
    head = config.get("attention_head_dim", 8)
    if head is not None and {head} != widths and widths:
        raise _Error(where, f"attention_head_dim = {head!r}: DDPM's attention has one head "
                            f"(attention_head_dim None, or the attention's width {sorted(widths)})")
    if config.get("attn_norm_num_groups") not in (None, config.get("norm_num_groups", 32)):
        raise _Error(where, f"attn_norm_num_groups = {config['attn_norm_num_groups']!r} must be None "
                            f"or norm_num_groups")


# --------------------------------------------------------------------------------------------
# diffusers' state dict -> the U-Net's parameters
# --------------------------------------------------------------------------------------------

_LAYERS = {"norm1": "norm1", "conv1": "conv1", "emb_proj": "time_emb_proj", "norm2": "norm2",
           "conv2": "conv2", "skip": "conv_shortcut", "norm": "group_norm", "q": "to_q", "k": "to_k",
           "v": "to_v", "proj_out": "to_out.0", "conv": "conv"}
_LEGACY = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}  # diffusers < 0.14
_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def _block_names(model: UNet) -> dict[tuple, str]:
    """The U-Net's module paths -> diffusers' module names."""
    names = {("conv_in",): "conv_in", ("emb_dense0",): "time_embedding.linear_1",
             ("emb_dense1",): "time_embedding.linear_2", ("mid_res1",): "mid_block.resnets.0",
             ("mid_attn",): "mid_block.attentions.0", ("mid_res2",): "mid_block.resnets.1",
             ("norm_out",): "conv_norm_out", ("conv_out",): "conv_out"}
    for side in ("down", "up"):
        block = j = 0
        for k, layer in enumerate(getattr(model, side)):
            if isinstance(layer, (Downsample, Upsample)):  # the last layer of a diffusers block
                names[(side, k)] = f"{side}_blocks.{block}.{side}samplers.0"
                block, j = block + 1, 0
            else:
                names[(side, k, "res")] = f"{side}_blocks.{block}.resnets.{j}"
                names[(side, k, "attn")] = f"{side}_blocks.{block}.attentions.{j}"
                j += 1
    return names


def _diffusers_name(names: dict[tuple, str], path: tuple) -> str:
    for n in (3, 2, 1):
        if path[:n] in names:
            return ".".join([names[path[:n]], *(_LAYERS[p] for p in path[n:-1]), _LEAVES[path[-1]]])
    raise AssertionError(f"no diffusers name for the U-Net's parameter {path}")


def _from_torch(value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
    """A torch weight in the U-Net's layout (conv OIHW -> HWIO, linear and 1×1 conv [O, I] ->
    [I, O]), or None if its shape does not fit `shape`."""
    if len(shape) == 4 and value.shape == (shape[3], shape[2], shape[0], shape[1]):
        return value.transpose(2, 3, 1, 0)
    if len(shape) == 2 and value.shape in ((shape[1], shape[0]), (shape[1], shape[0], 1, 1)):
        return value.reshape(shape[1], shape[0]).T
    return value if len(shape) == 1 and value.shape == shape else None


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else tuple(reversed(shape))


def _state(where: str, config: UNetConfig, weights: Mapping[str, np.ndarray]) -> nnx.State:
    """The U-Net's parameters (nnx.Param leaves, in config.param_dtype) from diffusers' names."""
    abstract = nnx.eval_shape(lambda: UNet(config, rngs=nnx.Rngs(0)))
    names = _block_names(abstract)
    used, flat = set(), []
    for path, variable in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        name = _diffusers_name(names, path)
        found = _present(name, weights)
        if found is None:
            raise _Error(where, f"missing {name} (the U-Net's {'/'.join(map(str, path))}): not the "
                                f"state dict of the UNet2DModel its config describes")
        name = found
        value = np.asarray(weights[name])
        if not jnp.issubdtype(value.dtype, jnp.floating):
            raise _Error(where, f"{name} must be floating, got dtype {value.dtype}")
        converted = _from_torch(value, variable.shape)
        if converted is None:
            raise _Error(where, f"{name} has shape {value.shape}; the U-Net of this config needs "
                                f"{_torch_shape(variable.shape)}")
        used.add(name)
        flat.append((path, variable.replace(jnp.asarray(converted, config.param_dtype))))
    unexpected = sorted(set(weights) - used)
    if unexpected:
        more = f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else ""
        raise _Error(where, f"unexpected {', '.join(unexpected[:3])}{more}: not the state dict of the "
                            f"UNet2DModel its config describes")
    return nnx.from_flat_state(flat)


def _present(name: str, weights: Mapping[str, np.ndarray]) -> str | None:
    """`name`, or its pre-0.14 diffusers spelling, whichever the state dict has."""
    if name in weights:
        return name
    for new, old in _LEGACY.items():
        if f".{new}." in name:
            legacy = name.replace(f".{new}.", f".{old}.")
            return legacy if legacy in weights else None
    return None


# --------------------------------------------------------------------------------------------
# The files
# --------------------------------------------------------------------------------------------


def _files(where: str, path_or_dir: str | os.PathLike) -> tuple[str, str]:
    """(config.json, weights file) of a diffusers model folder (or its `unet/` subfolder, as a
    pipeline stores it), or of a weights file with config.json beside it."""
    path = os.fspath(path_or_dir)
    if os.path.isdir(path):
        for folder in (path, os.path.join(path, "unet")):
            weights = [os.path.join(folder, n) for n in _WEIGHTS if os.path.isfile(os.path.join(folder, n))]
            if weights and os.path.isfile(os.path.join(folder, _CONFIG)):
                return os.path.join(folder, _CONFIG), weights[0]
        raise _Error(where, f"{path} holds no {_CONFIG} with {' or '.join(_WEIGHTS)} (nor does its unet/): "
                            f"download google/ddpm-cifar10-32's files into it")
    if not os.path.isfile(path):
        raise _Error(where, f"no such file or folder: {path}")
    config = os.path.join(os.path.dirname(path), _CONFIG)
    if not os.path.isfile(config):
        raise _Error(where, f"{path}: its model's {_CONFIG} must be in the same folder")
    return config, path


def _read_json(where: str, path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _Error(where, f"{path} is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise _Error(where, f"{path}: expected a JSON object, got a {type(value).__name__}")
    return value


def _read_weights(path: str) -> dict[str, np.ndarray]:
    """A `.safetensors` (by its name) or a torch.save'd state dict, without running its code."""
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    return read_torch_state_dict(path)


def load_ddpm_weights(path_or_dir: str | os.PathLike, *,
                      dropout: float = 0.1) -> tuple[UNetConfig, nnx.State]:
    """DDPM weights stored by diffusers (a `UNet2DModel`) as vdm_jax's `UNetConfig` and parameters.

    Args:
      path_or_dir: the model's folder (`config.json` and `diffusion_pytorch_model.safetensors`,
        else `.bin`; or those in its `unet/` subfolder), or a weights file with `config.json`
        beside it. E.g. a download of `google/ddpm-cifar10-32`.
      dropout: the config's dropout rate (not in the weights; see `unet_config_from_diffusers`).

    Returns:
      (config, params): `nnx.merge(nnx.graphdef(UNet(config, ...)), params)` is the network;
      `ddpm_unet` does that. The network takes `cond = i/T` for step i = 1..T, as every vdm_jax
      DDPM network does (`config.time_offset = -1` feeds it the step i - 1 it was trained on).

    Raises:
      ValueError: a missing or unreadable file, a config of another architecture (the setting is
        named), a missing or unexpected parameter, or a shape that does not fit; one line each.
      pickle.UnpicklingError: a `.bin` that is not a plain state dict (`read_torch_state_dict`).
    """
    where = "load_ddpm_weights"
    config_path, weights_path = _files(where, path_or_dir)
    config = _unet_config(_read_json(where, config_path), dropout=dropout, where=f"{where}: {config_path}")
    return config, _state(f"{where}: {weights_path}", config, _read_weights(weights_path))


def ddpm_unet(path_or_dir: str | os.PathLike, **kwargs: Any) -> UNet:
    """A `UNet` holding the weights `load_ddpm_weights(path_or_dir, **kwargs)` reads; nothing
    random is drawn (the network is built abstractly, then filled)."""
    config, params = load_ddpm_weights(path_or_dir, **kwargs)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: UNet(config, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, params)


_VARIANCES = {"fixed_small": "posterior", "fixed_large": "beta"}
_PREDICTIONS = {"epsilon": "eps", "sample": "x", "v_prediction": "v"}


def load_ddpm_family(path_or_dir: str | os.PathLike | None = None):
    """The `vdm_jax.families.DDPM` of a diffusers `DDPMScheduler` config.

    Reads `scheduler_config.json` in `path_or_dir` (a model folder, its parent pipeline folder or
    its `scheduler/` subfolder). None, or a folder without one: Ho et al.'s CIFAR-10 process,
    T = 1000 steps of β linear from 1e-4 to 0.02, ε prediction, the reverse variance β̃
    (diffusers' 'fixed_small', what `google/ddpm-cifar10-32` ships).

    Raises:
      ValueError: a schedule other than linear β, trained β's, or an unknown variance or
        prediction type.
    """
    from vdm_jax.families import DDPM  # (vdm_jax.models does not import the families)

    where = "load_ddpm_family"
    found = _scheduler_config(path_or_dir)
    if found is None:
        return DDPM(timesteps=1000, schedule="linear", beta_start=1e-4, beta_end=0.02, prediction="eps",
                    variance="posterior")
    s = _read_json(where, found)
    where = f"{where}: {found}"
    if s.get("beta_schedule", "linear") != "linear" or s.get("trained_betas") is not None:
        raise _Error(where, f"beta_schedule = {s.get('beta_schedule')!r} (trained_betas "
                            f"{'given' if s.get('trained_betas') is not None else 'None'}): only DDPM's linear β reads")
    if s.get("num_train_timesteps", 1000) != 1000:
        raise _Error(where, f"num_train_timesteps = {s['num_train_timesteps']!r}: the U-Net embeds 1000 t, "
                            f"DDPM's step index only for T = 1000")
    variance, prediction = s.get("variance_type", "fixed_small"), s.get("prediction_type", "epsilon")
    if variance not in _VARIANCES or prediction not in _PREDICTIONS:
        raise _Error(where, f"variance_type {variance!r} / prediction_type {prediction!r}: expected one of "
                            f"{sorted(_VARIANCES)} / {sorted(_PREDICTIONS)}")
    return DDPM(timesteps=1000, schedule="linear",
                beta_start=s.get("beta_start", 1e-4), beta_end=s.get("beta_end", 0.02),
                prediction=_PREDICTIONS[prediction], variance=_VARIANCES[variance])


def _scheduler_config(path_or_dir: str | os.PathLike | None) -> str | None:
    if path_or_dir is None:
        return None
    path = os.fspath(path_or_dir)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    pipeline = os.path.dirname(folder) if os.path.basename(folder) == "unet" else folder
    for candidate in (folder, pipeline, os.path.join(pipeline, "scheduler")):
        if os.path.isfile(os.path.join(candidate, _SCHEDULER)):
            return os.path.join(candidate, _SCHEDULER)
    return None
