"""Images in, uint8 tensors out: reading image folders and stacking PIL images for the feature extractors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def image_files(folder: str | Path) -> list[Path]:
    """The images directly in ``folder``, sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def open_image(path: Path) -> Image.Image:
    """The image at ``path``, read fully (the file is closed), with its PNG text chunks in ``info``."""
    with Image.open(path) as image:
        image.load()
        return image


def to_uint8(images: list[Image.Image]) -> Tensor:
    """PIL images of one size -> uint8 ``(B, 1, H, W)`` if all are grayscale ("L"), else ``(B, 3, H, W)`` RGB."""
    if not images:
        raise ValueError("no images to convert")
    mode = "L" if all(image.mode == "L" for image in images) else "RGB"
    sizes = {image.size for image in images}
    if len(sizes) > 1:
        raise ValueError(f"images must all have one size to be measured together, got sizes {sorted(sizes)}")
    arrays = np.stack([np.asarray(image.convert(mode), dtype=np.uint8) for image in images])
    tensor = torch.from_numpy(arrays)
    return tensor[:, None] if mode == "L" else tensor.permute(0, 3, 1, 2).contiguous()
