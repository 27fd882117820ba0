"""Pipeline configuration and loading: our ``pipeline.json`` folders, diffusers Stable Diffusion folders, and the
translation of a diffusers scheduler config into our schedule, default sampler and grid options (docs/samplers.md).

Our format is a folder with ``pipeline.json`` (``PipelineConfig``), ``unet/`` and ``vae/`` in our model format
(``unnoise.models.io``) and, for a CLIP text encoder, diffusers-style ``text_encoder/`` and ``tokenizer/`` folders.
The bundled MiniLM encoder is not copied: it loads from its package.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from unnoise.denoisers import PREDICTIONS
from unnoise.models.config import ModelConfig
from unnoise.models.io import load_diffusers, load_model, save_model
from unnoise.models.text import CLIPTextEncoder, MiniLMEncoder, TextEncoder
from unnoise.samplers import SAMPLERS
from unnoise.schedules import BETA_KINDS, FINALS, INTERPOLATIONS, SPACINGS, VPSchedule, check_choice, check_steps

TEXT_ENCODERS = ("minilm", "clip")
# The embedded default model, shipped as package data: MNIST text-to-image (configs/mnist-*.toml made it).
DEFAULT_MODEL = Path(__file__).resolve().parent / "weights" / "mnist-ldm"


@dataclasses.dataclass(frozen=True, kw_only=True)
class TextEncoderConfig(ModelConfig):
    """Which text encoder: the bundled MiniLM, or CLIP from the folder's ``text_encoder/`` and ``tokenizer/``."""

    kind: str = "minilm"
    max_length: int = 77  # MiniLM only: tokens per prompt (CLIP uses its tokenizer's model_max_length)
    clip_skip: int = 0  # CLIP only: hidden state this many layers before the last

    def __post_init__(self) -> None:
        check_choice("text_encoder.kind", self.kind, TEXT_ENCODERS)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScheduleConfig(ModelConfig):
    """The training noise schedule: beta kind (``cosine`` is diffusers' ``squaredcos_cap_v2``) or trained betas.

    ``interpolation`` is how fractional timesteps of ``leading``/``trailing``/``linspace`` grids map to sigma
    ("linear" as diffusers' Euler, Euler ancestral, Heun and LMS); karras and exponential grids always use "log".
    """

    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    rescale_zero_snr: bool = False
    trained_betas: tuple[float, ...] | None = None
    interpolation: str = "log"

    def __post_init__(self) -> None:
        check_choice("schedule.beta_schedule", self.beta_schedule, BETA_KINDS)
        check_choice("schedule.interpolation", self.interpolation, INTERPOLATIONS)
        if self.trained_betas is not None and self.rescale_zero_snr:
            raise ValueError("schedule.rescale_zero_snr=True with trained_betas is not supported; allowed: one of them")

    def build(self, spacing: str) -> VPSchedule:
        """The VP schedule, with the sigma interpolation that the grid ``spacing`` uses."""
        interpolation = "log" if spacing in ("karras", "exponential") else self.interpolation
        if self.trained_betas is not None:
            betas = torch.tensor(self.trained_betas, dtype=torch.float64)
            return VPSchedule(torch.cumprod(1 - betas, 0), interpolation=interpolation)  # type: ignore[arg-type]
        return VPSchedule.from_betas(
            self.beta_schedule,
            self.num_train_timesteps,
            self.beta_start,
            self.beta_end,
            self.rescale_zero_snr,
            interpolation=interpolation,  # type: ignore[arg-type]
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig(ModelConfig):
    """Defaults of a call (sampler, steps, guidance) and the grid options of ``VPSchedule.sigmas_for``."""

    sampler: str = "euler"
    steps: int = 20
    guidance_scale: float = 7.5
    spacing: str = "leading"
    steps_offset: int = 0
    final: str = "zero"
    extra_point: bool = False  # diffusers' multistep schedulers' leading/linspace placement
    span: str | None = None  # karras/exponential bounded by this spacing's grid (diffusers' Euler, Heun, LMS)
    quantize: bool = False  # round the network's timestep on karras grids (diffusers' multistep schedulers)

    def __post_init__(self) -> None:
        check_choice("sampling.sampler", self.sampler, tuple(SAMPLERS))
        check_choice("sampling.spacing", self.spacing, SPACINGS)
        check_choice("sampling.final", self.final, FINALS)
        check_steps(self.steps, "sampling.steps")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """What ``pipeline.json`` holds; latent scaling lives in the VAE's config."""

    text_encoder: TextEncoderConfig = dataclasses.field(default_factory=TextEncoderConfig)
    prediction: str = "epsilon"
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)

    def __post_init__(self) -> None:
        check_choice("prediction", self.prediction, PREDICTIONS)

    def to_dict(self) -> dict[str, Any]:
        parts = {name: getattr(self, name).to_dict() for name in ("text_encoder", "schedule", "sampling")}
        return {"_type": "text_to_image", "prediction": self.prediction, **parts}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PipelineConfig:
        data = dict(data)
        if data.pop("_type", "text_to_image") != "text_to_image":
            raise ValueError("pipeline.json: _type must be 'text_to_image'")
        parts = {"text_encoder": TextEncoderConfig, "schedule": ScheduleConfig, "sampling": SamplingConfig}
        unknown = sorted(set(data) - set(parts) - {"prediction"})
        if unknown:
            raise ValueError(f"pipeline.json: unknown keys {unknown}; allowed: {sorted([*parts, 'prediction'])}")
        kwargs: dict[str, Any] = {name: part.from_dict(data[name]) for name, part in parts.items() if name in data}
        return cls(prediction=data.get("prediction", "epsilon"), **kwargs)


