"""Inception Score (Salimans et al. 2016): exp E_x KL(p(y|x) || p(y)), mean and std over splits."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from unnoise.metrics.features import as_features
from unnoise.metrics.kid import MeanStd

_SUM_TOL = 1e-3  # rows of a float32 softmax sum to 1 within ~1e-6; a larger gap means these are not probabilities


def inception_score(probs: Tensor | np.ndarray, *, splits: int = 10) -> MeanStd:
    """IS as the original code computes it: ``splits`` consecutive chunks, exp of the mean KL in each, mean and std.

    ``probs`` are class probabilities ``(N, C)``, for the FID Inception network ``softmax(logits)`` with its
    bias-free logits (``InceptionFeatureExtractor.features_and_logits``), as the original TensorFlow code and
    torch-fidelity's ``logits_unbiased``. The samples are not shuffled; 0 log 0 counts as 0.
    """
    p = as_features(probs, "probs")
    if not isinstance(splits, int) or not 1 <= splits <= p.shape[0]:
        raise ValueError(f"splits must be an int in [1, N={p.shape[0]}], got {splits!r}")
    if (p < 0).any() or ((p.sum(1) - 1).abs() > _SUM_TOL).any():
        raise ValueError("probs must be probabilities: non-negative rows that sum to 1 (apply softmax to logits)")
    n = p.shape[0]
    scores = []
    for i in range(splits):
        part = p[i * n // splits : (i + 1) * n // splits]
        p_y = part.mean(0, keepdim=True)
        kl = (torch.xlogy(part, part) - torch.xlogy(part, p_y)).sum(1)
        scores.append(float(kl.mean().exp()))
    return MeanStd(float(np.mean(scores)), float(np.std(scores)))
