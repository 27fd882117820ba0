"""Training losses: ``loss(denoiser, x0, cond) -> per-sample loss (B,)``, owning sigma sampling and weighting.

Every objective is computed from the denoiser's ``x0_hat = D(x, sigma)`` with ``x = x0 + sigma * noise``: the
error in each objective's own target space is the x0 error times a known per-sigma factor, so one code path
serves all of them (``objective_factor``):

- ``epsilon``: ``eps_hat = (x - x0_hat) / sigma``, so ``|eps_hat - eps|^2 = |x0_hat - x0|^2 / sigma^2``.
- ``v`` (Salimans & Ho 2022): ``v = sqrt(a) eps - sqrt(1 - a) x0`` with ``a = 1 / (1 + sigma^2)``, so
  ``|v_hat - v|^2 = |x0_hat - x0|^2 (1 + sigma^2) / sigma^2``.
- ``x0``: factor 1.
- ``edm``: Karras et al. 2022 eq. 2's ``lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = 1 / c_out^2``,
  the MSE of EDM's raw network output against its effective target (eq. 8).
- ``flow``: on ``x_t = (1 - t) x0 + t noise`` with ``t = sigma / (1 + sigma)``, ``v = noise - x0`` and
  ``x0_hat - x0 = t (v - v_hat)``, so ``|v_hat - v|^2 = |x0_hat - x0|^2 (1 + sigma)^2 / sigma^2``.

A weighting multiplies the objective's MSE. ``uniform`` is 1; ``min_snr`` (Hang et al. 2023) and ``edm``
(Karras et al. 2022) fix the *total* weight on the x0 error to ``min(SNR, gamma)`` and ``lambda(sigma)``, whatever
the objective: in the objective's space that is that weight divided by ``objective_factor``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from unnoise.core.denoisers import EDMDenoiser, FlowDenoiser, VPDenoiser, check_sigma, per_sample_sigma
from unnoise.core.schedules import VPSchedule, add_noise, check_choice, snr

OBJECTIVES = ("epsilon", "v", "x0", "edm", "flow")
WEIGHTINGS = ("uniform", "min_snr", "edm")
FLOW_DISTRIBUTIONS = ("uniform", "logit_normal")
OBJECTIVE_FOR_PREDICTION = {"epsilon": "epsilon", "v_prediction": "v", "sample": "x0"}


def edm_weight(sigma: Tensor | float, sigma_data: float = 0.5) -> Tensor:
    """EDM loss weight on the x0 error, ``(sigma^2 + sigma_data^2) / (sigma sigma_data)^2``, Karras et al. 2022."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def objective_factor(objective: str, sigma: Tensor | float, sigma_data: float = 0.5) -> Tensor:
    """Ratio of the objective's target-space MSE to the x0-space MSE at ``sigma`` (see the module docstring)."""
    check_choice("objective", objective, OBJECTIVES)
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    if objective == "epsilon":
        return sigma**-2
    if objective == "v":
        return (1 + sigma**2) / sigma**2
    if objective == "x0":
        return torch.ones_like(sigma)
    if objective == "edm":
        return edm_weight(sigma, sigma_data)
    return ((1 + sigma) / sigma) ** 2


def min_snr_weight(sigma: Tensor | float, gamma: float, objective: str, sigma_data: float = 0.5) -> Tensor:
    """Min-SNR-gamma weight on the objective's MSE, Hang et al. 2023: eps ``min(SNR, g) / SNR``, v ``/ (SNR + 1)``."""
    _check_gamma(gamma)
    ratio = snr(sigma)
    return ratio.clamp(max=gamma) / objective_factor(objective, sigma, sigma_data)


def _check_gamma(gamma: float) -> None:
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"gamma={gamma!r} must be a finite number > 0 (Hang et al. 2023 use 5)")


def _normal(batch: int, generator: torch.Generator | None, device: torch.device | None) -> Tensor:
    return torch.randn(batch, generator=generator, dtype=torch.float64, device=_device(generator, device))


def _device(generator: torch.Generator | None, device: torch.device | str | None) -> torch.device | str | None:
    # Draw where the generator lives (a CPU generator cannot fill a CUDA tensor); the caller moves the result.
    return generator.device if generator is not None else device


