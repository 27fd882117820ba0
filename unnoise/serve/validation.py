"""A request's settings, checked against the server's limits and the model: ``GenerationSpec`` or an ``ApiError``.

Every API (OpenAI, AUTOMATIC1111, jobs) turns its body into the same keyword arguments and calls ``build_spec``
with the names its clients know (``n`` / ``batch_size``, ``guidance_scale`` / ``cfg_scale``), so a bad value gets
a 422 that names the field as the client sent it. The pipeline's own check (``resolve_request``) runs last, so
nothing the pipeline would reject gets into the queue.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import secrets
from typing import Any

from unnoise.core.samplers import SAMPLERS
from unnoise.core.schedules import SPACINGS
from unnoise.pipeline.inputs import resolve_request
from unnoise.serve.config import ServeConfig
from unnoise.serve.vram import GIB, VramPlanner

SEED_LIMIT = 2**63  # the pipeline's: seeds seed .. seed + n - 1 must lie below it


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


@dataclasses.dataclass(frozen=True)
class GenerationSpec:
    """One request's validated settings: ``n`` images with seeds ``seed .. seed + n - 1``."""

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

    @property
    def batch_key(self) -> tuple[Any, ...]:
        """Requests with equal keys share one sampler run: same grid, same latent shape, same guidance."""
        return self.width, self.height, self.steps, self.sampler, self.spacing, self.guidance_scale

    def call_arguments(self) -> dict[str, Any]:
        """The keyword arguments of ``Pipeline.__call__`` that generate this request alone."""
        return dict(
            prompt=self.prompt, negative_prompt=self.negative_prompt, num_images=self.n, steps=self.steps,
            sampler=self.sampler, spacing=self.spacing, guidance_scale=self.guidance_scale, seed=self.seed,
            width=self.width, height=self.height,
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationSpec:
        return cls(**data)


# Our keyword -> the field name in each API (for messages); absent: the API has no such field.
FIELDS_NATIVE = {k: k for k in ("prompt", "negative_prompt", "n", "width", "height", "steps", "sampler",
                                "guidance_scale", "seed", "spacing")}  # fmt: skip


def build_spec(values: dict[str, Any], fields: dict[str, str], limits: ServeConfig, pipe: Any,
               planner: VramPlanner | None = None) -> GenerationSpec:  # fmt: skip
    """Check ``values`` (our keywords; None: the model's default) and fill the model's defaults."""

    def name(key: str) -> str:
        return fields.get(key, key)

    defaults = pipe.config.sampling
    prompt = _text(name("prompt"), values.get("prompt"), limits.max_prompt_chars, required=True)
    negative = _text(name("negative_prompt"), values.get("negative_prompt"), limits.max_prompt_chars) or None
    n = _integer(name("n"), values.get("n", 1), 1, limits.max_batch, "the server's --max-batch")
    width, height = _size(fields, values, limits, pipe)
    max_steps = min(limits.max_steps, pipe.num_train_timesteps)
    steps = _integer(name("steps"), _or(values.get("steps"), defaults.steps), 1, max_steps, "the server's limit")
    sampler = _or(values.get("sampler"), defaults.sampler)
    if sampler not in SAMPLERS:
        raise invalid(name("sampler"), sampler, f"allowed: {', '.join(SAMPLERS)}")
    spacing = _or(values.get("spacing"), defaults.spacing)
    if spacing not in SPACINGS:
        raise invalid(name("spacing"), spacing, f"allowed: {', '.join(SPACINGS)}")
    scale = _or(values.get("guidance_scale"), defaults.guidance_scale)
    lo, hi = limits.guidance_range
    if not _is_number(scale) or not lo <= scale <= hi:
        raise invalid(name("guidance_scale"), scale, f"expected a number from {lo:g} to {hi:g}")
    seed = values.get("seed")
    seed = secrets.randbelow(2**32) if seed is None else seed
    if not _is_int(seed) or not 0 <= seed <= SEED_LIMIT - n:
        raise invalid(name("seed"), seed, "expected an integer from 0 to 2**63 - n, or none for a random one")
    spec = GenerationSpec(prompt, negative, n, width, height, steps, sampler, spacing, float(scale), seed)
    _pipeline_check(spec, fields, pipe)
    if planner is not None:
        check_fits(spec, planner, fields)
    return spec


def check_fits(spec: GenerationSpec, planner: VramPlanner, fields: dict[str, str]) -> None:
    """413 when the request cannot run even alone within the VRAM budget."""
    fits = planner.max_batch(spec.width, spec.height)
    if spec.n <= fits:
        return
    need = planner.estimate(spec.n, spec.width, spec.height)
    what = f"{fields.get('n', 'n')}={spec.n} at {spec.width}x{spec.height}"
    advice = f"at this size at most {fields.get('n', 'n')}={fits} fits" if fits else "ask for a smaller size"
    message = (
        f"{what} needs an estimated {need.describe()}, over the server's VRAM budget of "
        f"{planner.budget / GIB:.3g} GiB; {advice}"
    )
    raise ApiError(413, message, param=fields.get("n", "n"), code="too_large_for_vram_budget")


def _pipeline_check(spec: GenerationSpec, fields: dict[str, str], pipe: Any) -> None:
    """The pipeline's validation of the same call; its "name=value" message is re-labelled with the API's field."""
    defaults = {k: p.default for k, p in inspect.signature(type(pipe).__call__).parameters.items() if k != "self"}
    try:
        resolve_request(pipe, {**defaults, **spec.call_arguments()})
    except ValueError as error:
        message = str(error)
        key = message.split("=", 1)[0]
        param = fields.get({"num_images": "n"}.get(key, key), key)
        raise ApiError(422, f"{param}{message[len(key) :]}", param=param, code="invalid_value") from None


def _size(fields: dict[str, str], values: dict[str, Any], limits: ServeConfig, pipe: Any) -> tuple[int, int]:
    factor = pipe.latent_factor
    width, height = (_or(values.get(k), d) for k, d in zip(("width", "height"), pipe.default_size, strict=True))
    one_field = fields.get("width") == fields.get("height")  # OpenAI's "size": WIDTHxHEIGHT
    for key, value in (("width", width), ("height", height)):
        if not _is_int(value) or value < factor or value % factor:
            shown = f"{width}x{height}" if one_field else value
            allowed = f"width and height must be positive multiples of {factor} (this model's latent factor)"
            raise invalid(fields.get(key, key), shown, allowed)
    if width * height > limits.max_pixels:
        shown = f"{width}x{height}" if one_field else width
        allowed = f"{width}x{height} is more than the server's {limits.max_pixels} pixels"
        raise invalid(fields.get("width", "width"), shown, allowed)
    return width, height


def _text(param: str, value: Any, limit: int, required: bool = False) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise invalid(param, value, "expected a string")
    if len(value) > limit:
        raise invalid(param, f"{value[:40]}...", f"it has {len(value)} characters, at most {limit}")
    return value


def _integer(param: str, value: Any, lo: int, hi: int, why: str) -> int:
    if not _is_int(value) or not lo <= value <= hi:
        raise invalid(param, value, f"expected an integer from {lo} to {hi} ({why})")
    return value


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
