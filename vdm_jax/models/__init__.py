"""Neural networks for vdm_jax. The networks only predict; the diffusion math lives elsewhere."""

from vdm_jax.models.unet import (
    PREDICTIONS,
    AttnBlock,
    Downsample,
    ResBlock,
    UNet,
    UNetConfig,
    Upsample,
    as_pred_fn,
    count_params,
    ddpm_cifar10,
    fourier_features,
    sinusoidal_embedding,
    tiny,
    vdm_cifar10,
)

__all__ = [
    "PREDICTIONS",
    "AttnBlock",
    "Downsample",
    "ResBlock",
    "UNet",
    "UNetConfig",
    "Upsample",
    "as_pred_fn",
    "count_params",
    "ddpm_cifar10",
    "fourier_features",
    "sinusoidal_embedding",
    "tiny",
    "vdm_cifar10",
]
