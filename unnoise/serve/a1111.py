"""AUTOMATIC1111's web API (``/sdapi/v1``): the surface its clients use, the ``webuiapi`` package among them.

Generation (txt2img with the hires fix, img2img, inpainting) goes through ``build_spec`` and the engine as every
request does: an ``n_iter`` request is ``n_iter`` jobs with seeds counting on, batched with compatible ones. Field
names, defaults and response shapes are AUTOMATIC1111's (modules/api/models.py and api.py): ``info`` is a JSON
string, ``parameters`` the request as read. A field this server does not implement is accepted at its neutral value
only (``NEUTRAL``), so that a client's defaults pass and nothing a client asks for is silently dropped. Progress,
interrupt and skip act on this API's running jobs (``Engine.progress``, ``interrupt``, ``skip``); the models of
``--model-dir`` are listed and switched with AUTOMATIC1111's titles, ``name [sha256[:10]]``.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import io
import json
import os
import re
import time
from pathlib import Path
from typing import Annotated, Any

import torch
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from unnoise.core.samplers import SAMPLERS
from unnoise.core.schedules import SPACINGS
from unnoise.files import file_sha256
from unnoise.pipeline.folders import model_weights_file
from unnoise.pipeline.hires import A1111_UPSCALERS, UPSCALERS, Hires
from unnoise.pipeline.images import INPAINTING_FILLS, RESIZE_MODES
from unnoise.pipeline.inputs import SEED_LIMIT
from unnoise.pipeline.loading import SINGLE_FILE_SUFFIXES
from unnoise.pipeline.png import A1111_SAMPLERS, A1111_SCHEDULES, split_parameters
from unnoise.pipeline.prompts import extract_loras
from unnoise.serve.engine import Engine
from unnoise.serve.routes import job_headers, lora_file_hash, raise_failed, request_spec, wait_for_jobs
from unnoise.serve.schemas import LORAS_ADAPTER, Images, Side, Steps
from unnoise.serve.validation import FIELDS_NATIVE, ApiError, GenerationSpec, decode_image, invalid

router = APIRouter()
API = "a1111"  # the engine's name for this API's jobs (interrupt and skip stop only these)
STOPPED = ("interrupted", "skipped")  # jobs that end so answer 200 with the images made before, as AUTOMATIC1111
# AUTOMATIC1111 resizes with PIL's Lanczos when the hires upscaler is "None" (modules/images.py resize_image).
HIRES_UPSCALERS = {**A1111_UPSCALERS, "None": "lanczos"}

Strength = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
SeedOrRandom = Annotated[int, Field(ge=-1, le=SEED_LIMIT - 1, description="-1: a random one")]
Pixels = Annotated[int, Field(ge=-1, le=2**31 - 1)]


class A1111Request(BaseModel):
    """The fields txt2img and img2img share; None means the model's default."""

    model_config = ConfigDict(extra="ignore")
    prompt: str = Field("", description="<lora:name:scale> tags in it select LoRA adapters (GET /sdapi/v1/loras)")
    negative_prompt: str | None = ""
    steps: Steps | None = None
    cfg_scale: float | None = None
    sampler_name: str | None = None
    sampler_index: str | None = None  # older clients' name for sampler_name
    scheduler: str | None = None  # "Automatic", "Karras", "Exponential" or one of our spacings
    seed: SeedOrRandom | None = -1
    width: Side | None = None
    height: Side | None = None
    batch_size: Images = 1
    n_iter: Annotated[int, Field(ge=1, description="batches, at most the server's --max-queue")] = 1
    send_images: bool = True
    save_images: bool = False  # every image is kept in the job store (GET /v1/jobs) whatever this says
    override_settings: dict[str, Any] | None = None  # options, accepted when they equal the current ones
    override_settings_restore_afterwards: bool | None = True
    # accepted at their neutral values only (NEUTRAL): this server does not implement them
    styles: list[str] | None = None
    subseed: SeedOrRandom | None = -1
    subseed_strength: float | None = 0
    seed_resize_from_h: Pixels | None = -1
    seed_resize_from_w: Pixels | None = -1
    restore_faces: bool | None = None
    tiling: bool | None = None
    eta: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    script_name: str | None = None
    script_args: list[Any] | None = None
    alwayson_scripts: dict[str, Any] | None = None
    do_not_save_samples: bool | None = None
    do_not_save_grid: bool | None = None


