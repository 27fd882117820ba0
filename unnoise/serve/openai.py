"""OpenAI Images API: generations (JSON), edits and variations (multipart/form-data, as OpenAI's), the model list.

Edits and variations are the pipeline's img2img and inpainting, through ``build_spec`` as every request: the image is
resized to ``size`` (absent or ``auto``: the image's own size, as the pipeline's img2img), and ``n``, ``size``,
``response_format``, the extensions and their errors are the generations' own. What OpenAI's contract adds is checked
here, with 400 naming the field: one PNG ``image`` (gpt-image's several reference images have no meaning for an
img2img model), a PNG ``mask`` of the image's size whose fully transparent pixels (alpha 0) are repainted, as OpenAI
documents it (the pipeline's mask is white where it repaints). OpenAI has no strength: the extension field
``strength`` sets it; by default a masked edit repaints the masked pixels from pure noise (1.0, as diffusers'
inpainting pipeline), a whole-image edit keeps the composition (0.8, diffusers' and our img2img default), and a
variation stays closer still (``VARIATION_STRENGTH``). A variation has no prompt (our models are text-conditioned:
it runs unconditionally, which guidance leaves unchanged); the extension ``prompt`` may give one.
"""

from __future__ import annotations

import base64
import io
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import JSONResponse
from PIL import Image
from starlette.datastructures import UploadFile  # what the form holds (FastAPI's UploadFile subclasses it)

from unnoise.pipeline.images import has_alpha
from unnoise.serve.engine import Engine
from unnoise.serve.routes import job_headers, raise_failed, request_spec, wait_for_jobs
from unnoise.serve.schemas import (
    OPENAI_FIELDS,
    OpenAIEditForm,
    OpenAIImageRequest,
    OpenAIVariationForm,
    form_loras,
    openai_values,
)
from unnoise.serve.validation import MAX_INPUT_PIXELS, ApiError, GenerationSpec

router = APIRouter()

EDIT_STRENGTH = 0.8  # a whole-image edit: diffusers' img2img default (and Request's)
MASKED_EDIT_STRENGTH = 1.0  # the masked pixels start from pure noise, as diffusers' inpainting pipeline by default
VARIATION_STRENGTH = 0.6  # the embedded model keeps the input's digit in 93% of variations (docs/serving.md)
MAX_UPLOAD_BYTES = 50 * 2**20  # OpenAI's limit for GPT Image inputs (DALL-E 2 took 4 MB)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MULTIPART = "multipart/form-data"


@router.post("/v1/images/generations")
async def images_generations(body: OpenAIImageRequest, request: Request) -> JSONResponse:
    """OpenAI Images API: ``{created, data: [{b64_json | url, revised_prompt}]}``."""
    spec = request_spec(request, openai_values(body, body.prompt, body.loras), OPENAI_FIELDS)
    return await _images(request, spec, body.response_format)


def _form_body(request: Request) -> None:
    """415 for a body that is not a form, rather than "prompt is required" for a JSON one (run before the form is
    validated)."""
    kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if kind not in (MULTIPART, "application/x-www-form-urlencoded"):
        raise ApiError(415, f"Content-Type {kind or None!r} is not allowed; send {MULTIPART} (the image and mask as "
                       "files, the other fields as form fields)", code="unsupported_media_type")  # fmt: skip


@router.post("/v1/images/edits", dependencies=[Depends(_form_body)])
async def images_edits(form: Annotated[OpenAIEditForm, Form(media_type=MULTIPART)], request: Request) -> JSONResponse:
    """OpenAI image edit: ``prompt``, one PNG ``image``, an optional PNG ``mask`` (alpha 0: repaint); the
    generations' fields and extensions, and ``strength``."""
    image = await _one_image(form)
    mask = None
    if form.mask is not None:
        mask = _repaint_mask(form.mask, await _png("mask", form.mask), image)
    strength = form.strength
    if strength is None:
        strength = MASKED_EDIT_STRENGTH if mask is not None else EDIT_STRENGTH
    values = await _form_values(request, form, image, mask, strength)
    return await _images(request, request_spec(request, values, OPENAI_FIELDS), form.response_format)


