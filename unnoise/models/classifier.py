"""A small MNIST digit classifier: its penultimate features serve FID-MNIST, its predictions prompt adherence.

A few 3x3 conv stages with GroupNorm (per-image statistics, so an image's output does not depend on the batch it
is in, in training or eval), global average pooling, one hidden layer (the features) and a linear head.
Generated MNIST images are 32 x 32 (2 px of background around the 28 x 28 digits); ``prepare_digits`` crops them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unnoise.models.config import ModelConfig
from unnoise.models.io import load_model

# The classifier trained by ``unnoise.train.classifier.train_classifier`` with its defaults.
SHIPPED_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "mnist-ldm" / "classifier"


@dataclasses.dataclass(frozen=True, kw_only=True)
class DigitClassifierConfig(ModelConfig):
    """Classifier shape; the defaults are those of the shipped MNIST classifier."""

    in_channels: int = 1
    size: int = 28  # input pixels (height = width)
    channels: tuple[int, ...] = (16, 32, 64)  # widths of the conv stages; each stage but the last halves the size
    norm_groups: int = 8  # GroupNorm groups; every width must be a multiple
    feature_dim: int = 128  # width of the penultimate layer, the features of FID-MNIST
    num_classes: int = 10

    def __post_init__(self) -> None:
        for name in ("in_channels", "size", "norm_groups", "feature_dim"):
            _require(self, name, _count(getattr(self, name)), "an int >= 1")
        _require(self, "num_classes", _count(self.num_classes) and self.num_classes >= 2, "an int >= 2")
        groups = self.norm_groups
        ok = isinstance(self.channels, tuple) and len(self.channels) > 0
        ok = ok and all(_count(c) and c % groups == 0 for c in self.channels)
        _require(self, "channels", ok, f"a non-empty tuple of positive multiples of norm_groups={groups}")
        factor = 2 ** (len(self.channels) - 1)
        _require(self, "size", self.size % factor == 0, f"a multiple of {factor} (one halving per stage but the last)")


class DigitClassifier(nn.Module):
    """Conv stages -> global average pool -> features (B, feature_dim) -> logits (B, num_classes)."""

    def __init__(self, config: DigitClassifierConfig):
        super().__init__()
        self.config = config
        widths = (config.in_channels, *config.channels)
        self.stages = nn.ModuleList(
            _stage(c_in, c_out, config.norm_groups) for c_in, c_out in zip(widths[:-1], widths[1:])
        )
        self.hidden = nn.Linear(config.channels[-1], config.feature_dim)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations (B, feature_dim) of images (B, in_channels, size, size) in [-1, 1]."""
        self._check_input(x)
        for i, stage in enumerate(self.stages):
            if i:
                x = F.avg_pool2d(x, 2)
            x = stage(x)
        return F.silu(self.hidden(x.mean(dim=(2, 3))))

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, num_classes) of images (B, in_channels, size, size) in [-1, 1]."""
        return self.head(self.features(x))

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        """Predicted digits, int64 (B,), of images in [-1, 1] of any even-padded size >= ``config.size``."""
        return self(prepare_digits(images, size=self.config.size)).argmax(dim=1)

    def _check_input(self, x: Tensor) -> None:
        c, s = self.config.in_channels, self.config.size
        if x.ndim != 4 or x.shape[1] != c or x.shape[2:] != (s, s):
            raise ValueError(
                f"DigitClassifier expects images (B, {c}, {s}, {s}), got {tuple(x.shape)}; "
                "crop larger generated images with prepare_digits"
            )


def prepare_digits(images: Tensor, *, size: int = 28) -> Tensor:
    """Center-crop square images (B, C, H, H), H = size + 2k, to (B, C, size, size): 32 x 32 MNIST -> 28 x 28."""
    if images.ndim != 4 or images.shape[2] != images.shape[3]:
        raise ValueError(f"prepare_digits expects square images (B, C, H, H), got shape {tuple(images.shape)}")
    height = images.shape[2]
    if height < size or (height - size) % 2:
        raise ValueError(
            f"prepare_digits: images of {height} x {height} pixels cannot be center-cropped to {size} x {size}; "
            f"allowed sizes are {size} + 2k ({size}, {size + 2}, {size + 4}, ...)"
        )
    pad = (height - size) // 2
    return images[:, :, pad : pad + size, pad : pad + size]


def load_classifier(path: str | Path = SHIPPED_WEIGHTS) -> DigitClassifier:
    """A ``DigitClassifier`` folder written by ``save_model`` (the shipped one by default), in eval mode."""
    model = load_model(path)
    if not isinstance(model, DigitClassifier):
        raise ValueError(f"{path} holds a {type(model).__name__}, not a DigitClassifier")
    return model.eval()


def _stage(c_in: int, c_out: int, groups: int) -> nn.Sequential:
    """Two 3x3 convolutions, each followed by GroupNorm and SiLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1),
        nn.GroupNorm(groups, c_out),
        nn.SiLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1),
        nn.GroupNorm(groups, c_out),
        nn.SiLU(),
    )


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _require(config: DigitClassifierConfig, name: str, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"DigitClassifierConfig.{name}={getattr(config, name)!r} is not allowed; expected {allowed}")
