"""Request bodies of the three APIs and their translation into ``build_spec`` keywords and field names.

Bodies check JSON types and the bounds that hold on every server (pydantic, so that /openapi.json states them and
no integer goes on unbounded); the limits of this server and model (--max-batch, --max-steps, pixels, latent factor,
names) are checked by ``validation.build_spec``. The OpenAI and AUTOMATIC1111 bodies ignore fields they do not know,
as their clients send many (``model``, ``quality``, ``restore_faces`` ...); the jobs API, ours, refuses unknown
fields so that a typo is an error rather than a default.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from unnoise.core.samplers import SAMPLERS
from unnoise.pipeline.inputs import SEED_LIMIT
from unnoise.pipeline.png import A1111_SAMPLERS, A1111_SCHEDULES, lora_prompt_tags
from unnoise.serve.validation import FIELDS_NATIVE, invalid

# A job list's offset and an image's index: far past any count of jobs or images, under SQLite's 2**63 - 1, and the
# largest integer that every JSON client reads exactly (RFC 7493), so that /openapi.json (floats) states it exactly.
ROW_LIMIT = 2**53 - 1
Images = Annotated[int, Field(ge=1, description="images in one batch, at most the server's --max-batch")]
Steps = Annotated[int, Field(ge=1, description="sampler steps, at most the server's --max-steps")]
Side = Annotated[int, Field(ge=1, description="pixels, a multiple of the model's latent factor")]
Seed = Annotated[int, Field(ge=0, le=SEED_LIMIT - 1, description="the first image's seed; none: a random one")]
# LoRA scales a request may ask for: AUTOMATIC1111 users go past 1 (and below 0, to subtract a concept), but a few
# times over the update swamps the base weights and the image is noise.
LORA_SCALE_LIMIT = 4.0
LoRAScale = Annotated[float, Field(ge=-LORA_SCALE_LIMIT, le=LORA_SCALE_LIMIT, allow_inf_nan=False)]
LoRAs = Annotated[
    dict[str, LoRAScale],
    Field(description="LoRA adapters by name (GET /v1/loras lists them: the files of the server's --lora-dir) and "
          "their scales; exactly these run, others are off; absent: the served pipeline's own (none on "
          "`unnoise serve`)"),
]  # fmt: skip
_LORAS = TypeAdapter(LoRAs)


class OpenAIImageRequest(BaseModel):
    """``POST /v1/images/generations`` (OpenAI Images API) with the extensions negative_prompt ... seed, loras."""

    model_config = ConfigDict(extra="ignore")
    prompt: str
    n: Images | None = 1
    size: str | None = None  # "WIDTHxHEIGHT"; None or "auto": the model's size
    response_format: Literal["url", "b64_json"] | None = "url"
    output_format: Literal["png"] | None = None
    model: str | None = None  # one model is served; any name is accepted
    negative_prompt: str | None = None
    steps: Steps | None = None
    sampler: str | None = None
    guidance_scale: float | None = None
    seed: Seed | None = None
    loras: LoRAs | None = None


OPENAI_FIELDS = {**FIELDS_NATIVE, "width": "size", "height": "size"}


def openai_values(body: OpenAIImageRequest) -> dict[str, Any]:
    width = height = None
    if body.size is not None and body.size != "auto":
        match = re.fullmatch(r"(\d+)x(\d+)", body.size)
        if match is None:
            raise invalid("size", body.size, "expected WIDTHxHEIGHT, e.g. 512x512, or auto")
        width, height = int(match[1]), int(match[2])
    return dict(
        prompt=body.prompt, negative_prompt=body.negative_prompt, n=1 if body.n is None else body.n, width=width,
        height=height, steps=body.steps, sampler=body.sampler, guidance_scale=body.guidance_scale, seed=body.seed,
        loras=body.loras,
    )  # fmt: skip


class A1111Txt2ImgRequest(BaseModel):
    """``POST /sdapi/v1/txt2img`` (AUTOMATIC1111's API): the fields below; None means the model's default. LoRAs
    are named as AUTOMATIC1111 clients name them, by ``<lora:name:scale>`` tags in the prompt."""

    model_config = ConfigDict(extra="ignore")
    prompt: str = Field("", description="<lora:name:scale> tags in it select LoRA adapters (GET /v1/loras)")
    negative_prompt: str | None = ""
    steps: Steps | None = None
    cfg_scale: float | None = None
    sampler_name: str | None = None
    sampler_index: str | None = None  # older clients' name for sampler_name
    scheduler: str | None = None  # "Automatic", "Karras", "Exponential"
    seed: Annotated[int, Field(ge=-1, le=SEED_LIMIT - 1, description="-1: a random one")] | None = -1
    width: Side | None = None
    height: Side | None = None
    batch_size: Images = 1
    n_iter: Annotated[int, Field(ge=1, description="batches, at most the server's --max-queue")] = 1
    send_images: bool = True


A1111_FIELDS = {**FIELDS_NATIVE, "n": "batch_size", "guidance_scale": "cfg_scale", "sampler": "sampler_name",
                "spacing": "scheduler", "loras": "prompt"}  # fmt: skip
_A1111_BACK = {v.lower(): k for k, v in A1111_SAMPLERS.items()} | {k: k for k in SAMPLERS}
_SCHEDULES_BACK = {v.lower(): k for k, v in A1111_SCHEDULES.items()}


def a1111_values(body: A1111Txt2ImgRequest) -> dict[str, Any]:
    sampler, spacing = _a1111_sampler(body.sampler_name or body.sampler_index)
    if body.scheduler is not None and body.scheduler.lower() != "automatic":
        if body.scheduler.lower() not in _SCHEDULES_BACK:
            allowed = ", ".join(["Automatic", *A1111_SCHEDULES.values()])
            raise invalid("scheduler", body.scheduler, f"allowed: {allowed}")
        spacing = _SCHEDULES_BACK[body.scheduler.lower()]
    prompt, loras = _a1111_loras(body.prompt)
    return dict(
        prompt=prompt, negative_prompt=body.negative_prompt or None, n=body.batch_size, width=body.width,
        height=body.height, steps=body.steps, sampler=sampler, spacing=spacing, guidance_scale=body.cfg_scale,
        seed=None if body.seed in (None, -1) else body.seed, loras=loras,
    )  # fmt: skip


def _a1111_loras(prompt: str) -> tuple[str, dict[str, float] | None]:
    """The prompt without its ``<lora:name:scale>`` tags and the tags' adapters (None without tags), as
    AUTOMATIC1111 reads them, within the bounds of the other APIs' ``loras`` field."""
    try:
        text, loras = lora_prompt_tags(prompt)
    except ValueError as error:
        raise invalid("prompt", prompt[:200], str(error)) from None
    try:
        _LORAS.validate_python(loras)
    except ValidationError as error:
        first = error.errors()[0]
        raise invalid("prompt", f"<lora:{first['loc'][0]}:{first['input']}>", first["msg"]) from None
    return text, loras or None


def _a1111_sampler(name: str | None) -> tuple[str | None, str | None]:
    """(our sampler, spacing or None) from an AUTOMATIC1111 name, old style ("DPM++ 2M Karras") included."""
    if name is None:
        return None, None
    text = name.strip().lower()
    for label, spacing in _SCHEDULES_BACK.items():
        if text.endswith(" " + label) and text[: -len(label) - 1] in _A1111_BACK:
            return _A1111_BACK[text[: -len(label) - 1]], spacing
    if text in _A1111_BACK:
        return _A1111_BACK[text], None
    allowed = ", ".join([*A1111_SAMPLERS.values(), *(s for s in SAMPLERS if s not in A1111_SAMPLERS)])
    raise invalid("sampler_name", name, f"allowed: {allowed} (optionally followed by Karras or Exponential)")


class JobRequest(BaseModel):
    """``POST /v1/jobs``: our names; unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")
    prompt: str
    negative_prompt: str | None = None
    n: Images = 1
    width: Side | None = None
    height: Side | None = None
    steps: Steps | None = None
    sampler: str | None = None
    guidance_scale: float | None = None
    seed: Seed | None = None
    loras: LoRAs | None = None


def job_values(body: JobRequest) -> dict[str, Any]:
    return body.model_dump()