@router.post("/v1/images/variations", dependencies=[Depends(_form_body)])
async def images_variations(form: Annotated[OpenAIVariationForm, Form(media_type=MULTIPART)],
                            request: Request) -> JSONResponse:  # fmt: skip
    """OpenAI image variation: images close to one PNG ``image``; extensions as edits, ``prompt`` included."""
    image = await _one_image(form)
    strength = VARIATION_STRENGTH if form.strength is None else form.strength
    values = await _form_values(request, form, image, None, strength)
    return await _images(request, request_spec(request, values, OPENAI_FIELDS), form.response_format)


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    """OpenAI model list: the one model served."""
    engine: Engine = request.app.state.engine
    engine.require_ready()
    entry = {"id": engine.pipe.name, "object": "model", "created": 0, "owned_by": "unnoise"}
    return {"object": "list", "data": [entry]}


async def _images(request: Request, spec: GenerationSpec, response_format: str | None) -> JSONResponse:
    """Run ``spec`` and answer as OpenAI: ``{created, data: [{b64_json | url, revised_prompt}]}``."""
    jobs = request.app.state.engine.submit([spec], "openai")
    await wait_for_jobs(request, jobs)
    raise_failed(jobs)
    job, base = jobs[0], str(request.base_url).rstrip("/")
    if response_format == "b64_json":
        data = [{"b64_json": base64.b64encode(png).decode(), "revised_prompt": None} for _, _, png in job.images]
    else:
        data = [{"url": f"{base}/v1/images/{job.id}/{i}.png", "revised_prompt": None} for i in range(spec.n)]
    return JSONResponse({"created": int(job.created), "data": data}, headers=job_headers(jobs))


async def _form_values(request: Request, form: OpenAIVariationForm, image: Image.Image, mask: Image.Image | None,
                       strength: float) -> dict[str, Any]:  # fmt: skip
    """``build_spec`` keywords of an edit or variation form (its ``loras[NAME]`` fields read from the raw form)."""
    values = openai_values(form, form.prompt, form_loras(await request.form()))
    return {**values, "image": image, "mask": mask, "strength": strength}


def _bad_image(param: str, rest: str) -> ApiError:
    return ApiError(400, f"{param}{rest}", param=param, code="invalid_image")


async def _one_image(form: OpenAIVariationForm) -> Image.Image:
    """The form's one image, sent as ``image`` or ``image[]``."""
    files = [*(form.image or []), *(form.image_list or [])]
    if not files:
        raise _bad_image("image", " is required: one PNG file, sent as multipart/form-data")
    if len(files) > 1:
        raise _bad_image("image", f" has {len(files)} files; this server edits one image (a PNG) per request")
    return await _png("image", files[0])


async def _png(param: str, upload: UploadFile | str) -> Image.Image:
    """The decoded PNG of an upload; 400 naming ``param`` for anything else."""
    if not isinstance(upload, UploadFile):
        raise _bad_image(param, f"={upload[:40]!r} is not allowed; expected a PNG file, sent as a multipart file")
    data = await upload.read(MAX_UPLOAD_BYTES + 1)
    shown = f"={upload.filename!r} is not allowed"
    if len(data) > MAX_UPLOAD_BYTES:
        raise _bad_image(param, f"{shown}; expected a PNG file of at most {MAX_UPLOAD_BYTES} bytes")
    if not data.startswith(PNG_SIGNATURE):
        raise _bad_image(param, f"{shown}; expected a PNG file (its bytes do not start with PNG's signature)")
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > MAX_INPUT_PIXELS:
            size = f"{image.width}x{image.height}"
            raise _bad_image(param, f"{shown}; it is {size}, more than {MAX_INPUT_PIXELS} pixels")
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise _bad_image(param, f"{shown}; it is not a readable PNG ({type(error).__name__}: {error})") from None
    return image


def _repaint_mask(upload: UploadFile, mask: Image.Image, image: Image.Image) -> Image.Image:
    """OpenAI's mask (fully transparent pixels: repaint) as the pipeline's (white: repaint)."""
    shown = f"={upload.filename!r} is not allowed"
    if mask.size != image.size:
        sizes = f"{mask.width}x{mask.height}, the image's {image.width}x{image.height}"
        raise _bad_image("mask", f"{shown}; it must have the image's size: its size is {sizes}")
    if not has_alpha(mask):
        raise _bad_image("mask", f"{shown}; it has no alpha channel, whose fully transparent pixels (alpha 0) mark "
                         "where to repaint")  # fmt: skip
    repaint = mask.convert("RGBA").getchannel("A").point(lambda alpha: 255 if alpha == 0 else 0)
    if repaint.getextrema()[1] == 0:
        raise _bad_image("mask", f"{shown}; it has no fully transparent pixel (alpha 0): nothing to repaint")
    return repaint