def sampling_grid(
    schedule: ScheduleConfig, sampling: SamplingConfig, steps: int, spacing: str | None = None
) -> tuple[VPSchedule, Tensor]:
    """The schedule and the sigma grid for ``steps`` with the config's grid options (``spacing`` overrides)."""
    spacing = sampling.spacing if spacing is None else spacing
    vp = schedule.build(spacing)
    s = sampling
    span = s.span if spacing in ("karras", "exponential") else None
    sigmas = vp.sigmas_for(
        steps, spacing, steps_offset=s.steps_offset, final=s.final, extra_point=s.extra_point, span=span
    )
    return vp, sigmas


# -- diffusers scheduler configs ---------------------------------------------------------------------------------

_BETAS = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine", "sigmoid": "sigmoid"}
_COMMON = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None)
_COMMON |= dict(prediction_type="epsilon", steps_offset=0, timestep_spacing="linspace")
_SIGMA_SPACINGS = dict(use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False)
_MULTISTEP = dict(solver_order=2, thresholding=False, final_sigmas_type="zero", rescale_betas_zero_snr=False)
_MULTISTEP |= dict(lower_order_final=True, use_flow_sigmas=False, use_dynamic_shifting=False, **_SIGMA_SPACINGS)
# class -> (default sampler, the config keys it reads with diffusers' defaults)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "DDIMScheduler": (
        "ddim",
        dict(
            clip_sample=True,
            set_alpha_to_one=True,
            thresholding=False,
            rescale_betas_zero_snr=False,
            timestep_spacing="leading",
        ),
    ),
    "DDPMScheduler": (
        "ddpm",
        dict(
            clip_sample=True,
            variance_type="fixed_small",
            thresholding=False,
            rescale_betas_zero_snr=False,
            timestep_spacing="leading",
        ),
    ),
    "PNDMScheduler": ("dpmpp_2m", dict(set_alpha_to_one=False, timestep_spacing="leading")),
    "LMSDiscreteScheduler": ("dpmpp_2m", dict(_SIGMA_SPACINGS)),
    "EulerDiscreteScheduler": (
        "euler",
        dict(
            interpolation_type="linear",
            sigma_min=None,
            sigma_max=None,
            timestep_type="discrete",
            rescale_betas_zero_snr=False,
            final_sigmas_type="zero",
            **_SIGMA_SPACINGS,
        ),
    ),
    "EulerAncestralDiscreteScheduler": ("euler_a", dict(rescale_betas_zero_snr=False)),
    "HeunDiscreteScheduler": ("heun", dict(beta_start=0.00085, beta_end=0.012, clip_sample=False, **_SIGMA_SPACINGS)),
    "DPMSolverMultistepScheduler": (
        "dpmpp_2m",
        dict(
            algorithm_type="dpmsolver++",
            solver_type="midpoint",
            use_lu_lambdas=False,
            variance_type=None,
            euler_at_final=False,
            lambda_min_clipped=-float("inf"),
            **_MULTISTEP,
        ),
    ),
    "UniPCMultistepScheduler": (
        "unipc",
        dict(
            solver_type="bh2",
            predict_x0=True,
            disable_corrector=[],
            solver_p=None,
            **_MULTISTEP,
        ),
    ),
}
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


