"""Networks: the U-Net and the KL autoencoder, their configs, and loading (our format and diffusers folders)."""

from unnoise.models.io import load_diffusers, load_model, save_model

__all__ = ["load_diffusers", "load_model", "save_model"]
