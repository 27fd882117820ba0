"""The pipeline plane: one public generation call over batched requests, its inputs, configuration, loading,
diffusers scheduler translation and PNG parameters."""

from unnoise.pipeline.config import (
    PipelineConfig,
    SamplingConfig,
    ScheduleConfig,
    TextEncoderConfig,
    sampling_grid,
)
from unnoise.pipeline.hires import UPSCALERS, Hires
from unnoise.pipeline.inputs import ImageInput, Request, ResolvedRequest, resolve_request
from unnoise.pipeline.loading import DEFAULT_MODEL, Components, load_components, resolve_model, save_components
from unnoise.pipeline.pipeline import GenerationCancelled, KnownRegion, Pipeline, StepCallback, UNetDenoiserModel
from unnoise.pipeline.schedulers import SCHEDULERS, translate_scheduler

__all__ = [
    "DEFAULT_MODEL",
    "SCHEDULERS",
    "Components",
    "GenerationCancelled",
    "Hires",
    "ImageInput",
    "KnownRegion",
    "Pipeline",
    "PipelineConfig",
    "Request",
    "ResolvedRequest",
    "SamplingConfig",
    "ScheduleConfig",
    "StepCallback",
    "TextEncoderConfig",
    "UPSCALERS",
    "UNetDenoiserModel",
    "load_components",
    "resolve_model",
    "resolve_request",
    "sampling_grid",
    "save_components",
    "translate_scheduler",
]
