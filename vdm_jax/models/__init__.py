"""Neural networks for vdm_jax: the U-Net (it only predicts; the diffusion math lives elsewhere)
and the FID Inception network that measures sample quality (`vdm_jax.fid`)."""

from vdm_jax.models.ddpm_weights import (
    ddpm_unet,
    load_ddpm_family,
    load_ddpm_weights,
    read_safetensors,
    unet_config_from_diffusers,
)
from vdm_jax.models.inception import FID_IMAGE_SIZE, FIDInception, fid_inception_from_weights, to_unit_interval
from vdm_jax.models.inception_weights import (
    FID_WEIGHTS_URL,
    fid_inception,
    load_fid_inception_weights,
    read_torch_state_dict,
)
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
from vdm_jax.models.vdm_weights import VDM_CIFAR10_BPD, VDM_CIFAR10_CHECKPOINT, VDMCheckpoint, read_vdm_checkpoint

__all__ = [
    "ddpm_unet",
    "load_ddpm_family",
    "load_ddpm_weights",
    "read_safetensors",
    "unet_config_from_diffusers",
    "FID_IMAGE_SIZE",
    "FID_WEIGHTS_URL",
    "FIDInception",
    "fid_inception",
    "fid_inception_from_weights",
    "load_fid_inception_weights",
    "read_torch_state_dict",
    "to_unit_interval",
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
    "VDM_CIFAR10_BPD",
    "VDM_CIFAR10_CHECKPOINT",
    "VDMCheckpoint",
    "read_vdm_checkpoint",
]
