"""Improved precision and recall (Kynkäänniemi et al. 2019): k-NN balls around each set's samples."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from unnoise.metrics.features import as_features, check_same_dim


class PrecisionRecall(NamedTuple):
    """Precision: fraction of generated samples on the real manifold; recall: fraction of real ones on the generated."""

    precision: float
    recall: float


def precision_recall(
    real: Tensor | np.ndarray, generated: Tensor | np.ndarray, *, k: int = 3, batch_size: int = 256
) -> PrecisionRecall:
    """Kynkäänniemi et al. 2019, Eq. 1-2: a sample is on a manifold if it lies within some sample's k-NN ball.

    The ball of a sample has the radius of its k-th nearest neighbour within its own set (itself excluded); a
    distance equal to the radius counts as inside, as in the reference code and torch-fidelity. Distances are
    computed in float64 on the features' device, ``batch_size`` rows at a time against the whole other set, so
    memory is ``batch_size * N * 8`` bytes.
    """
    real, generated = as_features(real, "real"), as_features(generated, "generated")
    check_same_dim(real, generated, ("real", "generated"))
    generated = generated.to(real.device)
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    for name, x in (("real", real), ("generated", generated)):
        if x.shape[0] <= k:
            raise ValueError(f"{name} has {x.shape[0]} samples; k={k} nearest neighbours need at least {k + 1}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    real_radii2 = knn_radii2(real, k, batch_size)
    generated_radii2 = knn_radii2(generated, k, batch_size)
    precision = _fraction_inside(generated, real, real_radii2, batch_size)
    recall = _fraction_inside(real, generated, generated_radii2, batch_size)
    return PrecisionRecall(precision, recall)


def squared_distances(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise squared Euclidean distances ``(len(a), len(b))`` as |a|^2 + |b|^2 - 2 a.b.

    The expansion can round a true 0 (a sample against itself) to a tiny negative number; such values are set
    to 0, which is the exact answer they approximate. Real distances never come out negative.
    """
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * (a @ b.T)
    return d2.clamp_min_(0)


def knn_radii2(x: Tensor, k: int, batch_size: int) -> Tensor:
    """Squared distance from each row of ``x`` to its k-th nearest other row (the row itself is the 0th)."""
    return torch.cat([squared_distances(chunk, x).kthvalue(k + 1, dim=1).values for chunk in x.split(batch_size)])


def _fraction_inside(queries: Tensor, centers: Tensor, radii2: Tensor, batch_size: int) -> float:
    inside = sum(
        int((squared_distances(chunk, centers) <= radii2[None, :]).any(dim=1).sum())
        for chunk in queries.split(batch_size)
    )
    return inside / queries.shape[0]