def translate_scheduler(cfg: dict[str, Any]) -> tuple[ScheduleConfig, str, SamplingConfig]:
    """A diffusers ``scheduler_config.json`` as (schedule, prediction type, sampling defaults and grid options).

    PNDM and LMS have no sampler here; their configs get ``dpmpp_2m``, the multistep solver closest in spirit.
    Options we cannot honour are applied as their default with one warning each, naming the option.
    """
    name = cfg.get("_class_name")
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler _class_name={name!r} is not supported; supported: {sorted(SCHEDULERS)}")
    sampler, extra = SCHEDULERS[name]
    c = {**_COMMON, **extra}
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
    if "sde" in c.get("algorithm_type", ""):
        sampler = "dpmpp_2m_sde"
    final = "sigma_min" if c.get("final_sigmas_type") == "sigma_min" or c.get("set_alpha_to_one") is False else "zero"
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
        sampler=sampler,
        steps=50,  # diffusers' StableDiffusionPipeline defaults
        guidance_scale=7.5,
        spacing=spacing,
        steps_offset=int(c["steps_offset"]),
        final=final,
        extra_point=multistep,  # used by leading and linspace grids only
        span=c["timestep_spacing"] if name in _SPACED_RANGE and spacing in ("karras", "exponential") else None,
        quantize=multistep and c["beta_schedule"] != "squaredcos_cap_v2",
    )
    return schedule, c["prediction_type"], sampling


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


# -- loading and saving --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Components:
    """What a pipeline folder holds, loaded; ``unet_weights`` is the file whose hash names the model."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: TextEncoder
    config: PipelineConfig
    unet_weights: Path | None


def resolve_model(path: str | Path) -> Path:
    """A model folder: ``"default"`` is the embedded default model (package data), anything else a path."""
    if str(path) == "default":
        if not (DEFAULT_MODEL / "pipeline.json").is_file():
            raise FileNotFoundError(
                f"the embedded default model is missing from {DEFAULT_MODEL}; reinstall unnoise, or rebuild it with "
                "`make default-model` in a source checkout"
            )
        return DEFAULT_MODEL
    return Path(path)


def load_components(path: str | Path) -> Components:
    """Load our folder (``pipeline.json``), a diffusers Stable Diffusion folder (``model_index.json``) or "default"."""
    folder = resolve_model(path)
    if (folder / "pipeline.json").is_file():
        return _load_ours(folder)
    if (folder / "model_index.json").is_file():
        return _load_diffusers(folder)
    raise FileNotFoundError(f"{folder} holds neither pipeline.json (our format) nor model_index.json (diffusers)")


def _load_ours(folder: Path) -> Components:
    config = PipelineConfig.from_dict(json.loads((folder / "pipeline.json").read_text()))
    te = config.text_encoder
    if te.kind == "minilm":
        text_encoder: TextEncoder = MiniLMEncoder.from_package(max_length=te.max_length)
    else:
        text_encoder = CLIPTextEncoder.from_folder(
            folder / "text_encoder", folder / "tokenizer", clip_skip=te.clip_skip
        )
    unet, vae = load_model(folder / "unet"), load_model(folder / "vae")
    return Components(unet, vae, text_encoder, config, folder / "unet" / "model.safetensors")


def _load_diffusers(folder: Path) -> Components:
    index = json.loads((folder / "model_index.json").read_text())
    needed = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    missing = [name for name in needed if not index.get(name) or index[name][0] is None]
    if missing:
        raise ValueError(f"{folder / 'model_index.json'}: components {missing} are missing; a Stable Diffusion folder")
    if index.get("text_encoder_2") or index["text_encoder"][1] != "CLIPTextModel":
        raise ValueError(
            f"{folder}: {index.get('_class_name')} with text encoder {index['text_encoder'][1]!r} is not supported; "
            "allowed: Stable Diffusion 1.x/2.x (one CLIPTextModel)"
        )
    scheduler_cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    schedule, prediction, sampling = translate_scheduler(scheduler_cfg)
    config = PipelineConfig(
        text_encoder=TextEncoderConfig(kind="clip"), prediction=prediction, schedule=schedule, sampling=sampling
    )
    text_encoder = CLIPTextEncoder.from_folder(folder / "text_encoder", folder / "tokenizer")
    unet, vae = load_diffusers(folder / "unet"), load_diffusers(folder / "vae")
    names = (
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.fp16.safetensors",
        "diffusion_pytorch_model.bin",
    )
    weights = next((folder / "unet" / n for n in names if (folder / "unet" / n).is_file()), None)
    return Components(unet, vae, text_encoder, config, weights)


def save_components(path: str | Path, parts: Components) -> None:
    """Write our format: ``pipeline.json``, ``unet/``, ``vae/`` and, for CLIP, ``text_encoder/`` and ``tokenizer/``."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    save_model(parts.unet, folder / "unet")
    save_model(parts.vae, folder / "vae")
    if parts.config.text_encoder.kind == "clip":
        parts.text_encoder.model.save_pretrained(folder / "text_encoder", safe_serialization=True)
        parts.text_encoder.tokenizer.save_pretrained(folder / "tokenizer")
    text = json.dumps(parts.config.to_dict(), indent=2, sort_keys=True) + "\n"
    (folder / "pipeline.json").write_text(text)