class A1111Txt2ImgRequest(A1111Request):
    """``POST /sdapi/v1/txt2img``; ``enable_hr`` adds the hires fix: a second img2img pass at ``hr_scale`` times the
    size (or ``hr_resize_x`` x ``hr_resize_y``) from the first upscaled by ``hr_upscaler`` (GET
    /sdapi/v1/latent-upscale-modes and /upscalers), ``hr_second_pass_steps`` steps (0: ``steps``) at
    ``denoising_strength``."""

    enable_hr: bool = False
    denoising_strength: Strength | None = None  # the hires fix's; None: 0.7
    hr_scale: Annotated[float, Field(ge=1, le=16, allow_inf_nan=False)] = 2.0
    hr_upscaler: str | None = None  # None: "Latent"
    hr_second_pass_steps: Annotated[int, Field(ge=0, description="0: steps")] = 0
    hr_resize_x: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0
    hr_resize_y: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0
    firstphase_width: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = 0  # neutral only: the old hires fix
    firstphase_height: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = 0
    hr_checkpoint_name: str | None = None  # neutral only: the second pass runs the same model, sampler and prompt
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str | None = ""
    hr_negative_prompt: str | None = ""


class A1111Img2ImgRequest(A1111Request):
    """``POST /sdapi/v1/img2img``: ``init_images`` (one base64 image, a ``data:`` URL prefix allowed) redrawn at
    ``denoising_strength``; with a ``mask`` (white: repaint) it is inpainting. ``resize_mode`` 0 just resize, 1 crop
    and resize, 2 resize and fill, 3 resize the latents; ``inpainting_fill`` 0 fill, 1 original, 2 latent noise,
    3 latent nothing; ``inpaint_full_res``: only the masked region (plus padding), at width x height."""

    init_images: list[str] = Field(min_length=1, max_length=1, description="one base64-encoded image")
    denoising_strength: Strength = 0.75
    resize_mode: Annotated[int, Field(ge=0, le=3)] = 0
    mask: str | None = None
    mask_blur: Annotated[int, Field(ge=0, le=64)] | None = None  # None: 4
    mask_blur_x: Annotated[int, Field(ge=0, le=64)] = 4  # as AUTOMATIC1111, mask_blur sets both when given
    mask_blur_y: Annotated[int, Field(ge=0, le=64)] = 4
    inpainting_fill: Annotated[int, Field(ge=0, le=3)] = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: Annotated[int, Field(ge=0, le=2**15)] = 0
    inpainting_mask_invert: Annotated[int, Field(ge=0, le=1)] = 0
    include_init_images: bool = False
    initial_noise_multiplier: float | None = None  # neutral only
    image_cfg_scale: float | None = None  # instruct-pix2pix models only; others ignore it, as AUTOMATIC1111


# Fields accepted at these values only (None: absent); anything else is a 422 naming the field.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "styles": (None, []), "subseed_strength": (None, 0), "seed_resize_from_h": (None, 0, -1),
    "seed_resize_from_w": (None, 0, -1), "restore_faces": (None, False), "tiling": (None, False),
    "eta": (None, 1.0),  # our ancestral samplers' eta (AUTOMATIC1111's eta_ancestral default)
    "s_churn": (None, 0), "s_tmax": (None, 0), "s_tmin": (None, 0), "s_noise": (None, 1),
    "script_name": (None, ""), "script_args": (None, []), "alwayson_scripts": (None, {}),
    "firstphase_width": (None, 0), "firstphase_height": (None, 0),
    "hr_checkpoint_name": (None, "", "Use same checkpoint"), "hr_sampler_name": (None, "", "Use same sampler"),
    "hr_scheduler": (None, "", "Use same scheduler"), "initial_noise_multiplier": (None, 1),
}  # fmt: skip

