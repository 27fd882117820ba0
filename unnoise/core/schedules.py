"""Noise schedules: variance-preserving training schedules seen in sigma space, and sampling grids.

A VP schedule defines ``alphas_cumprod[t]``; its sigma is ``sqrt((1 - alphas_cumprod) / alphas_cumprod)``, so that
``x = x0 + sigma * noise`` is the VP sample ``sqrt(a) x0 + sqrt(1 - a) noise`` divided by ``sqrt(a)``.
A sampling grid is a float64 tensor of decreasing sigmas whose last entry is the end of sampling (0 by default).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

BETA_KINDS = ("linear", "scaled_linear", "cosine", "sigmoid")
SPACINGS = ("leading", "trailing", "linspace", "karras", "exponential", "tau")
FINALS = ("zero", "sigma_min")
INTERPOLATIONS = ("log", "linear")

# A zero-terminal-SNR schedule has sigma = inf at its last step, which no sampler in sigma space can start from.
# As diffusers' discrete schedulers do, the last alphas_cumprod is raised to 2**-24 (sigma about 4096); where the
# step before it is already below that (linear betas), the schedule's geometric decay is continued instead.
ZERO_SNR_FLOOR = 2.0**-24


def check_choice(field: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{field}={value!r} is not supported; allowed values: {', '.join(allowed)}")


def check_steps(steps: object, name: str = "steps") -> None:
    """Raise unless ``steps`` is an integer >= 1 (bools excluded), naming the field."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{name}={steps!r} must be an integer >= 1")


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Rescale betas so the last step has zero SNR, Lin et al. 2023, Alg. 1."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1.0 - alphas


def _betas(kind: str, n: int, beta_start: float, beta_end: float) -> Tensor:
    f64 = torch.float64
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=f64)
    if kind == "scaled_linear":  # Stable Diffusion: linear in sqrt(beta)
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=f64) ** 2
    if kind == "sigmoid":  # GeoDiff, Xu et al. 2022
        return torch.sigmoid(torch.linspace(-6, 6, n, dtype=f64)) * (beta_end - beta_start) + beta_start

    # cosine: Nichol & Dhariwal 2021, eq. 17, betas capped at 0.999 (diffusers' squaredcos_cap_v2)
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)], dtype=f64)


def _interp(t: Tensor, table: Tensor) -> Tensor:
    """Piecewise-linear interpolation of ``table`` at fractional indices ``t`` in [0, len - 1]."""
    low = t.floor().clamp(0, len(table) - 2).long()
    w = t - low
    return (1 - w) * table[low] + w * table[low + 1]


