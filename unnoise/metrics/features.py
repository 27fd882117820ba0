"""What the metrics take in: the feature-extractor interface and checks on image batches and feature matrices."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from torch import Tensor


class FeatureExtractor(Protocol):
    """Images ``(B, C, H, W)`` uint8 -> features ``(B, dim)``; ``name`` is recorded with every result it produces."""

    @property
    def name(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def __call__(self, images: Tensor) -> Tensor: ...


def check_images(images: Tensor, name: str = "images") -> Tensor:
    """A uint8 batch ``(B, 3, H, W)``; one channel is repeated to three, as PIL's ``convert("RGB")`` does."""
    if not isinstance(images, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of dtype uint8, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise ValueError(f"{name} must have dtype uint8 (pixel values 0..255), got {images.dtype}")
    if images.ndim != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0:
        raise ValueError(f"{name} must have shape (B>0, 1 or 3, H, W), got {tuple(images.shape)}")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def as_features(x: Tensor | np.ndarray, name: str, *, min_rows: int = 1) -> Tensor:
    """A finite float64 matrix ``(N, D)`` with ``N >= min_rows``; a tensor stays on its device."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if x.ndim != 2 or x.shape[0] < min_rows or x.shape[1] == 0:
        raise ValueError(f"{name} must have shape (N, D) with N >= {min_rows} and D > 0, got {tuple(x.shape)}")
    x = x.to(torch.float64)
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} holds {int((~torch.isfinite(x)).sum())} non-finite values (NaN or inf)")
    return x


def check_same_dim(a: Tensor, b: Tensor, names: tuple[str, str]) -> None:
    """Both feature matrices have the same width D."""
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{names[0]} has {a.shape[1]} features per row but {names[1]} has {b.shape[1]}")
