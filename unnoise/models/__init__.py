"""Networks: the U-Net and the KL autoencoder, their configs, and loading (our format and diffusers folders)."""

from unnoise.models.io import load_diffusers, load_model, save_model
from unnoise.models.text import (
    CLIPTextEncoder,
    MiniLMEncoder,
    PromptTruncatedWarning,
    TextEmbedding,
    TextEncoder,
)
from unnoise.models.unet import UNet, UNetConfig
from unnoise.models.vae import AutoencoderKL, AutoencoderKLConfig, DiagonalGaussian

__all__ = [
    "AutoencoderKL",
    "AutoencoderKLConfig",
    "CLIPTextEncoder",
    "MiniLMEncoder",
    "PromptTruncatedWarning",
    "TextEmbedding",
    "TextEncoder",
    "DiagonalGaussian",
    "UNet",
    "UNetConfig",
    "load_diffusers",
    "load_model",
    "save_model",
]
