"""google-research/vdm's checkpoints, read without its code: the score network and the noise schedule.

    ckpt = read_vdm_checkpoint("checkpoint-final/checkpoints-0")   # a directory of ckpt-N.flax, or one file
    model = nnx.merge(ckpt.graphdef, ckpt.ema_params)              # a vdm_jax `UNet` with the official EMA weights
    gamma = vdm_jax.LearnedLinearSchedule()                        # γ(t) = b + |w| t, with the EMA's w and b:
    gamma.w[...], gamma.b[...] = ckpt.ema_schedule["w"], ckpt.ema_schedule["b"]
    pred_fn = as_pred_fn(model, gamma)                             # (γ_min, γ_max = -13.3, 5: the official config's)

The official code (google-research/vdm, `experiment.py`) saves its train state with clu's
`Checkpoint.save`: `flax.serialization.to_bytes(state)` into `checkpoints-0/ckpt-N.flax`, a Flax
msgpack of {'step', 'params', 'ema_params', 'opt_state'}. It is read here with
`flax.serialization.msgpack_restore`, which rebuilds plain NumPy arrays and dicts and runs no code
from the file. `python -m experiments.import_checkpoint
--from=vdm` turns one into a vdm_jax work directory.

The official score network (`model_vdm.ScoreUNet`) is `vdm_cifar10()`'s layout and no option of
`UNetConfig` had to be added: no downsampling, `sm_n_layer` ResBlocks of `sm_n_embd` channels
(conv1, a bias-free `cond_proj` of the embedding, conv2, a 1×1 `nin_shortcut` where the channels
change), middle (ResBlock, attention, ResBlock; the middle attention is there even with
`with_attention=False`), `sm_n_layer + 1` up ResBlocks on concat(h, skip), attention after every
down and up block with `with_attention` (`attn_resolutions=(image_size,)` here), Fourier features
with exponents 6 and 7 (`Base2FourierFeatures(start=6, stop=8)`, the same channel order), flax's
GroupNorm (32 groups, ε = 1e-6), the time embedding of 1000·(γ_t − γ_min)/(γ_max − γ_min) (the
sinusoidal embedding of tensor2tensor, sines first) concatenated with the 1-wide `conditioning`
input (`extra_cond_dim=1`), a swish MLP of width 4·sm_n_embd, and the output
conv(swish(GroupNorm(h))) + z. `PARAMETER_NAMES` documents the mapping.

What the file does not hold is read from the official config, with the CIFAR-10 config's values as
defaults: the image size (32), `gamma_min`/`gamma_max` (−13.3, 5.0: the network sees γ mapped to
[0, 1] with them), `sm_n_timesteps` (0: continuous time) and the dropout rate (0.1).
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import nnx

from vdm_jax.models.unet import UNet, UNetConfig, vdm_cifar10

__all__ = ["VDM_CIFAR10_CHECKPOINT", "VDM_CIFAR10_BPD", "PARAMETER_NAMES", "VDMCheckpoint", "read_vdm_checkpoint",
           "read_flax_msgpack", "vdm_unet_config", "vdm_unet_state"]

VDM_CIFAR10_CHECKPOINT = "gs://gresearch/vdm/cifar10/checkpoint-final/checkpoints-0"
"""The released CIFAR-10 checkpoint (google-research/vdm's README: `configs/cifar10.py`, no data augmentation)."""
VDM_CIFAR10_BPD = 2.637
"""Its test bits/dim as the official README reports it (`eval_bpd=2.637`; the paper's 2.65)."""

_FOURIER = (6, 7)  # model_vdm.Base2FourierFeatures(start=6, stop=8, step=1)

# vdm_jax's layer name -> the official one (`model_vdm.py`); the leaves (kernel, bias, scale) keep their names.
_TOP = {"emb_dense0": "dense0", "emb_dense1": "dense1", "conv_in": "conv_in", "norm_out": "GroupNorm_0",
        "conv_out": "conv_out"}
_MIDDLE = {"mid_res1": "mid.block_1", "mid_attn": "mid.attn_1", "mid_res2": "mid.block_2"}
_RESBLOCK = {"norm1": "GroupNorm_0", "conv1": "conv1", "emb_proj": "cond_proj", "norm2": "GroupNorm_1",
             "conv2": "conv2", "skip": "nin_shortcut"}
_ATTENTION = {"norm": "GroupNorm_0", "q": "q", "k": "k", "v": "v", "proj_out": "proj_out"}

PARAMETER_NAMES = {
    "emb_dense0, emb_dense1": "score_model/dense0, dense1",
    "conv_in, norm_out, conv_out": "score_model/conv_in, GroupNorm_0, conv_out",
    "down/i/res, down/i/attn": "score_model/down.block_i, down.attn_i",
    "mid_res1, mid_attn, mid_res2": "score_model/mid.block_1, mid.attn_1, mid.block_2",
    "up/i/res, up/i/attn": "score_model/up.block_i, up.attn_i",
    "ResBlock norm1, conv1, emb_proj, norm2, conv2, skip": "GroupNorm_0, conv1, cond_proj, GroupNorm_1, conv2, "
                                                           "nin_shortcut",
    "AttnBlock norm, q, k, v, proj_out": "GroupNorm_0, q, k, v, proj_out",
    "the schedule's w, b (γ(t) = b + |w| t)": "gamma/w, gamma/b",
}
"""vdm_jax's `UNet` state paths and the official parameter names they are read from."""


class VDMCheckpoint(NamedTuple):
    """An official VDM checkpoint in vdm_jax's terms.

    model_config: the `UNetConfig` of the official score network.
    graphdef: the `UNet`'s graph definition (`nnx.merge(graphdef, params)` is the network).
    params, ema_params: the U-Net's `nnx.State` from the checkpoint's 'params' and 'ema_params'.
    gamma_type: the official schedule, 'learnable_scalar' (γ(t) = b + |w| t, w and b learned) or
      'fixed' (γ_min + (γ_max − γ_min) t: no parameters).
    schedule, ema_schedule: {'w': float, 'b': float} of a 'learnable_scalar' schedule ({} if fixed).
    step: the training step the checkpoint was saved at.
    """

    model_config: UNetConfig
    graphdef: Any
    params: nnx.State
    ema_params: nnx.State
    gamma_type: str
    schedule: dict[str, float]
    ema_schedule: dict[str, float]
    step: int


def _checkpoint_file(path: str) -> str:
    """`path` itself, or in a directory (clu's `checkpoints-0/`) its newest `ckpt-N.flax`."""
    if not os.path.isdir(path):
        return path
    numbered = [(int(m.group(1)), name) for name in os.listdir(path) if (m := re.fullmatch(r"ckpt-(\d+)\.flax", name))]
    if not numbered:
        raise FileNotFoundError(f"{path} holds no ckpt-N.flax file: give the official checkpoint directory "
                                "(e.g. checkpoint-final/checkpoints-0) or one of its .flax files.")
    return os.path.join(path, max(numbered)[1])


def read_flax_msgpack(path: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """(the file read, its contents) of a Flax msgpack file (`flax.serialization.to_bytes`), or of the newest
    `ckpt-N.flax` in a directory: nested dicts of NumPy arrays. Nothing in the file is run.

    Raises:
      FileNotFoundError: no such file, or a directory without a `ckpt-N.flax`.
      ValueError: the file is not a Flax msgpack of a dict (one line naming it).
    """
    from flax import serialization  # (flax's msgpack reader: arrays, dicts and lists; no code)

    path = _checkpoint_file(os.path.abspath(os.path.expanduser(os.fspath(path))))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist.")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        tree = serialization.msgpack_restore(raw)
    except Exception as e:  # noqa: BLE001 - msgpack and NumPy each have their own errors for a bad file
        raise ValueError(f"{path} is not a Flax msgpack checkpoint ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]})") from None
    if not isinstance(tree, dict):
        raise ValueError(f"{path} is not a Flax msgpack checkpoint of a train state (it holds a "
                         f"{type(tree).__name__}, not a dict)")
    return path, tree


def _shape(tree: Mapping, *names: str) -> tuple[int, ...]:
    node = tree
    for name in names:
        node = node[name]
    return tuple(np.shape(node))


def vdm_unet_config(score_model: Mapping[str, Any], *, image_size: int = 32, dropout: float = 0.1) -> UNetConfig:
    """The `UNetConfig` of an official `ScoreUNet` from its parameters (`params['score_model']`).

    The widths, the number of blocks, attention, Fourier features and the conditioning input are read
    from the parameters' names and shapes; `image_size` (which only names the attention's resolution
    here) and `dropout` (which only matters for training) are not in a checkpoint.

    Raises:
      ValueError: parameters that are not a `ScoreUNet`'s (one line saying which).
    """
    try:
        n_embd, c_in_conv = _shape(score_model, "conv_in", "kernel")[3], _shape(score_model, "conv_in", "kernel")[2]
        channels = _shape(score_model, "conv_out", "kernel")[3]
        dense_in, width = _shape(score_model, "dense0", "kernel")
    except (KeyError, IndexError, TypeError) as e:
        raise ValueError(f"the parameters are not a VDM ScoreUNet's (no {e} of the expected shape under "
                         "score_model: conv_in, conv_out, dense0)") from None
    if c_in_conv not in (channels, channels * (1 + 2 * len(_FOURIER))):
        raise ValueError(f"score_model/conv_in/kernel takes {c_in_conv} channels: neither the {channels} of the "
                         f"images nor {channels * (1 + 2 * len(_FOURIER))} with VDM's Fourier features")
    if width != 4 * n_embd or dense_in < n_embd:
        raise ValueError(f"score_model/dense0/kernel has shape {(dense_in, width)}; a ScoreUNet of {n_embd} channels "
                         f"has ({n_embd} + conditioning, {4 * n_embd})")
    layers = sum(1 for name in score_model if re.fullmatch(r"down\.block_\d+", name))
    attention = "down.attn_0" in score_model
    try:
        return vdm_cifar10(in_channels=channels, image_size=image_size, base_channels=n_embd,
                           num_res_blocks=layers, attn_resolutions=(image_size,) if attention else (),
                           dropout=float(dropout), embedding_dim=n_embd, extra_cond_dim=dense_in - n_embd,
                           fourier_features=_FOURIER if c_in_conv != channels else ())
    except ValueError as e:
        raise ValueError(f"this ScoreUNet ({layers} layers of {n_embd} channels) has no vdm_jax UNet: {e}") from None


def _official_path(path: tuple) -> tuple[str, ...]:
    """The official name of a vdm_jax `UNet` state path (`PARAMETER_NAMES`)."""
    head, *rest = path
    if head in _TOP:
        return (_TOP[head], *rest)
    if head in _MIDDLE:
        block, (layer, leaf), kind = _MIDDLE[head], rest, "attn" if head == "mid_attn" else "res"
    else:  # ('down' | 'up', i, 'res' | 'attn', layer, leaf)
        i, kind, layer, leaf = rest
        block = f"{head}.{'block' if kind == 'res' else 'attn'}_{i}"
    return block, (_RESBLOCK if kind == "res" else _ATTENTION)[layer], leaf


def _flat(tree: Mapping, prefix: tuple = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, (*prefix, k)) if isinstance(v, Mapping) else {(*prefix, k): v})
    return out


def vdm_unet_state(score_model: Mapping[str, Any], config: UNetConfig, *, where: str = "score_model") -> nnx.State:
    """The `UNet(config)` state (`nnx.split(model)[1]`) holding an official `ScoreUNet`'s parameters.

    Raises:
      ValueError: a parameter missing, of another shape, or left over (one line naming it).
    """
    official = _flat(score_model)
    _, abstract = nnx.split(nnx.eval_shape(lambda: UNet(config, rngs=nnx.Rngs(0))))
    made, used = [], set()
    for path, variable in nnx.to_flat_state(abstract):
        name = _official_path(path)
        shape = tuple(variable.get_value().shape)
        if name not in official:
            raise ValueError(f"{where}/{'/'.join(name)} is missing: it is vdm_jax's {'/'.join(map(str, path))} "
                             f"{list(shape)}")
        value = np.asarray(official[name])
        if value.shape != shape:
            raise ValueError(f"{where}/{'/'.join(name)} has shape {list(value.shape)}, but vdm_jax's "
                             f"{'/'.join(map(str, path))} takes {list(shape)}")
        made.append((path, variable.replace(jnp.asarray(value, variable.get_value().dtype))))
        used.add(name)
    extra = sorted(set(official) - used)
    if extra:
        raise ValueError(f"{where} has {len(extra)} parameter(s) vdm_jax's UNet has no place for, e.g. "
                         f"{where}/{'/'.join(extra[0])}")
    return nnx.from_flat_state(made)


def _schedule(params: Mapping[str, Any], where: str) -> tuple[str, dict[str, float]]:
    gamma = params.get("gamma")
    if gamma is None:
        return "fixed", {}
    if set(gamma) == {"w", "b"} and all(np.size(gamma[k]) == 1 for k in "wb"):
        return "learnable_scalar", {k: float(np.asarray(gamma[k]).reshape(())) for k in "wb"}
    raise ValueError(f"{where}/gamma holds {sorted(gamma)}: only the 'learnable_scalar' schedule (w, b; the "
                     "official CIFAR-10 config's) and the 'fixed' one are read; 'learnable_nnet' is not")


def read_vdm_checkpoint(path: str | os.PathLike, *, image_size: int = 32, dropout: float = 0.1) -> VDMCheckpoint:
    """An official VDM checkpoint (google-research/vdm) as a vdm_jax `UNet` and its noise schedule.

    Args:
      path: a `ckpt-N.flax` file, or the directory holding them (its newest
        is read), e.g. the released `checkpoint-final/checkpoints-0` (`VDM_CIFAR10_CHECKPOINT`).
      image_size: the images' size (the official config's data; 32 for CIFAR-10).
      dropout: the network's dropout rate when trained further (`sm_pdrop`; 0.1 for CIFAR-10).

    Returns:
      A `VDMCheckpoint`: the network's config, graph definition and states (parameters and EMA),
      the schedule's w and b, and the step.

    Raises:
      FileNotFoundError: no such file.
      ValueError: not a Flax msgpack file, not a VDM train state, or parameters that do not fit a
        ScoreUNet (one line each).
    """
    path, tree = read_flax_msgpack(path)
    if "step" not in tree or not all(isinstance(tree.get(k), Mapping) and isinstance(tree[k].get("score_model"),
                                                                                      Mapping)
                                     for k in ("params", "ema_params")):
        raise ValueError(f"{path} is a Flax msgpack file but not a VDM train state: it needs 'step', and 'params' "
                         f"and 'ema_params' with a 'score_model'; it holds {sorted(tree)}")
    config = vdm_unet_config(tree["params"]["score_model"], image_size=image_size, dropout=dropout)
    states = {k: vdm_unet_state(tree[k]["score_model"], config, where=f"{k}/score_model")
              for k in ("params", "ema_params")}
    schedules = {k: _schedule(tree[k], k) for k in ("params", "ema_params")}
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: UNet(config, rngs=nnx.Rngs(0))))
    return VDMCheckpoint(config, graphdef, states["params"], states["ema_params"], schedules["params"][0],
                         schedules["params"][1], schedules["ema_params"][1], int(np.asarray(tree["step"])))
