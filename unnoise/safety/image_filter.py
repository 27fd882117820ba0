"""Image filters: an interface, and a CLIP concept checker like the Stable Diffusion safety checker.

``CLIPConceptFilter`` embeds the image with a CLIP model loaded from a local folder (``CLIPEmbedder``) and compares it
by cosine similarity with the text embeddings of named concepts; an image is flagged when any concept reaches its
threshold (the SD checker does the same with 17 concept embeddings shipped as weights and per-concept thresholds;
ours are plain text in ``image_concepts.toml``, which an operator can edit). A flag never changes pixels here:
``apply_action`` decides, as configured, whether a flagged image is withheld, blurred or returned as is.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from PIL import ImageFilter as PILImageFilter

IMAGE_ACTIONS = ("withhold", "blur", "flag")
BLUR_FRACTION = 1 / 12  # blur radius as a share of the longer side: shapes are gone, layout is kept


@dataclasses.dataclass(frozen=True)
class ImageVerdict:
    """The image filter's answer: flagged or not, and why (the concept, its score and threshold)."""

    flagged: bool
    reason: str | None = None
    concept: str | None = None
    category: str | None = None
    score: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PASSED = ImageVerdict(False)


class ImageFilter(Protocol):
    """Anything that judges generated images."""

    def check(self, images: Sequence[Image.Image]) -> list[ImageVerdict]: ...


@dataclasses.dataclass(frozen=True)
class Concept:
    """A concept to flag: its text (embedded by CLIP), its category and its cosine-similarity threshold."""

    text: str
    category: str
    threshold: float


def load_concepts(path: str | Path) -> list[Concept]:
    """Read ``[[concept]]`` tables with ``text``, ``category`` and ``threshold``."""
    data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    concepts = []
    for i, table in enumerate(data.get("concept", [])):
        try:
            concepts.append(Concept(str(table["text"]), str(table["category"]), float(table["threshold"])))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}: concept {i} needs text, category and a numeric threshold ({error})") from None
    if not concepts:
        raise ValueError(f"{path}: no [[concept]] tables")
    return concepts


class CLIPConceptFilter:
    """Flags an image whose CLIP embedding is at least a concept's threshold (cosine) from that concept's text."""

    def __init__(self, embedder: Any, concepts: Sequence[Concept]):
        self.embedder = embedder
        self.concepts = list(concepts)
        text = embedder.embed_texts([c.text for c in self.concepts])
        self._concepts = torch.nn.functional.normalize(text.float(), dim=1)
        self._thresholds = torch.tensor([c.threshold for c in self.concepts])

    @classmethod
    def from_folder(
        cls, folder: str | Path, concepts: str | Path | Sequence[Concept], *, device: str = "cpu"
    ) -> CLIPConceptFilter:
        """Load a saved ``CLIPModel`` and ``CLIPProcessor`` (e.g. openai/clip-vit-large-patch14) from ``folder``."""
        from unnoise.metrics.clip_score import CLIPEmbedder

        listed = load_concepts(concepts) if isinstance(concepts, str | Path) else list(concepts)
        return cls(CLIPEmbedder.from_folder(folder, device=device), listed)

    def scores(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Cosine similarity of each image to each concept, ``(N, concepts)``."""
        pixels = [torch.from_numpy(np.array(i.convert("RGB"))).permute(2, 0, 1) for i in images]
        same_size = all(p.shape == pixels[0].shape for p in pixels)
        batches = [torch.stack(pixels)] if same_size else [p[None] for p in pixels]
        embeddings = torch.cat([self.embedder.embed_images(b).float().cpu() for b in batches])
        return torch.nn.functional.normalize(embeddings, dim=1) @ self._concepts.T.cpu()

    def check(self, images: Sequence[Image.Image]) -> list[ImageVerdict]:
        """One verdict per image; the reason names the concept that passes its threshold by the most."""
        if not images:
            return []
        margin = self.scores(images) - self._thresholds
        verdicts = []
        for row in margin:
            k = int(row.argmax())
            if row[k] < 0:
                verdicts.append(PASSED)
                continue
            concept = self.concepts[k]
            score = float(row[k]) + concept.threshold
            reason = f"image matches concept {concept.text!r} ({concept.category}): {score:.3f} >= {concept.threshold}"
            verdicts.append(ImageVerdict(True, reason, concept.text, concept.category, score))
        return verdicts


def apply_action(image: Image.Image, verdict: ImageVerdict, action: str) -> Image.Image | None:
    """What a client gets for an image: itself if not flagged; else None ("withhold"), blurred, or itself ("flag")."""
    if action not in IMAGE_ACTIONS:
        raise ValueError(f"image_action={action!r} is not allowed; expected one of {', '.join(IMAGE_ACTIONS)}")
    if not verdict.flagged or action == "flag":
        return image
    if action == "withhold":
        return None
    blurred = image.filter(PILImageFilter.GaussianBlur(radius=max(image.size) * BLUR_FRACTION))
    blurred.info.update(image.info)
    return blurred
