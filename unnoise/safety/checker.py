"""The safety stage that the pipeline, the CLI and the server call: one object built from one config.

Before generation ``check_prompt`` (or ``require_allowed``, which raises ``PromptBlocked``); after decoding
``finish(images)``, which runs the image filter, embeds the watermark and writes the provenance pairs, and returns
every image with its ``ImageVerdict`` in ``image.info["safety"]`` (the pipeline never hides an image); where images
leave the process, ``deliver`` applies the configured action to a flagged one (withhold, blur or flag only).
The pipeline calls ``require_allowed`` and ``finish`` in ``Pipeline.generate``; the CLI and the server call
``deliver``, and the server asks ``check_prompt`` before it queues a request (verdicts are remembered, so the
pipeline's own check of the same prompt costs nothing).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from unnoise.safety import watermark
from unnoise.safety.image_filter import (
    IMAGE_ACTIONS,
    PASSED,
    CLIPConceptFilter,
    ImageFilter,
    ImageVerdict,
    apply_action,
)
from unnoise.safety.prompt_filter import DATA, PromptFilter, Verdict
from unnoise.safety.provenance import IMAGE_FILTER, PROVENANCE_INFO, WATERMARK, image_filter_note, watermark_note
from unnoise.safety.semantic import SentenceEncoder
from unnoise.safety.watermark import DEFAULT_KEY, DEFAULT_PAYLOAD, PAYLOAD_BITS

INFO_KEY = "safety"  # image.info[INFO_KEY]: the image's ImageVerdict (absent: the image filter did not run)
ALLOWED = Verdict(True, None, 0.0, "prompt filter is off")
PROMPT_MEMORY = 256  # prompt verdicts remembered: the server checks at submit, the pipeline again when it runs


class PromptBlocked(ValueError):
    """The prompt filter refused the prompt; ``verdict`` holds the category and the reason."""

    def __init__(self, prompt: str, verdict: Verdict):
        shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
        super().__init__(f"prompt={shown!r} is refused by the safety filter, category {verdict.category}: "
                         f"{verdict.reason}")  # fmt: skip
        self.verdict = verdict


@dataclasses.dataclass(frozen=True, kw_only=True)
class SafetyConfig:
    """What the safety stage does; every part can be turned off. ``clip_model`` enables the image filter."""

    prompt_filter: bool = True
    image_filter: bool = True  # runs only with a clip_model folder
    clip_model: Path | None = None  # a saved transformers CLIPModel + CLIPProcessor
    image_action: str = "withhold"  # for a flagged image, where images leave the process: withhold, blur or flag
    watermark: bool = True
    watermark_payload: int = DEFAULT_PAYLOAD
    watermark_key: int = DEFAULT_KEY
    data: Path = DATA  # blocklist.toml, thresholds.json, semantic.safetensors, image_concepts.toml
    device: str = "cpu"  # for the CLIP model

    def __post_init__(self) -> None:
        if self.image_action not in IMAGE_ACTIONS:
            raise ValueError(
                f"image_action={self.image_action!r} is not allowed; expected one of {', '.join(IMAGE_ACTIONS)}"
            )
        if not 0 <= self.watermark_payload < 2**PAYLOAD_BITS:
            raise ValueError(f"watermark_payload={self.watermark_payload!r} is not allowed; expected 0 to 2**32 - 1")


class SafetyChecker:
    """Prompt filter, image filter and watermark as ``config`` says; see the module docstring for the calls."""

    def __init__(
        self,
        config: SafetyConfig,
        prompt_filter: PromptFilter | None = None,
        image_filter: ImageFilter | None = None,
    ):
        self.config, self.prompt_filter, self.image_filter = config, prompt_filter, image_filter
        self._verdicts: dict[str, Verdict] = {}  # the last PROMPT_MEMORY prompts' verdicts, oldest first
        self._lock = threading.Lock()  # the server's request threads and its worker share the checker

    @classmethod
    def from_config(
        cls, config: SafetyConfig | None = None, *, encoder: SentenceEncoder | None = None
    ) -> SafetyChecker:
        """Load what ``config`` turns on; pass the pipeline's MiniLM ``encoder`` to avoid loading it twice."""
        config = config or SafetyConfig()
        prompts = PromptFilter.load(config.data, encoder=encoder) if config.prompt_filter else None
        images = None
        if config.image_filter and config.clip_model is not None:
            images = CLIPConceptFilter.from_folder(
                config.clip_model, Path(config.data) / "image_concepts.toml", device=config.device
            )
        return cls(config, prompts, images)

    def check_prompt(self, prompt: str) -> Verdict:
        """The prompt filter's verdict (always allowed when the filter is off)."""
        if self.prompt_filter is None:
            return ALLOWED
        with self._lock:
            verdict = self._verdicts.pop(prompt, None)
        if verdict is None:
            verdict = self.prompt_filter.check(prompt)
        with self._lock:
            self._verdicts[prompt] = verdict  # most recent last
            if len(self._verdicts) > PROMPT_MEMORY:
                del self._verdicts[next(iter(self._verdicts))]
        return verdict

    def require_allowed(self, prompt: str) -> Verdict:
        """``check_prompt``, raising ``PromptBlocked`` for a refused prompt."""
        verdict = self.check_prompt(prompt)
        if not verdict.allowed:
            raise PromptBlocked(prompt, verdict)
        return verdict

    def check_image(self, image: Image.Image) -> ImageVerdict:
        """The image filter's verdict (never flagged when no image filter runs)."""
        return self._check_images([image])[0] or PASSED

    def finish(self, images: Sequence[Image.Image]) -> list[Image.Image]:
        """Filter, watermark and record provenance; every image is returned, with ``info["safety"]`` when checked."""
        out = []
        for image, verdict in zip(images, self._check_images(images), strict=True):
            marked, note = self._watermark(image)
            if verdict is not None:
                marked.info[INFO_KEY] = verdict
            marked.info[PROVENANCE_INFO] = {WATERMARK: note, IMAGE_FILTER: image_filter_note(verdict)}
            out.append(marked)
        return out

    def deliver(self, image: Image.Image) -> Image.Image | None:
        """The image as a client may receive it: withheld (None), blurred or as is, per ``config.image_action``."""
        verdict = image.info.get(INFO_KEY)
        if not isinstance(verdict, ImageVerdict):
            return image
        return apply_action(image, verdict, self.config.image_action)

    def _check_images(self, images: Sequence[Image.Image]) -> list[ImageVerdict | None]:
        if self.image_filter is None:
            return [None] * len(images)
        return list(self.image_filter.check(images))

    def _watermark(self, image: Image.Image) -> tuple[Image.Image, str]:
        if not self.config.watermark:
            return image.copy(), watermark_note(None, "watermarking is off")
        try:
            marked = watermark.embed(image, self.config.watermark_payload, key=self.config.watermark_key)
        except watermark.WatermarkTooSmall:
            w, h = image.size
            return image.copy(), watermark_note(None, f"{w}x{h} is below the {watermark.MIN_SIDE} px minimum side")
        return marked, watermark_note(self.config.watermark_payload)


def image_verdict(image: Image.Image) -> ImageVerdict | None:
    """The ``ImageVerdict`` that ``SafetyChecker.finish`` attached to ``image``, if any."""
    verdict = image.info.get(INFO_KEY)
    return verdict if isinstance(verdict, ImageVerdict) else None
