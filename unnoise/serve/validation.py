"""A request's settings, checked against the server's limits, then by the pipeline: ``GenerationSpec`` or an
``ApiError``.

Every API (OpenAI, AUTOMATIC1111, jobs) turns its body into the same keyword arguments and calls ``build_spec``
with the names its clients know (``n`` / ``batch_size``, ``guidance_scale`` / ``cfg_scale``), so a bad value gets
a 422 that names the field as the client sent it. The server checks only its own limits (prompt length, batch,
steps, pixels, guidance range), then runs the pipeline's ``resolve_request`` once (the engine later hands the
resolved request to ``Pipeline.generate``), then the model's declared sizes (400) and the VRAM budget (413). A LoRA
name that the pipeline does not know (``Pipeline.available_loras``: loaded, or a file of ``lora_dir``) is a 400.
img2img, inpainting and the hires fix are the keywords of ``EDIT_KEYS`` (the ``Request`` fields of the same names),
checked by the pipeline; the server adds its pixel limit on an input image's size and on the hires fix's upscaled
size, which is also the size the VRAM budget is checked at.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import io
from typing import Any

from PIL import Image, UnidentifiedImageError

from unnoise.checks import is_int, is_number
from unnoise.pipeline import Request, ResolvedRequest, resolve_request
from unnoise.serve.config import ServeConfig
from unnoise.serve.vram import GIB, VramPlanner


class ApiError(Exception):
    """An HTTP error with an OpenAI-style body ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(self.status)
        if kind is None:
            kind = "invalid_request_error" if self.status < 500 else "server_error"
        error = {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        return {"error": error, "detail": self.message}


def invalid(param: str, value: Any, allowed: str) -> ApiError:
    """422 naming the field as the client spelled it, in the pipeline's ``name=value is not allowed; ...`` form."""
    return ApiError(422, f"{param}={value!r} is not allowed; {allowed}", param=param, code="invalid_value")


MAX_INPUT_PIXELS = 4096 * 4096  # an input image or mask, checked before decoding: a small PNG may claim a huge canvas


def decode_image(field: str, text: str) -> Image.Image:
    """A base64 image (a ``data:image/...;base64,`` prefix allowed), read; 422 naming ``field`` if it is not one."""
    if text.startswith(("http://", "https://")):
        raise invalid(field, text[:80], "this server does not fetch URLs; send the image base64-encoded")
    data = text.split(",", 1)[1] if text.startswith("data:") and "," in text else text
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(field, f"{text[:40]}...", "it is not valid base64") from None
    try:
        image = Image.open(io.BytesIO(raw))
        if image.width * image.height > MAX_INPUT_PIXELS:
            raise invalid(field, f"{image.width}x{image.height} image", f"at most {MAX_INPUT_PIXELS} pixels")
        image.load()
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError) as error:
        raise invalid(field, f"{text[:40]}...", f"it is not a readable image ({type(error).__name__})") from None
    return image


@dataclasses.dataclass(frozen=True)
class GenerationSpec:
    """One request's validated settings, as stored: ``n`` images with seeds ``seed .. seed + n - 1``.

    ``resolved`` is the pipeline's resolved request that the engine generates (not stored; None when read back).
    """

    prompt: str
    negative_prompt: str | None
    n: int
    width: int
    height: int
    steps: int
    sampler: str
    spacing: str
    guidance_scale: float
    seed: int
    loras: dict[str, float] = dataclasses.field(default_factory=dict)  # the adapters that run, by name (none at 0)
    # img2img, inpainting and the hires fix, as given (None: not asked for; ``EDIT_KEYS``). An input image is kept as
    # the sha256 of its pixels (``image_digest``), never the pixels: the worker runs the resolved request, which the
    # engine stores beside the spec (``NewJob.inputs``), so the spec only has to say which image a job was given.
    image: str | None = None
    mask: str | None = None
    strength: float | None = None
    resize_mode: str | None = None
    mask_blur: float | None = None
    mask_invert: bool | None = None
    inpainting_fill: str | None = None
    inpaint_full_res: bool | None = None
    inpaint_full_res_padding: int | None = None
    paste_back: bool | None = None
    hires: dict[str, Any] | None = None  # the fields of ``unnoise.pipeline.hires.Hires``
    cache_interval: int | None = None  # feature caching (``Request.cache_interval``), as given
    resolved: ResolvedRequest | None = dataclasses.field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, req: ResolvedRequest) -> GenerationSpec:
        return cls(req.prompt, req.negative_prompt, req.num_images, req.width, req.height, req.steps, req.sampler,
                   req.spacing, req.guidance_scale, req.seed, dict(req.loras), resolved=req)  # fmt: skip

    @property
    def peak_size(self) -> tuple[int, int]:
        """(width, height) of the largest pass: the hires fix's upscaled size, else the request's."""
        if self.resolved is not None and self.resolved.hires is not None:
            return self.resolved.hires.upscale_to
        return self.width, self.height

    @property
    def batch_key(self) -> tuple[Any, ...]:
        """Requests with equal keys share one sampler pass (the pipeline's rule)."""
        if self.resolved is None:
            raise ValueError("a GenerationSpec read back from the store has no resolved request to batch")
        return self.resolved.batch_key

    def reseeded(self, seed: int) -> GenerationSpec:
        """The same request with its first seed moved to ``seed`` (range-checked by the caller)."""
        resolved = dataclasses.replace(self.resolved, seed=seed) if self.resolved is not None else None
        return dataclasses.replace(self, seed=seed, resolved=resolved)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "resolved"}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationSpec:
        return cls(**data)


