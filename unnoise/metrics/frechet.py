"""Fréchet distance between Gaussians fitted to features: FID (Heusel et al. 2017), computed in float64."""

from __future__ import annotations

import numpy as np
from torch import Tensor

from unnoise.metrics.stats import FeatureStatistics

# Eigenvalues of a covariance that is positive semidefinite (PSD) in exact arithmetic come out slightly negative
# from rounding: of the input (a float32 sigma is rounded to ~6e-8 relative) and of the float64 arithmetic here.
# By Weyl's inequality each eigenvalue moves by at most ||dS||_2 <= ||dS||_F <= eps * sqrt(D) * ||S||_2, so
# negatives down to _ROUNDING * eps * sqrt(D) * lambda_max are rounding and count as 0; anything more negative is
# a matrix that is not a covariance, and is rejected rather than hidden.
_ROUNDING = 100.0


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)): Fréchet distance of two Gaussians (Dowson & Landau 1982).

    tr (S1 S2)^(1/2) is computed as tr (A S2 A)^(1/2) with A = S1^(1/2): S1 S2 = A (A S2) and A S2 A = (A S2) A
    share their nonzero eigenvalues, and A S2 A is symmetric PSD, so ``eigh`` gives them stably even when S1 or S2
    is singular (fewer samples than dimensions), where ``scipy.linalg.sqrtm`` of the non-symmetric product returns
    complex round-off and may fail (pytorch-fid then retries with an eps offset, which changes the answer).
    """
    mu1, mu2 = _vector(mu1, "mu1"), _vector(mu2, "mu2")
    if mu1.shape != mu2.shape:
        raise ValueError(f"mu1 has shape {mu1.shape} but mu2 has shape {mu2.shape}")
    dim = mu1.shape[0]
    sigma1, tol1 = _covariance(sigma1, "sigma1", dim)
    sigma2, tol2 = _covariance(sigma2, "sigma2", dim)

    w1, v1 = np.linalg.eigh(sigma1)
    w1 = _psd_eigenvalues(w1, tol1 * max(w1.max(), 0.0), "sigma1")
    w2 = np.linalg.eigvalsh(sigma2)
    w2_max = max(w2[-1], 0.0)
    _psd_eigenvalues(w2, tol2 * w2_max, "sigma2")
    a = (v1 * np.sqrt(w1)) @ v1.T  # S1^(1/2)
    m = a @ sigma2 @ a
    w = np.linalg.eigvalsh((m + m.T) / 2)
    # Negatives in A S2 A come from sigma2's own tolerated rounding and from the two products here.
    w = _psd_eigenvalues(w, (tol2 + _tolerance(np.float64, dim)) * w1.max() * w2_max, "sigma1 @ sigma2")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(w).sum())


def fid_from_statistics(a: FeatureStatistics, b: FeatureStatistics) -> float:
    """Fréchet distance between the Gaussians of two ``FeatureStatistics`` from the same feature space."""
    if a.feature_space != b.feature_space:
        raise ValueError(f"statistics from feature spaces {a.feature_space!r} and {b.feature_space!r} do not compare")
    return frechet_distance(a.mean, a.cov, b.mean, b.cov)


def fid_from_features(feats_a: Tensor | np.ndarray, feats_b: Tensor | np.ndarray) -> float:
    """FID between two feature matrices ``(N, D)``: mean and unbiased covariance of each, then ``frechet_distance``."""
    return fid_from_statistics(FeatureStatistics.from_features(feats_a), FeatureStatistics.from_features(feats_b))


def _tolerance(dtype: np.dtype, dim: int) -> float:
    return _ROUNDING * float(np.finfo(dtype).eps) * dim**0.5


def _array(x: np.ndarray | Tensor, name: str) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name} must hold floating-point values, got dtype {x.dtype}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} holds {int((~np.isfinite(x)).sum())} non-finite values (NaN or inf)")
    return x


def _vector(x: np.ndarray | Tensor, name: str) -> np.ndarray:
    x = _array(x, name)
    if x.ndim != 1 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a vector of shape (D,), got shape {x.shape}")
    return x.astype(np.float64)


def _covariance(x: np.ndarray | Tensor, name: str, dim: int) -> tuple[np.ndarray, float]:
    """``x`` in float64, checked to be (dim, dim) and symmetric to its rounding; and that rounding tolerance."""
    x = _array(x, name)
    if x.shape != (dim, dim):
        raise ValueError(f"{name} must have shape ({dim}, {dim}) to match the means, got {x.shape}")
    tol = _tolerance(x.dtype, dim)
    x = x.astype(np.float64)
    asymmetry = np.abs(x - x.T).max()
    if asymmetry > tol * np.abs(x).max():
        raise ValueError(f"{name} is not symmetric: max |{name} - {name}.T| = {asymmetry:.3g}")
    return (x + x.T) / 2, tol


def _psd_eigenvalues(w: np.ndarray, tol: float, name: str) -> np.ndarray:
    """Eigenvalues of a PSD matrix with rounding negatives (>= -tol) set to 0; larger negatives are an error."""
    if w.min() < -tol:
        raise ValueError(
            f"{name} is not positive semidefinite: eigenvalue {w.min():.6g} (largest {w.max():.6g}) is beyond "
            f"rounding (tolerance {tol:.3g}); a covariance matrix cannot have it"
        )
    return np.maximum(w, 0.0)
