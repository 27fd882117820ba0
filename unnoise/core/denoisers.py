"""Denoiser adapters: any network, any parametrization, seen as ``D(x, sigma, **cond) -> x0_hat``.

Every adapter writes ``D = c_skip * x + c_out * F(c_in * x, c_noise)`` (Karras et al. 2022, eq. 7) with its
own coefficients, where ``x = x0 + sigma * noise``. Conversions between VP and sigma scaling happen here only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from unnoise.core.schedules import VPSchedule, append_dims, check_choice, check_steps

PREDICTIONS = ("epsilon", "v_prediction", "sample")
DEFAULT_SIGMA_DATA = 0.5  # EDM's value; about the std of images in [-1, 1]


def data_std(denoiser: Callable[..., Tensor]) -> float:
    """The data std a sampler may assume: the denoiser's ``sigma_data`` attribute, else ``DEFAULT_SIGMA_DATA``."""
    return float(getattr(denoiser, "sigma_data", DEFAULT_SIGMA_DATA))


def per_sample_sigma(x: Tensor, sigma: Tensor | float) -> Tensor:
    """Sigma as a float64 vector of length ``x.shape[0]``; a scalar is broadcast, a mismatched vector raises."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
    if sigma.ndim == 0:
        return sigma.expand(x.shape[0])
    if sigma.shape != (x.shape[0],):
        raise ValueError(
            f"sigma has shape {tuple(sigma.shape)}; expected a scalar or ({x.shape[0]},) "
            f"for x of shape {tuple(x.shape)}"
        )
    return sigma


def check_sigma(sigma: Tensor) -> Tensor:
    """Raise unless every sigma is finite and positive (sigma 0 is the data itself: nothing to denoise)."""
    if not torch.isfinite(sigma).all() or (sigma <= 0).any():
        raise ValueError(f"sigma must be finite and positive, got {sigma.tolist()}")
    return sigma


def _model_dtype(x: Tensor) -> torch.dtype:
    # Time inputs stay in float64 when the caller computes in float64 (oracle tests), float32 otherwise.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class Denoiser(nn.Module):
    """Base adapter: subclasses give ``scalings(sigma) -> (c_skip, c_out, c_in)`` and ``noise_input(sigma)``."""

    def __init__(self, model: Callable[..., Tensor], sigma_data: float = DEFAULT_SIGMA_DATA):
        super().__init__()
        if not sigma_data > 0:
            raise ValueError(f"sigma_data={sigma_data!r} must be positive")
        self.model = model
        self.sigma_data = sigma_data  # the data std; EDM's preconditioning and the gauss_pc sampler use it

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def noise_input(self, sigma: Tensor) -> Tensor:
        raise NotImplementedError

    def prior_std(self, sigma: float) -> float:
        """Std of ``x`` at ``sigma`` when x0 is forgotten: scale unit noise by this to start sampling."""
        return float(sigma)

    def forward(self, x: Tensor, sigma: Tensor | float, **cond: Any) -> Tensor:
        sigma = check_sigma(per_sample_sigma(x, sigma))
        c_skip, c_out, c_in = (append_dims(c, x.ndim).to(x.dtype) for c in self.scalings(sigma))
        out = self.model(x * c_in, self.noise_input(sigma).to(_model_dtype(x)), **cond)
        if out.shape != x.shape:
            raise ValueError(f"model output shape {tuple(out.shape)} differs from input shape {tuple(x.shape)}")
        return c_skip * x + c_out * out.to(x.dtype)


class VPDenoiser(Denoiser):
    """A discrete-time VP network (epsilon, v or x0 prediction) called as ``model(x * c_in, t, **cond)``.

    ``quantize=True`` rounds t to the nearest training timestep, as diffusers' multistep schedulers do with
    karras sigmas (and k-diffusion's ``quantize``); the sampler still steps with the exact sigma.
    """

    def __init__(
        self,
        model: Callable[..., Tensor],
        schedule: VPSchedule,
        prediction: str = "epsilon",
        *,
        quantize: bool = False,
        sigma_data: float = DEFAULT_SIGMA_DATA,
    ):
        super().__init__(model, sigma_data)
        check_choice("prediction", prediction, PREDICTIONS)
        self.schedule = schedule
        self.prediction = prediction
        self.quantize = quantize

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        c_in = 1 / (1 + sigma**2).sqrt()
        if self.prediction == "epsilon":
            return torch.ones_like(sigma), -sigma, c_in
        if self.prediction == "v_prediction":  # v = sqrt(a) eps - sqrt(1 - a) x0
            return c_in**2, -sigma * c_in, c_in
        return torch.zeros_like(sigma), torch.ones_like(sigma), c_in

    def noise_input(self, sigma: Tensor) -> Tensor:
        t = self.schedule.sigma_to_t(sigma.cpu()).to(sigma.device)
        return t.round() if self.quantize else t

    def prior_std(self, sigma: float) -> float:
        return float((1 + sigma**2) ** 0.5)


class EDMDenoiser(Denoiser):
    """EDM preconditioning, Karras et al. 2022, Table 1: ``model(c_in x, log(sigma) / 4)``."""

    def __init__(self, model: Callable[..., Tensor], sigma_data: float = DEFAULT_SIGMA_DATA):
        super().__init__(model, sigma_data)

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1 / (sigma**2 + sd2).sqrt()
        return c_skip, c_out, c_in

    def noise_input(self, sigma: Tensor) -> Tensor:
        return sigma.log() / 4


class FlowDenoiser(Denoiser):
    """A rectified-flow / flow-matching network on ``x_t = (1 - t) x0 + t noise`` predicting ``noise - x0``.

    In sigma space ``sigma = t / (1 - t)`` and ``x = x_t / (1 - t)``; the model sees ``t * time_scale``
    (1000 for diffusers' flow-matching models such as SD3).
    """

    def __init__(
        self, model: Callable[..., Tensor], *, time_scale: float = 1.0, sigma_data: float = DEFAULT_SIGMA_DATA
    ):
        super().__init__(model, sigma_data)
        self.time_scale = time_scale

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        c_in = 1 / (1 + sigma)
        return c_in, -sigma * c_in, c_in  # x0 = x_t - t * v

    def noise_input(self, sigma: Tensor) -> Tensor:
        return sigma / (1 + sigma) * self.time_scale

    def prior_std(self, sigma: float) -> float:
        return float(1 + sigma)


def flow_sigmas(steps: int, *, shift: float = 1.0, t_max: float = 0.999) -> Tensor:
    """Grid for flow models: t uniform from ``t_max`` to 0, time-shifted (Esser et al. 2024), as sigma = t/(1-t).

    t = 1 has sigma = inf, which no sampler in sigma space can start from, so the grid starts at ``t_max``.
    """
    check_steps(steps)
    if not 0 < t_max < 1:
        raise ValueError(f"t_max={t_max!r} must lie in (0, 1)")
    t = torch.linspace(t_max, 0, steps + 1, dtype=torch.float64)
    t = shift * t / (1 + (shift - 1) * t)
    return t / (1 - t)


def score(denoiser: Callable[..., Tensor], x: Tensor, sigma: Tensor | float, **cond: Any) -> Tensor:
    """The score of the noised data, ``grad log p(x; sigma) = (D(x, sigma) - x) / sigma**2`` (Tweedie)."""
    s = append_dims(per_sample_sigma(x, sigma), x.ndim).to(x.dtype)
    return (denoiser(x, sigma, **cond) - x) / s**2
