"""From image batches to metric values: per-image measurements, gathered over processes, then scored.

Each process measures its own images (features, classifier predictions, Inception class probabilities, CLIP
embeddings); the measurements are gathered in image order onto every process, and the main one scores them
against the reference. Measuring as images are made keeps memory at one batch of images whatever N is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np
import torch

from unnoise.eval.features import MNISTFeatures
from unnoise.eval.reference import Floor, RealSet
from unnoise.eval.samples import SampleBatch
from unnoise.metrics import (
    CLIPEmbedder,
    FeatureExtractor,
    FeatureStatistics,
    InceptionFeatureExtractor,
    clip_score,
    frechet_distance,
    inception_score,
    kid,
    precision_recall,
)

# --metrics names -> what each needs beyond the generated images
METRICS = {
    "fid": "the reference's statistics",
    "kid": "the reference's features",
    "pr": "the reference's features (precision and recall, k=3)",
    "adherence": "digit prompts and the MNIST classifier",
    "is": "the FID Inception weights (--inception-weights)",
    "clip": "prompts and a CLIP model folder (--clip)",
}


def parse_metrics(text: str) -> tuple[str, ...]:
    """``"fid,kid"`` -> ``("fid", "kid")``; unknown or repeated names are a ValueError that lists the allowed ones."""
    names = tuple(name.strip() for name in text.split(","))
    for name in names:
        if name not in METRICS:
            raise ValueError(f"metrics: {name!r} is not a metric; allowed: {', '.join(METRICS)} (comma-separated)")
    if len(set(names)) != len(names):
        raise ValueError(f"metrics: {text!r} names a metric twice")
    return names


@dataclasses.dataclass(frozen=True)
class Scorers:
    """The networks a run measures with: the FID feature space, and those of the other metrics when asked for."""

    features: FeatureExtractor
    classifier: MNISTFeatures | None = None  # adherence
    inception: InceptionFeatureExtractor | None = None  # Inception Score
    clip: CLIPEmbedder | None = None  # CLIP score


@dataclasses.dataclass(frozen=True)
class Measurements:
    """Per-image arrays in image order; a field is None when no metric asked for it."""

    features: np.ndarray  # (n, dim) float32
    labels: np.ndarray | None = None  # prompted digit, -1 for a prompt that is not a digit caption
    predictions: np.ndarray | None = None  # the classifier's digit
    probs: np.ndarray | None = None  # Inception class probabilities (n, 1008)
    image_embeds: np.ndarray | None = None  # CLIP
    text_embeds: np.ndarray | None = None

    @classmethod
    def concat(cls, parts: list[Measurements]) -> Measurements:
        """The non-empty parts one after the other (a field is kept only if every one of them has it)."""
        parts = [part for part in parts if len(part)] or parts[:1]
        fields = {}
        for field in dataclasses.fields(cls):
            values = [getattr(part, field.name) for part in parts]
            fields[field.name] = np.concatenate(values) if all(v is not None for v in values) else None
        return cls(**fields)

    def __len__(self) -> int:
        return len(self.features)


def measure(batches: Iterable[SampleBatch], scorers: Scorers) -> Measurements:
    """Measure every batch with the ``scorers`` that are set."""
    parts = [Measurements(np.zeros((0, scorers.features.dim), np.float32))]  # a process may have no images
    for batch in batches:
        parts.append(_measure_batch(batch, scorers))
    return Measurements.concat(parts)


@torch.no_grad()
def _measure_batch(batch: SampleBatch, scorers: Scorers) -> Measurements:
    images = batch.images
    fields: dict[str, np.ndarray | None] = {"labels": batch.labels}
    if scorers.inception is not None:
        pool, logits = scorers.inception.features_and_logits(images)
        fields["probs"] = _numpy(torch.softmax(logits.double(), dim=1))
        if scorers.features is scorers.inception:
            fields["features"] = _numpy(pool)
    if scorers.classifier is not None:
        feats, digits = scorers.classifier.features_and_predictions(images)
        fields["predictions"] = _numpy(digits)
        if scorers.features is scorers.classifier:
            fields["features"] = _numpy(feats)
    if "features" not in fields:
        fields["features"] = _numpy(scorers.features(images))
    if scorers.clip is not None:
        if batch.prompts is None:
            raise ValueError("the CLIP score needs each image's prompt; these images carry none")
        fields["image_embeds"] = _numpy(scorers.clip.embed_images(images))
        fields["text_embeds"] = _numpy(scorers.clip.embed_texts(batch.prompts))
    return Measurements(**fields)


def gather(part: Measurements, world_size: int) -> Measurements:
    """Every process's measurements, in rank order (ranks hold consecutive shares), on every process."""
    if world_size == 1:
        return part
    import torch.distributed as dist

    parts: list[Measurements | None] = [None] * world_size
    dist.all_gather_object(parts, part)
    return Measurements.concat([p for p in parts if p is not None])


def score(m: Measurements, metrics: tuple[str, ...], reference: RealSet, floor: Floor | None) -> dict:
    """The ``metrics`` of measurements ``m`` against ``reference``; the floor goes beside the FID."""
    out: dict = {}
    if "fid" in metrics:
        stats = FeatureStatistics.from_features(m.features)
        out["fid"] = frechet_distance(stats.mean, stats.cov, reference.mu, reference.sigma)
        out["fid_floor"] = floor.to_dict() if floor is not None else None
    if "kid" in metrics:
        out["kid"] = kid(reference.require_features("KID"), m.features)._asdict()
    if "pr" in metrics:
        out.update(precision_recall(reference.require_features("precision/recall"), m.features)._asdict())
    if "adherence" in metrics:
        out["adherence"] = adherence(m)
    if "is" in metrics:
        out["inception_score"] = inception_score(_need(m.probs, "is"))._asdict()
    if "clip" in metrics:
        out["clip_score"] = clip_score(_need(m.image_embeds, "clip"), _need(m.text_embeds, "clip"))
    return out


def adherence(m: Measurements) -> dict:
    """Fraction of images the classifier reads as their prompted digit, overall and per digit, with the confusion."""
    labels, predictions = _need(m.labels, "adherence"), _need(m.predictions, "adherence")
    unknown = int((labels < 0).sum())
    if unknown:
        raise ValueError(f"adherence needs digit prompts; {unknown} of {len(labels)} images have other prompts")
    confusion = np.zeros((10, 10), dtype=np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    counts = confusion.sum(1)
    per_digit = {d: float(confusion[d, d] / counts[d]) for d in range(10) if counts[d]}
    overall = float(np.trace(confusion) / counts.sum())
    return {"overall": overall, "per_digit": per_digit, "confusion": confusion.tolist()}


def _need(value: np.ndarray | None, metric: str) -> np.ndarray:
    if value is None:
        raise ValueError(f"metric {metric!r} needs {METRICS[metric]}, which this run does not have")
    return value


def _numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
