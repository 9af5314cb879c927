"""The FID Inception-v3 network in Flax NNX: pytorch-fid's, layer for layer.

    model = fid_inception()                          # pytorch-fid's weights (inception_weights)
    out = model(to_unit_interval(uint8_images))      # [B, H, W, 3] in [0, 1], any H, W
    out["pool"]                                      # [B, 2048]: the FID/KID features
    out["logits_unbiased"]                           # [B, 1008]: the Inception Score's logits

`FIDInception` is pytorch-fid's `InceptionV3(output_blocks=[3], resize_input=True,
normalize_input=True, use_fid_inception=True)` plus the `fc` layer of its weights file (the
TensorFlow FID graph's 1008-way classifier), in NHWC and float32:

* the images are resized to 299×299 bilinearly as `F.interpolate(mode='bilinear',
  align_corners=False)` does (half-pixel centres, edge samples clamped, no antialiasing when
  downsampling), then mapped from [0, 1] to [-1, 1] by 2x - 1;
* torchvision's Inception-v3 stem and blocks (every conv is `BasicConv2d`: a conv without bias,
  inference BatchNorm with eps 0.001, ReLU) with pytorch-fid's patches: the average pools of
  Mixed_5b-d, 6b-e and 7b exclude the zero padding from their means (TensorFlow's pooling), and
  Mixed_7c's pool branch max-pools;
* the mean over the final 8×8 map gives 'pool'; 'logits' = pool @ W.T + b and 'logits_unbiased'
  = pool @ W.T (what the original Inception Score code and torch-fidelity use).

Module and parameter names follow torchvision's, so a pytorch state_dict name maps to one NNX path
('Mixed_5b.branch1x1.conv.weight' -> Mixed_5b.branch1x1.conv.kernel, in HWIO): see
`fid_inception_from_weights`. Convolutions and matmuls run at `Precision.HIGHEST`, so that GPUs
and TPUs do not drop to TF32/bfloat16 passes and the features stay comparable across machines.
"""
from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vdm_jax.models._init import OneDrawModule, constant, variance_scaling

__all__ = ["FID_IMAGE_SIZE", "FIDInception", "to_unit_interval", "resize_bilinear",
           "fid_inception_from_weights"]

FID_IMAGE_SIZE = 299  # the network's input size: every image is resized to 299×299
_BN_EPSILON = 1e-3  # torchvision's BasicConv2d
_HIGHEST = jax.lax.Precision.HIGHEST
# Random weights (tests, benchmarks): flax's He-normal kernels, zero biases, identity BatchNorm.
_HE_NORMAL, _ZEROS, _ONES = variance_scaling(2.0), constant(0.0), constant(1.0)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def _check_images(owner: str, images, kind, what: str) -> None:
    """images are [B, H, W, 3] (channels last) of the given dtype kind (checked at trace time)."""
    shape, dtype = jnp.shape(images), jnp.result_type(images)
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"{owner}: images must be RGB images [B, H, W, 3] (channels last), got shape {shape}.")
    if not jnp.issubdtype(dtype, kind):
        raise TypeError(f"{owner}: images must be {what} array, got dtype {dtype}.")


def to_unit_interval(images) -> jax.Array:
    """uint8 images [B, H, W, 3] in [0, 255] -> float32 in [0, 1] (x / 255), FIDInception's input."""
    _check_images("to_unit_interval", images, jnp.integer, "an integer")
    return jnp.asarray(images, jnp.float32) / 255.0


def resize_bilinear(images: jax.Array, size: int = FID_IMAGE_SIZE) -> jax.Array:
    """[B, H, W, C] -> [B, size, size, C] as torch's `F.interpolate(mode='bilinear',
    align_corners=False)`: half-pixel centres, samples beyond the edge clamped to it, and no
    antialiasing when downsampling (each output pixel mixes at most 2×2 input pixels)."""
    shape = (images.shape[0], size, size, images.shape[-1])
    return jax.image.resize(images, shape, method="bilinear", antialias=False, precision=_HIGHEST)


