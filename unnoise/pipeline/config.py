"""A pipeline's configuration, ``pipeline.json``: its text encoder, training noise schedule and sampling defaults."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from unnoise.checks import is_int
from unnoise.core.denoisers import PREDICTIONS
from unnoise.core.samplers import SAMPLERS
from unnoise.core.schedules import BETA_KINDS, FINALS, INTERPOLATIONS, SPACINGS, VPSchedule, check_choice, check_steps
from unnoise.models.config import ModelConfig

TEXT_ENCODERS = ("minilm", "clip", "sdxl")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TextEncoderConfig(ModelConfig):
    """Which text encoder: the bundled MiniLM, CLIP from the folder's ``text_encoder/`` and ``tokenizer/``, or
    SDXL's two towers (also ``text_encoder_2/`` and ``tokenizer_2/``)."""

    kind: str = "minilm"
    max_length: int = 77  # MiniLM only: tokens per prompt (CLIP uses its tokenizer's model_max_length)
    clip_skip: int = 0  # CLIP only: hidden state this many layers before the last
    # SDXL: without a negative prompt the unconditional embeddings are zeros, not the empty prompt's (diffusers'
    # ``force_zeros_for_empty_prompt``, true for SDXL base)
    force_zeros_for_empty_prompt: bool = False

    def __post_init__(self) -> None:
        check_choice("text_encoder.kind", self.kind, TEXT_ENCODERS)
        if not isinstance(self.force_zeros_for_empty_prompt, bool):
            raise ValueError(
                f"text_encoder.force_zeros_for_empty_prompt={self.force_zeros_for_empty_prompt!r} is not allowed; "
                "allowed: true or false"
            )


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
    # (width, height) pairs the model was trained for, the first its default; None: any multiple of the latent
    # factor. The server refuses other sizes unless started with --any-size; the library and the CLI allow them.
    sizes: tuple[tuple[int, int], ...] | None = None

    def __post_init__(self) -> None:
        check_choice("prediction", self.prediction, PREDICTIONS)
        if self.sizes is not None:
            pairs = [tuple(pair) for pair in self.sizes] if isinstance(self.sizes, list | tuple) else None
            if not pairs or any(len(p) != 2 or not all(is_int(v) and v > 0 for v in p) for p in pairs):
                raise ValueError(
                    f"sizes={self.sizes!r} is not allowed; expected a non-empty list of [width, height] pairs of "
                    "positive integers, or null for any size"
                )
            object.__setattr__(self, "sizes", tuple(pairs))

    def to_dict(self) -> dict[str, Any]:
        parts = {name: getattr(self, name).to_dict() for name in ("text_encoder", "schedule", "sampling")}
        sizes = [list(pair) for pair in self.sizes] if self.sizes is not None else None
        return {"_type": "text_to_image", "prediction": self.prediction, "sizes": sizes, **parts}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PipelineConfig:
        data = dict(data)
        if data.pop("_type", "text_to_image") != "text_to_image":
            raise ValueError("pipeline.json: _type must be 'text_to_image'")
        parts = {"text_encoder": TextEncoderConfig, "schedule": ScheduleConfig, "sampling": SamplingConfig}
        unknown = sorted(set(data) - set(parts) - {"prediction", "sizes"})
        if unknown:
            allowed = sorted([*parts, "prediction", "sizes"])
            raise ValueError(f"pipeline.json: unknown keys {unknown}; allowed: {allowed}")
        kwargs: dict[str, Any] = {name: part.from_dict(data[name]) for name, part in parts.items() if name in data}
        return cls(prediction=data.get("prediction", "epsilon"), sizes=data.get("sizes"), **kwargs)


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
