"""Request bodies of the OpenAI and jobs APIs (AUTOMATIC1111's: ``a1111``) and their translation into
``build_spec`` keywords and field names.

Bodies check JSON types and the bounds that hold on every server (pydantic, so that /openapi.json states them and
no integer goes on unbounded); the limits of this server and model (--max-batch, --max-steps, pixels, latent factor,
names) are checked by ``validation.build_spec``. The OpenAI and AUTOMATIC1111 bodies ignore fields they do not know,
as their clients send many (``model``, ``quality``, ``restore_faces`` ...); the jobs API, ours, refuses unknown
fields so that a typo is an error rather than a default.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from fastapi import UploadFile
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, WithJsonSchema
from starlette.datastructures import FormData

from unnoise.pipeline.images import INPAINTING_FILLS, RESIZE_MODES
from unnoise.pipeline.inputs import SEED_LIMIT
from unnoise.serve.validation import FIELDS_NATIVE, decode_image, invalid

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
LORAS_ADAPTER = TypeAdapter(LoRAs)


# Feature caching (``Request.cache_interval``): a full U-Net call every N calls, the outer level only between them.
CacheInterval = Annotated[int, Field(ge=1, le=1000, description="feature caching: a full U-Net call every N calls "
                                     "(the outermost level only between them); 1: none")]  # fmt: skip


class OpenAIImageFields(BaseModel):
    """The fields that OpenAI's generations, edits and variations share, with our extensions negative_prompt ...
    seed; None means the model's default."""

    model_config = ConfigDict(extra="ignore")
    n: Images | None = 1
    size: str | None = None  # "WIDTHxHEIGHT"; None or "auto": the model's size
    response_format: Literal["url", "b64_json"] | None = "url"
    output_format: Literal["png"] | None = None
    model: str | None = None  # one model is served; any name is accepted
    user: str | None = None  # OpenAI's end-user id for abuse monitoring: accepted, not used
    stream: bool | None = None  # streamed partial images are not served: true is refused
    negative_prompt: str | None = None
    steps: Steps | None = None
    sampler: str | None = None
    guidance_scale: float | None = None
    seed: Seed | None = None
    cache_interval: CacheInterval | None = None


class OpenAIImageRequest(OpenAIImageFields):
    """``POST /v1/images/generations`` (OpenAI Images API), JSON, with the extensions of ``OpenAIImageFields`` and
    loras."""

    prompt: str
    loras: LoRAs | None = None


# A file of a multipart form. A text value where a file belongs passes here and is refused by the route with the 400
# that every unusable image gets; /openapi.json states the file.
Upload = Annotated[UploadFile | str, WithJsonSchema({"type": "string", "contentMediaType": "application/octet-stream"})]
Strength = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False, description="the part of the sampler's steps "
                                  "that runs from the noised input: 1 repaints it all")]  # fmt: skip


class OpenAIVariationForm(OpenAIImageFields):
    """``POST /v1/images/variations`` (multipart/form-data): one PNG ``image``, sent as ``image`` or, as the openai
    client sends a list, ``image[]``; LoRAs as form fields ``loras[NAME]=SCALE``; extensions ``prompt`` (default
    empty: our models are text-conditioned, a variation is unconditional) and ``strength``."""

    image: list[Upload] | None = Field(None, description="one PNG file (required)")
    image_list: list[Upload] | None = Field(None, alias="image[]", description="the openai client's name for a "
                                            "list of images: one PNG file")  # fmt: skip
    prompt: str = ""
    strength: Strength | None = None


class OpenAIEditForm(OpenAIVariationForm):
    """``POST /v1/images/edits`` (multipart/form-data): ``prompt``, one PNG ``image`` and an optional PNG ``mask`` of
    its size whose fully transparent pixels (alpha 0) are repainted; without a mask the whole image is edited."""

    prompt: str
    mask: Upload | None = Field(None, description="a PNG of the image's size with an alpha channel")


OPENAI_FIELDS = {**FIELDS_NATIVE, "width": "size", "height": "size"}


def openai_values(body: OpenAIImageFields, prompt: str, loras: dict[str, float] | None) -> dict[str, Any]:
    if body.stream:
        raise invalid("stream", body.stream, "this server answers with the finished images only (false)")
    width = height = None
    if body.size is not None and body.size != "auto":
        match = re.fullmatch(r"(\d+)x(\d+)", body.size)
        if match is None:
            raise invalid("size", body.size, "expected WIDTHxHEIGHT, e.g. 512x512, or auto")
        width, height = int(match[1]), int(match[2])
    return dict(
        prompt=prompt, negative_prompt=body.negative_prompt, n=1 if body.n is None else body.n, width=width,
        height=height, steps=body.steps, sampler=body.sampler, guidance_scale=body.guidance_scale, seed=body.seed,
        loras=loras, cache_interval=body.cache_interval,
    )  # fmt: skip


def form_loras(form: FormData) -> dict[str, float] | None:
    """The ``loras[NAME]=SCALE`` fields of a multipart form (as the openai client sends ``extra_body={"loras":
    {...}}``), within the bounds of the JSON bodies' ``loras``; None without them."""
    if "loras" in form:
        raise invalid("loras", form["loras"], "send each adapter as a form field loras[NAME]=SCALE")
    loras: dict[str, Any] = {}
    for key, value in form.multi_items():
        match = re.fullmatch(r"loras\[(.+)\]", key)
        if match is not None:
            loras[match[1]] = value
    try:
        return LORAS_ADAPTER.validate_python(loras) or None
    except ValidationError as error:
        first = error.errors()[0]
        name = first["loc"][0]
        raise invalid(f"loras.{name}", loras[name], first["msg"]) from None


Base64Image = Annotated[str, Field(description="base64 of an image file (PNG, JPEG, WebP ...); a data: URL "
                                    "(data:image/png;base64,...) is accepted as it is")]  # fmt: skip


class JobRequest(BaseModel):
    """``POST /v1/jobs``: our names (the library's ``Request`` fields); unknown fields are refused. ``image`` makes it
    img2img, ``mask`` too inpainting (docs/img2img.md); None: the pipeline's default."""

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
    image: Base64Image | None = None
    mask: Base64Image | None = Field(None, description="base64 image of the image's size, white where it is "
                                     "repainted (a data: URL accepted)")  # fmt: skip
    strength: Strength | None = None
    resize_mode: str | None = Field(None, description=f"one of {', '.join(RESIZE_MODES)}")
    mask_blur: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    mask_invert: bool | None = None
    inpainting_fill: str | None = Field(None, description=f"one of {', '.join(INPAINTING_FILLS)}")
    inpaint_full_res: bool | None = None
    inpaint_full_res_padding: Annotated[int, Field(ge=0, le=2**15)] | None = None
    paste_back: bool | None = None
    cache_interval: CacheInterval | None = None


def job_values(body: JobRequest) -> dict[str, Any]:
    """``build_spec`` keywords: the body's fields, its images decoded (422 naming the field if one is not)."""
    values = body.model_dump()
    for key in ("image", "mask"):
        if values[key] is not None:
            values[key] = decode_image(key, values[key])
    return values