A1111_FIELDS = {
    **FIELDS_NATIVE, "n": "batch_size", "guidance_scale": "cfg_scale", "sampler": "sampler_name",
    "spacing": "scheduler", "image": "init_images", "strength": "denoising_strength",
    "mask_invert": "inpainting_mask_invert", "hires": "hr_scale", "hires.scale": "hr_scale",
    "hires.upscaler": "hr_upscaler", "hires.steps": "hr_second_pass_steps", "hires.strength": "denoising_strength",
    "hires.width": "hr_resize_x", "hires.height": "hr_resize_y",
}  # fmt: skip
_A1111_BACK = {v.lower(): k for k, v in A1111_SAMPLERS.items()} | {k: k for k in SAMPLERS}
_SCHEDULES_BACK = {v.lower(): k for k, v in A1111_SCHEDULES.items()} | {k: k for k in SPACINGS}


def a1111_values(body: A1111Request) -> dict[str, Any]:
    """``build_spec`` keywords of the fields txt2img and img2img share."""
    for name, allowed in NEUTRAL.items():
        value = getattr(body, name, None)
        if value not in allowed:
            shown = ", ".join(repr(v) for v in allowed if v is not None)
            raise invalid(name, value, f"this server does not implement it; allowed: {shown} (or leave it out)")
    if isinstance(body, A1111Txt2ImgRequest):
        _same("hr_prompt", body.hr_prompt, body.prompt)
        _same("hr_negative_prompt", body.hr_negative_prompt, body.negative_prompt)
    sampler, spacing = _a1111_sampler(body.sampler_name or body.sampler_index)
    if body.scheduler is not None and body.scheduler.lower() != "automatic":
        if body.scheduler.lower() not in _SCHEDULES_BACK:
            allowed = ", ".join(["Automatic", *A1111_SCHEDULES.values(), *SPACINGS])
            raise invalid("scheduler", body.scheduler, f"allowed: {allowed}")
        spacing = _SCHEDULES_BACK[body.scheduler.lower()]
    _check_lora_tags(body.prompt)
    return dict(
        prompt=body.prompt, negative_prompt=body.negative_prompt or None, n=body.batch_size, width=body.width,
        height=body.height, steps=body.steps, sampler=sampler, spacing=spacing, guidance_scale=body.cfg_scale,
        seed=None if body.seed in (None, -1) else body.seed, prompt_syntax=True,
    )  # fmt: skip


def _same(name: str, value: str | None, prompt: str | None) -> None:
    if value and value != (prompt or ""):
        raise invalid(name, value, "the second pass uses the prompt; allowed: empty or the same text")


def hires_values(body: A1111Txt2ImgRequest) -> dict[str, Any]:
    """The hires fix as ``build_spec``'s ``hires`` (none without ``enable_hr``)."""
    if not body.enable_hr:
        return {}
    name = body.hr_upscaler if body.hr_upscaler is not None else "Latent"
    if name not in HIRES_UPSCALERS:
        raise invalid("hr_upscaler", name, f"allowed: {', '.join(HIRES_UPSCALERS)}")
    strength = {} if body.denoising_strength is None else {"strength": body.denoising_strength}
    hires = Hires(scale=body.hr_scale, upscaler=HIRES_UPSCALERS[name], steps=body.hr_second_pass_steps or None,
                  width=body.hr_resize_x or None, height=body.hr_resize_y or None, **strength)  # fmt: skip
    return {"hires": hires}


def img2img_values(body: A1111Img2ImgRequest) -> dict[str, Any]:
    """The init image and mask decoded, and AUTOMATIC1111's numbered modes as the pipeline's names."""
    values: dict[str, Any] = {
        "image": decode_image("init_images.0", body.init_images[0]),
        "strength": body.denoising_strength,
        "resize_mode": RESIZE_MODES[body.resize_mode],
    }
    if body.mask is None:
        return values
    blur_x, blur_y = (body.mask_blur, body.mask_blur) if body.mask_blur is not None else (body.mask_blur_x,
                                                                                          body.mask_blur_y)  # fmt: skip
    if blur_x != blur_y:
        raise invalid("mask_blur_y", blur_y, f"this server blurs masks alike in x and y; allowed: {blur_x}")
    return values | {
        "mask": decode_image("mask", body.mask), "mask_blur": blur_x, "mask_invert": bool(body.inpainting_mask_invert),
        "inpainting_fill": INPAINTING_FILLS[body.inpainting_fill], "inpaint_full_res": body.inpaint_full_res,
    } | ({"inpaint_full_res_padding": body.inpaint_full_res_padding} if body.inpaint_full_res else {})  # fmt: skip
    # AUTOMATIC1111 ignores the padding of a whole-picture inpaint; the pipeline refuses a padding it cannot apply


