"""Evaluation of generators: prompt adherence with the project's MNIST classifier (FID and sweeps build on it)."""

from unnoise.eval.adherence import Adherence, digit_adherence, images_to_tensor

__all__ = ["Adherence", "digit_adherence", "images_to_tensor"]
