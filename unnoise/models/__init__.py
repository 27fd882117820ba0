"""Networks: the U-Net and the KL autoencoder, their configs, and loading (our format and diffusers folders)."""

from unnoise.models.io import load_diffusers, load_model, save_model
from unnoise.models.unet import UNet, UNetConfig
from unnoise.models.vae import AutoencoderKL, AutoencoderKLConfig, DiagonalGaussian

__all__ = [
    "AutoencoderKL",
    "AutoencoderKLConfig",
    "DiagonalGaussian",
    "UNet",
    "UNetConfig",
    "load_diffusers",
    "load_model",
    "save_model",
]