# --------------------------------------------------------------------------------------------
# Layers: flax's, named as torchvision's. `FIDInception(rngs=...)` draws random weights (flax's
# He-normal kernels, zero biases, identity BatchNorm); `fid_inception_from_weights` fills the same
# tree from a state dict.
# --------------------------------------------------------------------------------------------


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    """3×3, stride 1, padding 1, averaging only the pixels inside the image (TensorFlow's pool;
    torch's `count_include_pad=False`)."""
    return nnx.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x: jax.Array, stride: int) -> jax.Array:
    """3×3 max pool: stride 2 without padding (the reductions), or stride 1 with padding 1
    (Mixed_7c's pool branch; the padding never wins the max)."""
    padding = "VALID" if stride == 2 else ((1, 1), (1, 1))
    return nnx.max_pool(x, (3, 3), strides=(stride, stride), padding=padding)


class BasicConv2d(nnx.Module):
    """torchvision's BasicConv2d at inference: conv without bias, BatchNorm (eps 0.001), ReLU.

    `kernel_size`, `stride` and `padding` are torch's (an int or (h, w)); padding is symmetric.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], *,
                 stride: int = 1, padding: int | tuple[int, int] = 0, rngs: nnx.Rngs):
        ph, pw = _pair(padding)
        self.conv = nnx.Conv(in_channels, out_channels, _pair(kernel_size), strides=stride,
                             padding=((ph, ph), (pw, pw)), use_bias=False, precision=_HIGHEST,
                             kernel_init=_HE_NORMAL, rngs=rngs)
        self.bn = nnx.BatchNorm(out_channels, use_running_average=True, epsilon=_BN_EPSILON,
                               scale_init=_ONES, bias_init=_ZEROS, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.bn(self.conv(x)))


# --------------------------------------------------------------------------------------------
# Blocks (torchvision's InceptionA-E with pytorch-fid's pooling; branches concatenated on C)
# --------------------------------------------------------------------------------------------


class InceptionA(nnx.Module):
    """Mixed_5b-d (pytorch-fid's FIDInceptionA): 1×1 | 1×1, 5×5 | 1×1, 3×3, 3×3 | avg pool, 1×1."""

    def __init__(self, in_channels: int, pool_features: int, *, rngs: nnx.Rngs):
        self.branch1x1 = BasicConv2d(in_channels, 64, 1, rngs=rngs)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1, rngs=rngs)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, rngs=rngs)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.concatenate([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool_3x3(x)),
        ], axis=-1)


class InceptionB(nnx.Module):
    """Mixed_6a, a reduction (35 -> 17): 3×3 /2 | 1×1, 3×3, 3×3 /2 | max pool /2."""

    def __init__(self, in_channels: int, *, rngs: nnx.Rngs):
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.concatenate([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            _max_pool_3x3(x, stride=2),
        ], axis=-1)


class InceptionC(nnx.Module):
    """Mixed_6b-e (pytorch-fid's FIDInceptionC), factorised 7×7s: 1×1 | 1×1, 1×7, 7×1 |
    1×1, 7×1, 1×7, 7×1, 1×7 | avg pool, 1×1."""

    def __init__(self, in_channels: int, channels_7x7: int, *, rngs: nnx.Rngs):
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1, rngs=rngs)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1, rngs=rngs)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1, rngs=rngs)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch_pool = BasicConv2d(in_channels, 192, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7dbl = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7dbl = layer(b7dbl)
        return jnp.concatenate([self.branch1x1(x), b7, b7dbl, self.branch_pool(_avg_pool_3x3(x))], axis=-1)


class InceptionD(nnx.Module):
    """Mixed_7a, a reduction (17 -> 8): 1×1, 3×3 /2 | 1×1, 1×7, 7×1, 3×3 /2 | max pool /2."""

    def __init__(self, in_channels: int, *, rngs: nnx.Rngs):
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1, rngs=rngs)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, rngs=rngs)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1, rngs=rngs)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b7x7x3 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7x7x3 = layer(b7x7x3)
        return jnp.concatenate([self.branch3x3_2(self.branch3x3_1(x)), b7x7x3, _max_pool_3x3(x, stride=2)],
                               axis=-1)


