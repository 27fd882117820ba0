"""Evaluation metrics on features: FID, KID, precision/recall, Inception Score, CLIP score; the FID Inception network.

The metrics take feature matrices ``(N, D)`` (torch or numpy) and compute in float64. Features come from a
``FeatureExtractor`` (``InceptionFeatureExtractor`` here) whose ``name`` is recorded with every result.
``transformers`` is imported only when a CLIP model is loaded.
"""

from unnoise.metrics.clip_score import CLIPEmbedder, clip_score
from unnoise.metrics.features import FeatureExtractor, check_images
from unnoise.metrics.frechet import fid_from_features, fid_from_statistics, frechet_distance
from unnoise.metrics.inception import (
    RESIZE_MODES,
    WEIGHTS_ENV,
    WEIGHTS_URL,
    FIDInceptionV3,
    InceptionFeatureExtractor,
    load_inception,
)
from unnoise.metrics.inception_score import inception_score
from unnoise.metrics.kid import MeanStd, kid
from unnoise.metrics.precision_recall import PrecisionRecall, precision_recall
from unnoise.metrics.stats import FeatureStatistics

__all__ = [
    "CLIPEmbedder",
    "FIDInceptionV3",
    "FeatureExtractor",
    "FeatureStatistics",
    "InceptionFeatureExtractor",
    "MeanStd",
    "PrecisionRecall",
    "RESIZE_MODES",
    "WEIGHTS_ENV",
    "WEIGHTS_URL",
    "check_images",
    "clip_score",
    "fid_from_features",
    "fid_from_statistics",
    "frechet_distance",
    "inception_score",
    "kid",
    "load_inception",
    "precision_recall",
]