def _check_lora_tags(prompt: str) -> None:
    """The server's bounds on the scales of the prompt's ``<lora:name:scale>`` tags, those of the other APIs'
    ``loras`` field (the pipeline reads the tags: AUTOMATIC1111's prompt language, ``prompt_syntax``)."""
    try:
        _, loras = extract_loras(prompt)
    except ValueError as error:
        raise invalid("prompt", prompt[:200], str(error).removeprefix("prompt: ")) from None
    try:
        LORAS_ADAPTER.validate_python(loras)
    except ValidationError as error:
        first = error.errors()[0]
        raise invalid("prompt", f"<lora:{first['loc'][0]}:{first['input']}>", first["msg"]) from None


def _known_lora_tags(prompt: str, available: dict[str, Any]) -> None:
    """400 ``unknown_lora`` for a tag naming a LoRA this server does not have, as for the other APIs' ``loras``."""
    for name in extract_loras(prompt)[1]:
        if name not in available:
            listed = ", ".join(sorted(available)) or "none (the server has no --lora-dir)"
            raise ApiError(400, f"prompt={prompt[:200]!r} is not allowed; its tag names {name!r}, not a known LoRA; "
                           f"available: {listed}", param="prompt", code="unknown_lora")  # fmt: skip


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


# -- generation ------------------------------------------------------------------------------------------------------


@router.post("/sdapi/v1/txt2img")
async def txt2img(body: A1111Txt2ImgRequest, request: Request) -> JSONResponse:
    """AUTOMATIC1111 txt2img: ``n_iter`` batches of ``batch_size``, seeds counting on across them; the hires fix."""
    return await _generate(request, body, a1111_values(body) | hires_values(body))


@router.post("/sdapi/v1/img2img")
async def img2img(body: A1111Img2ImgRequest, request: Request) -> JSONResponse:
    """AUTOMATIC1111 img2img and inpainting."""
    return await _generate(request, body, a1111_values(body) | img2img_values(body))


async def _generate(request: Request, body: A1111Request, values: dict[str, Any]) -> JSONResponse:
    engine: Engine = request.app.state.engine
    limit = request.app.state.config.max_queue
    if not 1 <= body.n_iter <= limit:
        raise invalid("n_iter", body.n_iter, f"expected an integer from 1 to {limit} (the server's --max-queue)")
    _check_overrides(request, body.override_settings)
    engine.require_ready()
    _known_lora_tags(body.prompt, engine.pipe.available_loras())
    first = request_spec(request, values, A1111_FIELDS)
    if first.seed + body.n_iter * first.n > SEED_LIMIT:
        raise invalid("seed", first.seed, "expected seed + n_iter * batch_size <= 2**63")
    specs = [first.reseeded(first.seed + k * first.n) for k in range(body.n_iter)]
    jobs = engine.submit(specs, API)
    await wait_for_jobs(request, jobs)
    raise_failed([job for job in jobs if job.error_code not in STOPPED])
    made = [job for job in jobs if job.status == "succeeded"]
    images = [(seed, params, png) for job in made for seed, params, png in job.images]
    info = _info(body, first, images, engine)
    encoded = [base64.b64encode(png).decode() for _, _, png in images] if body.send_images else []
    parameters = body.model_dump()
    if isinstance(body, A1111Img2ImgRequest) and not body.include_init_images:
        parameters["init_images"] = parameters["mask"] = None
    return JSONResponse({"images": encoded, "parameters": parameters, "info": json.dumps(info)},
                        headers=job_headers(jobs))  # fmt: skip