class InceptionE(nnx.Module):
    """Mixed_7b/c (pytorch-fid's FIDInceptionE_1/_2), expanded filter banks: 1×1 | 1×1, (1×3 and
    3×1) | 1×1, 3×3, (1×3 and 3×1) | pool, 1×1. The pool is 'avg' (7b) or 'max' (7c: pytorch-fid
    reproduces the TensorFlow FID graph, which max-pools there)."""

    def __init__(self, in_channels: int, *, pool: str, rngs: nnx.Rngs):
        if pool not in ("avg", "max"):
            raise ValueError(f"InceptionE: pool must be 'avg' or 'max', got {pool!r}.")
        self.branch1x1 = BasicConv2d(in_channels, 320, 1, rngs=rngs)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1, rngs=rngs)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch_pool = BasicConv2d(in_channels, 192, 1, rngs=rngs)
        self.pool = pool

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3_1(x)
        b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = _avg_pool_3x3(x) if self.pool == "avg" else _max_pool_3x3(x, stride=1)
        return jnp.concatenate([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(b3dbl), self.branch3x3dbl_3b(b3dbl),
            self.branch_pool(pooled),
        ], axis=-1)


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------


class FIDInception(OneDrawModule):
    """pytorch-fid's FID Inception-v3 with its 1008-way `fc` (see the module docstring).

    `FIDInception(rngs=nnx.Rngs(0))` has random weights (He-normal kernels cut from one draw, zero
    biases, identity BatchNorm): the structure, for tests or `nnx.eval_shape`. For
    features comparable with published FIDs build it with `fid_inception()` (the published
    weights) or `fid_inception_from_weights`. Eager calls run one compiled program per input
    shape (`nnx.jit`); inside `jax.jit`, `jax.vmap` or other transforms the network traces into
    the caller's.
    """

    def __init__(self, *, rngs: nnx.Rngs):
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, rngs=rngs)  # 299 -> 149
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, rngs=rngs)  # -> 147
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, rngs=rngs)  # then max pool -> 73
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, rngs=rngs)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, rngs=rngs)  # -> 71, then max pool -> 35
        self.Mixed_5b = InceptionA(192, pool_features=32, rngs=rngs)
        self.Mixed_5c = InceptionA(256, pool_features=64, rngs=rngs)
        self.Mixed_5d = InceptionA(288, pool_features=64, rngs=rngs)
        self.Mixed_6a = InceptionB(288, rngs=rngs)  # -> 17
        self.Mixed_6b = InceptionC(768, channels_7x7=128, rngs=rngs)
        self.Mixed_6c = InceptionC(768, channels_7x7=160, rngs=rngs)
        self.Mixed_6d = InceptionC(768, channels_7x7=160, rngs=rngs)
        self.Mixed_6e = InceptionC(768, channels_7x7=192, rngs=rngs)
        self.Mixed_7a = InceptionD(768, rngs=rngs)  # -> 8
        self.Mixed_7b = InceptionE(1280, pool="avg", rngs=rngs)
        self.Mixed_7c = InceptionE(2048, pool="max", rngs=rngs)
        self.fc = nnx.Linear(2048, 1008, kernel_init=_HE_NORMAL, bias_init=_ZEROS, rngs=rngs)

    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        """Inception features of RGB images.

        Args:
          images: [B, H, W, 3] floating, values in [0, 1] (`to_unit_interval` converts uint8);
            any H and W: they are resized to 299×299. Computed in float32.

        Returns:
          {'pool': [B, 2048] (the FID features), 'logits': [B, 1008] (pool @ W.T + b),
          'logits_unbiased': [B, 1008] (pool @ W.T)}, float32.

        Raises:
          ValueError / TypeError (at trace time) for images not of shape [B, H, W, 3] or not
          floating.
        """
        _check_images("FIDInception", images, jnp.floating, "a floating-point")
        return self._forward(images)

    @nnx.jit(graph=False)
    def _forward(self, images: jax.Array) -> dict[str, jax.Array]:
        x = 2.0 * resize_bilinear(images.astype(jnp.float32)) - 1.0  # [0, 1] -> [-1, 1]
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = _max_pool_3x3(x, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = _max_pool_3x3(x, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                      self.Mixed_7c):
            x = block(x)
        pool = jnp.mean(x, axis=(1, 2))  # adaptive average pool to 1×1
        unbiased = jnp.dot(pool, self.fc.kernel[...], precision=_HIGHEST)
        return {"pool": pool, "logits": unbiased + self.fc.bias[...][None], "logits_unbiased": unbiased}


# --------------------------------------------------------------------------------------------
# pytorch-fid's weights
# --------------------------------------------------------------------------------------------

# The last part of an NNX path -> the last part of the torch state_dict name.
_TORCH_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
                     "var": "running_var"}