# Our keyword -> the field name in each API (for messages); absent: the API has no such field.
FIELDS_NATIVE = {k: k for k in ("prompt", "negative_prompt", "n", "width", "height", "steps", "sampler",
                                "guidance_scale", "seed", "spacing", "loras")}  # fmt: skip
# img2img, inpainting and hires keywords of ``build_spec``, passed to ``Request`` as given (None: the pipeline's
# default): ``image`` and ``mask`` are PIL images (each API decodes its own encoding), ``hires`` a ``Hires``.
EDIT_KEYS = ("image", "mask", "strength", "resize_mode", "mask_blur", "mask_invert", "inpainting_fill",
             "inpaint_full_res", "inpaint_full_res_padding", "paste_back", "hires")  # fmt: skip
# Other ``Request`` fields passed as given and stored in the spec: feature caching.
PASSED_KEYS = (*EDIT_KEYS, "cache_interval")


def image_digest(image: Any) -> str:
    """``sha256:HEX`` of a PIL image's mode, size and pixels: how a spec records an input image."""
    digest = hashlib.sha256(f"{image.mode} {image.width}x{image.height}\n".encode())
    digest.update(image.tobytes())
    return f"sha256:{digest.hexdigest()}"


def _stored_edits(edits: dict[str, Any]) -> dict[str, Any]:
    """The ``EDIT_KEYS`` values of a request as ``GenerationSpec`` stores them (JSON)."""
    stored = dict(edits)
    for key in ("image", "mask"):
        if key in stored:
            stored[key] = image_digest(stored[key])
    if "hires" in stored:
        stored["hires"] = dataclasses.asdict(stored["hires"])
    return stored


def build_spec(values: dict[str, Any], fields: dict[str, str], limits: ServeConfig, pipe: Any,
               planner: VramPlanner | None = None) -> GenerationSpec:  # fmt: skip
    """The server's limits on ``values`` (our keywords; None: the model's default), then the pipeline's check."""

    def name(key: str) -> str:
        return fields.get(key, key)

    prompt = _text(name("prompt"), values.get("prompt"), limits.max_prompt_chars, required=True)
    negative = _text(name("negative_prompt"), values.get("negative_prompt"), limits.max_prompt_chars) or None
    n = _integer(name("n"), values.get("n", 1), 1, limits.max_batch, "the server's --max-batch")
    if values.get("steps") is not None:
        _integer(name("steps"), values["steps"], 1, limits.max_steps, "the server's --max-steps")
    scale = values.get("guidance_scale")
    lo, hi = limits.guidance_range
    if scale is not None and (not is_number(scale) or not lo <= scale <= hi):
        raise invalid(name("guidance_scale"), scale, f"expected a number from {lo:g} to {hi:g}")
    edits = {key: values[key] for key in PASSED_KEYS if values.get(key) is not None}
    width, height = _size(fields, values, limits, pipe)
    if "image" in edits:  # without width and height the output has the image's size, checked once resolved
        width, height = values.get("width"), values.get("height")
    request = Request(
        prompt, negative_prompt=negative, num_images=n, steps=values.get("steps"), sampler=values.get("sampler"),
        guidance_scale=scale, seed=values.get("seed"), width=width, height=height, spacing=values.get("spacing"),
        loras=values.get("loras"), prompt_syntax=values.get("prompt_syntax"), **edits,
    )  # fmt: skip
    try:
        resolved = resolve_request(pipe, request)
    except ValueError as error:  # "name=value is not allowed; ..." re-labelled with the API's field
        message = str(error)
        key = message.split("=", 1)[0]
        param = fields.get({"num_images": "n"}.get(key, key), key)
        # the bodies make ``loras`` a mapping of bounded numbers: what the pipeline refuses of it as a whole is a
        # name this server does not have (400, as a size the model does not declare), not a malformed value
        status, code = (400, "unknown_lora") if key == "loras" else (422, "invalid_value")
        raise ApiError(status, f"{param}{message[len(key) :]}", param=param, code=code) from None
    spec = dataclasses.replace(GenerationSpec.of(resolved), **_stored_edits(edits))
    _resolved_pixels(spec, fields, values, limits)
    _declared_size(spec, fields, limits, pipe)
    if planner is not None:
        check_fits(spec, planner, fields)
    return spec