def _info(body: A1111Request, first: GenerationSpec, images: list[tuple[int, str, bytes]], engine: Engine) -> dict:
    """AUTOMATIC1111's ``info`` (``Processed.js``; sent JSON-encoded): the settings, per image its seed and
    parameters; the prompt as the client wrote it, LoRA tags included."""
    count, negative, pipe = len(images), body.negative_prompt or "", engine.pipe
    hires = first.hires is not None
    strength = first.strength if first.image is not None else first.hires["strength"] if hires else None
    return {
        "prompt": body.prompt, "all_prompts": [body.prompt] * count,
        "negative_prompt": negative, "all_negative_prompts": [negative] * count,
        "seed": first.seed, "all_seeds": [seed for seed, _, _ in images],
        "subseed": -1, "all_subseeds": [-1] * count, "subseed_strength": 0,
        "width": first.width, "height": first.height, "sampler_name": A1111_SAMPLERS.get(first.sampler, first.sampler),
        "cfg_scale": first.guidance_scale, "steps": first.steps, "batch_size": first.n, "restore_faces": False,
        "face_restoration_model": None, "sd_model_name": pipe.name, "sd_model_hash": pipe.model_hash,
        "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": strength, "extra_generation_params": {}, "index_of_first_image": 0,
        "infotexts": [params for _, params, _ in images], "styles": [], "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": pipe.config.text_encoder.clip_skip + 1,
        "is_using_inpainting_conditioning": pipe.unet.config.in_channels != pipe.vae.config.latent_channels,
        "version": "unnoise",
    }  # fmt: skip


# -- progress, interrupt, skip ---------------------------------------------------------------------------------------


@router.get("/sdapi/v1/progress")
def progress(request: Request, skip_current_image: bool = Query(False)) -> dict[str, Any]:
    """The running batch as AUTOMATIC1111 reports its job: ``progress`` (0 to 1; 0 and ``job_count`` 0 when idle),
    ``eta_relative`` (seconds), ``state`` and ``current_image``, a preview of the oldest running job (PNG, base64;
    None until the worker has decoded one, at most one step after it was first asked for)."""
    engine: Engine = request.app.state.engine
    now = time.time()
    state = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
             "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}  # fmt: skip
    run = engine.progress(preview=not skip_current_image)
    if run is None:  # idle, or between two batches: then the queued jobs are still to do
        waiting = engine.waiting()
        state["job_count"] = waiting
        return {"progress": 0.01 if waiting else 0, "eta_relative": 0, "state": state, "current_image": None,
                "textinfo": None}  # fmt: skip
    kind = "img2img" if run.jobs and run.jobs[0].spec.image is not None else "txt2img"
    job_count = run.passes + run.waiting
    state.update(skipped=run.skipped, interrupted=run.interrupted, job=kind, job_count=job_count,
                 job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(run.started)), job_no=run.pass_index,
                 sampling_step=run.step, sampling_steps=run.total or 0)  # fmt: skip
    # AUTOMATIC1111's estimate: 0.01, plus the finished passes and this one's steps, over all passes
    done = 0.01 + run.pass_index / job_count + (run.step / run.total / job_count if run.total else 0)
    elapsed = max(now - run.started, 0.0)
    image = None
    if run.preview is not None and not skip_current_image:
        out = io.BytesIO()
        run.preview.save(out, format="PNG")
        image = base64.b64encode(out.getvalue()).decode()
    return {"progress": min(done, 1.0), "eta_relative": elapsed / done - elapsed, "state": state,
            "current_image": image, "textinfo": None}  # fmt: skip


@router.post("/sdapi/v1/interrupt")
def interrupt(request: Request) -> dict[str, Any]:
    """Stop this API's running jobs at their next sampler step and drop the rest of their requests' batches; their
    requests answer 200 with the images finished before (none when nothing runs)."""
    request.app.state.engine.interrupt(API)
    return {}


@router.post("/sdapi/v1/skip")
def skip(request: Request) -> None:
    """Stop this API's running jobs at their next sampler step; the next batches of their requests still run."""
    request.app.state.engine.skip(API)


# -- models and options ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A model as ``/sd-models`` lists it: ``name`` is its path under ``--model-dir`` (or its own name)."""

    name: str
    path: Path
    sha256: str | None

    @property
    def shorthash(self) -> str | None:
        return None if self.sha256 is None else self.sha256[:10]

    @property
    def title(self) -> str:
        return self.name if self.sha256 is None else f"{self.name} [{self.shorthash}]"

    @property
    def model_name(self) -> str:
        stem = self.name[: -len(self.path.suffix)] if self.path.is_file() else self.name
        return stem.replace("/", "_").replace("\\", "_")

    def aliases(self) -> set[str]:
        return {a for a in (self.title, self.name, self.model_name, self.shorthash, self.sha256) if a}

    def item(self) -> dict[str, Any]:
        return {"title": self.title, "model_name": self.model_name, "hash": self.shorthash, "sha256": self.sha256,
                "filename": str(self.path), "config": None}  # fmt: skip


