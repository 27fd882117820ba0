"""The translation of a diffusers ``scheduler_config.json`` into our schedule, default sampler and grid options
(docs/samplers.md)."""

from __future__ import annotations

import warnings
from typing import Any

from unnoise.core.denoisers import PREDICTIONS
from unnoise.core.samplers import SAMPLER_INFO
from unnoise.pipeline.config import SamplingConfig, ScheduleConfig

_BETAS = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine", "sigmoid": "sigmoid"}
_COMMON = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None)
_COMMON |= dict(prediction_type="epsilon", steps_offset=0, timestep_spacing="linspace")
_SIGMA_SPACINGS = dict(use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False)
_MULTISTEP = dict(solver_order=2, thresholding=False, final_sigmas_type="zero", rescale_betas_zero_snr=False)
_MULTISTEP |= dict(lower_order_final=True, use_flow_sigmas=False, use_dynamic_shifting=False, **_SIGMA_SPACINGS)
# class -> the config keys it reads, with diffusers' defaults; its sampler is the record naming it (_sampler_for)
SCHEDULERS: dict[str, dict[str, Any]] = {
    "DDIMScheduler": dict(
        clip_sample=True,
        set_alpha_to_one=True,
        thresholding=False,
        rescale_betas_zero_snr=False,
        timestep_spacing="leading",
    ),
    "DDPMScheduler": dict(
        clip_sample=True,
        variance_type="fixed_small",
        thresholding=False,
        rescale_betas_zero_snr=False,
        timestep_spacing="leading",
    ),
    "PNDMScheduler": dict(set_alpha_to_one=False, timestep_spacing="leading"),
    "LMSDiscreteScheduler": dict(_SIGMA_SPACINGS),
    "EulerDiscreteScheduler": dict(
        interpolation_type="linear",
        sigma_min=None,
        sigma_max=None,
        timestep_type="discrete",
        rescale_betas_zero_snr=False,
        final_sigmas_type="zero",
        **_SIGMA_SPACINGS,
    ),
    "EulerAncestralDiscreteScheduler": dict(rescale_betas_zero_snr=False),
    "HeunDiscreteScheduler": dict(beta_start=0.00085, beta_end=0.012, clip_sample=False, **_SIGMA_SPACINGS),
    "DPMSolverMultistepScheduler": dict(
        algorithm_type="dpmsolver++",
        solver_type="midpoint",
        use_lu_lambdas=False,
        variance_type=None,
        euler_at_final=False,
        lambda_min_clipped=-float("inf"),
        **_MULTISTEP,
    ),
    "LCMScheduler": dict(
        clip_sample=False,
        set_alpha_to_one=True,
        thresholding=False,
        rescale_betas_zero_snr=False,
        timestep_spacing="leading",
        original_inference_steps=50,
        timestep_scaling=10.0,
    ),
    "UniPCMultistepScheduler": dict(
        solver_type="bh2",
        predict_x0=True,
        disable_corrector=[],
        solver_p=None,
        **_MULTISTEP,
    ),
}
# Classes that no sampler of ours runs, and the one their configs get: the multistep solver closest in spirit.
_STAND_INS = {"PNDMScheduler": "dpmpp_2m", "LMSDiscreteScheduler": "dpmpp_2m"}
# Options that change the result but that we do not apply: (key, the value diffusers' behaviour needs us to match).
_IGNORED = [
    ("clip_sample", False, "latents are not clipped"),
    ("thresholding", False, "latents are not thresholded"),
    ("variance_type", ("fixed_small", "fixed_small_log", None), "the sampler's own variance is used"),
    ("use_beta_sigmas", False, "the grid comes from timestep_spacing"),
    ("use_lu_lambdas", False, "the grid comes from timestep_spacing"),
    ("sigma_min", None, "the training schedule's sigma range is used"),
    ("sigma_max", None, "the training schedule's sigma range is used"),
    ("timestep_type", "discrete", "the network gets discrete-time timesteps"),
    ("interpolation_type", "linear", "sigma is interpolated linearly between timesteps"),
    ("solver_order", 2, "the sampler is second order"),
    ("solver_type", ("midpoint", "bh2"), "the sampler uses midpoint (DPM-Solver++) or bh2 (UniPC)"),
    ("predict_x0", True, "UniPC uses data prediction"),
    ("disable_corrector", [], "UniPC corrects every step"),
    ("solver_p", None, "UniPC uses its own predictor"),
    ("lambda_min_clipped", -float("inf"), "lambda is not clipped"),
    ("algorithm_type", ("dpmsolver++", "sde-dpmsolver++"), "the DPM-Solver++ form of the same order is used"),
]
_REFUSED = [("use_flow_sigmas", False), ("use_dynamic_shifting", False), ("prediction_type", PREDICTIONS)]
_REFUSED += [("original_inference_steps", 50), ("timestep_scaling", 10.0)]  # the lcm sampler's grid and scalings


