"""Routes: OpenAI Images, AUTOMATIC1111 txt2img, jobs with Server-Sent Events, stored images.

Every generation is a job in the store; the OpenAI and AUTOMATIC1111 routes submit and wait for it (cancelling it
if the client goes away), the jobs routes return at once.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from unnoise.core.samplers import SAMPLERS
from unnoise.models.lora import lora_hash
from unnoise.pipeline.inputs import SEED_LIMIT
from unnoise.pipeline.png import A1111_SAMPLERS
from unnoise.serve.engine import Engine
from unnoise.serve.jobs import Job, job_view
from unnoise.serve.schemas import (
    A1111_FIELDS,
    OPENAI_FIELDS,
    ROW_LIMIT,
    A1111Txt2ImgRequest,
    JobRequest,
    OpenAIImageRequest,
    a1111_values,
    job_values,
    openai_values,
)
from unnoise.serve.store import STATUSES
from unnoise.serve.validation import FIELDS_NATIVE, ApiError, GenerationSpec, build_spec, invalid

router = APIRouter()
LOG = logging.getLogger("unnoise.serve")
KEEP_ALIVE_S = 15.0


def _spec(request: Request, values: dict[str, Any], fields: dict[str, str]) -> GenerationSpec:
    """Validate against the loaded model (503 while it loads), then the VRAM budget, then the prompt filter."""
    engine: Engine = request.app.state.engine
    engine.require_ready()
    spec = build_spec(values, fields, request.app.state.config, engine.pipe, engine.planner)
    reason = engine.refusal(spec.prompt)  # the negative prompt is not judged: it names what to avoid
    if reason is not None:
        raise ApiError(400, f"the prompt was refused by the content filter: {reason}", param=fields["prompt"],
                       code="content_policy_violation")  # fmt: skip
    return spec


async def _wait(request: Request, jobs: list[Job]) -> None:
    """Wait until every job is finished; cancel them if the client disconnects first."""
    engine: Engine = request.app.state.engine
    loop = asyncio.get_running_loop()
    for job in jobs:
        finished = asyncio.Event()
        engine.subscribe(job, lambda event, data, e=finished: event == "done" and loop.call_soon_threadsafe(e.set))
        while not finished.is_set():
            try:
                await asyncio.wait_for(finished.wait(), timeout=1.0)
            except TimeoutError:
                if await request.is_disconnected():
                    for other in jobs:
                        engine.cancel(other.id)
                    return


def _raise_failed(jobs: list[Job]) -> None:
    for job in jobs:
        if job.status != "succeeded":
            status = job.http_status or (499 if job.status == "cancelled" else 500)
            raise ApiError(status, job.error or job.status, code=job.error_code, headers={"X-Job-Id": job.id})


def _headers(jobs: list[Job]) -> dict[str, str]:
    return {"X-Job-Id": ",".join(j.id for j in jobs), "X-Batch-Size": ",".join(str(j.batch_size) for j in jobs)}


# -- OpenAI --------------------------------------------------------------------------------------------------------


@router.post("/v1/images/generations")
async def images_generations(body: OpenAIImageRequest, request: Request) -> JSONResponse:
    """OpenAI Images API: ``{created, data: [{b64_json | url, revised_prompt}]}``."""
    spec = _spec(request, openai_values(body), OPENAI_FIELDS)
    jobs = request.app.state.engine.submit([spec], "openai")
    await _wait(request, jobs)
    _raise_failed(jobs)
    job, base = jobs[0], str(request.base_url).rstrip("/")
    if body.response_format == "b64_json":
        data = [{"b64_json": base64.b64encode(png).decode(), "revised_prompt": None} for _, _, png in job.images]
    else:
        data = [{"url": f"{base}/v1/images/{job.id}/{i}.png", "revised_prompt": None} for i in range(spec.n)]
    return JSONResponse({"created": int(job.created), "data": data}, headers=_headers(jobs))


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    """OpenAI model list: the one model served."""
    engine: Engine = request.app.state.engine
    engine.require_ready()
    entry = {"id": engine.pipe.name, "object": "model", "created": 0, "owned_by": "unnoise"}
    return {"object": "list", "data": [entry]}


@router.get("/v1/loras")
def loras(request: Request) -> dict[str, Any]:
    """The LoRA adapters a request may name in ``loras``: the files of ``--lora-dir`` by stem and those loaded, each
    with its AUTOMATIC1111 short hash (as the PNG's "Lora hashes" records it) and whether it is loaded yet."""
    engine: Engine = request.app.state.engine  # a plain def: FastAPI runs it in a thread pool, as hashing takes time
    engine.require_ready()
    info = engine.pipe.lora_info
    data = []
    for name, path in engine.pipe.available_loras().items():
        if name in info:
            digest = info[name].hash
        else:
            stat = path.stat()
            digest = _file_hash(str(path), stat.st_mtime_ns, stat.st_size)
        data.append({"name": name, "object": "lora", "hash": digest, "loaded": name in info})
    return {"object": "list", "data": data}


@functools.lru_cache(maxsize=1024)
def _file_hash(path: str, mtime_ns: int, size: int) -> str:
    """``lora_hash`` of a file, once per version of it (its modification time and size are part of the key)."""
    return lora_hash(path)


# -- AUTOMATIC1111 -------------------------------------------------------------------------------------------------


@router.post("/sdapi/v1/txt2img")
async def txt2img(body: A1111Txt2ImgRequest, request: Request) -> JSONResponse:
    """AUTOMATIC1111 txt2img: ``n_iter`` batches of ``batch_size``, seeds counting on across them."""
    limit = request.app.state.config.max_queue
    if not 1 <= body.n_iter <= limit:
        raise invalid("n_iter", body.n_iter, f"expected an integer from 1 to {limit} (the server's --max-queue)")
    first = _spec(request, a1111_values(body), A1111_FIELDS)
    if first.seed + body.n_iter * first.n > SEED_LIMIT:
        raise invalid("seed", first.seed, "expected seed + n_iter * batch_size <= 2**63")
    specs = [first.reseeded(first.seed + k * first.n) for k in range(body.n_iter)]
    jobs = request.app.state.engine.submit(specs, "a1111")
    await _wait(request, jobs)
    _raise_failed(jobs)
    images = [(seed, params, png) for job in jobs for seed, params, png in job.images]
    info = _a1111_info(first, body.n_iter, images, request.app.state.engine.pipe)
    encoded = [base64.b64encode(png).decode() for _, _, png in images] if body.send_images else []
    payload = {"images": encoded, "parameters": body.model_dump(), "info": json.dumps(info)}
    return JSONResponse(payload, headers=_headers(jobs))


def _a1111_info(first: GenerationSpec, n_iter: int, images: list[tuple[int, str, bytes]], pipe: Any) -> dict:
    """AUTOMATIC1111's ``info`` (sent JSON-encoded): the settings, and per image its seed and parameters."""
    count, negative = len(images), first.negative_prompt or ""
    return {
        "prompt": first.prompt, "all_prompts": [first.prompt] * count,
        "negative_prompt": negative, "all_negative_prompts": [negative] * count,
        "seed": first.seed, "all_seeds": [seed for seed, _, _ in images],
        "subseed": -1, "all_subseeds": [-1] * count,
        "width": first.width, "height": first.height, "sampler_name": A1111_SAMPLERS.get(first.sampler, first.sampler),
        "cfg_scale": first.guidance_scale, "steps": first.steps, "batch_size": first.n, "n_iter": n_iter,
        "infotexts": [params for _, params, _ in images], "sd_model_name": pipe.name, "sd_model_hash": pipe.model_hash,
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "index_of_first_image": 0,
    }  # fmt: skip


@router.get("/sdapi/v1/samplers")
async def samplers() -> list[dict[str, Any]]:
    """AUTOMATIC1111 sampler list: its names where it has one, with ours as aliases."""
    return [{"name": A1111_SAMPLERS.get(s, s), "aliases": [s], "options": {}} for s in SAMPLERS]


@router.get("/sdapi/v1/sd-models")
async def sd_models(request: Request) -> list[dict[str, Any]]:
    engine: Engine = request.app.state.engine
    engine.require_ready()
    pipe = engine.pipe
    title = f"{pipe.name} [{pipe.model_hash}]"
    config = request.app.state.config
    return [{"title": title, "model_name": pipe.name, "hash": pipe.model_hash, "filename": str(config.model)}]


# -- jobs ----------------------------------------------------------------------------------------------------------


@router.post("/v1/jobs", status_code=202)
async def create_job(body: JobRequest, request: Request) -> JSONResponse:
    """Queue a job and return it at once (202): poll ``GET /v1/jobs/{id}`` or stream its events."""
    spec = _spec(request, job_values(body), FIELDS_NATIVE)
    [job] = request.app.state.engine.submit([spec], "jobs")
    return JSONResponse(job_view(job.record(), str(request.base_url)), status_code=202)


@router.get("/v1/jobs")
async def list_jobs(
    request: Request,
    limit: int = Query(20, ge=1, le=100),
    offset: int = Query(0, ge=0, le=ROW_LIMIT),
    status: str | None = Query(None),
) -> dict[str, Any]:
    """Job history, newest first, with paging."""
    if status is not None and status not in STATUSES:
        raise invalid("status", status, f"allowed: {', '.join(STATUSES)}")
    records, total = request.app.state.store.page(limit, offset, status)
    engine: Engine = request.app.state.engine
    records = [live.record() if (live := engine.live(r["id"])) else r for r in records]
    base = str(request.base_url)
    next_offset = offset + len(records) if offset + len(records) < total else None
    data = [job_view(r, base) for r in records]
    return {
        "object": "list",
        "data": data,
        "total": total,
        "limit": limit,
        "offset": offset,
        "next_offset": next_offset,
    }


def _record(request: Request, job_id: str) -> dict[str, Any]:
    live = request.app.state.engine.live(job_id)
    record = live.record() if live is not None else request.app.state.store.get(job_id)
    if record is None:
        raise ApiError(404, f"job {job_id!r} does not exist", param="id", code="job_not_found")
    return record


@router.get("/v1/jobs/{job_id}")
async def get_job(job_id: str, request: Request) -> dict[str, Any]:
    return job_view(_record(request, job_id), str(request.base_url))


@router.delete("/v1/jobs/{job_id}")
async def cancel_job(job_id: str, request: Request) -> JSONResponse:
    """Cancel: a queued job at once (200), a running one at its next sampler step (202); 409 if it is finished."""
    job = request.app.state.engine.cancel(job_id)
    if job is None:
        record = _record(request, job_id)
        raise ApiError(409, f"job {job_id!r} is already {record['status']}", param="id", code="job_finished")
    return JSONResponse(job_view(job.record(), str(request.base_url)), status_code=200 if job.done else 202)


@router.get("/v1/jobs/{job_id}/events")
async def job_events(job_id: str, request: Request) -> StreamingResponse:
    """Server-Sent Events: ``status``, one ``progress`` per sampler step, then ``done`` with the job."""
    engine: Engine = request.app.state.engine
    base = str(request.base_url)
    job = engine.live(job_id)
    record = _record(request, job_id) if job is None else None
    return StreamingResponse(_events(engine, job, record, base), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip


async def _events(engine: Engine, job: Job | None, record: dict[str, Any] | None, base: str) -> AsyncIterator[str]:
    if job is None:
        yield _sse("done", job_view(record, base))
        return
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()

    def listener(event: str, data: dict[str, Any]) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, (event, data))

    engine.subscribe(job, listener)
    try:
        yield _sse("status", {"status": job.status, "step": job.step, "total": job.spec.steps})
        while True:
            try:
                event, data = await asyncio.wait_for(queue.get(), KEEP_ALIVE_S)
            except TimeoutError:
                yield ": keep-alive\n\n"
                continue
            yield _sse(event, job_view(data, base) if event == "done" else data)
            if event == "done":
                return
    finally:
        engine.unsubscribe(job, listener)


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


@router.get("/v1/images/{job_id}/{index}.png")
async def image(job_id: str, request: Request, index: int = Path(ge=0, le=ROW_LIMIT)) -> Response:
    """A generated image: PNG with its ``parameters`` text chunk."""
    png = request.app.state.store.image(job_id, index)
    if png is None:
        raise ApiError(404, f"job {job_id!r} has no image {index}", param="index", code="image_not_found")
    return Response(png, media_type="image/png")
