"""Prompt adherence of a digit generator: the fraction of images that the MNIST classifier reads as the prompted digit.

Prompts take the caption templates that the default model was trained with (``unnoise.data.captions``) in equal
shares, so "a handwritten digit 7", "the number seven", "7", ... are all measured. Image ``j`` of digit ``d`` has
seed ``seed + 1000 * d + j``, so a result is reproducible image by image whatever the batch size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from unnoise.data.captions import TEMPLATES, caption
from unnoise.models.classifier import DigitClassifier


@dataclasses.dataclass(frozen=True)
class Adherence:
    """Per-digit and overall fractions of images classified as their prompted digit, and the confusion counts."""

    per_digit: dict[int, float]
    overall: float
    confusion: np.ndarray  # (10, 10): row = prompted digit, column = predicted digit
    images_per_digit: int
    settings: dict

    def markdown(self) -> str:
        head = "| digit | " + " | ".join(str(d) for d in range(10)) + " | all |"
        rule = "|---" * 12 + "|"
        row = "| adherence | " + " | ".join(f"{self.per_digit[d]:.1%}" for d in range(10)) + f" | {self.overall:.1%} |"
        return "\n".join([head, rule, row])


def images_to_tensor(images: list[Image.Image]) -> Tensor:
    """8-bit grayscale or RGB PIL images to (B, 1, H, W) float32 in [-1, 1] (RGB is converted to luminance "L")."""
    arrays = [np.asarray(img.convert("L"), dtype=np.float32) for img in images]
    return torch.from_numpy(np.stack(arrays))[:, None] / 127.5 - 1.0


def digit_adherence(
    generate: Callable[..., list[Image.Image]],
    classifier: DigitClassifier,
    *,
    images_per_digit: int = 100,
    seed: int = 0,
    batch_size: int = 50,
    **settings,
) -> Adherence:
    """Generate ``images_per_digit`` images per digit with ``generate(prompt, num_images=, seed=, **settings)``
    (a ``Pipeline``), the caption templates in equal shares, and classify them."""
    if not (isinstance(images_per_digit, int) and images_per_digit >= 1):
        raise ValueError(f"images_per_digit={images_per_digit!r} must be an integer >= 1")
    confusion = np.zeros((10, 10), dtype=np.int64)
    for digit in range(10):
        # template t covers the block of images [t n / T, (t + 1) n / T): consecutive seeds, so one call each
        bounds = [t * images_per_digit // len(TEMPLATES) for t in range(len(TEMPLATES) + 1)]
        for template, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            for j0 in range(lo, hi, batch_size):
                count = min(batch_size, hi - j0)
                prompt = caption(digit, template)
                images = generate(prompt, num_images=count, seed=seed + 1000 * digit + j0, **settings)
                for p in classifier.predict(images_to_tensor(images)).tolist():
                    confusion[digit, p] += 1
    per_digit = {d: float(confusion[d, d] / confusion[d].sum()) for d in range(10)}
    overall = float(np.trace(confusion) / confusion.sum())
    return Adherence(per_digit, overall, confusion, images_per_digit, dict(settings, seed=seed))
