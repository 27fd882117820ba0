"""The data-set interface of training: ``len(ds)`` images, and ``ds.batch(indices, rng) -> Batch``.

A data set holds whole images in memory (or on disk) and turns index arrays into tensors. Every random choice it
makes (a caption template, a flip) comes from the ``rng`` it is handed, so that a training run is reproduced
exactly from its seed and position, on any number of processes.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np
import torch
from torch import Tensor


@dataclasses.dataclass(frozen=True)
class Batch:
    """Images in ``[-1, 1]``, float32 (B, C, H, W), with a caption and/or an integer label per image."""

    images: Tensor
    captions: list[str] | None = None
    labels: Tensor | None = None  # int64 (B,)


class ImageDataset(Protocol):
    """What the trainer needs of a data set."""

    channels: int
    size: int  # height = width, in pixels
    num_classes: int | None  # labels lie in [0, num_classes) when not None

    def __len__(self) -> int: ...

    def batch(self, indices: np.ndarray, rng: np.random.Generator) -> Batch: ...


def to_unit_range(pixels: np.ndarray) -> Tensor:
    """uint8 images (B, H, W) or (B, H, W, C) in 0..255 -> float32 (B, C, H, W) in [-1, 1]."""
    if pixels.dtype != np.uint8:
        raise ValueError(f"pixels must be uint8, got {pixels.dtype}")
    x = torch.from_numpy(np.ascontiguousarray(pixels)).float().div_(127.5).sub_(1.0)
    return x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()


def check_indices(indices: np.ndarray, n: int) -> np.ndarray:
    """Indices as int64, each in ``[0, n)``."""
    indices = np.asarray(indices)
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"indices must be a 1-d integer array, got shape {indices.shape} dtype {indices.dtype}")
    if len(indices) and (indices.min() < 0 or indices.max() >= n):
        raise IndexError(f"indices must lie in [0, {n}), got min {indices.min()} max {indices.max()}")
    return indices.astype(np.int64)