class VPSchedule:
    """A variance-preserving schedule over ``num_train_timesteps`` discrete steps, seen in sigma space."""

    def __init__(self, alphas_cumprod: Tensor, *, interpolation: Literal["log", "linear"] = "log"):
        check_choice("interpolation", interpolation, INTERPOLATIONS)
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).clone()
        if ac.ndim != 1 or len(ac) < 2:
            raise ValueError(f"alphas_cumprod must be 1-D with at least 2 entries, got shape {tuple(ac.shape)}")
        if not torch.isfinite(ac).all() or (ac <= 0).any() or (ac >= 1).any():
            raise ValueError("alphas_cumprod must lie in the open interval (0, 1)")
        if (ac[1:] >= ac[:-1]).any():
            raise ValueError("alphas_cumprod must be strictly decreasing in t")
        self.alphas_cumprod = ac
        self.interpolation = interpolation
        self.sigmas = ((1 - ac) / ac).sqrt()  # ascending in t
        self.log_sigmas = self.sigmas.log()

    @classmethod
    def from_betas(
        cls,
        kind: str = "linear",
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        rescale_zero_snr: bool = False,
        *,
        interpolation: Literal["log", "linear"] = "log",
    ) -> VPSchedule:
        """Build from a beta schedule; ``cosine`` is diffusers' ``squaredcos_cap_v2``."""
        check_choice("kind", kind, BETA_KINDS)
        if not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps={num_train_timesteps!r} must be an integer >= 2")
        betas = _betas(kind, num_train_timesteps, beta_start, beta_end)
        if rescale_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        if rescale_zero_snr:
            before = alphas_cumprod[-2]
            alphas_cumprod[-1] = ZERO_SNR_FLOOR if before > ZERO_SNR_FLOOR else before**2 / alphas_cumprod[-3]
        schedule = cls(alphas_cumprod, interpolation=interpolation)
        schedule._betas = betas
        return schedule

    @property
    def betas(self) -> Tensor:
        betas = getattr(self, "_betas", None)
        if betas is None:
            ac = self.alphas_cumprod
            betas = 1 - torch.cat([ac[:1], ac[1:] / ac[:-1]])
        return betas

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def t_to_sigma(self, t: Tensor | float) -> Tensor:
        """Sigma at (fractional) timestep t, interpolating log-sigma (or sigma, with interpolation='linear')."""
        t = torch.as_tensor(t, dtype=torch.float64)
        last = self.num_train_timesteps - 1
        if not torch.isfinite(t).all() or (t < 0).any() or (t > last).any():
            raise ValueError(f"timesteps must lie in [0, {last}], got {t.tolist()}")
        if self.interpolation == "log":
            return _interp(t, self.log_sigmas).exp()
        return _interp(t, self.sigmas)

    def sigma_to_t(self, sigma: Tensor | float) -> Tensor:
        """Fractional timestep of sigma, the inverse of ``t_to_sigma``; roundoff past either end maps to that end."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        tol = 1e-6
        if (
            not torch.isfinite(sigma).all()
            or (sigma < self.sigma_min * (1 - tol)).any()
            or (sigma > self.sigma_max * (1 + tol)).any()
        ):
            raise ValueError(
                f"sigma must lie in the training range [{self.sigma_min:.6g}, {self.sigma_max:.6g}], "
                f"got {sigma.flatten()[:8].tolist()}"
            )
        table = self.log_sigmas if self.interpolation == "log" else self.sigmas
        value = sigma.log() if self.interpolation == "log" else sigma
        low = (
            (torch.searchsorted(table, value.flatten().contiguous(), right=True) - 1)
            .clamp(0, len(table) - 2)
            .reshape(value.shape)
        )
        w = ((value - table[low]) / (table[low + 1] - table[low])).clamp(0, 1)
        return low + w

    def sigmas_for(
        self,
        steps: int,
        spacing: str = "leading",
        *,
        steps_offset: int = 0,
        final: Literal["zero", "sigma_min"] = "zero",
        extra_point: bool = False,
        rho: float = 7.0,
        sigma_data: float = 1.0,
        span: str | None = None,
    ) -> Tensor:
        """A sampling grid: ``steps + 1`` decreasing float64 sigmas ending in 0 (or in the smallest training sigma).

        ``extra_point`` places ``steps + 1`` timesteps and drops the smallest, as diffusers' multistep schedulers
        (DPMSolverMultistep, UniPC) do for ``leading`` and ``linspace``; ``karras`` (Karras et al. 2022, eq. 5)
        and ``exponential`` span the whole training range; ``tau`` is uniform in ``log(sigma_data^2 + sigma^2)``
        from the top of the range to the end (see ``tau_sigmas``). ``span`` bounds ``karras`` and ``exponential``
        by the first and last sigma of that spacing's grid instead, as diffusers' Euler, Heun and LMS do.
        With ``final="sigma_min"`` on a grid that already ends there (timestep 0), nothing is appended: diffusers
        takes a zero-length step at that point, which changes nothing.
        """
        check_steps(steps)
        check_choice("spacing", spacing, SPACINGS)
        check_choice("final", final, FINALS)
        if spacing == "tau":
            end = 0.0 if final == "zero" else self.sigma_min
            sigmas = tau_sigmas(steps, self.sigma_max, sigma_data, sigma_end=end)[:-1]
            if (sigmas < self.sigma_min * (1 - 1e-9)).any():
                raise ValueError(
                    f"spacing='tau' with steps={steps} and sigma_data={sigma_data} places sigmas below the "
                    f"schedule's smallest {self.sigma_min:.4g}; use fewer steps or a larger sigma_data"
                )
        elif spacing in ("karras", "exponential"):
            lo, hi = self.sigma_min, self.sigma_max
            if span is not None:
                check_choice("span", span, ("leading", "trailing", "linspace"))
                bounds = self.t_to_sigma(self.timesteps_for(steps, span, steps_offset=steps_offset))
                lo, hi = float(bounds[-1]), float(bounds[0])
            sigmas = _continuous_spacing(steps, spacing, lo, hi, rho)
        else:
            sigmas = self.t_to_sigma(
                self.timesteps_for(steps, spacing, steps_offset=steps_offset, extra_point=extra_point)
            )
        last = torch.zeros(1, dtype=torch.float64) if final == "zero" else self.sigmas[:1]
        if final == "sigma_min" and sigmas[-1] <= last[0] * (1 + 1e-12):
            return torch.cat([sigmas[:-1], last])  # the grid already ends at sigma_min
        return torch.cat([sigmas, last])

    def timesteps_for(self, steps: int, spacing: str, *, steps_offset: int = 0, extra_point: bool = False) -> Tensor:
        """The decreasing training timesteps that ``leading``, ``trailing`` and ``linspace`` spacing select."""
        n_train = self.num_train_timesteps
        limit = n_train - (1 if extra_point and spacing != "trailing" else 0)
        if steps > limit:
            raise ValueError(f"steps={steps} exceeds the {limit} distinct timesteps that {spacing!r} spacing can place")
        points = steps + 1 if extra_point else steps
        if spacing == "leading":
            t = (torch.arange(points, dtype=torch.float64) * (n_train // points)).flip(0) + steps_offset
        elif spacing == "trailing":
            t = (n_train - torch.arange(steps, dtype=torch.float64) * (n_train / steps)).round() - 1
            points = steps
        elif spacing == "linspace":
            t = torch.linspace(0, n_train - 1, points, dtype=torch.float64).flip(0)
            if extra_point:
                t = t.round()
        else:
            raise ValueError(f"spacing={spacing!r} has no timesteps; allowed values: leading, trailing, linspace")
        if points > steps:
            t = t[:steps]
        if t.max() > n_train - 1 or t.min() < 0:
            raise ValueError(f"steps_offset={steps_offset} moves timesteps outside [0, {n_train - 1}]")
        return t


def _continuous_spacing(steps: int, spacing: str, lo: float, hi: float, rho: float) -> Tensor:
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    if spacing == "karras":
        return (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    return torch.exp(math.log(hi) + ramp * (math.log(lo) - math.log(hi)))


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022 eq. 5 grid from sigma_max to sigma_min, then 0: for EDM and flow models."""
    check_steps(steps)
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    return torch.cat(
        [_continuous_spacing(steps, "karras", sigma_min, sigma_max, rho), torch.zeros(1, dtype=torch.float64)]
    )