@dataclass(frozen=True, kw_only=True)
class DiscreteSigmas:
    """DDPM training sigmas: ``t ~ U{0, ..., T - 1}`` mapped through ``schedule.sigmas[t]``, Ho et al. 2020, Alg. 1."""

    schedule: VPSchedule

    def __call__(self, batch: int, *, generator: torch.Generator | None = None, device: Any = None) -> Tensor:
        where = _device(generator, device)
        t = torch.randint(0, self.schedule.num_train_timesteps, (batch,), generator=generator, device=where)
        return self.schedule.sigmas.to(t.device)[t]


@dataclass(frozen=True, kw_only=True)
class LogNormalSigmas:
    """EDM training sigmas: ``log(sigma) ~ N(p_mean, p_std^2)``, Karras et al. 2022, Table 1."""

    p_mean: float = -1.2
    p_std: float = 1.2

    def __post_init__(self) -> None:
        if not self.p_std > 0:
            raise ValueError(f"p_std={self.p_std!r} must be > 0")

    def __call__(self, batch: int, *, generator: torch.Generator | None = None, device: Any = None) -> Tensor:
        return (self.p_mean + self.p_std * _normal(batch, generator, device)).exp()


@dataclass(frozen=True, kw_only=True)
class FlowSigmas:
    """Flow-matching times, uniform or logit-normal (Esser et al. 2024, sec. 3.1), as ``sigma = t / (1 - t)``.

    ``t`` is mapped affinely into ``[t_eps, 1 - t_eps]``: t = 0 is sigma = 0, which no denoiser accepts, and t = 1 is
    sigma = inf (a logit-normal draw rounds to 1 once its logit passes ~37 in float64). The loss is formed from
    ``x0_hat``, whose float32 rounding gives the flow loss a relative error of about ``6e-8 / t``; ``t_eps = 1e-4``
    keeps that under 1e-3. Near t = 1 the loss is exact to float32 precision.
    """

    distribution: str = "logit_normal"
    mean: float = 0.0
    std: float = 1.0
    t_eps: float = 1e-4

    def __post_init__(self) -> None:
        check_choice("distribution", self.distribution, FLOW_DISTRIBUTIONS)
        if not self.std > 0:
            raise ValueError(f"std={self.std!r} must be > 0")
        if not 0 < self.t_eps < 0.5:
            raise ValueError(f"t_eps={self.t_eps!r} must lie in (0, 0.5)")

    def __call__(self, batch: int, *, generator: torch.Generator | None = None, device: Any = None) -> Tensor:
        if self.distribution == "uniform":
            u = torch.rand(batch, generator=generator, dtype=torch.float64, device=_device(generator, device))
        else:
            u = torch.sigmoid(self.mean + self.std * _normal(batch, generator, device))
        t = self.t_eps + (1 - 2 * self.t_eps) * u
        return t / (1 - t)


SigmaSampler = Callable[..., Tensor]


