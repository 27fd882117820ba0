"""diffusers' schedulers driven by the same epsilon model and the same unit noise, in diffusers' own loop.

diffusers is an oracle for the benchmark only; nothing in ``unnoise`` imports it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

# Stable Diffusion 1.x/2.x's training schedule, as its scheduler_config.json gives it.
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


@dataclass(frozen=True)
class DiffusersConfig:
    """A diffusers scheduler class (by name) and the config keys that differ from its defaults."""

    label: str
    scheduler: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    evals_per_step: int = 1  # Heun: two model calls per step but the last

    def build(self):
        import diffusers

        return getattr(diffusers, self.scheduler)(**SD_SCHEDULE, **self.kwargs)

    def steps_for(self, nfe: int) -> int:
        """The most steps whose model calls do not exceed ``nfe``."""
        return (nfe + 1) // 2 if self.evals_per_step == 2 else nfe


def _config(label: str, scheduler: str, **kwargs: Any) -> DiffusersConfig:
    return DiffusersConfig(label, scheduler, kwargs, 2 if scheduler == "HeunDiscreteScheduler" else 1)


DIFFUSERS_CONFIGS: tuple[DiffusersConfig, ...] = (
    # DDIM as Stable Diffusion ships it (leading spacing, steps_offset 1, last step to alphas_cumprod[0]),
    # and as recommended for few steps (trailing, last step to sigma 0).
    _config("DDIM (SD config)", "DDIMScheduler", clip_sample=False, set_alpha_to_one=False, steps_offset=1),
    _config("DDIM trailing", "DDIMScheduler", clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing"),
    _config("Euler", "EulerDiscreteScheduler"),
    _config("Euler karras", "EulerDiscreteScheduler", use_karras_sigmas=True),
    _config("Heun", "HeunDiscreteScheduler"),
    _config("Heun karras", "HeunDiscreteScheduler", use_karras_sigmas=True),
    _config("DPM++ 2M", "DPMSolverMultistepScheduler"),
    _config("DPM++ 2M karras", "DPMSolverMultistepScheduler", use_karras_sigmas=True, final_sigmas_type="zero"),
    _config("DPM++ 2M trailing", "DPMSolverMultistepScheduler", timestep_spacing="trailing"),
    _config("DPM++ 3M karras", "DPMSolverMultistepScheduler", solver_order=3, use_karras_sigmas=True),
    _config("UniPC", "UniPCMultistepScheduler"),
    _config("UniPC karras", "UniPCMultistepScheduler", use_karras_sigmas=True),
    _config("UniPC trailing", "UniPCMultistepScheduler", timestep_spacing="trailing"),
    _config("UniPC-3", "UniPCMultistepScheduler", solver_order=3),
    _config("UniPC-3 karras", "UniPCMultistepScheduler", solver_order=3, use_karras_sigmas=True),
    _config("DEIS-3 karras", "DEISMultistepScheduler", solver_order=3, use_karras_sigmas=True),
)


def run_diffusers(
    config: DiffusersConfig, eps_model: Callable[[Tensor, Tensor], Tensor], noise: Tensor, nfe: int
) -> tuple[Tensor, float, float, int]:
    """diffusers' loop (``init_noise_sigma``, ``scale_model_input``, model, ``step``) from unit ``noise``.

    Returns the output, the first sigma, the factor that maps ``noise`` to the start in sigma scaling, and the
    number of model calls.
    """
    scheduler = config.build()
    scheduler.set_timesteps(config.steps_for(nfe))
    x = noise * scheduler.init_noise_sigma
    calls = 0
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        eps = eps_model(model_input, t.expand(len(x)))
        calls += 1
        x = scheduler.step(eps, t, x).prev_sample
    sigma_start, start_scale = _start(scheduler, float(scheduler.init_noise_sigma))
    return x.to(noise.dtype), sigma_start, start_scale, calls


def _start(scheduler, init_noise_sigma: float) -> tuple[float, float]:
    """The first sampling sigma and the factor that maps unit noise to the start in sigma scaling."""
    ac = scheduler.alphas_cumprod.to(torch.float64)
    if hasattr(scheduler, "sigmas") and getattr(scheduler, "init_noise_sigma", 1.0) != 1.0:
        # Euler/Heun-type: the state is already in sigma scaling and starts at noise * init_noise_sigma
        return float(scheduler.sigmas[0]), init_noise_sigma
    if hasattr(scheduler, "sigmas"):  # multistep schedulers: VP state, sigmas stored for stepping
        sigma = float(scheduler.sigmas[0])
    else:  # DDIM: VP state at the first timestep
        t = int(scheduler.timesteps[0])
        sigma = float(((1 - ac[t]) / ac[t]).sqrt())
    return sigma, float((1 + sigma**2) ** 0.5)  # VP unit noise is noise * sqrt(1 + sigma^2) in sigma scaling