@functools.lru_cache(maxsize=1024)
def _sha256(path: str, mtime_ns: int, size: int) -> str:
    return file_sha256(path)


def _checkpoint(name: str, path: Path) -> Checkpoint:
    weights = model_weights_file(path)
    digest = None
    if weights is not None:
        stat = weights.stat()
        digest = _sha256(str(weights), stat.st_mtime_ns, stat.st_size)
    return Checkpoint(name, path, digest)


def scan_models(folder: Path) -> list[tuple[str, Path]]:
    """(name, path) of the models under ``folder``: pipeline folders (``pipeline.json`` or ``model_index.json``, not
    looked into) and single files (``.safetensors``), sorted by name."""
    found = []
    for root, dirs, files in os.walk(folder):
        here = Path(root)
        for d in list(dirs):
            if any((here / d / marker).is_file() for marker in ("pipeline.json", "model_index.json")):
                found.append(here / d)
                dirs.remove(d)
        found += [here / f for f in files if Path(f).suffix.lower() == SINGLE_FILE_SUFFIXES[0]]
    return sorted((p.relative_to(folder).as_posix(), p) for p in found)


def checkpoints(request: Request) -> tuple[list[Checkpoint], Checkpoint]:
    """The models of ``--model-dir`` and the one served (listed too when it is not among them)."""
    engine: Engine = request.app.state.engine
    config = request.app.state.config
    listed = [] if config.model_dir is None else scan_models(config.model_dir)
    current_path = Path(engine.model_path).resolve()
    models = [_checkpoint(name, path) for name, path in listed]
    current = next((m for m in models if m.path.resolve() == current_path), None)
    if current is None:
        name = engine.pipe.name if engine.pipe is not None and engine.pipe.name else current_path.name
        current = _checkpoint(name, current_path) if current_path.exists() else Checkpoint(name, current_path, None)
        models.append(current)
    return models, current


@router.get("/sdapi/v1/sd-models")
def sd_models(request: Request) -> list[dict[str, Any]]:
    """The models this server may switch to (``--model-dir``) and the one it serves; the sha256 is of the file that
    names the model (a single file, or a folder's U-Net weights), computed once per version of the file."""
    return [m.item() for m in checkpoints(request)[0]]


@router.post("/sdapi/v1/refresh-checkpoints")
def refresh_checkpoints(request: Request) -> None:
    """Every listing reads ``--model-dir`` again; this one checks that it is still there."""
    folder = request.app.state.config.model_dir
    if folder is not None and not folder.is_dir():
        raise ApiError(500, f"the model folder {folder} is gone", code="model_dir_missing")


@router.get("/sdapi/v1/sd-vae")
def sd_vae() -> list[dict[str, Any]]:
    """No separate VAE files: each model's own VAE runs ("Automatic")."""
    return []


def _options(current: Checkpoint) -> dict[str, Any]:
    return {"sd_model_checkpoint": current.title, "sd_checkpoint_hash": current.sha256, "sd_vae": "Automatic",
            "samples_format": "png"}  # fmt: skip


@router.get("/sdapi/v1/options")
def get_options(request: Request) -> dict[str, Any]:
    """The options this server has: the model served (``sd_model_checkpoint``, its title) and read-only ones."""
    return _options(checkpoints(request)[1])