_IGNORED_SUFFIX = ".num_batches_tracked"  # BatchNorm's training counter: unused at inference


def _from_torch_layout(value: np.ndarray) -> np.ndarray:
    """Conv kernels OIHW -> HWIO; the fc's [out, in] -> [in, out]; vectors as they are."""
    if value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    return value.T if value.ndim == 2 else value


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torch shape of an NNX parameter's shape (the inverse of `_from_torch_layout`)."""
    if len(shape) == 4:
        h, w, i, o = shape
        return (o, i, h, w)
    return tuple(reversed(shape)) if len(shape) == 2 else tuple(shape)


def fid_inception_from_weights(weights: Mapping[str, np.ndarray]) -> FIDInception:
    """A `FIDInception` holding pytorch-fid's state dict `weights` {torch name: array}.

    The names are those of pytorch-fid's `fid_inception_v3().state_dict()` (its weights file):
    'Conv2d_1a_3x3.conv.weight', 'Mixed_5b.branch1x1.bn.running_var', ..., 'fc.weight',
    'fc.bias'; BatchNorm's '*.num_batches_tracked' may be present or not (unused). Conv kernels
    are transposed OIHW -> HWIO and the fc's weight [1008, 2048] -> [2048, 1008]; values are
    stored as float32. The network is built abstractly (`nnx.eval_shape`): nothing random is drawn.

    Raises:
      ValueError: a missing or unexpected name, a wrong shape or a non-floating array (named).
    """
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: FIDInception(rngs=nnx.Rngs(0))))
    expected = {}
    for path, variable in nnx.to_flat_state(abstract):
        name = ".".join([*map(str, path[:-1]), _TORCH_LEAF_NAMES[path[-1]]])
        expected[name] = (path, variable)
    given = {name for name in weights if not name.endswith(_IGNORED_SUFFIX)}
    _check_names(sorted(set(expected) - given), sorted(given - set(expected)))
    flat = []
    for name, (path, variable) in expected.items():
        value = np.asarray(weights[name])
        if value.shape != _torch_shape(variable.shape):
            raise ValueError(f"fid_inception_from_weights: {name} must have shape "
                             f"{_torch_shape(variable.shape)}, got {value.shape}.")
        if not jnp.issubdtype(value.dtype, jnp.floating):  # bfloat16 included
            raise ValueError(f"fid_inception_from_weights: {name} must be floating, got dtype {value.dtype}.")
        flat.append((path, variable.replace(jnp.asarray(_from_torch_layout(value), jnp.float32))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _check_names(missing: list[str], unexpected: list[str]) -> None:
    def listed(names):
        return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    problems = ([f"missing {listed(missing)}"] if missing else []) + \
               ([f"unexpected {listed(unexpected)}"] if unexpected else [])
    if problems:
        raise ValueError(f"fid_inception_from_weights: not pytorch-fid's Inception state dict: "
                         f"{'; '.join(problems)}.")
