"""CLIP score (Hessel et al. 2021; as torchmetrics scales it): 100 * max(cos(image, text), 0), averaged over pairs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from unnoise.metrics.features import as_features, check_images
from unnoise.models.text import CLIPTextEncoder, import_transformers, quiet_transformers


def clip_score(image_embeds: Tensor | np.ndarray, text_embeds: Tensor | np.ndarray) -> float:
    """Mean over pairs (row i with row i) of 100 * max(cosine similarity, 0)."""
    image_embeds, text_embeds = as_features(image_embeds, "image_embeds"), as_features(text_embeds, "text_embeds")
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(
            f"image_embeds {tuple(image_embeds.shape)} and text_embeds {tuple(text_embeds.shape)} must pair row by row"
        )
    text_embeds = text_embeds.to(image_embeds.device)
    for name, x in (("image_embeds", image_embeds), ("text_embeds", text_embeds)):
        if (x.norm(dim=1) == 0).any():
            raise ValueError(f"{name} has an all-zero row, whose cosine similarity is undefined")
    cos = torch.nn.functional.cosine_similarity(image_embeds, text_embeds, dim=1, eps=0)
    return float(100 * cos.clamp_min(0).mean())


class CLIPEmbedder:
    """Projected CLIP image and text embeddings from a local ``transformers`` CLIP folder (CLIPModel + processor).

    Prompts are padded and truncated to the tokenizer's length (77 for CLIP) by ``CLIPTextEncoder``, which warns
    with ``PromptTruncatedWarning`` naming what it drops; images go through the folder's ``CLIPImageProcessor``.
    """

    def __init__(self, model: Any, processor: Any) -> None:
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self._text = CLIPTextEncoder(model.text_model, processor.tokenizer)

    @classmethod
    def from_folder(cls, folder: str | Path, *, device: str | torch.device = "cpu") -> CLIPEmbedder:
        """Load ``CLIPModel`` and ``CLIPProcessor`` from ``folder`` (e.g. a saved openai/clip-vit-large-patch14)."""
        transformers = import_transformers()
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"no config.json in {folder}: give the folder of a saved CLIPModel and processor")
        with quiet_transformers(transformers):
            model = transformers.CLIPModel.from_pretrained(folder, local_files_only=True).to(device)
            processor = transformers.CLIPProcessor.from_pretrained(folder, local_files_only=True)
        return cls(model, processor)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def embed_images(self, images: Tensor) -> Tensor:
        """Image embeddings ``(B, projection_dim)`` of a uint8 batch ``(B, 1 or 3, H, W)``."""
        images = check_images(images)
        pil = [Image.fromarray(image.permute(1, 2, 0).cpu().numpy()) for image in images]
        pixels = self.processor.image_processor(images=pil, return_tensors="pt")["pixel_values"]
        return _pooled(self.model.get_image_features(pixel_values=pixels.to(self.device)))

    @torch.no_grad()
    def embed_texts(self, prompts: Sequence[str]) -> Tensor:
        """Text embeddings ``(B, projection_dim)``: the final state at the end token, projected."""
        return self.model.text_projection(self._text.encode(prompts).pooled)

    def score(self, images: Tensor, prompts: Sequence[str]) -> float:
        """``clip_score`` of image i against prompt i."""
        return clip_score(self.embed_images(images), self.embed_texts(prompts))


def _pooled(output: Any) -> Tensor:
    # transformers 4.x returns the projected embeddings; 5.x an output whose pooler_output holds them.
    return output if isinstance(output, Tensor) else output.pooler_output
