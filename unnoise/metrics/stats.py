"""Streaming feature statistics: count, sum and sum of outer products in float64, mergeable across processes.

The mean and the unbiased covariance (``numpy.cov``, as pytorch-fid computes it) follow from the three
accumulators, and sums add: merging two sets of statistics, or ``all_reduce`` over processes, is exact up to
float64 rounding. Saved as ``.npz`` with ``mu``, ``sigma`` and ``count`` (and ``feature_space``), read back
without pickles.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from unnoise.metrics.features import as_features


class FeatureStatistics:
    """Running count, sum and sum of outer products of ``dim``-wide feature vectors, in float64.

    ``feature_space`` names the extractor (``FeatureExtractor.name``); statistics from different feature
    spaces refuse to merge or be compared.
    """

    def __init__(self, dim: int, *, feature_space: str = "", device: str | torch.device = "cpu") -> None:
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        self.dim = dim
        self.feature_space = feature_space
        self.count = 0
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.sum_outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    @classmethod
    def from_features(cls, feats: Tensor | np.ndarray, *, feature_space: str = "") -> FeatureStatistics:
        """Statistics of one feature matrix ``(N, D)``."""
        feats = as_features(feats, "feats")
        return cls(feats.shape[1], feature_space=feature_space, device=feats.device).update(feats)

    def update(self, feats: Tensor | np.ndarray) -> FeatureStatistics:
        """Add a batch of features ``(N, dim)``."""
        x = as_features(feats, "feats").to(self.sum.device)
        if x.shape[1] != self.dim:
            raise ValueError(f"feats has {x.shape[1]} features per row, these statistics hold {self.dim}")
        self.count += x.shape[0]
        self.sum += x.sum(0)
        self.sum_outer += x.T @ x
        return self

    @property
    def mean(self) -> np.ndarray:
        """Mean feature vector ``(dim,)``, float64."""
        self._require(1, "a mean")
        return (self.sum / self.count).cpu().numpy()

    @property
    def cov(self) -> np.ndarray:
        """Unbiased covariance ``(dim, dim)`` (divides by count - 1), float64, exactly symmetric."""
        self._require(2, "an unbiased covariance")
        mu = self.sum / self.count
        # float64 keeps the cancellation in E[xx^T] - mu mu^T harmless for network features (|mu|^2 / var of order
        # 1-100 loses at most two of sixteen digits).
        cov = (self.sum_outer - self.count * torch.outer(mu, mu)) / (self.count - 1)
        return ((cov + cov.T) / 2).cpu().numpy()

    def merge(self, other: FeatureStatistics) -> FeatureStatistics:
        """Add ``other``'s accumulators to these: the statistics of both sets of features together."""
        if not isinstance(other, FeatureStatistics):
            raise TypeError(f"other must be FeatureStatistics, got {type(other).__name__}")
        self._check_compatible(other)
        self.count += other.count
        self.sum += other.sum.to(self.sum.device)
        self.sum_outer += other.sum_outer.to(self.sum.device)
        return self

    def all_reduce(self, group: object | None = None) -> FeatureStatistics:
        """Sum the accumulators over the processes of ``torch.distributed`` (every rank must call this)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("all_reduce needs an initialized torch.distributed process group (init_process_group)")
        count = torch.tensor(self.count, dtype=torch.int64, device=self.sum.device)
        for tensor in (count, self.sum, self.sum_outer):
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        self.count = int(count.item())
        return self

    def save(self, path: str | Path) -> None:
        """Write ``mu``, ``sigma``, ``count`` and ``feature_space`` to an ``.npz`` file at exactly ``path``."""
        mu, sigma = self.mean, self.cov
        with open(path, "wb") as f:
            np.savez(f, mu=mu, sigma=sigma, count=np.int64(self.count), feature_space=np.str_(self.feature_space))

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "cpu") -> FeatureStatistics:
        """Read a file written by ``save``; the accumulators are rebuilt from mu, sigma and count."""
        with np.load(path, allow_pickle=False) as data:
            if "count" not in data or "mu" not in data or "sigma" not in data:
                raise ValueError(
                    f"{path} holds {sorted(data.files)}, FeatureStatistics needs mu, sigma and count; reference "
                    "statistics with only mu and sigma (pytorch-fid, clean-fid) go straight to frechet_distance"
                )
            mu, sigma, count = data["mu"], data["sigma"], int(data["count"])
            feature_space = str(data["feature_space"]) if "feature_space" in data else ""
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]) or count < 2:
            raise ValueError(
                f"{path}: mu {mu.shape}, sigma {sigma.shape}, count {count}; expected (D,), (D, D) and count >= 2"
            )
        stats = cls(mu.shape[0], feature_space=feature_space, device=device)
        mu_t = torch.from_numpy(mu).to(device, torch.float64)
        stats.count = count
        stats.sum = count * mu_t
        sigma_t = torch.from_numpy(sigma).to(device, torch.float64)
        stats.sum_outer = (count - 1) * sigma_t + count * torch.outer(mu_t, mu_t)
        return stats

    def _require(self, count: int, what: str) -> None:
        if self.count < count:
            raise ValueError(f"{what} needs at least {count} feature vectors, these statistics hold {self.count}")

    def _check_compatible(self, other: FeatureStatistics) -> None:
        if other.dim != self.dim:
            raise ValueError(f"statistics of {other.dim}-dim features cannot combine with {self.dim}-dim ones")
        if other.feature_space != self.feature_space:
            raise ValueError(
                f"statistics from feature space {other.feature_space!r} cannot combine with {self.feature_space!r}"
            )
