"""Safety: prompt filter, image filter, invisible watermark, provenance and the red-team suite (docs/safety.md).

The pipeline, the CLI and the server use ``SafetyChecker`` (built from a ``SafetyConfig``); the parts are usable
alone. Nothing here imports ``transformers`` or loads a model until a filter is loaded.
"""

from unnoise.safety.checker import (
    INFO_KEY,
    PromptBlocked,
    SafetyChecker,
    SafetyConfig,
    image_verdict,
)
from unnoise.safety.image_filter import (
    IMAGE_ACTIONS,
    CLIPConceptFilter,
    Concept,
    ImageFilter,
    ImageVerdict,
    apply_action,
    load_concepts,
)
from unnoise.safety.normalize import normalize
from unnoise.safety.prompt_filter import CATEGORIES, PromptFilter, StaleCalibrationWarning, Verdict
from unnoise.safety.provenance import PROVENANCE_INFO, PROVENANCE_KEYS
from unnoise.safety.watermark import Detection, WatermarkTooSmall, detect, embed

__all__ = [
    "CATEGORIES",
    "IMAGE_ACTIONS",
    "INFO_KEY",
    "PROVENANCE_INFO",
    "PROVENANCE_KEYS",
    "CLIPConceptFilter",
    "Concept",
    "Detection",
    "ImageFilter",
    "ImageVerdict",
    "PromptBlocked",
    "PromptFilter",
    "SafetyChecker",
    "SafetyConfig",
    "StaleCalibrationWarning",
    "Verdict",
    "WatermarkTooSmall",
    "apply_action",
    "detect",
    "embed",
    "image_verdict",
    "load_concepts",
    "normalize",
]