def translate_scheduler(cfg: dict[str, Any]) -> tuple[ScheduleConfig, str, SamplingConfig]:
    """A diffusers ``scheduler_config.json`` as (schedule, prediction type, sampling defaults and grid options).

    PNDM and LMS have no sampler here; their configs get ``dpmpp_2m``, the multistep solver closest in spirit.
    Options we cannot honour are applied as their default with one warning each, naming the option.
    """
    name = cfg.get("_class_name")
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler _class_name={name!r} is not supported; supported: {sorted(SCHEDULERS)}")
    c = {**_COMMON, **SCHEDULERS[name]}
    c.update({k: v for k, v in cfg.items() if k in c})
    for key, allowed in _REFUSED:
        if c.get(key, allowed) not in (allowed if isinstance(allowed, tuple) else (allowed,)):
            raise ValueError(f"{name} config {key}={c[key]!r} is not supported; allowed: {allowed!r}")
    _warn_ignored(name, c)
    if c["beta_schedule"] not in _BETAS:
        raise ValueError(
            f"{name} config beta_schedule={c['beta_schedule']!r} is not supported; allowed: {list(_BETAS)}"
        )
    multistep = name in ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler")
    spacing = c["timestep_spacing"]
    if c.get("use_karras_sigmas"):
        spacing = "karras"
    elif c.get("use_exponential_sigmas"):
        spacing = "exponential"
    final = "sigma_min" if c.get("final_sigmas_type") == "sigma_min" or c.get("set_alpha_to_one") is False else "zero"
    lcm = name == "LCMScheduler"  # its last step returns the consistency output: the grid ends at 0
    final = "zero" if lcm else final
    linear = name in ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler")
    schedule = ScheduleConfig(
        beta_schedule=_BETAS[c["beta_schedule"]],
        beta_start=float(c["beta_start"]),
        beta_end=float(c["beta_end"]),
        num_train_timesteps=int(c["num_train_timesteps"]),
        rescale_zero_snr=bool(c.get("rescale_betas_zero_snr", False)),
        trained_betas=tuple(c["trained_betas"]) if c["trained_betas"] is not None else None,
        interpolation="linear" if linear or name == "LMSDiscreteScheduler" else "log",
    )
    sampling = SamplingConfig(
        sampler=_sampler_for(name, c),
        steps=4 if lcm else 50,  # diffusers' LatentConsistencyModelPipeline and StableDiffusionPipeline defaults
        guidance_scale=8.5 if lcm else 7.5,
        spacing=spacing,
        steps_offset=int(c["steps_offset"]),
        final=final,
        extra_point=multistep,  # used by leading and linspace grids only
        span=c["timestep_spacing"] if name in _SPACED_RANGE and spacing in ("karras", "exponential") else None,
        quantize=multistep and c["beta_schedule"] != "squaredcos_cap_v2",
    )
    return schedule, c["prediction_type"], sampling


def _sampler_for(name: str, c: dict[str, Any]) -> str:
    """Our sampler for class ``name`` with config ``c``: the record of that class whose selecting entries match."""
    if name in _STAND_INS:
        return _STAND_INS[name]
    if "algorithm_type" in c:  # DPM-Solver forms run as their DPM-Solver++ counterparts (see _IGNORED)
        c = {**c, "algorithm_type": c["algorithm_type"].removesuffix("++") + "++"}
    found = [i for i in SAMPLER_INFO.values() if i.diffusers_name == name]
    found = [i for i in found if all(c.get(key) == value for key, value in i.diffusers_config)]
    return max(found, key=lambda i: len(i.diffusers_config)).name  # the most specific match


# These bound karras/exponential grids by their spaced grid's ends, not the training range (diffusers 0.42).
_SPACED_RANGE = ("EulerDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler")


def _warn_ignored(name: str, c: dict[str, Any]) -> None:
    for key, default, why in _IGNORED:
        if key not in c:
            continue
        allowed = default if isinstance(default, tuple) else (default,)
        if c[key] not in allowed:
            _warn(f"{name} config {key}={c[key]!r} is not applied: {why}")
    if name in ("DDIMScheduler", "DDPMScheduler", "PNDMScheduler") and c["timestep_spacing"] == "linspace":
        _warn(f"{name} config timestep_spacing='linspace' is applied with exact fractional timesteps (not rounded)")
    if name == "UniPCMultistepScheduler" and c["lower_order_final"] is False:
        _warn(f"{name} config lower_order_final=False is not applied: the last step is first order")
    if name == "DPMSolverMultistepScheduler" and c["final_sigmas_type"] == "sigma_min":
        if c["euler_at_final"] or c["lower_order_final"]:
            _warn(
                f"{name} config final_sigmas_type='sigma_min' with euler_at_final={c['euler_at_final']!r}, "
                f"lower_order_final={c['lower_order_final']!r} is partly applied: the last step, to sigma_min, is "
                "second order (in diffusers first order below 15 steps, or always with euler_at_final)"
            )


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=4)