def check_fits(spec: GenerationSpec, planner: VramPlanner, fields: dict[str, str]) -> None:
    """413 when the request cannot run even alone within the VRAM budget (at its largest pass's size)."""
    width, height = spec.peak_size
    fits = planner.max_batch(width, height)
    if spec.n <= fits:
        return
    need = planner.estimate(spec.n, width, height)
    what = f"{fields.get('n', 'n')}={spec.n} at {width}x{height}"
    advice = f"at this size at most {fields.get('n', 'n')}={fits} fits" if fits else "ask for a smaller size"
    message = (
        f"{what} needs an estimated {need.describe()}, over the server's VRAM budget of "
        f"{planner.budget / GIB:.3g} GiB; {advice}"
    )
    raise ApiError(413, message, param=fields.get("n", "n"), code="too_large_for_vram_budget")


def _size(fields: dict[str, str], values: dict[str, Any], limits: ServeConfig, pipe: Any) -> tuple[int, int]:
    """(width, height), the model's own size when the request gives none, within the server's pixels."""
    width, height = (_or(values.get(k), d) for k, d in zip(("width", "height"), pipe.default_size, strict=True))
    if is_int(width) and is_int(height) and width * height > limits.max_pixels:  # else the pipeline says what is wrong
        one_field = fields.get("width") == fields.get("height")  # OpenAI's "size": WIDTHxHEIGHT
        allowed = f"{width}x{height} is more than the server's {limits.max_pixels} pixels"
        key = "height" if height > width and values.get("height") is not None else "width"  # the larger side sent
        value = f"{width}x{height}" if one_field else height if key == "height" else width
        raise invalid(fields.get(key, key), value, allowed)
    return width, height


def _resolved_pixels(spec: GenerationSpec, fields: dict[str, str], values: dict[str, Any], limits: ServeConfig) -> None:
    """The server's pixels for what ``_size`` could not see before resolving: the size an input image gives, and the
    hires fix's upscaled size (the model's declared sizes do not bound it: going past them is what it is for)."""
    if spec.width * spec.height > limits.max_pixels:
        param = fields.get("image", "image")
        raise invalid(param, f"{spec.width}x{spec.height} image", f"more than the server's {limits.max_pixels} pixels; "
                      "pass a smaller width and height")  # fmt: skip
    width, height = spec.peak_size
    if width * height > limits.max_pixels:
        hires = values["hires"]
        key, value = ("hires.width", hires.width) if hires.width or hires.height else ("hires.scale", hires.scale)
        if key == "hires.width" and not hires.width:
            key, value = "hires.height", hires.height
        raise invalid(fields.get(key, key), value, f"it upscales {spec.width}x{spec.height} to {width}x{height}, "
                      f"more than the server's {limits.max_pixels} pixels")  # fmt: skip


def _declared_size(spec: GenerationSpec, fields: dict[str, str], limits: ServeConfig, pipe: Any) -> None:
    """400 for a size the model does not declare (``pipeline.json`` "sizes"), unless the server allows any size."""
    sizes = pipe.config.sizes
    if sizes is None or limits.any_size or (spec.width, spec.height) in sizes:
        return
    param = fields.get("width", "width")
    shown = f"{spec.width}x{spec.height}" if param == fields.get("height") else spec.width
    listed = ", ".join(f"{w}x{h}" for w, h in sizes)
    raise ApiError(
        400, f"{param}={shown} is not allowed; this model supports {listed} (other sizes only on a server "
        "started with --any-size)", param=param, code="unsupported_size",
    )  # fmt: skip


def _text(param: str, value: Any, limit: int, required: bool = False) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise invalid(param, value, "expected a string")
    if len(value) > limit:
        raise invalid(param, f"{value[:40]}...", f"it has {len(value)} characters, at most {limit}")
    return value


def _integer(param: str, value: Any, lo: int, hi: int, why: str) -> int:
    if not is_int(value) or not lo <= value <= hi:
        raise invalid(param, value, f"expected an integer from {lo} to {hi} ({why})")
    return value


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value
