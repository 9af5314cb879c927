"""A U-Net for diffusion models in Flax NNX (DDPM, Ho et al. 2020; VDM, Kingma et al. 2021).

The network maps a noisy image `z` [B, H, W, C] and a normalised time or noise level `cond` [B]
to one array with the shape of `z` ([B, H, W, 2C] with a learned variance). It only predicts:
what the output means ('eps', 'x', 'v' or 'score') is recorded in `UNetConfig.prediction`, and
`as_pred_fn` turns the network into the `pred_fn(z_t, t)` that the core's losses and samplers call.

The module holds parameters only, no RNG state: dropout is driven by an explicit `key`, so
training steps stay pure functions of pytrees::

    graphdef, params = nnx.split(model)          # params: nnx.Param leaves only
    eps_hat = nnx.merge(graphdef, params)(z_t, t, key=dropout_key)

The layers are flax's (`nnx.Conv`, `nnx.Linear`, `nnx.GroupNorm`) with flax's initialisers; every
kernel of a `UNet` is cut from one random draw (`vdm_jax.models._init`), and an eager call is one
compiled program (`nnx.jit`), not one per operation.

Two layouts are covered by one `UNetConfig`:

* DDPM (`downsample=True`): levels of `num_res_blocks` ResBlocks at halving resolutions, joined
  by strided convs; the up path has `num_res_blocks + 1` blocks per level, each taking the
  concatenation of `h` and one skip; nearest-neighbour upsampling + conv between levels.
* VDM (`downsample=False`): one level of many ResBlocks at full resolution, with Fourier
  features of the input and the "base measure" skip `eps_hat = f(z) + z`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, NoReturn

import jax
import jax.numpy as jnp
from flax import nnx

from vdm_jax.diffusion import PREDICTIONS
from vdm_jax.models._init import OneDrawModule, constant, variance_scaling

_TUPLE_FIELDS = ("channel_mult", "attn_resolutions", "fourier_features")
_TIME_SCALE = 1000.0  # cond in [0, 1] is embedded as cond * 1000, like DDPM's integer steps.


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Every architectural choice of the U-Net; validated eagerly.

    Attributes:
      in_channels: C of the images; the output has C channels too (2C with `learned_variance`).
      image_size: the image size the layout is designed for: level i works at `image_size / 2**i`,
        and attention follows the ResBlocks of the levels whose size is in `attn_resolutions`.
        The network is convolutional and takes any H, W its downsampling allows (multiples of
        `2**(len(channel_mult)-1)`); the layout stays the one `image_size` defines.
      base_channels: width after `conv_in`; level i has `base_channels * channel_mult[i]`.
      channel_mult: one multiplier per resolution level.
      num_res_blocks: ResBlocks per level in the down path (the up path has one more).
      attn_resolutions: spatial sizes at which each ResBlock is followed by self-attention.
      mid_attention: self-attention between the two middle ResBlocks.
      downsample: True: halve the resolution between levels (DDPM). False: all blocks at full
        resolution (VDM); then `channel_mult` must have a single entry.
      dropout: dropout rate inside every ResBlock (active only when a key is given).
      num_groups: GroupNorm groups; must divide every channel count in the network.
      embedding_dim: width of the sinusoidal embedding of `cond * 1000`; the MLP after it
        is `4 * embedding_dim` wide.
      time_offset: added to `cond * 1000` before the embedding. 0 for this library's own
        networks (DDPM step i, i = 1..T, is embedded as i). Ho et al.'s code and diffusers count
        the steps from 0 (their step i - 1 is step i here), so their DDPM weights are imported
        with -1 (`vdm_jax.models.ddpm_weights`); the network then sees what it was trained on.
      num_classes: K > 0 makes the network class-conditional: a learned embedding of the label
        (classes 0..K-1, and K = "no label", the unconditional model that classifier-free guidance
        needs) is added to the noise-level embedding, as in EDM and guided-diffusion. 0 (the
        default): unconditional, with no such parameters.
      extra_cond_dim: width of an optional extra conditioning vector `extra_cond` [B, k],
        concatenated to the time embedding before the MLP; zeros when not passed. This is
        VDM's `conditioning` input (an augmentation flag in its `cifar10_aug` runs, zeros for
        plain CIFAR-10). 0 = no such input.
      fourier_features: exponents n of VDM's input Fourier features: for each n, sin and cos of
        2**n * 2π * z are concatenated to z (empty = none; VDM uses (6, 7)).
      skip_input: VDM's "base measure": the prediction is `f(z) + z`.
      prediction: what the output means, one of `vdm_jax.diffusion.PREDICTIONS` (read by training).
      learned_variance: also output v (raw, unconstrained), for a learned variance (Nichol &
        Dhariwal 2021): the output is [B, H, W, 2C], the prediction's C channels then v's.
      emb_proj_bias: a bias on each ResBlock's projection of the embedding (DDPM: yes; VDM:
        no; it is redundant with `conv1`'s bias).
      zero_init_residual: zero-initialise the last layer of every residual branch (ResBlock
        `conv2`, attention `proj_out`), as DDPM and VDM do.
      zero_init_output: zero-initialise the output conv, as DDPM and VDM do.
      dtype: compute dtype of activations (e.g. 'bfloat16'; a dtype object is stored by its
        name); the output is cast to z's dtype.
      param_dtype: dtype of the parameters (float32 by default).
      remat: rematerialise each ResBlock and attention block in the backward pass
        (`nnx.remat`): only their inputs are kept from the forward pass, so activation
        memory falls to about one tensor per block for about one more forward pass of compute.
        Changes neither the parameters nor the result.
    """

    in_channels: int = 3
    image_size: int = 32
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    mid_attention: bool = True
    downsample: bool = True
    dropout: float = 0.1
    num_groups: int = 32
    embedding_dim: int = 128
    time_offset: float = 0.0
    num_classes: int = 0
    extra_cond_dim: int = 0
    fourier_features: tuple[int, ...] = ()
    skip_input: bool = False
    prediction: str = "eps"
    learned_variance: bool = False
    emb_proj_bias: bool = True
    zero_init_residual: bool = True
    zero_init_output: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False

    def __post_init__(self):
        for name in _TUPLE_FIELDS:  # Lists from JSON/YAML become tuples, so configs hash.
            if not isinstance(getattr(self, name), (tuple, list)):
                _fail(name, "a tuple of ints", getattr(self, name))
            object.__setattr__(self, name, tuple(getattr(self, name)))
        _check_fields(self)
        for name in ("dtype", "param_dtype"):  # jnp.bfloat16 and 'bfloat16' read the same.
            object.__setattr__(self, name, jnp.dtype(getattr(self, name)).name)
        _check_layout(self)

    def replace(self, **changes: Any) -> UNetConfig:
        """Returns a copy with `changes` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Returns the fields as a plain dict (inverse of `from_dict`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> UNetConfig:
        """Builds a config from a mapping; unknown keys raise a `ValueError` naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(
                f"UNetConfig: unknown field(s) {unknown}; valid fields are {sorted(known)}"
            )
        return cls(**fields)