@router.post("/sdapi/v1/options")
def set_options(body: dict[str, Any], request: Request) -> None:
    """Switch the model (``sd_model_checkpoint``: a title, name or hash of GET /sdapi/v1/sd-models); blocks until the
    jobs queued before it have run and the model is loaded. The other options are accepted when they equal their
    current values (as a client sends back what it read)."""
    engine: Engine = request.app.state.engine
    models, current = checkpoints(request)
    target = current
    if "sd_model_checkpoint" in body:
        target = _find(models, body["sd_model_checkpoint"], "sd_model_checkpoint")
    current_options, target_options = _options(current), _options(target)
    for key, value in body.items():
        if key not in current_options:
            raise invalid(key, value, f"this server has the options {', '.join(current_options)}")
        if value != target_options[key] and value != current_options[key] and key != "sd_model_checkpoint":
            raise invalid(key, value, f"it is read-only here; allowed: {target_options[key]!r}")
    if target.path.resolve() != current.path.resolve():
        engine.switch_model(target.path, target.title)


def _find(models: list[Checkpoint], name: Any, field: str) -> Checkpoint:
    for model in models:
        if isinstance(name, str) and (name in model.aliases() or name.split(" [")[0] == model.name):
            return model
    raise invalid(field, name, f"allowed: {', '.join(m.title for m in models)} (GET /sdapi/v1/sd-models)")


def _check_overrides(request: Request, overrides: dict[str, Any] | None) -> None:
    """``override_settings`` may restate the current options; switching per request is not done (POST options)."""
    if not overrides:
        return
    models, current = checkpoints(request)
    options = _options(current)
    for key, value in overrides.items():
        if key not in options:
            raise invalid(f"override_settings.{key}", value, f"this server has the options {', '.join(options)}")
        same = _find(models, value, f"override_settings.{key}") == current if key == "sd_model_checkpoint" else (
            value == options[key])  # fmt: skip
        if not same:
            raise invalid(f"override_settings.{key}", value, f"allowed: {options[key]!r} (the current value; POST "
                          "/sdapi/v1/options changes it for every request)")  # fmt: skip


@router.get("/sdapi/v1/cmd-flags")
def cmd_flags(request: Request) -> dict[str, Any]:
    """The server's settings (``unnoise serve`` flags; the API keys as a count), with AUTOMATIC1111's names for
    those it has too."""
    config = request.app.state.config
    flags = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    flags["api_keys"], flags["store"] = len(config.api_keys), config.store_shown  # no secrets
    flags = {k: str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v for k, v in flags.items()}
    return flags | {"api": True, "nowebui": False, "ckpt": flags["model"], "ckpt_dir": flags["model_dir"],
                    "lora_dir": flags["lora_dir"], "listen": config.host not in ("127.0.0.1", "localhost"),
                    "port": config.port}  # fmt: skip


# -- samplers, schedulers, upscalers ---------------------------------------------------------------------------------


@router.get("/sdapi/v1/samplers")
def samplers() -> list[dict[str, Any]]:
    """AUTOMATIC1111 sampler list: its names where it has one, with ours as aliases."""
    return [{"name": A1111_SAMPLERS.get(s, s), "aliases": [s], "options": {}} for s in SAMPLERS]


@router.get("/sdapi/v1/schedulers")
def schedulers() -> list[dict[str, Any]]:
    """First "Automatic" (the model's own spacing), then our spacings with AUTOMATIC1111's label if it has one."""
    entries = [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1,
                "need_inner_model": False}]  # fmt: skip
    for spacing in SPACINGS:
        label = A1111_SCHEDULES.get(spacing, spacing)
        entries.append({"name": spacing, "label": label, "aliases": None,
                        "default_rho": 7.0 if spacing == "karras" else -1, "need_inner_model": False})  # fmt: skip
    return entries


@router.get("/sdapi/v1/upscalers")
def upscalers() -> list[dict[str, Any]]:
    """The hires fix's pixel upscalers ("None" resizes with Lanczos, as AUTOMATIC1111)."""
    names = ["None", *(u.a1111_name for u in UPSCALERS.values() if u.mode is None)]
    return [{"name": n, "model_name": None, "model_path": None, "model_url": None, "scale": 4.0} for n in names]


@router.get("/sdapi/v1/latent-upscale-modes")
def latent_upscale_modes() -> list[dict[str, Any]]:
    """The hires fix's latent upscalers."""
    return [{"name": u.a1111_name} for u in UPSCALERS.values() if u.mode is not None]


# -- LoRAs, PNG info, the rest ---------------------------------------------------------------------------------------


