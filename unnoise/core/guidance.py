"""Classifier-free guidance as a denoiser wrapper: every sampler gets it for free.

Guidance is combined on the denoised estimates. For a fixed ``x`` and ``sigma`` every adapter's ``D`` is affine in
the network output, so ``uncond + scale * (cond - uncond)`` here equals the same combination of epsilon or v.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from unnoise.core.denoisers import data_std, per_sample_sigma
from unnoise.core.schedules import append_dims, check_choice

RESCALE_SPACES = ("v", "epsilon")


class CFGDenoiser(nn.Module):
    """Classifier-free guidance, Ho & Salimans 2022: one batched call, ``uncond + scale * (cond - uncond)``.

    ``rescale`` is guidance rescale (Lin et al. 2023, Alg. 2), matching the conditional prediction's std in
    ``rescale_space`` ("v" as the paper, ComfyUI and diffusers on v-models; "epsilon" as diffusers on
    epsilon models). ``interval=(sigma_lo, sigma_hi)`` guides only there and runs the conditional model
    alone elsewhere (Kynkäänniemi et al. 2024).
    """

    def __init__(
        self,
        denoiser: Callable[..., Tensor],
        scale: float,
        uncond: dict[str, Any],
        rescale: float = 0.0,
        interval: tuple[float, float] | None = None,
        *,
        rescale_space: Literal["v", "epsilon"] = "v",
    ):
        super().__init__()
        if not isinstance(uncond, dict):
            raise ValueError(f"uncond must be a dict of conditioning keyword arguments, got {type(uncond).__name__}")
        if not 0.0 <= rescale <= 1.0:
            raise ValueError(f"rescale={rescale!r} must lie in [0, 1]")
        check_choice("rescale_space", rescale_space, RESCALE_SPACES)
        if interval is not None and not (len(interval) == 2 and 0 <= interval[0] < interval[1]):
            raise ValueError(f"interval={interval!r} must be (sigma_lo, sigma_hi) with 0 <= sigma_lo < sigma_hi")
        self.denoiser = denoiser
        self.scale = float(scale)
        self.uncond = uncond
        self.rescale = rescale
        self.interval = interval
        self.rescale_space = rescale_space

    @property
    def sigma_data(self) -> float:
        return data_std(self.denoiser)

    def forward(self, x: Tensor, sigma: Tensor | float, **cond: Any) -> Tensor:
        sigma = per_sample_sigma(x, sigma)
        if self.scale == 1.0 or not self._in_interval(sigma):
            return self.denoiser(x, sigma, **cond)
        both = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **_batch(cond, self.uncond, x.shape[0]))
        d_cond, d_uncond = both.chunk(2)
        guided = d_uncond + self.scale * (d_cond - d_uncond)
        if self.rescale > 0:
            guided = self._rescale(x, sigma, d_cond, guided)
        return guided

    def _in_interval(self, sigma: Tensor) -> bool:
        if self.interval is None:
            return True
        inside = (sigma >= self.interval[0]) & (sigma <= self.interval[1])
        if inside.any() and not inside.all():
            raise ValueError("a batch with sigmas on both sides of the guidance interval is not supported")
        return bool(inside.all())

    def _rescale(self, x: Tensor, sigma: Tensor, d_cond: Tensor, guided: Tensor) -> Tensor:
        """Guidance rescale in the prediction space: ``phi * cfg * std(cond) / std(cfg) + (1 - phi) * cfg``."""
        s = append_dims(sigma, x.ndim).to(x.dtype)
        # a per-sample positive factor (c_in for v) cancels in std(cond) / std(cfg), so it is left out
        to_pred = (lambda d: (x - d) / s - s * d) if self.rescale_space == "v" else (lambda d: (x - d) / s)
        p_cond, p_cfg = to_pred(d_cond), to_pred(guided)
        dims = list(range(1, x.ndim))
        p_rescaled = p_cfg * (p_cond.std(dim=dims, keepdim=True) / p_cfg.std(dim=dims, keepdim=True))
        p = self.rescale * p_rescaled + (1 - self.rescale) * p_cfg
        return (x / s - p) / (1 / s + s) if self.rescale_space == "v" else x - s * p


def _batch(cond: dict[str, Any], uncond: dict[str, Any], batch: int) -> dict[str, Any]:
    """Stack conditional and unconditional keyword arguments along the batch: ``[cond; uncond]``."""
    if set(cond) != set(uncond):
        raise ValueError(f"cond keys {sorted(cond)} differ from uncond keys {sorted(uncond)}")
    merged = {}
    for key, c in cond.items():
        u = uncond[key]
        if isinstance(c, Tensor):
            if not isinstance(u, Tensor):
                raise ValueError(f"cond[{key!r}] is a tensor but uncond[{key!r}] is {type(u).__name__}")
            c = c.expand(batch, *c.shape[1:]) if c.shape[0] == 1 else c
            u = u.expand(batch, *u.shape[1:]) if u.shape[0] == 1 else u
            if c.shape[0] != batch or u.shape[0] != batch or c.shape[1:] != u.shape[1:]:
                raise ValueError(
                    f"cond[{key!r}] {tuple(c.shape)} and uncond[{key!r}] {tuple(u.shape)} must have batch 1 or "
                    f"{batch} and equal trailing shapes"
                )
            merged[key] = torch.cat([c, u])
        elif c is None and u is None:
            merged[key] = None
        else:
            raise ValueError(f"cond[{key!r}] must be a tensor (or None in both), got {type(c).__name__}")
    return merged
