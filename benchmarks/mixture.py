"""The ideal denoiser of a data set treated as a mixture of isotropic Gaussians, and its VP epsilon-model view.

For data ``x0 ~ (1/N) sum_i N(x_i, s^2 I)`` and ``x = x0 + sigma * noise``, the posterior mean is closed-form
(Karras et al. 2022, App. B.3 for s = 0): component i has responsibility ``softmax_i(-|x - x_i|^2 / 2 v)`` with
``v = s^2 + sigma^2``, and mean ``x_i + (s^2 / v) (x - x_i)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from unnoise.core.denoisers import per_sample_sigma
from unnoise.core.schedules import VPSchedule, append_dims


class MixtureDenoiser:
    """Exact ``D(x, sigma) = E[x0 | x]`` for Gaussians of std ``component_std`` around each row of ``centers``."""

    def __init__(self, centers: Tensor, component_std: float = 0.5, *, chunk: int = 256):
        if centers.ndim != 2 or len(centers) < 1:
            raise ValueError(f"centers must be (N, dim) with N >= 1, got shape {tuple(centers.shape)}")
        self.centers = centers.to(torch.float64)
        self.sq_norms = (self.centers**2).sum(1)
        self.var = float(component_std) ** 2
        self.chunk = chunk
        self.calls = 0  # batched evaluations, to count NFE

    def __call__(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        self.calls += 1
        shape, dtype = x.shape, x.dtype
        flat = x.reshape(len(x), -1).to(torch.float64)
        v = per_sample_sigma(flat, sigma) ** 2 + self.var  # (B,)
        mean = torch.cat([self._posterior_mean(*rows) for rows in zip(flat.split(self.chunk), v.split(self.chunk))])
        out = self.var / v[:, None] * flat + (1 - self.var / v[:, None]) * mean
        return out.reshape(shape).to(dtype)

    def _posterior_mean(self, flat: Tensor, v: Tensor) -> Tensor:
        """``sum_i w_i x_i`` over the components, for a chunk of rows."""
        # -|x - x_i|^2 / 2v without |x|^2, which the softmax over i cancels; softmax subtracts the max (logsumexp)
        logits = (flat @ self.centers.T - self.sq_norms / 2) / v[:, None]
        return torch.softmax(logits, dim=1) @ self.centers


class EpsilonModel:
    """``denoiser`` seen as a VP epsilon network ``eps(x_vp, t)`` on ``schedule``'s (fractional) timesteps."""

    def __init__(self, denoiser: MixtureDenoiser, schedule: VPSchedule):
        self.denoiser = denoiser
        self.schedule = schedule

    def __call__(self, x_vp: Tensor, t: Tensor | float) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64).cpu()
        sigma = self.schedule.t_to_sigma(t).to(x_vp.device)
        s = append_dims(per_sample_sigma(x_vp, sigma), x_vp.ndim)
        x = x_vp.to(torch.float64) * (1 + s**2).sqrt()
        eps = (x - self.denoiser(x, per_sample_sigma(x, sigma))) / s
        return eps.to(x_vp.dtype)