@router.get("/sdapi/v1/loras")
def loras(request: Request) -> list[dict[str, Any]]:
    """The LoRA files a prompt may name with ``<lora:name:scale>`` (``--lora-dir``), with their safetensors
    metadata (kohya's ``ss_*`` training fields) as AUTOMATIC1111 lists them."""
    from safetensors import safe_open

    engine: Engine = request.app.state.engine
    engine.require_ready()
    out = []
    for name, path in engine.pipe.available_loras().items():
        metadata: dict[str, Any] = {}
        if path is not None and Path(path).suffix == ".safetensors":
            with safe_open(str(path), "pt") as f:
                metadata = f.metadata() or {}
        stat = Path(path).stat() if path is not None else None
        digest = lora_file_hash(str(path), stat.st_mtime_ns, stat.st_size) if stat is not None else None
        out.append({"name": name, "alias": name, "path": str(path), "metadata": metadata, "hash": digest})
    return out


@router.post("/sdapi/v1/refresh-loras")
def refresh_loras(request: Request) -> None:
    """Every listing reads ``--lora-dir`` again (and a request loads a file the first time it names it)."""
    request.app.state.engine.require_ready()


class PNGInfoRequest(BaseModel):
    image: str = Field(description="a base64-encoded image (a data: URL prefix allowed)")


@router.post("/sdapi/v1/png-info")
def png_info(body: PNGInfoRequest) -> dict[str, Any]:
    """An image's ``parameters`` text (``info``), its fields as AUTOMATIC1111 parses them (``parameters``: Prompt,
    Negative prompt, then each "Key: value" of the last line, Size as Size-1 and Size-2) and its other text chunks
    (``items``)."""
    image = decode_image("image", body.image.strip())
    text = image.info.get("parameters")
    items = {k: v for k, v in image.info.items() if k != "parameters" and isinstance(v, str)}
    if not isinstance(text, str):
        return {"info": "", "items": items, "parameters": {}}
    return {"info": text, "items": items, "parameters": infotext_fields(text)}


def infotext_fields(text: str) -> dict[str, Any]:
    """The fields of AUTOMATIC1111-format parameters by their labels, values as written (quoted ones unquoted)."""
    prompt, negative, pairs = split_parameters(text)
    fields: dict[str, Any] = {"Prompt": prompt, "Negative prompt": negative or ""}
    for label, value in pairs:
        size = re.fullmatch(r"(\d+)x(\d+)", value) if label in ("Size", "Hires resize") else None
        if size is not None:
            fields[f"{label}-1"], fields[f"{label}-2"] = size[1], size[2]
        else:
            fields[label] = value
    return fields


@router.get("/sdapi/v1/embeddings")
def embeddings() -> dict[str, Any]:
    """Textual-inversion embeddings: none are loaded by this server."""
    return {"loaded": {}, "skipped": {}}


@router.get("/sdapi/v1/scripts")
def scripts() -> dict[str, list[str]]:
    """No AUTOMATIC1111 scripts or extensions (clients ask, to know which of them they may use)."""
    return {"txt2img": [], "img2img": []}


@router.get("/sdapi/v1/memory")
def memory() -> dict[str, Any]:
    """RAM (this process's resident set as ``used``) and, on CUDA, the allocator's figures, in AUTOMATIC1111's
    shape."""
    page = os.sysconf("SC_PAGE_SIZE")
    total = page * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[1]) * page
        ram: dict[str, Any] = {"free": total - used, "used": used, "total": total}
    except OSError as error:
        ram = {"error": str(error)}
    if not torch.cuda.is_available():
        return {"ram": ram, "cuda": {"error": "unavailable"}}
    free, size = torch.cuda.mem_get_info()
    s = torch.cuda.memory_stats()

    def pair(key: str) -> dict[str, int]:
        return {"current": s.get(f"{key}.all.current", 0), "peak": s.get(f"{key}.all.peak", 0)}

    cuda = {"system": {"free": free, "used": size - free, "total": size}, "active": pair("active_bytes"),
            "allocated": pair("allocated_bytes"), "reserved": pair("reserved_bytes"),
            "inactive": pair("inactive_split_bytes"),
            "events": {"retries": s.get("num_alloc_retries", 0), "oom": s.get("num_ooms", 0)}}  # fmt: skip
    return {"ram": ram, "cuda": cuda}
