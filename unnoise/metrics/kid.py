"""Kernel Inception Distance (Bińkowski et al. 2018): unbiased MMD^2 with a cubic polynomial kernel, over subsets."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from torch import Tensor

from unnoise.metrics.features import as_features, check_same_dim


class MeanStd(NamedTuple):
    """A metric averaged over subsets (or splits) of the samples, with its standard deviation over them."""

    mean: float
    std: float


def polynomial_kernel(x: Tensor, y: Tensor) -> Tensor:
    """k(x, y) = (x . y / D + 1)^3, the KID kernel."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def mmd2_unbiased(x: Tensor, y: Tensor) -> float:
    """Unbiased MMD^2 of two equal-size samples: off-diagonal means of k(x, x') and k(y, y'), minus 2 mean k(x, y)."""
    m = x.shape[0]
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return float(within - 2 * k_xy.sum() / (m * m))


def kid(
    real: Tensor | np.ndarray,
    generated: Tensor | np.ndarray,
    *,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 2020,
) -> MeanStd:
    """KID as torch-fidelity computes it: mean and std (ddof 0) of ``mmd2_unbiased`` over random subsets.

    Each subset draws ``min(subset_size, N_real, N_generated)`` rows of each set without replacement, with the
    index sequence of ``numpy.random.RandomState(seed).choice`` (torch-fidelity's, whose default seed is 2020).
    The kernels are computed in float64 on the features' device (torch-fidelity: float32 on the CPU).
    """
    real, generated = as_features(real, "real", min_rows=2), as_features(generated, "generated", min_rows=2)
    check_same_dim(real, generated, ("real", "generated"))
    generated = generated.to(real.device)
    if not isinstance(subsets, int) or subsets < 1:
        raise ValueError(f"subsets must be a positive int, got {subsets!r}")
    if not isinstance(subset_size, int) or subset_size < 2:
        raise ValueError(f"subset_size must be an int >= 2 (the unbiased estimate needs pairs), got {subset_size!r}")
    size = min(subset_size, real.shape[0], generated.shape[0])
    rng = np.random.RandomState(seed)
    mmds = []
    for _ in range(subsets):
        i = rng.choice(real.shape[0], size, replace=False)
        j = rng.choice(generated.shape[0], size, replace=False)
        mmds.append(mmd2_unbiased(real[i], generated[j]))
    return MeanStd(float(np.mean(mmds)), float(np.std(mmds)))