def tau_sigmas(steps: int, sigma_max: float, sigma_data: float = 1.0, *, sigma_end: float = 0.0) -> Tensor:
    """Grid uniform in ``tau = log(sigma_data^2 + sigma^2) / 2`` from sigma_max to sigma_end: steps shrink
    geometrically at high noise (like ``exponential``) and evenly in ``sigma^2`` near the data; ``tau`` stays
    finite at sigma 0, the time variable of the ``gauss_pc`` sampler."""
    check_steps(steps)
    if not (sigma_data > 0 and 0 <= sigma_end < sigma_max):
        raise ValueError(
            f"need sigma_data > 0 and 0 <= sigma_end < sigma_max, got sigma_data={sigma_data}, "
            f"sigma_end={sigma_end}, sigma_max={sigma_max}"
        )
    sd2 = sigma_data**2
    tau = torch.linspace(
        0.5 * math.log(sd2 + sigma_max**2), 0.5 * math.log(sd2 + sigma_end**2), steps + 1, dtype=torch.float64
    )
    sigmas = (torch.exp(2 * tau) - sd2).clamp_min(0).sqrt()
    sigmas[0], sigmas[-1] = sigma_max, sigma_end
    return sigmas


def check_grid(sigmas: Tensor) -> None:
    """Raise unless ``sigmas`` is a finite 1-D grid, decreasing, non-negative, with at least one step."""
    if not isinstance(sigmas, Tensor) or sigmas.ndim != 1 or len(sigmas) < 2:
        shape = tuple(sigmas.shape) if isinstance(sigmas, Tensor) else type(sigmas).__name__
        raise ValueError(f"sigmas must be a 1-D tensor with at least 2 entries (one step), got {shape}")
    if not torch.isfinite(sigmas).all():
        raise ValueError(f"sigmas must be finite, got {sigmas.tolist()}")
    if (sigmas < 0).any() or (sigmas[1:] >= sigmas[:-1]).any():
        raise ValueError(f"sigmas must be non-negative and strictly decreasing, got {sigmas.tolist()}")


def add_noise(x0: Tensor, noise: Tensor, sigma: Tensor | float, *, scaling: Literal["ve", "vp"] = "ve") -> Tensor:
    """The forward process: ``x0 + sigma * noise``, or its VP form ``sqrt(a) x0 + sqrt(1 - a) noise`` (scaling='vp')."""
    check_choice("scaling", scaling, ("ve", "vp"))
    if x0.shape != noise.shape:
        raise ValueError(f"x0 and noise shapes differ: {tuple(x0.shape)} vs {tuple(noise.shape)}")
    sigma = append_dims(torch.as_tensor(sigma, dtype=x0.dtype, device=x0.device), x0.ndim)
    x = x0 + sigma * noise
    return x / (1 + sigma**2).sqrt() if scaling == "vp" else x


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """Reshape a scalar or per-sample (B,) tensor to broadcast against a tensor of ``ndim`` dimensions."""
    if v.ndim > 1:
        raise ValueError(f"sigma must be a scalar or a per-sample vector, got shape {tuple(v.shape)}")
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def snr(sigma: Tensor | float) -> Tensor:
    """Signal-to-noise ratio of ``x0 + sigma * noise``: ``1 / sigma**2`` (= alphas_cumprod / (1 - alphas_cumprod))."""
    return torch.as_tensor(sigma, dtype=torch.float64) ** -2


def log_snr(sigma: Tensor | float) -> Tensor:
    """Log signal-to-noise ratio ``-2 log(sigma)``; half of it is the ``lambda`` of DPM-Solver and UniPC."""
    return -2 * torch.as_tensor(sigma, dtype=torch.float64).log()