def _fail(field: str, expected: str, got: Any) -> NoReturn:
    raise ValueError(f"UNetConfig.{field}: expected {expected}, got {got!r}")


def _is_int(x: Any, minimum: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= minimum


def _check_fields(c: UNetConfig) -> None:
    """Checks each field on its own: types, ranges and choices."""
    for name, minimum in [("in_channels", 1), ("image_size", 1), ("base_channels", 1),
                          ("num_res_blocks", 1), ("num_groups", 1), ("num_classes", 0), ("extra_cond_dim", 0)]:
        if not _is_int(getattr(c, name), minimum):
            _fail(name, f"an int >= {minimum}", getattr(c, name))
    if not c.channel_mult or not all(_is_int(m, 1) for m in c.channel_mult):
        _fail("channel_mult", "a non-empty tuple of ints >= 1", c.channel_mult)
    if not all(_is_int(r, 1) for r in c.attn_resolutions):
        _fail("attn_resolutions", "a tuple of ints >= 1", c.attn_resolutions)
    if not all(_is_int(n, 0) for n in c.fourier_features):
        _fail("fourier_features", "a tuple of ints >= 0 (exponents)", c.fourier_features)
    if not (_is_int(c.embedding_dim, 4) and c.embedding_dim % 2 == 0):
        _fail("embedding_dim", "an even int >= 4", c.embedding_dim)
    if not (isinstance(c.dropout, (int, float)) and 0.0 <= c.dropout < 1.0):
        _fail("dropout", "a rate in [0, 1)", c.dropout)
    if isinstance(c.time_offset, bool) or not (isinstance(c.time_offset, (int, float))
                                               and math.isfinite(c.time_offset)):
        _fail("time_offset", "a finite number", c.time_offset)
    for name in ("mid_attention", "downsample", "skip_input", "learned_variance", "emb_proj_bias",
                 "zero_init_residual", "zero_init_output", "remat"):
        if not isinstance(getattr(c, name), bool):
            _fail(name, "a bool", getattr(c, name))
    if c.prediction not in PREDICTIONS:
        _fail("prediction", f"one of {PREDICTIONS}", c.prediction)
    for name in ("dtype", "param_dtype"):
        if not _is_float_dtype(getattr(c, name)):
            _fail(name, "a floating dtype name such as 'float32' or 'bfloat16'", getattr(c, name))


def _is_float_dtype(name: Any) -> bool:
    try:
        return jnp.issubdtype(jnp.dtype(name), jnp.floating)
    except TypeError:
        return False


def _check_layout(c: UNetConfig) -> None:
    """Checks the fields against each other: resolutions, attention sizes, group counts."""
    levels = len(c.channel_mult)
    if not c.downsample and levels != 1:
        _fail("channel_mult", "a single level when downsample=False (VDM style)", c.channel_mult)
    if c.downsample and c.image_size % 2 ** (levels - 1):
        _fail("image_size", f"a multiple of 2**(len(channel_mult)-1) = {2 ** (levels - 1)}",
              c.image_size)
    reachable = _resolutions(c)
    for r in c.attn_resolutions:
        if r not in reachable:
            _fail("attn_resolutions", f"sizes among the reachable resolutions {reachable}", r)
    for ch in _all_channels(c):
        if ch % c.num_groups:
            _fail("num_groups", f"a divisor of every channel count (this one: {ch})",
                  c.num_groups)


# --------------------------------------------------------------------------------------------
# Layout: which blocks, with which channels, at which resolution. One source of truth for
# validation and construction.
# --------------------------------------------------------------------------------------------


class _Res(NamedTuple):
    """A ResBlock `in_ch -> out_ch` at spatial size `size`, optionally followed by attention."""
    in_ch: int
    out_ch: int
    size: int
    attn: bool


class _Resample(NamedTuple):
    """A change of resolution (stride-2 conv down, nearest + conv up) at `ch` channels."""
    ch: int


def _resolutions(c: UNetConfig) -> tuple[int, ...]:
    """Spatial size of each level: image_size, image_size / 2, ... (a single level without
    downsampling)."""
    return tuple(c.image_size // 2**i for i in range(len(c.channel_mult)))


def _down_layout(c: UNetConfig) -> tuple[list[_Res | _Resample], list[int]]:
    """Down-path blocks, and the channels of each skip they leave (conv_in's output first)."""
    layers, skips, ch = [], [c.base_channels], c.base_channels
    for level, size in enumerate(_resolutions(c)):
        out = c.base_channels * c.channel_mult[level]
        for _ in range(c.num_res_blocks):
            layers.append(_Res(ch, out, size, size in c.attn_resolutions))
            ch = out
            skips.append(ch)
        if level != len(c.channel_mult) - 1:
            layers.append(_Resample(ch))
            skips.append(ch)
    return layers, skips


def _up_layout(c: UNetConfig, skips: list[int]) -> list[_Res | _Resample]:
    """Up-path blocks: `num_res_blocks + 1` per level, each consuming one skip (last in,
    first out)."""
    skips, layers, ch = list(skips), [], skips[-1]
    for level in reversed(range(len(c.channel_mult))):
        size = _resolutions(c)[level]
        out = c.base_channels * c.channel_mult[level]
        for _ in range(c.num_res_blocks + 1):
            layers.append(_Res(ch + skips.pop(), out, size, size in c.attn_resolutions))
            ch = out
        if level != 0:
            layers.append(_Resample(ch))
    return layers


def _all_channels(c: UNetConfig) -> set[int]:
    """Every channel count that meets a GroupNorm."""
    down, skips = _down_layout(c)
    blocks = [b for b in down + _up_layout(c, skips) if isinstance(b, _Res)]
    return {ch for b in blocks for ch in (b.in_ch, b.out_ch)}


def _input_channels(c: UNetConfig) -> int:
    """Channels into conv_in: z and, per Fourier exponent, sin and cos of each channel."""
    return c.in_channels * (1 + 2 * len(c.fourier_features))


# --------------------------------------------------------------------------------------------
# Named configurations
# --------------------------------------------------------------------------------------------


def ddpm_cifar10(**overrides: Any) -> UNetConfig:
    """The DDPM CIFAR-10 network (Ho et al. 2020, Appendix B): 35,746,307 parameters.

    128 base channels, channel_mult (1, 2, 2, 2) at 32/16/8/4, 2 ResBlocks per level,
    attention at 16×16 and in the middle, dropout 0.1. The paper reports 35.7M; diffusers'
    DDPM-shaped `UNet2DModel` has the same 35,746,307.
    """
    return UNetConfig.from_dict(dict(
        in_channels=3, image_size=32, base_channels=128, channel_mult=(1, 2, 2, 2),
        num_res_blocks=2, attn_resolutions=(16,), mid_attention=True, downsample=True,
        dropout=0.1, embedding_dim=128, prediction="eps") | overrides)


def vdm_cifar10(**overrides: Any) -> UNetConfig:
    """The VDM CIFAR-10 score network (Kingma et al. 2021; google-research/vdm `ScoreUNet`).

    32 ResBlocks of 128 channels at 32×32, middle (ResBlock, attention, ResBlock), 33 up
    ResBlocks on concat(h, skip), Fourier features with exponents (6, 7), base measure
    `eps_hat = f(z) + z`, dropout 0.1, zero-initialised output conv.

    Parameters: 30,578,179, the same layout as the official `ScoreUNet`, including its
    1-wide `conditioning` slot (`extra_cond_dim=1`, zeros unless given). The official figure
    of 30,578,181 counts the whole VDM model, which adds the 2 scalars (w, b) of its learnable
    noise schedule γ(t) = b + |w| t; here the schedule lives outside the network.
    """
    return UNetConfig.from_dict(dict(
        in_channels=3, image_size=32, base_channels=128, channel_mult=(1,),
        num_res_blocks=32, attn_resolutions=(), mid_attention=True, downsample=False,
        dropout=0.1, embedding_dim=128, extra_cond_dim=1, fourier_features=(6, 7),
        emb_proj_bias=False, skip_input=True, prediction="eps") | overrides)


def tiny(*, image_size: int = 32, in_channels: int = 3, **overrides: Any) -> UNetConfig:
    """A small DDPM-style network for tests and a CPU quickstart (~0.42M parameters).

    Two levels (24 and 48 channels), one ResBlock per level, attention at the lower level
    (`image_size // 2`) and in the middle, 8 GroupNorm groups. Works for any even image size,
    e.g. `tiny(image_size=16, in_channels=1)` for 16×16 single-channel images.
    """
    return UNetConfig.from_dict(dict(
        in_channels=in_channels, image_size=image_size, base_channels=24, channel_mult=(1, 2),
        num_res_blocks=1, attn_resolutions=(image_size // 2,), mid_attention=True,
        downsample=True, dropout=0.1, num_groups=8, embedding_dim=32) | overrides)


# --------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------


def sinusoidal_embedding(t: jax.Array, dim: int) -> jax.Array:
    """Transformer-style sinusoidal embedding of a batch of scalars (DDPM / VDM / tensor2tensor).

    emb[b] = [sin(t_b ω_0), ..., sin(t_b ω_{d-1}), cos(t_b ω_0), ..., cos(t_b ω_{d-1})],
    ω_i = 10000^(-i / (d - 1)), d = dim / 2.

    Args:
      t: [B] values (DDPM: step index; here `cond * 1000`).
      dim: even embedding width, >= 4.

    Returns:
      [B, dim] float32 embedding.
    """
    half = dim // 2
    omega = jnp.exp(-math.log(10000.0) / (half - 1) * jnp.arange(half, dtype=jnp.float32))
    angles = t.astype(jnp.float32)[:, None] * omega[None, :]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def fourier_features(z: jax.Array, exponents: Sequence[int]) -> jax.Array:
    """VDM's input Fourier features (Kingma et al. 2021, Appendix C).

    For each exponent n: sin(2**n · 2π · z) and cos(2**n · 2π · z). Channels are ordered as in
    google-research/vdm: all sines, then all cosines; within each, channel-major
    (c0n0, c0n1, ..., c1n0, ...).

    Args:
      z: [..., C] array.
      exponents: F exponents n.

    Returns:
      [..., 2 · C · F] features, in z's dtype.
    """
    omega = 2.0 * jnp.pi * 2.0 ** jnp.asarray(exponents, z.dtype)       # [F]
    angles = z[..., None] * omega.reshape((1,) * z.ndim + (-1,))         # [..., C, F]
    angles = angles.reshape(*z.shape[:-1], -1)                           # [..., C * F]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def _dropout(h: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; the identity when `key` is None or the rate is 0."""
    if key is None or rate == 0.0:
        return h
    keep = jax.random.bernoulli(key, 1.0 - rate, h.shape)
    return jnp.where(keep, h / (1.0 - rate), jnp.zeros_like(h))


def _key_stream(key: jax.Array | None) -> Iterator[jax.Array | None]:
    """Yields a distinct key per dropout site (fold_in of its index), or None forever."""
    for i in itertools.count():
        yield None if key is None else jax.random.fold_in(key, i)


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


def _conv(c: UNetConfig, cin: int, cout: int, *, rngs: nnx.Rngs, stride: int = 1,
          zero: bool = False) -> nnx.Conv:
    """3×3 'SAME' conv in the config's dtypes (flax's lecun-normal kernel), optionally zero-initialised."""
    return nnx.Conv(cin, cout, (3, 3), (stride, stride), padding="SAME", dtype=c.dtype,
                    param_dtype=c.param_dtype, rngs=rngs, **_inits(zero))


def _dense(c: UNetConfig, cin: int, cout: int, *, rngs: nnx.Rngs, zero: bool = False,
           bias: bool = True) -> nnx.Linear:
    """Dense layer (a 1×1 conv on [B, H, W, C]) in the config's dtypes."""
    return nnx.Linear(cin, cout, use_bias=bias, dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs,
                      **_inits(zero))


_LECUN_NORMAL, _ZEROS, _ONES = variance_scaling(1.0), constant(0.0), constant(1.0)


def _inits(zero_kernel: bool) -> dict[str, Any]:
    """Lecun-normal or zero kernel, zero bias."""
    return {"kernel_init": _ZEROS if zero_kernel else _LECUN_NORMAL, "bias_init": _ZEROS}


def _norm(c: UNetConfig, ch: int, *, rngs: nnx.Rngs) -> nnx.GroupNorm:
    return nnx.GroupNorm(ch, num_groups=c.num_groups, epsilon=1e-6, dtype=c.dtype,
                         param_dtype=c.param_dtype, scale_init=_ONES, bias_init=_ZEROS, rngs=rngs)


class ResBlock(OneDrawModule):
    """Residual block conditioned on an embedding (DDPM `resnet_block`).

    out = skip(x) + conv2(dropout(swish(GN(conv1(swish(GN(x))) + Dense(emb)))))
    where skip is a 1×1 projection when the channel count changes, else the identity.
    """

    def __init__(self, in_ch: int, out_ch: int, c: UNetConfig, *, rngs: nnx.Rngs):
        self.norm1 = _norm(c, in_ch, rngs=rngs)
        self.conv1 = _conv(c, in_ch, out_ch, rngs=rngs)
        self.emb_proj = _dense(c, 4 * c.embedding_dim, out_ch, bias=c.emb_proj_bias, rngs=rngs)
        self.norm2 = _norm(c, out_ch, rngs=rngs)
        self.conv2 = _conv(c, out_ch, out_ch, zero=c.zero_init_residual, rngs=rngs)
        self.skip = _dense(c, in_ch, out_ch, rngs=rngs) if in_ch != out_ch else None
        self.rate = float(c.dropout)

    def __call__(self, x: jax.Array, emb: jax.Array, key: jax.Array | None) -> jax.Array:
        """x: [B, H, W, in_ch]; emb: [B, 4 * embedding_dim]; returns [B, H, W, out_ch]."""
        h = self.conv1(jax.nn.swish(self.norm1(x)))
        h = h + self.emb_proj(emb)[:, None, None, :]
        h = self.conv2(_dropout(jax.nn.swish(self.norm2(h)), self.rate, key))
        return (x if self.skip is None else self.skip(x)) + h


class AttnBlock(OneDrawModule):
    """Single-head self-attention over the H·W positions, with a residual connection.

    out = x + proj_out(softmax(q kᵀ / √C) v), with q, k, v 1×1 projections of GN(x).
    """

    def __init__(self, ch: int, c: UNetConfig, *, rngs: nnx.Rngs):
        self.norm = _norm(c, ch, rngs=rngs)
        self.q = _dense(c, ch, ch, rngs=rngs)
        self.k = _dense(c, ch, ch, rngs=rngs)
        self.v = _dense(c, ch, ch, rngs=rngs)
        self.proj_out = _dense(c, ch, ch, zero=c.zero_init_residual, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, C] -> [B, H, W, C]."""
        b, height, width, ch = x.shape
        h = self.norm(x)
        q, k, v = (f(h).reshape(b, height * width, 1, ch) for f in (self.q, self.k, self.v))
        h = jax.nn.dot_product_attention(q, k, v)  # [B, HW, 1 head, C]; fused on GPU.
        return x + self.proj_out(h.reshape(b, height, width, ch))


class _Stage(nnx.Module):
    """A ResBlock, followed by self-attention if its layout says so."""

    def __init__(self, spec: _Res, c: UNetConfig, *, rngs: nnx.Rngs):
        self.res = ResBlock(spec.in_ch, spec.out_ch, c, rngs=rngs)
        self.attn = AttnBlock(spec.out_ch, c, rngs=rngs) if spec.attn else None

    def __call__(self, x: jax.Array, emb: jax.Array, key: jax.Array | None) -> jax.Array:
        h = self.res(x, emb, key)
        return h if self.attn is None else self.attn(h)


class Downsample(OneDrawModule):
    """Halves H and W with a stride-2 3×3 conv ('SAME' padding, as in DDPM's TF code)."""

    def __init__(self, ch: int, c: UNetConfig, *, rngs: nnx.Rngs):
        self.conv = _conv(c, ch, ch, stride=2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, C] -> [B, H/2, W/2, C]."""
        return self.conv(x)


class Upsample(OneDrawModule):
    """Doubles H and W: nearest-neighbour repeat, then a 3×3 conv."""

    def __init__(self, ch: int, c: UNetConfig, *, rngs: nnx.Rngs):
        self.conv = _conv(c, ch, ch, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, C] -> [B, 2H, 2W, C]."""
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


def _build(spec: _Res | _Resample, c: UNetConfig, resample: type, rngs: nnx.Rngs) -> nnx.Module:
    if isinstance(spec, _Res):
        return _Stage(spec, c, rngs=rngs)
    return resample(spec.ch, c, rngs=rngs)


# --------------------------------------------------------------------------------------------
# Input checks (run at trace time)
# --------------------------------------------------------------------------------------------


def _check_z(c: UNetConfig, z: jax.Array) -> None:
    if jnp.ndim(z) != 4:
        raise ValueError(f"z: expected shape [B, H, W, C] (rank 4), got shape {jnp.shape(z)}")
    if not jnp.issubdtype(jnp.result_type(z), jnp.floating):
        raise TypeError(f"z: expected a floating-point array, got dtype {jnp.result_type(z)}")
    _, height, width, ch = jnp.shape(z)
    if ch != c.in_channels:
        raise ValueError(f"z: expected {c.in_channels} channels (in_channels), got shape "
                         f"{jnp.shape(z)}")
    factor = 2 ** (len(c.channel_mult) - 1) if c.downsample else 1
    if height < 1 or width < 1 or height % factor or width % factor:
        raise ValueError(f"z: expected H and W multiples of 2**(len(channel_mult)-1) = {factor} "
                         f"(the downsampling), got shape {jnp.shape(z)}")


def _check_cond(cond: jax.Array, batch: int) -> jax.Array:
    """Returns cond as a [B] array; a scalar is broadcast."""
    if not jnp.issubdtype(jnp.result_type(cond), jnp.floating):
        raise TypeError(f"cond: expected a floating-point time/noise level in [0, 1], got "
                        f"dtype {jnp.result_type(cond)}")
    if jnp.ndim(cond) == 0:
        return jnp.broadcast_to(jnp.asarray(cond), (batch,))
    if jnp.shape(cond) != (batch,):
        raise ValueError(f"cond: expected shape [B] = ({batch},) or a scalar, got shape "
                         f"{jnp.shape(cond)}")
    return jnp.asarray(cond)


def _check_labels(c: UNetConfig, labels: jax.Array | None, batch: int) -> jax.Array | None:
    """Returns labels as int [B] (None: every example "no label", class num_classes); None without classes."""
    if c.num_classes == 0:
        if labels is not None:
            raise ValueError("labels: given, but the config has num_classes=0 (an unconditional network)")
        return None
    if labels is None:
        return jnp.full((batch,), c.num_classes, jnp.int32)
    if not jnp.issubdtype(jnp.result_type(labels), jnp.integer) or jnp.shape(labels) != (batch,):
        raise ValueError(f"labels: expected integer classes [B] = ({batch},) in 0..{c.num_classes} "
                         f"({c.num_classes}: no label), got {jnp.result_type(labels)} of shape {jnp.shape(labels)}")
    return jnp.asarray(labels)


def _check_extra_cond(c: UNetConfig, extra: jax.Array | None, batch: int) -> jax.Array:
    """Returns extra_cond as [B, extra_cond_dim]; zeros when not given."""
    if extra is None:
        return jnp.zeros((batch, c.extra_cond_dim), jnp.float32)
    if c.extra_cond_dim == 0:
        raise ValueError("extra_cond: given, but the config has extra_cond_dim=0")
    if jnp.shape(extra) != (batch, c.extra_cond_dim):
        raise ValueError(f"extra_cond: expected shape [B, extra_cond_dim] = "
                         f"({batch}, {c.extra_cond_dim}), got shape {jnp.shape(extra)}")
    return jnp.asarray(extra, jnp.float32)


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------


class UNet(OneDrawModule):
    """U-Net ε/x/v/score predictor (see the module docstring and `UNetConfig`).

    Construct with `UNet(config, rngs=nnx.Rngs(seed))` (or `nnx.Rngs(params=key)`); the module
    keeps no RNG state. Eagerly, construction compiles one random draw for all kernels and a call
    is one compiled program (`nnx.jit`); inside `jax.jit`, `nnx.eval_shape` or other transforms
    both trace into the caller's program.
    """

    def __init__(self, config: UNetConfig, *, rngs: nnx.Rngs):
        c = self.config = config
        width = 4 * c.embedding_dim
        self.emb_dense0 = _dense(c, c.embedding_dim + c.extra_cond_dim, width, rngs=rngs)
        self.emb_dense1 = _dense(c, width, width, rngs=rngs)
        # The label's embedding: a bias-free dense layer on the scaled one-hot (EDM's), so each
        # class's vector has unit variance at initialisation.
        self.class_emb = _dense(c, c.num_classes + 1, width, bias=False, rngs=rngs) if c.num_classes else None
        self.conv_in = _conv(c, _input_channels(c), c.base_channels, rngs=rngs)
        down, skips = _down_layout(c)
        self.down = nnx.List([_build(s, c, Downsample, rngs) for s in down])
        mid = skips[-1]
        self.mid_res1 = ResBlock(mid, mid, c, rngs=rngs)
        self.mid_attn = AttnBlock(mid, c, rngs=rngs) if c.mid_attention else None
        self.mid_res2 = ResBlock(mid, mid, c, rngs=rngs)
        self.up = nnx.List([_build(s, c, Upsample, rngs) for s in _up_layout(c, skips)])
        out_ch = c.base_channels * c.channel_mult[0]
        self.norm_out = _norm(c, out_ch, rngs=rngs)
        self.conv_out = _conv(c, out_ch, c.in_channels * (1 + c.learned_variance),
                              zero=c.zero_init_output, rngs=rngs)

    @nnx.jit(graph=False)
    def __call__(self, z: jax.Array, cond: jax.Array, *, labels: jax.Array | None = None,
                 extra_cond: jax.Array | None = None, key: jax.Array | None = None) -> jax.Array:
        """Predicts from a noisy image.

        Args:
          z: [B, H, W, C] floating noisy image, C = in_channels; H and W multiples of
            2**(len(channel_mult)-1) (any size without downsampling).
          cond: [B] (or scalar, broadcast) normalised time / noise level, roughly in [0, 1];
            embedded as `sinusoidal_embedding(1000 * cond + time_offset)`.
          labels: with `num_classes` K > 0, the class of each example, int [B] in 0..K (K: no
            label; None: no label for all). Without classes, must be None.
          extra_cond: optional [B, extra_cond_dim] extra conditioning (zeros if None).
          key: dropout key; dropout is active iff a key is given.

        Returns:
          [B, H, W, C] prediction in z's dtype; with `learned_variance`, [B, H, W, 2C]: the
          prediction's C channels, then v's (`as_pred_fn` splits them).

        Raises:
          ValueError / TypeError at trace time for inputs of the wrong shape or dtype.
        """
        _check_z(self.config, z)
        cond = _check_cond(cond, z.shape[0])
        labels = _check_labels(self.config, labels, z.shape[0])
        extra_cond = _check_extra_cond(self.config, extra_cond, z.shape[0])
        emb = self._embed(cond, extra_cond, labels)
        keys = _key_stream(key)
        hs = self._encode(z, emb, keys)
        h = self._middle(hs[-1], emb, keys)
        h = self._decode(h, hs, emb, keys)
        out = self.conv_out(jax.nn.swish(self.norm_out(h)))
        return self._output(out, z)

    def _embed(self, cond: jax.Array, extra_cond: jax.Array, labels: jax.Array | None) -> jax.Array:
        """[B], [B, k], [B] -> [B, 4 * embedding_dim]: sinusoidal features, a swish MLP, plus the
        label's embedding before the last swish."""
        c = self.config
        time = _TIME_SCALE * cond
        if c.time_offset:
            time = time + c.time_offset
        emb = sinusoidal_embedding(time, c.embedding_dim)
        emb = jnp.concatenate([emb, extra_cond], axis=-1)
        emb = self.emb_dense1(jax.nn.swish(self.emb_dense0(emb)))
        if labels is not None:
            one_hot = jax.nn.one_hot(labels, c.num_classes + 1, dtype=emb.dtype) * math.sqrt(c.num_classes + 1)
            emb = emb + self.class_emb(one_hot)
        return jax.nn.swish(emb)

    def _encode(self, z: jax.Array, emb: jax.Array, keys: Iterator) -> list[jax.Array]:
        """Down path; returns every skip activation, conv_in's output first."""
        h = z
        if self.config.fourier_features:  # In z's precision: 2**7 · 2π · z overwhelms bf16.
            h = jnp.concatenate([z, fourier_features(z, self.config.fourier_features)], -1)
        hs = [self.conv_in(h.astype(self.config.dtype))]
        for layer in self.down:
            hs.append(layer(hs[-1]) if isinstance(layer, Downsample)
                      else self._block(layer, hs[-1], emb, next(keys)))
        return hs

    def _middle(self, h: jax.Array, emb: jax.Array, keys: Iterator) -> jax.Array:
        h = self._block(self.mid_res1, h, emb, next(keys))
        if self.mid_attn is not None:
            h = self._block(self.mid_attn, h)
        return self._block(self.mid_res2, h, emb, next(keys))

    def _decode(self, h: jax.Array, hs: list[jax.Array], emb: jax.Array,
                keys: Iterator) -> jax.Array:
        """Up path; each _Stage consumes the most recent remaining skip."""
        for layer in self.up:
            if isinstance(layer, Upsample):
                h = layer(h)
            else:
                h = self._block(layer, jnp.concatenate([h, hs.pop()], axis=-1), emb, next(keys))
        return h

    def _block(self, layer: nnx.Module, *args) -> jax.Array:
        """Calls a block; with `config.remat` its activations are recomputed in the backward pass."""
        return (_call_remat if self.config.remat else _call)(layer, *args)

    def _output(self, out: jax.Array, z: jax.Array) -> jax.Array:
        """Casts to z's dtype and adds the base measure z to the prediction channels if configured."""
        out = out.astype(z.dtype)
        if not self.config.skip_input:
            return out
        if not self.config.learned_variance:
            return out + z
        pred, v = jnp.split(out, 2, axis=-1)
        return jnp.concatenate([pred + z, v], axis=-1)


def _call(layer: nnx.Module, *args) -> jax.Array:
    return layer(*args)


_call_remat = nnx.remat(_call)


# --------------------------------------------------------------------------------------------
# The network as the core's prediction function; parameter counts
# --------------------------------------------------------------------------------------------


def as_pred_fn(model: UNet, gamma_fn: Callable[[jax.Array], jax.Array] | None = None, *,
               gamma_min: float = -13.3, gamma_max: float = 5.0,
               key: jax.Array | None = None) -> Callable:
    """`pred_fn(z_t, t)` for the core's losses and samplers, from a `UNet` (docs/math.md §4.4).

    `t` is a float time in [0, 1] ([B] or a scalar), as every `pred_fn` receives it. The network
    is conditioned on:

    - without `gamma_fn` (DDPM): t itself, embedded as 1000 t (DDPM step i is t = i/T);
    - with `gamma_fn` (VDM): the noise level (γ(t) - gamma_min) / (gamma_max - gamma_min), so it
      sees where on the noise scale it is even when the schedule is learned.

    Args:
      model: a `UNet` (also one rebuilt with `nnx.merge` inside a traced function).
      gamma_fn: the schedule t -> γ(t), or None to condition on t.
      gamma_min, gamma_max: the end points that map γ to [0, 1] (VDM's defaults).
      key: dropout key for every call of `pred_fn` (None: no dropout).

    Returns:
      `pred_fn(z_t, t, labels=None)` -> the prediction [B, H, W, C], or `(prediction, v)` when the
      model has `learned_variance` (what the core's `variance='learned'` expects). A class-conditional
      model (`num_classes` K > 0) takes the classes as `labels` int [B] (K or None: no label), so
      `pred_fn` is what `vdm_jax.guided` guides: `guided(pred_fn, labels, w, null_label=K)`.
    """
    if not isinstance(model, UNet):
        raise TypeError(f"as_pred_fn: model: expected a UNet, got {type(model).__name__}")
    if gamma_fn is not None and not callable(gamma_fn):
        raise TypeError(f"as_pred_fn: gamma_fn: expected a schedule t -> gamma(t) or None, got "
                        f"{type(gamma_fn).__name__}")
    on_host = all(isinstance(g, (int, float)) for g in (gamma_min, gamma_max))
    if on_host and not gamma_max > gamma_min:
        raise ValueError(f"as_pred_fn: gamma_max: expected > gamma_min = {gamma_min}, got {gamma_max}")
    learned = model.config.learned_variance

    def pred_fn(z_t: jax.Array, t: jax.Array, labels: jax.Array | None = None):
        t = jnp.asarray(t)
        if not jnp.issubdtype(t.dtype, jnp.floating):  # e.g. DDPM's integer steps: t = step / T
            raise TypeError(f"pred_fn: t: expected float times in [0, 1], got dtype {t.dtype}")
        cond = t if gamma_fn is None else (gamma_fn(t) - gamma_min) / (gamma_max - gamma_min)
        out = model(z_t, jnp.asarray(cond, jnp.result_type(z_t)), labels=labels, key=key)
        return tuple(jnp.split(out, 2, axis=-1)) if learned else out

    return pred_fn


def count_params(model_or_config: UNet | UNetConfig) -> int:
    """Number of parameters of a `UNet`, or of `UNet(config)` counted from shapes only."""
    if isinstance(model_or_config, UNet):
        model = model_or_config
    elif isinstance(model_or_config, UNetConfig):
        model = nnx.eval_shape(lambda: UNet(model_or_config, rngs=nnx.Rngs(0)))
    else:
        raise TypeError(f"count_params: model_or_config: expected a UNet or a UNetConfig, got "
                        f"{type(model_or_config).__name__}")
    return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