@dataclass(frozen=True, kw_only=True)
class DiffusionLoss:
    """Weighted denoising loss per sample: ``w(sigma) * objective_factor(sigma) * mean |D(x, sigma) - x0|^2``."""

    objective: str
    sigmas: SigmaSampler
    weighting: str = "uniform"
    gamma: float = 5.0
    sigma_data: float = 0.5

    def __post_init__(self) -> None:
        check_choice("objective", self.objective, OBJECTIVES)
        check_choice("weighting", self.weighting, WEIGHTINGS)
        _check_gamma(self.gamma)
        if not self.sigma_data > 0:
            raise ValueError(f"sigma_data={self.sigma_data!r} must be > 0")

    def weight(self, sigma: Tensor) -> Tensor:
        """The weighting's factor on the objective's own MSE (float64)."""
        if self.weighting == "min_snr":
            return min_snr_weight(sigma, self.gamma, self.objective, self.sigma_data)
        if self.weighting == "edm":
            return edm_weight(sigma, self.sigma_data) / objective_factor(self.objective, sigma, self.sigma_data)
        return torch.ones_like(torch.as_tensor(sigma, dtype=torch.float64))

    def x0_weight(self, sigma: Tensor) -> Tensor:
        """Total weight on the per-sample x0-space MSE: ``weight(sigma) * objective_factor(sigma)``."""
        return self.weight(sigma) * objective_factor(self.objective, sigma, self.sigma_data)

    def __call__(
        self,
        denoiser: Callable[..., Tensor],
        x0: Tensor,
        cond: dict[str, Any] | None = None,
        *,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        sigma: Tensor | float | None = None,
    ) -> Tensor:
        if x0.ndim < 1 or x0.shape[0] == 0:
            raise ValueError(f"x0 must have a non-empty batch dimension, got shape {tuple(x0.shape)}")
        if sigma is None:
            sigma = self.sigmas(x0.shape[0], generator=generator, device=x0.device).to(x0.device)
        sigma = check_sigma(per_sample_sigma(x0, sigma))
        if noise is None:
            where = _device(generator, x0.device)
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=where).to(x0.device)
        x0_hat = denoiser(add_noise(x0, noise, sigma), sigma, **(cond or {}))
        if x0_hat.shape != x0.shape:
            raise ValueError(f"denoiser output shape {tuple(x0_hat.shape)} differs from x0 shape {tuple(x0.shape)}")
        dtype = torch.float64 if x0.dtype == torch.float64 else torch.float32
        mse = (x0_hat.to(dtype) - x0.to(dtype)).pow(2).reshape(x0.shape[0], -1).mean(1)
        return self.x0_weight(sigma).to(dtype) * mse


def vp_loss(
    schedule: VPSchedule, prediction: str = "epsilon", *, weighting: str = "uniform", gamma: float = 5.0
) -> DiffusionLoss:
    """DDPM training (Ho et al. 2020) for a ``VPDenoiser`` of the given prediction type."""
    check_choice("prediction", prediction, tuple(OBJECTIVE_FOR_PREDICTION))
    objective = OBJECTIVE_FOR_PREDICTION[prediction]
    return DiffusionLoss(
        objective=objective, sigmas=DiscreteSigmas(schedule=schedule), weighting=weighting, gamma=gamma
    )


def edm_loss(
    *, sigma_data: float = 0.5, p_mean: float = -1.2, p_std: float = 1.2, weighting: str = "uniform", gamma: float = 5.0
) -> DiffusionLoss:
    """EDM training, Karras et al. 2022, Table 1: log-normal sigmas and the lambda-weighted x0 error."""
    sigmas = LogNormalSigmas(p_mean=p_mean, p_std=p_std)
    return DiffusionLoss(objective="edm", sigmas=sigmas, weighting=weighting, gamma=gamma, sigma_data=sigma_data)


def flow_loss(
    *,
    distribution: str = "logit_normal",
    mean: float = 0.0,
    std: float = 1.0,
    t_eps: float = 1e-4,
    weighting: str = "uniform",
    gamma: float = 5.0,
) -> DiffusionLoss:
    """Rectified-flow training (Esser et al. 2024): MSE of ``v = noise - x0`` at uniform or logit-normal t."""
    sigmas = FlowSigmas(distribution=distribution, mean=mean, std=std, t_eps=t_eps)
    return DiffusionLoss(objective="flow", sigmas=sigmas, weighting=weighting, gamma=gamma)


def loss_for(denoiser: Callable[..., Tensor], *, weighting: str = "uniform", gamma: float = 5.0) -> DiffusionLoss:
    """The standard loss of a denoiser adapter: DDPM for ``VPDenoiser``, EDM for ``EDMDenoiser``, flow for flow."""
    if isinstance(denoiser, VPDenoiser):
        return vp_loss(denoiser.schedule, denoiser.prediction, weighting=weighting, gamma=gamma)
    if isinstance(denoiser, EDMDenoiser):
        return edm_loss(sigma_data=denoiser.sigma_data, weighting=weighting, gamma=gamma)
    if isinstance(denoiser, FlowDenoiser):
        return flow_loss(weighting=weighting, gamma=gamma)
    raise ValueError(
        f"no standard loss for {type(denoiser).__name__}; allowed: VPDenoiser, EDMDenoiser, FlowDenoiser "
        "(build a DiffusionLoss directly for other denoisers)"
    )
